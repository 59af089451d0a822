"""The run manifest, ``<run>/manifest.json``: what a run used and produced.

Flow file hash and version, the input SOP Instance UIDs and the sender of the study (from
the fingerprint sensor), then per task: image and the digest actually run, GPU device ids,
exit code, start and end, output files. Tasks of one run may finish at once, on different
hosts: each writes its own part (``manifest.d/<part>.json``, write then rename) and then
rebuilds ``manifest.json`` from all parts under a lock, so no part is ever lost.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from .layout import RunDir

#: The part the fingerprint sensor writes: the run itself (flow, input, sender).
RUN_PART = "run"


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def record(run: RunDir, part: str, data: dict[str, Any]) -> None:
    """Save one part (:data:`RUN_PART` for the run itself, else a task id) and refresh manifest.json."""
    run.manifest_parts.mkdir(parents=True, exist_ok=True)
    _write_atomic(run.manifest_parts / f"{part}.json", data)
    with open(run.manifest_lock, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _write_atomic(run.manifest, assemble(run))


def assemble(run: RunDir) -> dict[str, Any]:
    """manifest.json's content: the run part at the top, tasks under ``tasks``."""
    manifest: dict[str, Any] = {"tasks": {}}
    parts = run.manifest_parts
    for path in sorted(parts.glob("*.json")) if parts.is_dir() else []:
        data = json.loads(path.read_text())
        if path.stem == RUN_PART:
            manifest.update(data)
        else:
            manifest["tasks"][path.stem] = data
    return manifest


def run_part(run: RunDir) -> dict[str, Any]:
    """What the fingerprint sensor recorded of the run ({} before it has)."""
    path = run.manifest_parts / f"{RUN_PART}.json"
    return json.loads(path.read_text()) if path.exists() else {}
