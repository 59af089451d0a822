"""The listener process against DCMTK peers: C-ECHO, storage, index, outbox while Airflow is down.

The ``listener`` fixture (conftest.py) starts ``python -m listener`` with Airflow "down".
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from peers import DCMTK_ENV, partial_files, require_tool, storescu
from postgres import query
from dicom_factory import make_series

pytestmark = pytest.mark.integration


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the File Meta group: what went over the wire, untouched."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    group_len = int.from_bytes(raw[140:144], "little")  # (0002,0000) UL value
    return raw[144 + group_len:]


def test_echo_is_answered(listener):
    done = subprocess.run([require_tool("echoscu"), "-aec", "RADDEPLOY", "127.0.0.1", str(listener["port"])],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_storescu_push_is_stored_indexed_and_queued(listener, tmp_path):
    series = make_series(tmp_path / "ct", slices=5)
    mr = make_series(tmp_path / "mr", modality="MR", slices=2, study_uid=series.study_uid)
    pushed = storescu(listener["port"], series.files + mr.files)
    assert pushed.returncode == 0, pushed.stderr

    study_dir = listener["data"] / "studies" / series.study_uid
    stored = sorted(study_dir.rglob("*.dcm"))
    assert len(stored) == 7
    by_name = {p.name: p for p in stored}
    from pydicom import dcmread
    for source in series.files + mr.files:
        ds = dcmread(source, stop_before_pixels=True)
        target = by_name[f"{ds.SOPInstanceUID}.dcm"]
        assert target.parent.name == ds.SeriesInstanceUID
        assert dataset_bytes(target) == dataset_bytes(source), f"{source.name} not stored byte-identical"
    assert partial_files(listener["data"] / "incoming") == []

    rows = query(listener.index, "SELECT series_uid, tags, calling_ae, size FROM instances")
    assert sorted({(r[0], json.loads(r[1])["Modality"]) for r in rows}) == sorted({(series.series_uid, "CT"),
                                                                                   (mr.series_uid, "MR")})
    assert all(r[2] == "STORESCU" and r[3] > 0 for r in rows)
    assert len(rows) == 7
    # One run for the one matching flow; Airflow is down, so its trigger waits in the outbox.
    runs = query(listener.index, "SELECT dag_id, run_id, state FROM runs")
    assert runs == [("listener_test", f"{series.study_uid}.1", "open")]
    outbox = query(listener.index, "SELECT run_id, delivered_at FROM outbox")
    assert outbox == [(f"{series.study_uid}.1", None)]

    # The same study again: stored once, no new run, no new trigger.
    again = storescu(listener["port"], series.files)
    assert again.returncode == 0, again.stderr
    assert query(listener.index, "SELECT COUNT(*) FROM instances") == [(7,)]
    assert query(listener.index, "SELECT COUNT(*) FROM outbox") == [(1,)]
    assert len(sorted(study_dir.rglob("*.dcm"))) == 7
    assert listener["proc"].poll() is None


def test_malformed_dataset_is_refused_and_listener_stays_up(listener, tmp_path):
    good = make_series(tmp_path / "ct", slices=1)
    bad = tmp_path / "bad.dcm"
    from pydicom import dcmread
    ds = dcmread(good.files[0])
    ds.StudyInstanceUID = "../../etc"
    ds.save_as(bad)
    pushed = storescu(listener["port"], [bad], extra=("-v",))
    # The sender gets "cannot understand"; the UID never becomes a path.
    assert "Received Store Response (Error: CannotUnderstand)" in pushed.stdout + pushed.stderr
    assert pushed.returncode != 0
    assert not list((listener["data"] / "studies").rglob("*.dcm"))
    assert not (listener["data"].parent / "etc").exists()
    echo = subprocess.run([require_tool("echoscu"), "-aec", "RADDEPLOY", "127.0.0.1", str(listener["port"])],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0
