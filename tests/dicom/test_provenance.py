"""Provenance stamped on results: a Contributing Equipment item that DCMTK reads back."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

from dicom_factory import make_series
from peers import require_tool
from raddeploy_provider import __version__
from raddeploy_provider.dicom.provenance import MANUFACTURER, Provenance, stamp

MADE_BY = Provenance("hn_oars", "1.2", "segment", "registry.local/hn-seg:1.2", "sha256:" + "ab" * 32)


def test_the_item_names_the_flow_the_model_and_the_image_digest(tmp_path):
    path = make_series(tmp_path, slices=1).files[0]
    before = pydicom.dcmread(path)
    assert stamp(path, MADE_BY)
    after = pydicom.dcmread(path)
    (item,) = after.ContributingEquipmentSequence
    assert item.Manufacturer == MANUFACTURER and item.SoftwareVersions == __version__
    assert item.ManufacturerModelName == "hn_oars 1.2"
    assert item.ContributionDescription == (f"Produced by raddeploy-provider {__version__}: flow hn_oars version 1.2, "
                                            "model segment, image registry.local/hn-seg:1.2 (sha256:" + "ab" * 32 + ")")
    code = item.PurposeOfReferenceCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("109102", "DCM", "Processing Equipment")
    # Everything else is as the model wrote it.
    del after.ContributingEquipmentSequence
    assert after == before and after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    dump = subprocess.run([require_tool("dcmdump"), "+P", "0018,a001", str(path)], capture_output=True, text=True)
    assert dump.returncode == 0 and "ContributingEquipmentSequence" in dump.stdout


def test_stamping_twice_changes_nothing_and_keeps_the_models_own_items(tmp_path):
    path = make_series(tmp_path, slices=1).files[0]
    ds = pydicom.dcmread(path)
    own = pydicom.Dataset()
    own.Manufacturer = "Model Vendor"
    ds.ContributingEquipmentSequence = [own]
    ds.save_as(path, enforce_file_format=True)
    assert stamp(path, MADE_BY)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert not stamp(path, MADE_BY)  # a retry of the same model: byte-identical
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert [i.Manufacturer for i in pydicom.dcmread(path).ContributingEquipmentSequence] == ["Model Vendor", MANUFACTURER]


def test_compressed_pixel_data_is_copied_not_decoded(tmp_path):
    path = tmp_path / "j2k.dcm"
    shutil.copy(get_testdata_file("JPEG2000.dcm"), path)
    original = pydicom.dcmread(path)
    stamp(path, MADE_BY)
    after = pydicom.dcmread(path)
    assert after.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert after.PixelData == original.PixelData  # the same encapsulated bytes
    assert np.array_equal(after.pixel_array, original.pixel_array)
