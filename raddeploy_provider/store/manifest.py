"""The run manifest, ``runs/<dag>/<run>/manifest.json``: what a run used and produced.

Flow file hash and version and the input SOP Instance UIDs (from the fingerprint sensor),
then per task: image and the digest actually run, GPU device ids, exit code, start and
end, output files. Tasks of one run may finish at once, on different hosts: each writes
its own ``manifest.d/<part>.json`` (write, then rename) and then rebuilds
``manifest.json`` from all parts under a lock, so no part is ever lost.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

PARTS = "manifest.d"


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def record(run_dir: Path, part: str, data: dict[str, Any]) -> None:
    """Save one part (``run`` for the run itself, else a task id) and refresh manifest.json."""
    parts = run_dir / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    _write_atomic(parts / f"{part}.json", data)
    with open(run_dir / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _write_atomic(run_dir / "manifest.json", assemble(run_dir))


def assemble(run_dir: Path) -> dict[str, Any]:
    """manifest.json's content: the run part at the top, tasks under ``tasks``."""
    parts = run_dir / PARTS
    manifest: dict[str, Any] = {"tasks": {}}
    for path in sorted(parts.glob("*.json")) if parts.is_dir() else []:
        data = json.loads(path.read_text())
        if path.stem == "run":
            manifest.update(data)
        else:
            manifest["tasks"][path.stem] = data
    return manifest


def find_run(runs_root: Path, run_id: str, dag_id: str | None = None) -> list[Path]:
    """Run folders named ``run_id`` (in ``dag_id``, or in any flow)."""
    pattern = f"{dag_id or '*'}/{run_id}"
    return sorted(p for p in runs_root.glob(pattern) if p.is_dir())
