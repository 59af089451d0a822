"""Run folders: the frozen input of a run, made of hard links to the stored instances.

Hard links cost no copy and keep the run's input unchanged whatever later arrives or is
cleaned up in ``studies/``. Names follow the flow format:
``{Modality}_{SeriesInstanceUID}_{SOPInstanceUID}.dcm``, in folders named by ``layout``.
Every header value that becomes part of a name goes through :func:`path_component`.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Sequence, Union

from .header import InstanceHeader
from .index import StoredInstance

_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")
#: The longest name part a header value gives (a file name is at most 255 bytes; the input
#: name holds a value and two UIDs of up to 64 characters each).
MAX_COMPONENT = 64
_HASH_CHARS = 8

#: An indexed instance, or a header just read from a file (``raddeploy match``): both name alike.
Named = Union[StoredInstance, InstanceHeader]


def path_component(value: object, fallback: str = "unknown") -> str:
    """A header value as one file or folder name part: the one place a value becomes a name.

    Runs of characters other than ``A-Za-z0-9_.+-`` become ``_``; leading and trailing ``.``
    and ``_`` go (no hidden names, never ``.`` or ``..``); several values are joined by ``_``;
    nothing left: ``fallback``. At most :data:`MAX_COMPONENT` characters: a longer one is cut
    and ends in ``-`` and 8 hex digits of the value's sha256, so values that differ only past
    the cut keep names of their own.
    """
    if isinstance(value, (list, tuple)):
        value = "_".join(str(v) for v in value)
    text = "" if value is None else str(value)
    name = _UNSAFE.sub("_", text).strip("._")
    if len(name) > MAX_COMPONENT:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]
        name = f"{name[:MAX_COMPONENT - _HASH_CHARS - 1]}-{digest}"
    return name or fallback


def input_name(inst: Named) -> str:
    return f"{path_component(inst.tags.get('Modality', ''), 'OT')}_{inst.series_uid}_{inst.sop_uid}.dcm"


def _folder(inst: Named, layout: Sequence[str]) -> Path:
    return Path(*(path_component(inst.tags.get(keyword, "")) for keyword in layout))


def input_path(inst: Named, layout: Sequence[str] = ()) -> Path:
    """Where ``inst`` lies in a run's ``input/`` folder, relative to it (no I/O)."""
    return _folder(inst, layout) / input_name(inst)


def snapshot(instances: Sequence[StoredInstance], data_root: Path, dest: Path,
             layout: Sequence[str] = (), uncompressed: bool = False) -> list[Path]:
    """Link ``instances`` into ``dest``; idempotent, so a retried sensor does not fail.

    ``uncompressed`` (the flow's ``input.transfer_syntax: uncompressed``): an instance received
    in another transfer syntax than the two uncompressed little endian ones is written there as
    a decompressed Explicit VR Little Endian copy (:func:`~raddeploy_provider.dicom.transcode.
    uncompressed_file`; :class:`~raddeploy_provider.dicom.transcode.CannotConvert` names why not),
    so a model without JPEG 2000, JPEG-LS or RLE codecs reads it; the stored file is unchanged.
    """
    from raddeploy_provider.dicom.transcode import UNCOMPRESSED_SYNTAXES, uncompressed_file

    dest.mkdir(parents=True, exist_ok=True)
    made = []
    for inst in instances:
        target = dest / input_path(inst, layout)
        target.parent.mkdir(parents=True, exist_ok=True)
        source = data_root / inst.path
        if uncompressed and inst.transfer_syntax not in UNCOMPRESSED_SYNTAXES:
            uncompressed_file(source, target)  # replaces a copy a failed try left
            made.append(target)
            continue
        if target.exists():
            if os.path.samefile(source, target):
                made.append(target)
                continue
            target.unlink()
        os.link(source, target)
        made.append(target)
    return made
