"""DICOM in -> Airflow run -> model container -> DICOM out, through real parts only.

DCMTK storescu pushes a CT to the listener of the embedded stack (the `raddeploy run` code
path); the flow's model runs on the real Docker engine; DCMTK storescp receives the result.
"""

from __future__ import annotations

import time

import pytest
from pydicom import dcmread

from dicom_factory import make_series
from peers import storescu, wait_for
from stack_factory import push_settled, query

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

DAG_ID = "e2e_ct_threshold"


def test_push_runs_model_and_delivers_derived_series(stack, airflow, destination, tmp_path):
    series = make_series(tmp_path / "ct", slices=6, size=64)
    scout = make_series(tmp_path / "scout", slices=1, study_uid=series.study_uid, description="Scout")
    before = set(destination.files())
    start = time.monotonic()
    pushed = storescu(stack.dicom_port, series.files + scout.files)
    assert pushed.returncode == 0, pushed.stderr

    received = wait_for(lambda: [p for p in destination.files() if p not in before]
                        if len(set(destination.files()) - before) >= 6 else None, 180, "the derived series")
    elapsed = time.monotonic() - start
    print(f"\npush -> delivered: {elapsed:.1f} s")

    inputs = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in series.files}
    out_series = set()
    assert len(received) == 6  # the whole CT series, not the scout (excluded by `~(?i)scout`)
    for path in received:
        ds = dcmread(path)  # valid DICOM, pixel data included
        assert ds.StudyInstanceUID == series.study_uid
        assert ds.SeriesInstanceUID != series.series_uid
        assert ds.SOPInstanceUID not in inputs
        assert ds.ImageType[0] == "DERIVED"
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in inputs
        assert set(ds.pixel_array.flatten().tolist()) <= {0, 1}
        out_series.add(ds.SeriesInstanceUID)
    assert len(out_series) == 1

    run_id = f"{series.study_uid}.1"
    runs = wait_for(lambda: [r for r in airflow.dag_runs(DAG_ID) if r["dag_run_id"] == run_id
                             and r["state"] == "success"], 60, "the run to succeed")
    assert runs[0]["conf"] == {"study_uid": series.study_uid, "generation": 1}  # UIDs only

    # Pushing the same study again opens no second run and sends nothing more. Once the listener
    # has decided about every instance and posted every trigger, a second run would be in both.
    push_settled(stack, series.files + scout.files)
    study_runs = [r for r in airflow.dag_runs(DAG_ID) if r["dag_run_id"].startswith(series.study_uid)]
    assert [r["dag_run_id"] for r in study_runs] == [run_id]
    registered = query(stack, "SELECT run_id FROM runs WHERE dag_id = ? AND study_uid = ?", (DAG_ID, series.study_uid))
    assert [r["run_id"] for r in registered] == [run_id]
    assert len(set(destination.files()) - before) == 6
