"""A lean reader of a Part 10 header, for the receive path: bytes in, index tags out.

pydicom's ``dcmread`` costs ~0.8 ms per file whatever the options; walking the elements of
a Little Endian file directly costs a tenth of that. It reads what the index keeps (every
public, text-like top-level element by keyword) and stops at the pixel data. Anything it
is not sure of (big endian, deflate, a character set other than the default, Latin-1 or
UTF-8, an undefined length it cannot skip) raises :class:`Unsupported`, and the caller
reads the file with pydicom instead: the walker is a shortcut, never a second opinion.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import DicomDictionary

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"}
BIG_ENDIAN = "1.2.840.10008.1.2.2"

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
             "UR", "UT"}
_SINGLE_TEXT = {"LT", "ST", "UT", "UR"}  # backslash is text here, not a value separator
_NUMBERS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
_CHARSETS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO 2022 IR 6": "latin-1", "ISO_IR 100": "latin-1",
             "ISO_IR 192": "utf-8"}
_MAX_VALUE = 1024
_UNDEFINED = 0xFFFFFFFF
_HEAD = struct.Struct("<HHI")
_EXPLICIT_SHORT = struct.Struct("<HH2sH")
_EXPLICIT_LONG = struct.Struct("<HH2s2xI")

#: tag -> (VR, keyword) for public elements that have a keyword.
_DICTIONARY = {tag: (entry[0], entry[4]) for tag, entry in DicomDictionary.items() if entry[4]}


class Unsupported(Exception):
    """The walker cannot read this file with certainty; read it with pydicom."""


class NeedMore(Exception):
    """The header continues past the bytes given; call again with more of the file."""


@dataclass
class Walked:
    meta: dict[str, str]  # TransferSyntaxUID, MediaStorageSOPClassUID, MediaStorageSOPInstanceUID
    tags: dict[str, Any]
    pixel_data_at: int | None  # offset of the (7FE0,0010) element header, if any


def _meta(buf: bytes) -> tuple[dict[str, str], int]:
    if len(buf) < 144 or buf[128:132] != b"DICM":
        raise Unsupported("no DICM prefix")
    group, element, vr, length = _EXPLICIT_SHORT.unpack_from(buf, 132)
    if (group, element, vr) != (2, 0, b"UL") or length != 4:
        raise Unsupported("no File Meta group length")
    end = 144 + struct.unpack_from("<I", buf, 140)[0]
    if end > len(buf):
        raise NeedMore()
    meta = {}
    pos = 144
    names = {0x0002: "MediaStorageSOPClassUID", 0x0003: "MediaStorageSOPInstanceUID", 0x0010: "TransferSyntaxUID"}
    while pos < end:
        group, element, vr, length = _EXPLICIT_SHORT.unpack_from(buf, pos)
        if vr in _LONG_VRS:
            length = struct.unpack_from("<I", buf, pos + 8)[0]
            value_at = pos + 12
        else:
            value_at = pos + 8
        if element in names:
            meta[names[element]] = buf[value_at:value_at + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = value_at + length
    return meta, end


def _decode(vr: str, raw: bytes, encoding: str) -> Any:
    if vr in _NUMBERS:
        code = _NUMBERS[vr]
        size = struct.calcsize(code)
        if not raw:
            return ""
        if len(raw) % size:
            raise Unsupported(f"{vr} value of {len(raw)} bytes")
        values = [str(v) for v in struct.unpack(f"<{len(raw) // size}{code}", raw)]
        return values[0] if len(values) == 1 else values
    text = raw.decode(encoding)
    if vr in _SINGLE_TEXT:
        return text.rstrip(" \x00")
    parts = [part.strip(" \x00") for part in text.split("\\")]
    return parts[0] if len(parts) == 1 else parts


def walk(buf: bytes, whole_file: bool = False) -> Walked:
    """Read the header in ``buf`` (the start of a Part 10 file, or all of it: ``whole_file``).

    Raises :class:`NeedMore` when ``buf`` ends before the header does (a file without pixel
    data ends its header only at the end of the file) and :class:`Unsupported` for
    anything to leave to pydicom.
    """
    meta, pos = _meta(buf)
    syntax = meta.get("TransferSyntaxUID", "")
    if syntax in DEFLATED or syntax == BIG_ENDIAN:
        raise Unsupported(f"transfer syntax {syntax}")
    explicit = syntax != IMPLICIT_LE
    encoding = "latin-1"
    tags: dict[str, Any] = {}
    end = len(buf)
    while pos < end:
        if pos + 8 > end:
            raise NeedMore()
        group, element = struct.unpack_from("<HH", buf, pos)
        tag = (group << 16) | element
        if tag == 0x7FE00010:
            return Walked(meta, tags, pos)
        vr, length, value_at = element_header(buf, pos, explicit)
        if not explicit:
            vr = _DICTIONARY.get(tag, ("UN", ""))[0]
        if length == _UNDEFINED:
            if vr not in ("SQ", "UN"):
                raise Unsupported(f"undefined length on ({group:04X},{element:04X})")
            pos = _skip_undefined(buf, value_at, explicit and vr != "UN")  # UN content is implicit VR
            continue
        next_pos = value_at + length
        if group > 0x7FE0:
            return Walked(meta, tags, None)
        entry = _DICTIONARY.get(tag)
        if vr == "UN" and entry is not None:  # a known element sent as UN: its dictionary VR, as pydicom does
            vr = entry[0]
        if vr == "US or SS":  # pixel value tags: signed when the pixels are (PixelRepresentation 1)
            vr = "SS" if tags.get("PixelRepresentation") == "1" else "US"
        if entry is not None and element != 0x0000 and length <= _MAX_VALUE * 4:
            if next_pos > end:
                raise NeedMore()
            raw = buf[value_at:next_pos]
            if tag == 0x00080005:  # SpecificCharacterSet: decode later text with it, or give up
                charset = raw.decode("ascii", "replace").strip(" \x00")
                if charset not in _CHARSETS:
                    raise Unsupported(f"character set {charset!r}")
                encoding = _CHARSETS[charset]
            if vr in _TEXT_VRS or vr in _NUMBERS:
                value = _decode(vr, raw, encoding)
                if isinstance(value, list) or len(value) <= _MAX_VALUE:
                    tags[entry[1]] = value
        pos = next_pos
    if pos > end or not whole_file:
        raise NeedMore()
    return Walked(meta, tags, None)


def element_header(buf: bytes, pos: int, explicit: bool) -> tuple[str, int, int]:
    """(VR as written, or "" when implicit; value length; offset of the value) of the element at ``pos``."""
    if not explicit:
        return "", struct.unpack_from("<I", buf, pos + 4)[0], pos + 8
    vr_bytes = buf[pos + 4:pos + 6]
    if vr_bytes in _LONG_VRS:
        if pos + 12 > len(buf):
            raise NeedMore()
        return vr_bytes.decode("ascii", "replace"), struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
    return vr_bytes.decode("ascii", "replace"), struct.unpack_from("<H", buf, pos + 6)[0], pos + 8


def _skip_undefined(buf: bytes, pos: int, explicit: bool) -> int:
    """Skip a sequence of undefined length: items up to the sequence delimiter (nested ones too)."""
    end = len(buf)
    while True:
        if pos + 8 > end:
            raise NeedMore()
        group, element, length = _HEAD.unpack_from(buf, pos)
        pos += 8
        if (group, element) == (0xFFFE, 0xE0DD):  # sequence delimiter
            return pos
        if (group, element) != (0xFFFE, 0xE000):
            raise Unsupported("unexpected element inside a sequence")
        if length != _UNDEFINED:
            pos += length
            continue
        pos = _skip_item(buf, pos, explicit)


def _skip_item(buf: bytes, pos: int, explicit: bool) -> int:
    """Skip the elements of an item of undefined length, up to its delimiter."""
    end = len(buf)
    while True:
        if pos + 8 > end:
            raise NeedMore()
        group, element = struct.unpack_from("<HH", buf, pos)
        if (group, element) == (0xFFFE, 0xE00D):  # item delimiter
            return pos + 8
        vr, length, value_at = element_header(buf, pos, explicit)
        if length == _UNDEFINED:
            pos = _skip_undefined(buf, value_at, explicit and vr != "UN")
        else:
            pos = value_at + length
