"""Run folders: the frozen input of a run, made of hard links to the stored instances.

Hard links cost no copy and keep the run's input unchanged whatever later arrives or is
cleaned up in ``studies/``. Names follow the flow format:
``{Modality}_{SeriesInstanceUID}_{SOPInstanceUID}.dcm``, in folders named by ``layout``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence, Union

from .header import InstanceHeader
from .index import StoredInstance

_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")

#: An indexed instance, or a header just read from a file (``raddeploy match``): both name alike.
Named = Union[StoredInstance, InstanceHeader]


def input_name(inst: Named) -> str:
    modality = _UNSAFE.sub("_", str(inst.tags.get("Modality", "OT"))) or "OT"
    return f"{modality}_{inst.series_uid}_{inst.sop_uid}.dcm"


def _folder(inst: Named, layout: Sequence[str]) -> Path:
    parts = []
    for keyword in layout:
        value = inst.tags.get(keyword, "")
        value = "_".join(value) if isinstance(value, list) else str(value)
        parts.append(_UNSAFE.sub("_", value).strip("._") or "unknown")
    return Path(*parts) if parts else Path()


def input_path(inst: Named, layout: Sequence[str] = ()) -> Path:
    """Where ``inst`` lies in a run's ``input/`` folder, relative to it (no I/O)."""
    return _folder(inst, layout) / input_name(inst)


def snapshot(instances: Sequence[StoredInstance], data_root: Path, dest: Path,
             layout: Sequence[str] = ()) -> list[Path]:
    """Link ``instances`` into ``dest``; idempotent, so a retried sensor does not fail."""
    dest.mkdir(parents=True, exist_ok=True)
    made = []
    for inst in instances:
        target = dest / input_path(inst, layout)
        target.parent.mkdir(parents=True, exist_ok=True)
        source = data_root / inst.path
        if target.exists():
            if os.path.samefile(source, target):
                made.append(target)
                continue
            target.unlink()
        os.link(source, target)
        made.append(target)
    return made
