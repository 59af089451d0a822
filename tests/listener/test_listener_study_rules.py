"""The study rules over the wire, against a real listener process: another patient's instance
is refused, a corrected re-send is indexed and opens the next generation, header values make
bounded safe names in a run's input, deeply nested sequences are refused without a traceback.

The listener's flow (``conftest.FLOW``, DAG ``listener_test``) triggers on Modality CT; Airflow
is down, so its runs wait in the outbox, where these tests read them.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pydicom
import pytest

from dicom_factory import make_series
from listener.policy import ingest_verdict
from postgres import query
from raddeploy_provider.dicom.dimse import Status
from raddeploy_provider.store import StudyIndex, snapshot
from raddeploy_provider.store.errors import OtherPatient
from raddeploy_provider.store.header_walk import MAX_DEPTH
from raddeploy_provider.store.snapshot import MAX_COMPONENT
from test_listener_input import (  # noqa: F401 - chunked is a fixture
    CANNOT_UNDERSTAND,
    SUCCESS,
    Scu,
    assert_clean_and_alive,
    chunked,
    index_rows,
    log_lines,
    storescu_status_lines,
    study_files,
)
from peers import storescu
from store.test_store_rules import check_names, with_nested

pytestmark = pytest.mark.integration

DAG = "listener_test"


def runs(listener) -> list[tuple]:
    return query(listener.index, "SELECT dag_id, run_id, generation, state FROM runs ORDER BY generation")


def triggers(listener) -> list[str]:
    return [r for (r,) in query(listener.index, "SELECT run_id FROM outbox ORDER BY id")]


def rewrite(source: Path, dest: Path, **values) -> Path:
    ds = pydicom.dcmread(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # over-long and invalid values are the point
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(dest, enforce_file_format=True)
    return dest


# -- the verdicts, as pure decisions ----------------------------------------------------------

def test_verdicts_of_the_study_rules() -> None:
    other = ingest_verdict(OtherPatient("1.2.3", "1.2.3.4"))
    assert other.status == Status.OTHER_PATIENT == 0xC001 and 0xC000 <= other.status <= 0xCFFF  # error: permanent
    assert other.level == logging.WARNING and not other.traceback
    deep = ingest_verdict(RecursionError("maximum recursion depth exceeded"))
    assert deep.status == Status.CANNOT_UNDERSTAND and not deep.traceback


# -- 1. another patient's instance ------------------------------------------------------------

def test_another_patients_instance_is_refused(listener, tmp_path) -> None:
    series = make_series(tmp_path / "ct", slices=2, size=16, patient_id="PAT-OWN")
    pushed = storescu(listener.port, series.files[:1], extra=("-v",))
    assert storescu_status_lines(pushed) == ["I: Received Store Response (Success)"], pushed.stderr
    assert runs(listener) == [(DAG, f"{series.study_uid}.1", 1, "open")]
    stored_before, runs_before, triggers_before = study_files(listener), runs(listener), triggers(listener)

    intruder = rewrite(series.files[1], tmp_path / "intruder.dcm", PatientID="PAT-INTRUDER",
                       PatientName="Intruder^Ivan")
    sop = pydicom.dcmread(intruder).SOPInstanceUID
    scu = Scu(listener.port, calling="WRONGPACS")
    try:
        status = scu.store(intruder)
        echo = scu.echo()  # the association goes on
    finally:
        scu.close()
    assert status == Status.OTHER_PATIENT and echo == SUCCESS
    pushed = storescu(listener.port, [intruder], extra=("-v",))  # what DCMTK's user sees
    assert storescu_status_lines(pushed) == ["I: Received Store Response (Error: CannotUnderstand)"], \
        pushed.stdout + pushed.stderr

    assert study_files(listener) == stored_before
    assert [sop_uid for (sop_uid,) in index_rows(listener)] == [pydicom.dcmread(series.files[0]).SOPInstanceUID]
    assert runs(listener) == runs_before and triggers(listener) == triggers_before
    [line] = [line for line in log_lines(listener, "another Patient ID", at_least=2) if "WRONGPACS" in line]
    assert series.study_uid in line and sop in line and "WRONGPACS@127.0.0.1" in line
    log = listener.log_text()
    assert "PAT-INTRUDER" not in log and "PAT-OWN" not in log and "Intruder" not in log and "Phantom" not in log
    assert "Traceback" not in log
    assert_clean_and_alive(listener)


# -- 2. a corrected re-send -------------------------------------------------------------------

def test_corrected_resend_is_indexed_and_opens_the_next_generation(listener, tmp_path) -> None:
    series = make_series(tmp_path / "ct", slices=1, size=16)
    source = series.files[0]
    pushed = storescu(listener.port, [source], extra=("-v",))
    assert storescu_status_lines(pushed) == ["I: Received Store Response (Success)"], pushed.stderr
    [(sop, first_path)] = index_rows(listener, "sop_uid, path")
    first = listener.data / first_path
    index = StudyIndex(listener.index)
    try:
        index.close_run(DAG, f"{series.study_uid}.1", series.study_uid)  # as the fingerprint sensor does
    finally:
        index.close()

    fixed = rewrite(source, tmp_path / "fixed.dcm", SeriesDescription="Planning CT (corrected)")
    for _ in range(2):  # the corrected version, then the same again
        pushed = storescu(listener.port, [fixed], extra=("-v",))
        assert storescu_status_lines(pushed) == ["I: Received Store Response (Success)"], pushed.stderr

    [(sop_now, path, tags)] = index_rows(listener, "sop_uid, path, tags")
    assert sop_now == sop and json.loads(tags)["SeriesDescription"] == "Planning CT (corrected)"
    assert Path(path).name == f"{sop}.v2.dcm" and Path(path).parent == Path(first_path).parent
    assert first.is_file() and pydicom.dcmread(first).SeriesDescription == "Planning CT"  # kept as it was
    assert study_files(listener) == sorted([first, listener.data / path])
    assert runs(listener) == [(DAG, f"{series.study_uid}.1", 1, "closing"), (DAG, f"{series.study_uid}.2", 2, "open")]
    assert triggers(listener) == [f"{series.study_uid}.1", f"{series.study_uid}.2"]
    [line] = log_lines(listener, "re-sent with other content")
    assert sop in line and "version 2" in line
    assert_clean_and_alive(listener)


# -- 3. header values that become names -------------------------------------------------------

def test_hostile_values_make_bounded_names_in_a_run_input(listener, tmp_path, chunked) -> None:
    series = make_series(tmp_path / "ct", slices=2, size=16)
    long_modality = rewrite(series.files[0], tmp_path / "long.dcm", Modality="C" * 300, SeriesDescription="../x")
    dotted = rewrite(series.files[1], tmp_path / "dots.dcm", SeriesDescription="../x", ImageComments="." * 300)
    scu = Scu(listener.port)
    try:
        assert [scu.store(long_modality), scu.store(dotted)] == [SUCCESS, SUCCESS]
    finally:
        scu.close()
    index = StudyIndex(listener.index)
    try:
        instances = index.instances(series.study_uid)
    finally:
        index.close()
    assert len(instances) == 2 and instances[0].tags["Modality"] == "C" * 300
    dest = tmp_path / "run" / "input"
    layout = ["SeriesDescription", "Modality", "ImageComments"]

    made = snapshot(instances, listener.data, dest, layout=layout)  # as the fingerprint sensor makes the input

    check_names(dest, made)
    assert {p.relative_to(dest).parts[0] for p in made} == {"x"}
    assert len(made[0].name) <= 3 * MAX_COMPONENT + 6 and made[0].name.startswith("C" * 55 + "-")
    for path, inst in zip(made, instances):
        assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == inst.sop_uid
    assert_clean_and_alive(listener)


# -- 4. nested sequences ----------------------------------------------------------------------

def test_deeply_nested_sequences_are_refused_without_a_traceback(listener, tmp_path, chunked) -> None:
    source = make_series(tmp_path / "ct", slices=1, size=16).files[0]
    bad = {
        "undefined lengths": with_nested(source, tmp_path / "undefined.dcm", 1500, defined=False),
        "defined lengths": with_nested(source, tmp_path / "defined.dcm", 1500, defined=True),
        "read by pydicom": with_nested(source, tmp_path / "pydicom.dcm", 1500, defined=False, charset="ISO_IR 144"),
    }
    scu = Scu(listener.port)
    try:
        statuses = {what: scu.store(path) for what, path in bad.items()}
        echo = scu.echo()
    finally:
        scu.close()
    assert statuses == dict.fromkeys(bad, CANNOT_UNDERSTAND) and echo == SUCCESS
    lines = log_lines(listener, f"nested more than {MAX_DEPTH} deep", at_least=len(bad))
    assert len(lines) == len(bad) and all("refused:" in line for line in lines), listener.log_text()[-3000:]
    assert study_files(listener) == [] and index_rows(listener) == []
    assert "Traceback" not in listener.log_text() and "RecursionError" not in listener.log_text()
    assert_clean_and_alive(listener)
