"""A lean reader of a Part 10 header, for the receive path: bytes in, index tags out.

pydicom's ``dcmread`` costs ~0.8 ms per file whatever the options; walking the elements of
a Little Endian file directly costs a tenth of that. It reads what the index keeps (every
public, text-like top-level element by keyword) and stops at the pixel data. Anything it
is not sure of (big endian, deflate, a character set other than the default, Latin-1 or
UTF-8, an undefined length it cannot skip) raises :class:`Unsupported`, and the caller
reads the file with pydicom instead: the walker is a shortcut, never a second opinion.

Sequences are walked (item and element headers, no values), iteratively, to bound their
nesting: deeper than :data:`MAX_DEPTH` is :class:`~.errors.StoreError` (the file is refused:
pydicom and every tool after it would recurse once per level).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from raddeploy_provider.dicom.dictionary import DicomDictionary

from .errors import StoreError

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
#: The deepest nesting of sequences an instance may have (a sequence at the top level is depth 1).
MAX_DEPTH = 64
_HEAD = struct.Struct("<HHI")
_EXPLICIT_SHORT = struct.Struct("<HH2sH")
_EXPLICIT_LONG = struct.Struct("<HH2s2xI")

#: tag -> (VR, keyword) for public elements that have a keyword.
_DICTIONARY = {tag: (entry[0], entry[4]) for tag, entry in DicomDictionary.items() if entry[4]}


def dictionary_vr(tag: int) -> str | None:
    """The VR the DICOM dictionary gives a public element, or None."""
    entry = _DICTIONARY.get(tag)
    return entry[0] if entry else None


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
            pos = skip_sequence(buf, value_at, _UNDEFINED, explicit and vr != "UN")  # UN content is implicit VR
            continue
        next_pos = value_at + length
        if group > 0x7FE0:
            return Walked(meta, tags, None)
        entry = _DICTIONARY.get(tag)
        if vr == "UN" and entry is not None:  # a known element sent as UN: its dictionary VR, as pydicom does
            vr = entry[0]
            if vr == "SQ":
                pos = skip_sequence(buf, value_at, length, False)
                continue
        if vr == "SQ":
            pos = skip_sequence(buf, value_at, length, explicit)
            continue
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


def skip_sequence(buf: bytes, pos: int, length: int, explicit: bool) -> int:
    """Walk the sequence whose value starts at ``pos`` (``length``: its value length, or
    undefined: up to its delimiter) and return the offset just after it.

    Items and their elements are walked by their headers, nested sequences too, without
    recursion; raises :class:`StoreError` when sequences nest deeper than :data:`MAX_DEPTH`.
    An undefined-length element that is not a sequence (encapsulated pixel data, an icon's,
    say) holds fragments: items skipped by their lengths.
    """
    size = len(buf)
    # Open sequences ("S"), items ("I") and fragment lists ("F"): (kind, end or None until a
    # delimiter, explicit VR inside).
    stack: list[tuple[str, int | None, bool]] = [("S", None if length == _UNDEFINED else pos + length, explicit)]
    depth = 1
    while stack:
        kind, end, explicit = stack[-1]
        if end is not None and pos >= end:
            if pos > end:
                raise Unsupported("an item or element runs past the end of its sequence")
            stack.pop()
            depth -= kind == "S"
            continue
        if pos + 8 > size:
            raise NeedMore()
        group, element, item_length = _HEAD.unpack_from(buf, pos)
        if kind != "I":  # a sequence or fragments: items up to the end or the delimiter
            pos += 8
            if (group, element) == (0xFFFE, 0xE0DD) and end is None:  # sequence delimiter
                stack.pop()
                depth -= kind == "S"
            elif (group, element) != (0xFFFE, 0xE000):
                raise Unsupported("unexpected element inside a sequence")
            elif kind == "F":
                if item_length == _UNDEFINED:
                    raise Unsupported("a fragment of undefined length")
                pos += item_length
            else:
                stack.append(("I", None if item_length == _UNDEFINED else pos + item_length, explicit))
            continue
        if (group, element) == (0xFFFE, 0xE00D) and end is None:  # item delimiter
            pos += 8
            stack.pop()
            continue
        written, length, value_at = element_header(buf, pos, explicit)
        known = _DICTIONARY.get((group << 16) | element)
        vr = written if explicit and written != "UN" else (known[0] if known else "UN")
        if length == _UNDEFINED:
            if vr in ("SQ", "UN"):
                stack.append(("S", None, explicit and written != "UN"))  # UN content is implicit VR
                depth += 1
            else:
                stack.append(("F", None, explicit))
        elif vr == "SQ":
            stack.append(("S", value_at + length, explicit and written != "UN"))
            depth += 1
        if depth > MAX_DEPTH:
            raise StoreError(f"sequences nested more than {MAX_DEPTH} deep: the data set cannot be read safely")
        pos = value_at if length == _UNDEFINED or vr == "SQ" else value_at + length
    return pos
