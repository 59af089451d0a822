"""Converting compressed and other-syntax files to an uncompressed one, on pydicom's own test files.

Each converted data set is wrapped in a File Meta group and read back: pixels as pydicom (or,
where pydicom cannot, DCMTK) decodes the original, every other element unchanged, DCMTK's
dcmdump reads it cleanly; lossless ones give the bytes of the uncompressed reference file.
"""

from __future__ import annotations

import subprocess
import warnings
from io import BytesIO
from pathlib import Path

import numpy
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filereader import data_element_generator
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGExtended12Bit,
    JPEGLossless,
)

from peers import DCMTK_ENV, require_tool
from raddeploy_provider.dicom.dimse import file_meta
from raddeploy_provider.dicom.transcode import CannotConvert, uncompressed

# pydicom's test files carry made-up UIDs (rtdose*) that pydicom warns about when reading them
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

#: pydicom test file -> the Photometric Interpretation after conversion
CASES = {
    "JPEG2000.dcm": "MONOCHROME2",  # JPEG 2000 (lossy allowed)
    "MR_small_jp2klossless.dcm": "MONOCHROME2",  # JPEG 2000 lossless
    "GDCMJ2K_TextGBR.dcm": "RGB",  # JPEG 2000 lossless, YBR_RCT
    "J2K_pixelrep_mismatch.dcm": "MONOCHROME2",  # signed J2K, header unsigned: gdcm path fails, openjpeg's works
    "MR_small_jpeg_ls_lossless.dcm": "MONOCHROME2",  # JPEG-LS lossless
    "JPEGLSNearLossless_16.dcm": "MONOCHROME2",  # JPEG-LS near-lossless (lossy)
    "SC_rgb_jls_lossy_line.dcm": "RGB",
    "SC_rgb_jpeg_dcmtk.dcm": "RGB",  # JPEG baseline, YBR_FULL
    "SC_rgb_dcmtk_+eb+cy+np.dcm": "RGB",  # JPEG baseline, YBR_FULL_422
    "SC_rgb_jpeg_gdcm.dcm": "RGB",  # JPEG lossless SV1
    "JPGExtended.dcm": "MONOCHROME2",  # JPEG extended, 12-bit
    "MR_small_RLE.dcm": "MONOCHROME2",
    "SC_rgb_rle_2frame.dcm": "RGB",  # RLE, colour, two frames
    "rtdose_rle.dcm": "MONOCHROME2",  # RLE, 32-bit, 15 frames
    "CT_small.dcm": "MONOCHROME2",  # Explicit VR Little Endian already
    "MR_small_implicit.dcm": "MONOCHROME2",
    "MR_small_bigendian.dcm": "MONOCHROME2",
    "SC_rgb_small_odd_big_endian.dcm": "RGB",  # big endian, 8-bit, odd sizes
    "rtdose_expb.dcm": "MONOCHROME2",  # big endian, 32-bit, multi-frame
    "image_dfl.dcm": "MONOCHROME2",  # Deflated Explicit VR Little Endian
}

#: compressed or other-syntax file -> the uncompressed file pydicom ships with the same pixels
LOSSLESS = {
    "MR_small_jpeg_ls_lossless.dcm": "MR_small.dcm",
    "MR_small_jp2klossless.dcm": "MR_small.dcm",
    "MR_small_RLE.dcm": "MR_small.dcm",
    "MR_small_bigendian.dcm": "MR_small.dcm",
    "MR_small_expb.dcm": "MR_small.dcm",
    "MR_small_implicit.dcm": "MR_small.dcm",
    "rtdose_rle.dcm": "rtdose.dcm",
    "rtdose_expb.dcm": "rtdose.dcm",
    "liver_expb_1frame.dcm": "liver_1frame.dcm",
    "SC_rgb_small_odd_big_endian.dcm": "SC_rgb_small_odd.dcm",
}

#: elements that decompressing may change (pydicom.pixels.decompress); the rest must be equal
PIXEL_MODULE_CHANGES = {"PixelData", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames"}


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name)
    assert path, f"{name} is not among the installed pydicom's test files"
    return Path(path)


def read_converted(original: Dataset, body: bytes, syntax: str) -> Dataset:
    return dcmread(BytesIO(file_meta(original.SOPClassUID, original.SOPInstanceUID, syntax) + body))


def dcmtk_decompressed(path: Path, tmp_path: Path) -> numpy.ndarray:
    """The pixels DCMTK's dcmdjpeg decodes (pydicom 3.0 gives no plugin for 12-bit JPEG Extended)."""
    out = tmp_path / f"dcmtk-{path.name}"
    subprocess.run([require_tool("dcmdjpeg"), str(path), str(out)], env=DCMTK_ENV, check=True,
                   capture_output=True)
    return dcmread(out).pixel_array


def reference_pixels(path: Path, tmp_path: Path) -> numpy.ndarray:
    original = dcmread(path)
    if original.file_meta.TransferSyntaxUID == JPEGExtended12Bit and original.BitsStored > 8:
        return dcmtk_decompressed(path, tmp_path)
    return original.pixel_array


def dcmdump_clean(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / "converted.dcm"
    path.write_bytes(data)
    done = subprocess.run([require_tool("dcmdump"), "-E", str(path)], env=DCMTK_ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not [line for line in done.stderr.splitlines() if line[:2] in ("E:", "F:", "W:")], done.stderr
    return done.stdout


def top_level_lengths(body: bytes, syntax: str) -> dict[int, int]:
    fp = BytesIO(body)
    return {int(elem.tag): elem.length  # sequences come as DataElements, without a length
            for elem in data_element_generator(fp, syntax == ImplicitVRLittleEndian, True) if hasattr(elem, "length")}


@pytest.mark.parametrize("syntax", SYNTAXES, ids=["explicit", "implicit"])
@pytest.mark.parametrize("name", CASES)
def test_converted_data_set_reads_back_with_the_same_pixels_and_elements(name, syntax, tmp_path):
    path = pydicom_file(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on the test files' oddities
        original = dcmread(path)
        expected = reference_pixels(path, tmp_path)
        body = uncompressed(path, syntax)
        wrapped = file_meta(original.SOPClassUID, original.SOPInstanceUID, syntax) + body
        got = dcmread(BytesIO(wrapped))

    assert got.file_meta.TransferSyntaxUID == syntax
    assert not got["PixelData"].is_undefined_length
    numpy.testing.assert_array_equal(got.pixel_array, expected)
    assert got.PhotometricInterpretation == CASES[name]
    if got.SamplesPerPixel > 1:
        assert got.PlanarConfiguration == 0
    assert got["PixelData"].VR in ("OB", "OW")
    for elem in original:
        if elem.keyword in PIXEL_MODULE_CHANGES or elem.VR in ("OB", "OW", "UN"):
            continue  # raw bytes (byte order) are compared through the pixels and dcmdump
        if elem.tag.is_private and syntax == ImplicitVRLittleEndian:
            continue  # read back without a VR: bytes

        assert got[elem.tag].value == elem.value, f"{elem.tag} {elem.keyword}"
    assert {e.tag for e in original if not e.tag.is_private} == {e.tag for e in got if not e.tag.is_private}
    assert len(body) % 2 == 0
    assert all(n % 2 == 0 or n == 0xFFFFFFFF for n in top_level_lengths(body, syntax).values())
    dump = dcmdump_clean(wrapped, tmp_path)
    used = "Explicit" if syntax == ExplicitVRLittleEndian else "Implicit"
    assert f"# Dicom-Data-Set\n# Used TransferSyntax: Little Endian {used}\n" in dump


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_conversion_gives_the_uncompressed_reference_bytes(name):
    reference = dcmread(pydicom_file(LOSSLESS[name]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = read_converted(reference, uncompressed(pydicom_file(name)), ExplicitVRLittleEndian)
    numpy.testing.assert_array_equal(got.pixel_array, reference.pixel_array)
    assert got.PixelData == reference.PixelData


def test_dcmtk_jpeg_lossless_process_14_and_extended_12_bit(tmp_path):
    """DCMTK encodes MR_small (16-bit) as lossless Process 14 and gets it back bit for bit;
    a 12-bit JPEG Extended one (DCMTK's own encoding) decodes as DCMTK decodes it."""
    mr = pydicom_file("MR_small.dcm")
    lossless = tmp_path / "mr_jpeg_lossless.dcm"
    subprocess.run([require_tool("dcmcjpeg"), "+el", str(mr), str(lossless)], env=DCMTK_ENV, check=True,
                   capture_output=True)
    assert dcmread(lossless).file_meta.TransferSyntaxUID == JPEGLossless  # Process 14, any predictor
    reference = dcmread(mr)
    got = read_converted(reference, uncompressed(lossless), ExplicitVRLittleEndian)
    numpy.testing.assert_array_equal(got.pixel_array, reference.pixel_array)

    twelve = dcmread(mr)
    twelve.PixelData = (reference.pixel_array.astype("<i2") & 0x0FFF).astype("<u2").tobytes()
    twelve.BitsStored, twelve.HighBit, twelve.PixelRepresentation = 12, 11, 0
    source = tmp_path / "mr12.dcm"
    twelve.save_as(source)
    extended = tmp_path / "mr12_extended.dcm"
    subprocess.run([require_tool("dcmcjpeg"), "+ee", str(source), str(extended)], env=DCMTK_ENV, check=True,
                   capture_output=True)
    assert dcmread(extended).file_meta.TransferSyntaxUID == JPEGExtended12Bit
    got = read_converted(twelve, uncompressed(extended), ExplicitVRLittleEndian)
    numpy.testing.assert_array_equal(got.pixel_array, dcmtk_decompressed(extended, tmp_path))


def test_file_in_the_asked_syntax_comes_back_as_it_is():
    path = pydicom_file("CT_small.dcm")
    raw = path.read_bytes()
    meta_end = 132 + 12 + dcmread(path).file_meta.FileMetaInformationGroupLength
    assert uncompressed(path, ExplicitVRLittleEndian) == raw[meta_end:]
    implicit = pydicom_file("MR_small_implicit.dcm")
    raw = implicit.read_bytes()
    meta_end = 132 + 12 + dcmread(implicit).file_meta.FileMetaInformationGroupLength
    assert uncompressed(implicit, ImplicitVRLittleEndian) == raw[meta_end:]


def test_corrupt_jpeg_2000_is_refused_with_the_reason(tmp_path):
    ds = dcmread(pydicom_file("MR_small_jp2klossless.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 2 // 2 * 2]])  # the codestream cut in half
    corrupt = tmp_path / "corrupt_j2k.dcm"
    ds.save_as(corrupt)
    with pytest.raises(CannotConvert) as caught:
        uncompressed(corrupt)
    reason = str(caught.value)
    assert reason.startswith("JPEG 2000 Image Compression (Lossless Only) pixel data cannot be decoded: ")
    assert "pylibjpeg" in reason and "the node accepts only uncompressed syntaxes" in reason
    assert "\n" not in reason


def test_non_dicom_files_are_refused(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_bytes(b"not a DICOM file at all\n" * 20)
    with pytest.raises(CannotConvert, match="not a DICOM Part 10 file"):
        uncompressed(text)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(CannotConvert, match="not a DICOM Part 10 file"):
        uncompressed(empty)
    cut = tmp_path / "cut_meta.dcm"
    cut.write_bytes(pydicom_file("CT_small.dcm").read_bytes()[:150])
    with pytest.raises(CannotConvert, match="File Meta group runs past the end"):
        uncompressed(cut)


def test_unknown_transfer_syntax_and_nested_encapsulated_pixels_are_refused(tmp_path):
    ds = dcmread(pydicom_file("JPEG2000.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.110"  # JPEG XL Lossless: pydicom 3.0 has no decoder
    jpegxl = tmp_path / "jpegxl.dcm"
    ds.save_as(jpegxl)
    with pytest.raises(CannotConvert, match="^JPEG XL Lossless pixel data cannot be decoded: No pixel data decoders"):
        uncompressed(jpegxl)
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.8.498.1"  # someone's private syntax
    private = tmp_path / "private.dcm"
    ds.save_as(private)
    with pytest.raises(CannotConvert, match="unknown to pydicom"):
        uncompressed(private)

    ds = dcmread(pydicom_file("JPEG2000.dcm"))
    icon = Dataset()
    icon.Rows, icon.Columns, icon.BitsAllocated = ds.Rows, ds.Columns, ds.BitsAllocated
    icon.PixelData = ds.PixelData
    icon["PixelData"].VR = "OB"
    icon["PixelData"].is_undefined_length = True
    ds.IconImageSequence = [icon]
    nested = tmp_path / "icon.dcm"
    ds.save_as(nested)
    with pytest.raises(CannotConvert, match="inside a sequence item"):
        uncompressed(nested)


def test_only_little_endian_uncompressed_targets():
    with pytest.raises(ValueError):
        uncompressed(pydicom_file("CT_small.dcm"), ExplicitVRBigEndian)
