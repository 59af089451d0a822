"""read_header refuses a file cut short, whatever its transfer syntax, and accepts it whole."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, RLELossless

from dicom_factory import make_series
from raddeploy_provider.store import StoreError, read_header


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_series(tmp_path_factory.mktemp("h"), slices=1, size=16).files[0]


def implicit_le(ds: pydicom.Dataset, path: Path) -> None:
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)


def explicit_be(ds: pydicom.Dataset, path: Path) -> None:
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # force_encoding: fine for a test file
        dcmwrite(path, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    assert path.read_bytes()[128:132] == b"DICM"


def encapsulated(ds: pydicom.Dataset, path: Path) -> None:
    # the fragments are not real RLE: the store keeps the bytes and never decodes them
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.NumberOfFrames = 3
    ds.PixelData = encapsulate([b"\x01" * 300, b"\x02" * 200, b"\x03" * 100])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def explicit_le(ds: pydicom.Dataset, path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)


def no_pixels(ds: pydicom.Dataset, path: Path) -> None:
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)


WRITERS = [explicit_le, implicit_le, explicit_be, encapsulated]


@pytest.mark.parametrize("writer", WRITERS + [no_pixels])
def test_a_whole_file_reads(tmp_path: Path, source: Path, writer) -> None:
    path = tmp_path / "whole.dcm"
    writer(pydicom.dcmread(source), path)
    header = read_header(path)
    assert header.modality == "CT"
    assert header.transfer_syntax == pydicom.dcmread(path).file_meta.TransferSyntaxUID
    # trailing bytes after the pixel data (padding) are not a cut
    path.write_bytes(path.read_bytes() + b"\x00" * 16)
    assert read_header(path).sop_uid == header.sop_uid


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("cut", [1, 8, 150, 350])
def test_a_file_cut_in_its_pixel_data_is_refused(tmp_path: Path, source: Path, writer, cut: int) -> None:
    path = tmp_path / "cut.dcm"
    writer(pydicom.dcmread(source), path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-cut])
    with pytest.raises(StoreError, match="cut short"):
        read_header(path)


@pytest.mark.parametrize("writer", WRITERS)
def test_a_file_cut_right_after_the_pixel_data_element_header_is_refused(
        tmp_path: Path, source: Path, writer) -> None:
    path = tmp_path / "cut.dcm"
    writer(pydicom.dcmread(source), path)
    with open(path, "rb") as fh:
        pydicom.dcmread(fh, stop_before_pixels=True)
        start = fh.tell()
    path.write_bytes(path.read_bytes()[:start + (8 if writer is implicit_le else 12)])
    with pytest.raises(StoreError, match="cut short"):
        read_header(path)


def test_a_file_cut_in_its_header_is_refused(tmp_path: Path, source: Path) -> None:
    raw = source.read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(raw[:400])  # before the UIDs
    with pytest.raises(StoreError, match="cut short"):  # not "SOPClassUID is missing": it is there, cut
        read_header(path)
