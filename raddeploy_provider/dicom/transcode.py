"""Give a Part 10 file's data set in an uncompressed transfer syntax, for a node that accepts no other.

The sender streams a file as it is when the node accepts its transfer syntax; when the node
accepts only Explicit or Implicit VR Little Endian, :func:`uncompressed` gives the data set
(without preamble and File Meta group) re-encoded, compressed pixel data decoded. A file
already in the asked syntax comes back byte for byte. Decoding is pydicom 3's
(:func:`pydicom.pixels.decompress`: YBR_FULL_422 and other YCbCr become RGB, Planar
Configuration 0, Pixel Data native, OB for 8-bit and OW above, padded to an even length; the
SOP Instance UID is kept, as for any transfer syntax change), with BSD/MIT codecs only:

| transfer syntax                                   | decoded by                          |
|---------------------------------------------------|-------------------------------------|
| JPEG Baseline (8-bit), JPEG Extended 8-bit        | python-gdcm                         |
| JPEG Extended 12-bit (monochrome)                 | python-gdcm, called here directly   |
| JPEG Lossless (Process 14, and SV1)               | python-gdcm                         |
| JPEG-LS Lossless and Near-Lossless                | python-gdcm                         |
| JPEG 2000 (lossless and lossy)                    | python-gdcm, else pylibjpeg-openjpeg |
| HTJ2K (all three)                                 | pylibjpeg-openjpeg                  |
| RLE Lossless                                      | pydicom itself, else pylibjpeg-rle  |
| Deflated Explicit VR Little Endian                | pydicom itself (zlib) when reading  |
| Explicit VR Big Endian                            | here: O* values byte-swapped        |

pylibjpeg-libjpeg (GPLv3), pyjpegls and Pillow are deliberately not dependencies: pydicom
names them among the missing plugins in its messages, which is expected. Not convertible
(:class:`CannotConvert`): transfer syntaxes pydicom does not know (JPEG XL, private ones),
corrupt pixel data, files that are not DICOM Part 10, and encapsulated Pixel Data inside a
sequence item (an Icon Image Sequence), which pydicom does not decode.
"""

from __future__ import annotations

import os
import struct
from io import BytesIO
from pathlib import Path

import numpy
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels import decompress, get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGExtended12Bit,
)

__all__ = ["CannotConvert", "uncompressed", "uncompressed_file", "UNCOMPRESSED_SYNTAXES"]

_TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: What a reader without codecs reads as is: the two uncompressed little endian syntaxes.
UNCOMPRESSED_SYNTAXES = frozenset(_TARGETS)
_UNCOMPRESSED = "the node accepts only uncompressed syntaxes"
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
# Bytes per value of the VRs whose values are raw bytes in pydicom, swapped from big endian
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_META = struct.Struct("<HH2s")
# pydicom's words: a prefix before its plugins' messages (which name the plugin), and its
# gdcm plugin's error when GDCM fails (GetBuffer() gives None)
_ALL_FAILED = "Unable to decode as exceptions were raised by all available plugins:"
_GDCM_FAILED = "'NoneType' object has no attribute 'encode'"


class CannotConvert(Exception):
    """The file's data set cannot be given in the asked syntax; str() is the reason, for the send report."""


def uncompressed(path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The data set of the Part 10 file at `path` (WITHOUT the preamble and File Meta group), pixel data
    decompressed when it was compressed, encoded in `transfer_syntax` (Explicit VR Little Endian or Implicit VR Little Endian).

    Raises :class:`CannotConvert` with the reason when that cannot be done, ``ValueError``
    for another `transfer_syntax`, ``OSError`` when the file cannot be read.
    """
    if transfer_syntax not in _TARGETS:
        raise ValueError(f"not an uncompressed little endian transfer syntax: {transfer_syntax}")
    data = Path(path).read_bytes()
    offset, source = _file_meta(data)
    if source == transfer_syntax:
        return data[offset:]
    if source and not UID(source).is_transfer_syntax:
        raise CannotConvert(f"transfer syntax {source} is unknown to pydicom and cannot be decoded; {_UNCOMPRESSED}")
    try:
        ds = dcmread(BytesIO(data))
        ds.walk(lambda _, elem: elem)  # parse every element now, so that a damaged one is reported here
    except Exception as exc:
        raise CannotConvert(f"the file cannot be read as DICOM: {exc}") from exc
    if source == ExplicitVRBigEndian:
        _swap_to_little_endian(ds)
    elif source and UID(source).is_compressed and "PixelData" in ds:
        try:
            _decompress(ds, UID(source), path)
        except Exception as exc:
            reason = " ".join(str(exc).split())  # one line: pydicom lists its plugins' errors on lines
            raise CannotConvert(f"{UID(source).name} pixel data cannot be decoded: {reason}; {_UNCOMPRESSED}") from exc
        for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):  # for encapsulated data only
            ds.pop(keyword, None)
    _refuse_nested_encapsulated(ds)
    out = DicomBytesIO()
    out.is_little_endian = True
    out.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    try:
        write_dataset(out, ds)
    except Exception as exc:
        raise CannotConvert(f"the data set cannot be encoded in {UID(transfer_syntax).name}: {exc}") from exc
    return out.getvalue()


def uncompressed_file(source: Path, target: Path) -> None:
    """Write ``source`` to ``target`` as a Part 10 file in Explicit VR Little Endian (pixel data
    decompressed, File Meta copied with the new Transfer Syntax UID), through a temporary file
    in the same folder, so ``target`` is whole or absent. :class:`CannotConvert` as
    :func:`uncompressed` raises it."""
    try:
        data = uncompressed(source, ExplicitVRLittleEndian)
    except CannotConvert as exc:  # said of a node; here it is the model's input
        raise CannotConvert(str(exc).removesuffix(f"; {_UNCOMPRESSED}")) from None
    try:
        meta = read_file_meta_info(source)
    except Exception as exc:
        raise CannotConvert(f"the File Meta group cannot be read: {exc}") from exc
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_file_meta_info(out, meta, enforce_standard=True)
    partial = target.with_name(f".{target.name}.partial")
    with open(partial, "wb") as fp:
        fp.write(b"\x00" * 128 + b"DICM" + out.getvalue() + data)
    os.replace(partial, target)


def _decompress(ds: Dataset, syntax: UID, path: Path) -> None:
    """Decode the Pixel Data in place, trying each installed plugin in turn.

    pydicom gives up after its first plugin when the error comes after decoding (pydicom
    3.0.2 fails a signed JPEG 2000 whose header says unsigned with gdcm, "output array is
    read-only"; pylibjpeg-openjpeg then decodes it).
    """
    if syntax == JPEGExtended12Bit and ds.get("BitsStored", 8) > 8:
        return _decompress_jpeg12(ds, path)
    errors = []
    for plugin in get_decoder(syntax).available_plugins or ("",):  # none: decompress() names what is missing
        try:
            decompress(ds, as_rgb=True, generate_instance_uid=False, decoding_plugin=plugin)
            return
        except Exception as exc:
            errors.append(str(exc).replace(_ALL_FAILED, "").replace(_GDCM_FAILED, "GDCM could not decode it"))
    raise ValueError("; ".join(errors))


def _decompress_jpeg12(ds: Dataset, path: Path) -> None:
    """12-bit JPEG Extended, which pydicom 3.0 does not hand to GDCM (for a bug of old GDCM
    versions; GDCM 3.2 decodes it as DCMTK's dcmdjpeg does). GDCM reads the file itself, and
    prints "Unsupported JPEG data precision 12" on stderr before it retries with its 12-bit
    decoder (python-gdcm issue #35): harmless."""
    import gdcm

    if ds.get("SamplesPerPixel", 1) != 1:
        raise ValueError("12-bit JPEG Extended with more than one sample per pixel is not supported")
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise ValueError("GDCM cannot read the file")
    pixels = reader.GetImage().GetBuffer()  # a str (surrogate-escaped bytes), None when GDCM fails
    if pixels is None:
        raise ValueError("GDCM could not decode it")
    pixels = pixels.encode("utf-8", "surrogateescape")
    expected = ds.Rows * ds.Columns * int(ds.get("NumberOfFrames", 1) or 1) * 2
    if len(pixels) != expected:
        raise ValueError(f"GDCM decoded {len(pixels)} bytes, {expected} expected")
    ds.PixelData = pixels
    ds["PixelData"].VR = "OW"
    ds["PixelData"].is_undefined_length = False
    ds.BitsAllocated = 16
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def _file_meta(data: bytes) -> tuple[int, str | None]:
    """Where the data set starts after the File Meta group, and the group's Transfer Syntax UID."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise CannotConvert("not a DICOM Part 10 file: no 'DICM' prefix after the 128-byte preamble")
    pos, syntax = 132, None
    truncated = CannotConvert("not a DICOM Part 10 file: its File Meta group runs past the end of the file")
    while pos < len(data):
        if pos + 8 > len(data):
            raise truncated
        group, element, vr = _META.unpack_from(data, pos)
        if group != 0x0002:
            break
        if vr in _LONG_VRS:
            if pos + 12 > len(data):
                raise truncated
            head, length = 12, struct.unpack_from("<I", data, pos + 8)[0]
        else:
            head, length = 8, struct.unpack_from("<H", data, pos + 6)[0]
        if element == 0x0010:
            syntax = data[pos + head:pos + head + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos += head + length
        if pos > len(data):
            raise truncated
    return pos, syntax


def _swap_to_little_endian(ds: Dataset) -> None:
    """Byte-swap the values pydicom keeps as raw bytes (OW, OF, OL, OD, OV), in place.

    Numbers of other VRs are parsed values, written in the new byte order by pydicom. Native
    Pixel Data of 16 bits and more is swapped per pixel, as pydicom reads it.
    """
    def swap(parent: Dataset, elem: DataElement) -> None:
        width = _SWAP_WIDTH.get(elem.VR)
        if elem.tag == 0x7FE00010 and parent.get("BitsAllocated", 0) in (16, 32, 64):
            width = parent.BitsAllocated // 8
        if width and isinstance(elem.value, (bytes, bytearray)) and len(elem.value) % width == 0:
            elem.value = numpy.frombuffer(elem.value, f">u{width}").astype(f"<u{width}").tobytes()

    ds.walk(swap)


def _refuse_nested_encapsulated(ds: Dataset) -> None:
    def check(parent: Dataset, elem: DataElement) -> None:
        if elem.tag == 0x7FE00010 and elem.is_undefined_length and parent is not ds:
            raise CannotConvert("encapsulated Pixel Data inside a sequence item (an icon image?) "
                                f"cannot be decoded; {_UNCOMPRESSED}")

    ds.walk(check)
