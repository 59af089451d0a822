"""Read the header of a stored instance into the index's plain form, without pixel data.

The index keeps every top-level text-like element by keyword so that any trigger keyword can
be matched later without opening the file again. Bulk and binary elements are left out.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from . import header_walk
from .errors import StoreError
from .uids import checked_uid

if TYPE_CHECKING:  # pydicom is imported where a file needs it: the walker reads most without
    import pydicom
    from pydicom.dataelem import DataElement

_BINARY_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ", "AT"}
_MAX_VALUE_CHARS = 1024
#: Values longer than this (bytes) are never indexed: pydicom leaves them in the file, as the walker does.
_DEFER_SIZE = 4 * _MAX_VALUE_CHARS


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
    from pydicom.multival import MultiValue

    value = elem.value
    if value is None:  # present but empty (numeric VRs read as None): empty text, not "None"
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return [str(v).strip(" \x00") for v in value]
    if isinstance(value, (bytes, bytearray)):
        return None
    text = str(value)
    return text if len(text) <= _MAX_VALUE_CHARS else None


_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UC", b"UR", b"UT"}


def _pydicom_encoding(meta: Any) -> tuple[bool, str] | None:
    """(implicit VR, struct byte order) of a file pydicom read; None: deflated (inflated in
    memory: a cut stream fails there), or a syntax pydicom does not know or none (checked_uid
    reports that)."""
    from pydicom.uid import UID

    if not meta.get("TransferSyntaxUID"):
        return None
    try:
        syntax = UID(meta.get("TransferSyntaxUID"))
        if syntax.is_deflated:
            return None
        return syntax.is_implicit_VR, "<" if syntax.is_little_endian else ">"
    except ValueError:  # a transfer syntax pydicom does not know: leave it to the reader
        return None


def _walked_encoding(walked: header_walk.Walked) -> tuple[bool, str] | None:
    """The encoding the walker read the file in (it reads no deflated or big endian file)."""
    if not walked.meta.get("TransferSyntaxUID"):
        return None
    return walked.meta["TransferSyntaxUID"] == header_walk.IMPLICIT_LE, "<"


def _check_pixel_data_complete(fh: IO[bytes], encoding: tuple[bool, str] | None, size: int) -> None:
    """Raise StoreError if the file ends before the pixel data it declares (a cut transfer).

    pydicom reads a cut file without complaint, and ``stop_before_pixels`` never reaches the
    cut; the pixel data element's own header says how long it is, so check that much only.
    ``fh`` is positioned where the reader stopped: at the pixel data element, or at the end.
    ``encoding``: (implicit VR, byte order) of the data set; None: not ours to judge.
    """
    start = fh.tell()
    if start >= size or encoding is None:
        return
    implicit, endian = encoding
    cut = StoreError(f"the file ends before its pixel data does ({size} bytes): it was cut short; send it again")
    head = fh.read(12)
    if len(head) < 8:
        raise cut
    if implicit:
        length, value_start = struct.unpack(endian + "L", head[4:8])[0], start + 8
    elif head[4:6] in _LONG_VRS:
        if len(head) < 12:
            raise cut
        length, value_start = struct.unpack(endian + "L", head[8:12])[0], start + 12
    else:
        length, value_start = struct.unpack(endian + "H", head[6:8])[0], start + 8
    if length != 0xFFFFFFFF:
        if value_start + length > size:
            raise cut
        return
    pos = value_start  # encapsulated: walk the items (one per frame) up to the delimiter
    while True:
        fh.seek(pos)
        item = fh.read(8)
        if len(item) < 8:
            raise cut
        group, element, length = struct.unpack(endian + "HHL", item)
        if (group, element) != (0xFFFE, 0xE000):  # the delimiter, or not ours to judge
            return
        pos += 8 + length
        if pos > size:
            raise cut


def read_header(path: Path, head: bytes | None = None) -> InstanceHeader:
    """Parse the header of a Part 10 file; raises pydicom errors, InvalidUID or StoreError on bad data.

    The lean walker (:mod:`.header_walk`) reads the common files; pydicom reads the rest.
    ``head``: the file's first bytes, when the caller has them in memory (the receiver does),
    so the common case reads nothing back from disk.
    """
    if head is not None:
        size = os.stat(path).st_size
        walked = _walk_bytes(head, whole_file=len(head) >= size)
        if walked is not None and _pixel_data_fits(head, walked, size):
            return _instance_header(walked.tags, walked.meta)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        walked = _walk(fh, size)
        if walked is not None:
            if walked.pixel_data_at is not None:
                fh.seek(walked.pixel_data_at)
                _check_pixel_data_complete(fh, _walked_encoding(walked), size)
            tags, meta = walked.tags, walked.meta
        else:
            import pydicom

            fh.seek(0)
            try:
                ds = pydicom.dcmread(fh, stop_before_pixels=True, defer_size=_DEFER_SIZE)
                stopped = fh.tell()
                _check_pixel_data_complete(fh, _pydicom_encoding(ds.file_meta), size)
                _check_values_complete(ds, fh, size, read_to_end=stopped >= size)
                tags = _pydicom_tags(ds)
                _check_depth(ds)
            except RecursionError:  # pydicom reads nested sequences recursively
                raise _too_deep() from None
            meta = {k: ds.file_meta.get(k) for k in ("TransferSyntaxUID", "MediaStorageSOPClassUID",
                                                      "MediaStorageSOPInstanceUID")}
    return _instance_header(tags, meta)


def _too_deep() -> StoreError:
    return StoreError(f"sequences nested more than {header_walk.MAX_DEPTH} deep: "
                      "the data set cannot be read safely")


def _check_depth(ds: pydicom.Dataset) -> None:
    """Raise StoreError if sequences nest deeper than the walker allows (the same rule on
    pydicom's path). Iterative, and only sequences are converted (one level at a time)."""
    stack = [(ds, 0)]
    while stack:
        dataset, depth = stack.pop()
        for tag in dataset.keys():
            raw = dataset.get_item(tag, keep_deferred=True)
            vr = raw.VR
            if vr in (None, "UN"):
                vr = header_walk.dictionary_vr(int(tag)) or vr
            if vr != "SQ":
                continue
            if depth + 1 > header_walk.MAX_DEPTH:
                raise _too_deep()
            stack.extend((item, depth + 1) for item in dataset[tag].value)


def _instance_header(tags: dict[str, Any], meta: dict[str, Any]) -> InstanceHeader:
    return InstanceHeader(
        study_uid=checked_uid(tags.get("StudyInstanceUID"), "StudyInstanceUID"),
        series_uid=checked_uid(tags.get("SeriesInstanceUID"), "SeriesInstanceUID"),
        # From the dataset only: the listener's File Meta repeats the C-STORE request, not the data set,
        # and an instance without its own UIDs (Type 1) cannot be sent on or matched later.
        sop_uid=checked_uid(tags.get("SOPInstanceUID"), "SOPInstanceUID"),
        sop_class_uid=checked_uid(tags.get("SOPClassUID"), "SOPClassUID"),
        transfer_syntax=checked_uid(meta.get("TransferSyntaxUID"), "TransferSyntaxUID"),
        tags=tags,
    )


def _walk_bytes(buf: bytes, whole_file: bool) -> header_walk.Walked | None:
    try:
        return header_walk.walk(buf, whole_file=whole_file)
    except (header_walk.NeedMore, header_walk.Unsupported, struct.error, UnicodeDecodeError, ValueError):
        return None


def _pixel_data_fits(head: bytes, walked: header_walk.Walked, size: int) -> bool:
    """True if native pixel data fits the file (checked from ``head``); False: let the file say
    (encapsulated pixel data, or an element header beyond ``head``)."""
    if walked.pixel_data_at is None:
        return True
    if walked.pixel_data_at + 12 > len(head) or walked.meta.get("TransferSyntaxUID") in (None, ""):
        return False
    explicit = walked.meta["TransferSyntaxUID"] != header_walk.IMPLICIT_LE
    _, length, value_at = header_walk.element_header(head, walked.pixel_data_at, explicit)
    if length == 0xFFFFFFFF:
        return False  # encapsulated: its items are walked in the file
    if value_at + length > size:
        raise StoreError(f"the file ends before its pixel data does ({size} bytes): it was cut short; send it again")
    return True


def _walk(fh: IO[bytes], size: int) -> header_walk.Walked | None:
    """The walker's reading of the file; None: use pydicom."""
    buf = fh.read(min(size, 65536))
    whole = len(buf) >= size
    try:
        return header_walk.walk(buf, whole_file=whole)
    except header_walk.NeedMore:
        if whole:
            return None  # cut inside the header: pydicom, then _check_values_complete, say where
    except (header_walk.Unsupported, struct.error, UnicodeDecodeError, ValueError):
        return None
    # The header goes on past what was read (long sequences, a large element before the pixel
    # data): map the file rather than read it, so the values the walker skips stay on disk.
    with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        try:
            return header_walk.walk(mapped, whole_file=True)
        except (header_walk.Unsupported, header_walk.NeedMore, struct.error, UnicodeDecodeError, ValueError):
            return None


def _check_values_complete(ds: pydicom.Dataset, fh: IO[bytes], size: int, read_to_end: bool) -> None:
    """Raise StoreError if the file ends inside a top-level element: pydicom reads a cut value short,
    and drops a cut element header, without a word. ``read_to_end``: no pixel data stopped pydicom.
    """
    from pydicom.dataelem import RawDataElement
    from pydicom.uid import UID

    if UID(ds.file_meta.get("TransferSyntaxUID", "")).is_deflated:
        return  # inflated in memory: a cut stream fails there
    cut = StoreError(f"the file ends inside an element ({size} bytes): it was cut short; send it again")
    last = None
    for tag in ds.keys():
        raw = ds.get_item(tag, keep_deferred=True)
        if not isinstance(raw, RawDataElement) or raw.length == 0xFFFFFFFF:
            last = None
            continue
        if (len(raw.value) if raw.value is not None else size - raw.value_tell) < raw.length:
            raise cut
        last = raw
    if read_to_end and last is not None and last.value_tell + last.length < size:
        fh.seek(last.value_tell + last.length)
        if fh.read(8).strip(b"\x00"):  # zeros: padding; anything else: the start of a cut element
            raise cut


def _pydicom_tags(ds: pydicom.Dataset) -> dict[str, Any]:
    from pydicom.dataelem import RawDataElement

    tags: dict[str, Any] = {}
    for tag in ds.keys():
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            continue  # deferred: longer than any value the index keeps, and left unread
        elem = ds[tag]
        if elem.VR in _BINARY_VRS or not elem.keyword or elem.tag.group == 0x7FE0:
            continue
        value = _text(elem)
        if value is not None:
            tags[elem.keyword] = value
    return tags
