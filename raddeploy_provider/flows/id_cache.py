"""Which flow file holds which DAG id, remembered between processes.

An Airflow worker parses the DAG file for every task it starts; with a parsing context it
needs one flow, but finding it means reading every file (~1.5 ms each). After each full
load the DAG ids are saved with each file's size and mtime; a task start then stats the
files and, when nothing changed, loads only its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .loader import flow_files


def _signature(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_mtime_ns, st.st_size]


def save(cache: Path, ids: dict[Path, str]) -> None:
    """Record ``{file: dag_id}`` for every flow file just loaded (write-then-rename)."""
    entries = {}
    for path, dag_id in ids.items():
        try:
            entries[str(path)] = {"dag_id": dag_id, "sig": _signature(path)}
        except FileNotFoundError:
            continue
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, cache)
    except OSError:  # a read-only data dir only costs speed
        pass


def lookup(cache: Path, folder: Path, dag_id: str) -> Path | None:
    """The file that holds ``dag_id``, if the cache is current for every flow file."""
    try:
        entries = json.loads(cache.read_text())
        files = flow_files(folder)
    except (OSError, ValueError):
        return None
    if {str(p) for p in files} != set(entries):
        return None
    found = None
    for path in files:
        entry = entries[str(path)]
        try:
            if entry["sig"] != _signature(path):
                return None
        except FileNotFoundError:
            return None
        if entry["dag_id"] == dag_id:
            found = path
    return found
