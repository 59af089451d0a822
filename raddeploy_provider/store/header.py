"""Read the header of a stored instance into the index's plain form, without pixel data.

The index keeps every top-level text-like element by keyword so that any trigger keyword can
be matched later without opening the file again. Bulk and binary elements are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue

from .uids import checked_uid

_BINARY_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"}
_MAX_VALUE_CHARS = 1024


@dataclass(frozen=True)
class InstanceHeader:
    """What the store needs to know about one instance; ``tags`` is what triggers match."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    tags: dict[str, Any]

    @property
    def modality(self) -> str:
        return str(self.tags.get("Modality", ""))


def _text(elem: DataElement) -> Any:
    value = elem.value
    if isinstance(value, MultiValue):
        return [str(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return None
    text = str(value)
    return text if len(text) <= _MAX_VALUE_CHARS else None


def read_header(path: Path) -> InstanceHeader:
    """Parse the header of a Part 10 file; raises pydicom errors or InvalidUID on bad data."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    tags: dict[str, Any] = {}
    for elem in ds:
        if elem.VR in _BINARY_VRS or not elem.keyword or elem.tag.group == 0x7FE0:
            continue
        value = _text(elem)
        if value is not None:
            tags[elem.keyword] = value
    meta = ds.file_meta
    return InstanceHeader(
        study_uid=checked_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID"),
        series_uid=checked_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"),
        sop_uid=checked_uid(ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID"), "SOPInstanceUID"),
        sop_class_uid=checked_uid(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID"), "SOPClassUID"),
        transfer_syntax=checked_uid(meta.get("TransferSyntaxUID"), "TransferSyntaxUID"),
        tags=tags,
    )
