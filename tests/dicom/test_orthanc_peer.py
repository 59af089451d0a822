"""The Orthanc test peer (tests/orthanc.py): DCMTK storescu stores into it, its REST API gives back
the instances, byte for byte; its accepted transfer syntaxes can be restricted."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_factory import make_series
from orthanc import Orthanc
from peers import storescu

pytestmark = pytest.mark.integration


def data_set(raw: bytes) -> bytes:
    """The bytes after the File Meta group (its group length is the first element, at 132)."""
    group_len = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_len:]


def test_stored_instances_come_back_byte_for_byte(orthanc, tmp_path):
    series = make_series(tmp_path / "ct", slices=3)
    done = storescu(orthanc.port, series.files, ae_title=orthanc.ae_title)
    assert done.returncode == 0, done.stderr

    ids = orthanc.instances()
    assert len(ids) == 3
    sent = {data_set(p.read_bytes()) for p in series.files}
    assert {data_set(orthanc.file(i)) for i in ids} == sent
    tags = [orthanc.tags(i) for i in ids]
    assert {t["SeriesInstanceUID"] for t in tags} == {series.series_uid}
    assert sorted(int(t["InstanceNumber"]) for t in tags) == [1, 2, 3]


def test_called_ae_title_is_checked(orthanc, tmp_path):
    series = make_series(tmp_path / "ct", slices=1)
    done = storescu(orthanc.port, series.files, ae_title="SOMEONE_ELSE")
    assert done.returncode != 0
    assert "Called AE Title Not Recognized" in done.stderr
    assert orthanc.instances() == []


def test_accepted_transfer_syntaxes_restrict_what_it_stores(tmp_path):
    peer = Orthanc(tmp_path / "orthanc", ae_title="UNCOMPRESSED",
                   accepted_transfer_syntaxes=[ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    try:
        jpeg2000 = Path(get_testdata_file("JPEG2000.dcm"))
        refused = storescu(peer.port, [jpeg2000], ae_title=peer.ae_title)
        assert refused.returncode != 0
        assert "JPEG 2000" in refused.stderr  # storescu: cannot convert it to what Orthanc accepted
        series = make_series(tmp_path / "ct", slices=1)
        done = storescu(peer.port, series.files, ae_title=peer.ae_title)
        assert done.returncode == 0, done.stderr
        assert len(peer.instances()) == 1
    finally:
        peer.stop()
