"""DicomSendOperator on a run folder alone (no study index) against real DCMTK peers.

Every task after the fingerprint sensor depends on its run folder only: the input (whose
identity the results must carry), the outputs to send, the ledger of what a node already
accepted, and the sender the sensor recorded in the manifest for return-to-sender. These
tests build such a folder and nothing else; outputs are made as a model would write them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from pydicom.uid import generate_uid

from dicom_factory import make_series
from peers import StoreSCP, free_port
from raddeploy_provider.dicom.scu import SendError
from raddeploy_provider.operators.dicom_send import DicomSendOperator
from raddeploy_provider.store import DataDir, manifest

pytestmark = pytest.mark.integration

FLOW = "send_flow"
PATIENT = "TEST0001"


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in list(os.environ):
        if name.startswith("RADDEPLOY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RADDEPLOY_DATA", str(tmp_path / "data"))
    run = DataDir(tmp_path / "data").run(FLOW, "1.2.826.0.1.3680043.8.498.1.1")
    source = make_series(run.input, slices=2, patient_id=PATIENT)  # what the sensor froze
    series = make_series(run.mount("dst"), slices=3, study_uid=source.study_uid, patient_id=PATIENT)
    context = {"dag": SimpleNamespace(dag_id=FLOW), "run_id": run.run_id,
               "dag_run": SimpleNamespace(conf={"study_uid": series.study_uid, "generation": 1}),
               "ti": SimpleNamespace(try_number=1)}
    assert not (tmp_path / "data" / "index.sqlite3").exists()  # nothing but the run folder
    return SimpleNamespace(dir=run, series=series, context=context)


def to(scp: StoreSCP, **kwargs) -> DicomSendOperator:
    return DicomSendOperator(task_id="send_0_node", sources=["dst"], host="127.0.0.1", port=scp.port,
                             ae_title=scp.ae_title, **kwargs)


def rewrite(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_sends_the_outputs_and_keeps_a_ledger_by_uid_and_content(run, storescp):
    op = to(storescp)
    result = op.execute(run.context)
    assert (result["accepted"], result["refused"], result["accepted_now"]) == (3, 0, 3)
    assert len(storescp.files()) == 3
    ledger = json.loads(run.dir.sent_ledger("send_0_node").read_text())
    assert sorted(ledger) == sorted(sop_uid(p) for p in run.series.files)
    assert all(len(digest) == 64 for digest in ledger.values())
    # What was sent where and when is in the manifest.
    sent = manifest.assemble(run.dir)["tasks"]["send_0_node"]
    assert sent["node"].startswith(f"{storescp.ae_title}@127.0.0.1:")
    assert {uid: entry["status"] for uid, entry in sent["sent"].items()} == {uid: "0x0000" for uid in ledger}
    # A retry sends nothing the node already accepted.
    again = op.execute(run.context)
    assert (again["accepted"], again["accepted_now"]) == (3, 0) and len(storescp.files()) == 3


def test_a_regenerated_result_is_sent_again_an_unchanged_one_is_not(run, storescp):
    op = to(storescp)
    op.execute(run.context)
    # The model ran again: one result has new content under the same file name and SOP UID.
    changed = run.series.files[1]
    rewrite(changed, SeriesDescription="Regenerated")
    result = op.execute(run.context)
    assert (result["accepted"], result["accepted_now"]) == (3, 1)
    received = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, storescp.files())}  # storescp: one file per UID
    assert len(received) == 3 and received[sop_uid(changed)].SeriesDescription == "Regenerated"


def test_a_result_of_another_patient_sends_nothing_and_names_the_instance(run, storescp, caplog):
    wrong = run.series.files[2]
    rewrite(wrong, PatientID="OTHER-PATIENT")
    with pytest.raises(AirflowFailException) as info:
        to(storescp).execute(run.context)
    message = str(info.value)
    assert message.startswith("nothing is sent: 1 of 3 output files refused by the output guard")
    assert f"dst/{wrong.name} (SOP Instance UID {sop_uid(wrong)}): PatientID: differs from the input's" in message
    assert "OTHER-PATIENT" not in message and PATIENT not in message  # no Patient IDs in logs
    assert storescp.files() == []


def test_a_result_in_another_study_is_refused_unless_the_flow_allows_it(run, storescp):
    rewrite(run.series.files[0], StudyInstanceUID=generate_uid())
    with pytest.raises(AirflowFailException, match=r"StudyInstanceUID: differs from the input's \(say `new_study: "
                                                   r"allowed`"):
        to(storescp).execute(run.context)
    assert storescp.files() == []
    assert to(storescp, check_study=False).execute(run.context)["accepted"] == 3


def test_an_anonymising_flow_may_change_the_patient(run, storescp):
    for path in run.series.files:
        rewrite(path, PatientID="ANON-1", StudyInstanceUID="1.2.3.4")
    assert to(storescp, check_patient=False, check_study=False).execute(run.context)["accepted"] == 3


def test_a_symbolic_link_in_the_output_sends_nothing(run, storescp, tmp_path):
    host_file = tmp_path / "other-patient.dcm"  # any file on the worker host
    shutil.copy(run.series.files[0], host_file)
    (run.dir.mount("dst") / "leak.dcm").symlink_to(host_file)
    with pytest.raises(AirflowFailException, match=r"dst/leak.dcm: file: a symbolic link: a model may only send "
                                                   r"files it wrote"):
        to(storescp).execute(run.context)
    assert storescp.files() == []


def test_an_output_that_is_not_dicom_is_refused(run, storescp):
    (run.dir.mount("dst") / "notes.txt").write_text("model log")
    with pytest.raises(AirflowFailException, match=r"dst/notes.txt: file: not a valid DICOM Part 10 file"):
        to(storescp).execute(run.context)
    assert storescp.files() == []


def test_return_to_sender_needs_the_sender_on_the_allow_list(run, tmp_path, monkeypatch):
    sender = StoreSCP(tmp_path / "sender", ae_title="CT_SCANNER")  # the modality, listening for results
    try:
        manifest.record(run.dir, manifest.RUN_PART, {"sender": {"calling_ae": "CT_SCANNER", "host": "127.0.0.1"}})
        op = DicomSendOperator(task_id="send_to_sender", sources=["dst"], return_to_sender_port=sender.port)
        with pytest.raises(AirflowFailException, match="the listener has no allow-list"):
            op.execute(run.context)
        monkeypatch.setenv("RADDEPLOY_ALLOWED_CALLING_AETS", "MR_SCANNER")
        with pytest.raises(AirflowFailException, match="calling AE title 'CT_SCANNER' is not allowed"):
            op.execute(run.context)
        monkeypatch.setenv("RADDEPLOY_ALLOWED_CALLING_AETS", "CT_SCANNER,MR_SCANNER")
        monkeypatch.setenv("RADDEPLOY_ALLOWED_NETWORKS", "10.0.0.0/8")
        with pytest.raises(AirflowFailException, match="address 127.0.0.1 is not in RADDEPLOY_ALLOWED_NETWORKS"):
            op.execute(run.context)
        assert sender.files() == []
        monkeypatch.setenv("RADDEPLOY_ALLOWED_NETWORKS", "127.0.0.0/8")
        assert op.execute(run.context)["accepted"] == 3
        assert len(sender.files()) == 3
    finally:
        sender.stop()


def test_return_to_sender_refused_by_the_sensor_says_why(run, monkeypatch):
    monkeypatch.setenv("RADDEPLOY_ALLOWED_NETWORKS", "127.0.0.0/8")
    op = DicomSendOperator(task_id="send_to_sender", sources=["dst"], return_to_sender_port=104)
    with pytest.raises(AirflowException, match=r"no sender is recorded for this run \(manifest.json\)"):
        op.execute(run.context)
    manifest.record(run.dir, manifest.RUN_PART, {"sender": None, "sender_refused": "the matched input came from 2 "
                                                 "nodes (A@10.0.0.1, B@10.0.0.2): results go back to none of them"})
    with pytest.raises(AirflowFailException, match="results are not returned to the sender: the matched input came "
                                                   "from 2 nodes"):
        op.execute(run.context)


def test_an_unreachable_node_is_one_log_line_with_the_next_try(run, caplog, capfd):
    port = free_port()
    op = DicomSendOperator(task_id="send_0_node", sources=["dst"], host="127.0.0.1", port=port, ae_title="GONE",
                           retries=3, retry_exponential_backoff=2.0)
    caplog.set_level(logging.INFO)
    with pytest.raises(SendError) as info:
        op.execute(run.context)
    report = info.value.report
    assert report.unreachable and report.accepted == [] and len(report.results) == 3
    # The task's own log (Airflow's structured logger writes it to the task's output) ...
    task_log = capfd.readouterr().out.splitlines()
    problems = [line for line in task_log if "[error" in line or "[warning" in line and "Task Runner" not in line]
    assert len(problems) == 1, problems
    assert f"GONE@127.0.0.1:{port} cannot be reached: " in problems[0]
    assert "Airflow tries again in 300-600 s (try 1 of 4)" in problems[0]
    # ... and the SCU's (standard logging): nothing per file.
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert json.loads(run.dir.sent_ledger("send_0_node").read_text()) == {}
    assert "unreachable" in manifest.assemble(run.dir)["tasks"]["send_0_node"]


def test_a_node_down_for_two_tries_then_up_receives_everything_once(run, tmp_path):
    port = free_port()
    op = DicomSendOperator(task_id="send_0_node", sources=["dst"], host="127.0.0.1", port=port, ae_title="LATE",
                           retries=3)
    for try_number in (1, 2):
        run.context["ti"] = SimpleNamespace(try_number=try_number)
        with pytest.raises(SendError):
            op.execute(run.context)
    late = StoreSCP(tmp_path / "late", ae_title="LATE", port=port)
    try:
        run.context["ti"] = SimpleNamespace(try_number=3)
        assert op.execute(run.context)["accepted"] == 3
        assert sorted(sop_uid(p) for p in late.files()) == sorted(sop_uid(p) for p in run.series.files)
        run.context["ti"] = SimpleNamespace(try_number=4)  # cleared and run again: nothing is sent twice
        assert op.execute(run.context)["accepted_now"] == 0 and len(late.files()) == 3
    finally:
        late.stop()


def test_empty_outputs_are_an_error(run, storescp):
    shutil.rmtree(run.dir.mount("dst"))
    run.dir.mount("dst").mkdir()
    with pytest.raises(AirflowException, match="nothing to send: outputs dst are empty"):
        to(storescp).execute(run.context)
