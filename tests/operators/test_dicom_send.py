"""DicomSendOperator on a run folder alone (no study index) against a real DCMTK storescp.

Every task after the fingerprint sensor depends on its run folder only: the outputs to
send, the ledger of what a node already accepted, and the sender the sensor recorded in
the manifest for return-to-sender. These tests build such a folder and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowException

from dicom_factory import make_series
from peers import StoreSCP
from raddeploy_provider.dicom.scu import SendError
from raddeploy_provider.operators.dicom_send import DicomSendOperator
from raddeploy_provider.store import DataDir, manifest

pytestmark = pytest.mark.integration

FLOW = "send_flow"


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in list(os.environ):
        if name.startswith("RADDEPLOY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RADDEPLOY_DATA", str(tmp_path / "data"))
    run = DataDir(tmp_path / "data").run(FLOW, "1.2.826.0.1.3680043.8.498.1.1")
    series = make_series(run.mount("dst"), slices=3)
    context = {"dag": SimpleNamespace(dag_id=FLOW), "run_id": run.run_id,
               "dag_run": SimpleNamespace(conf={"study_uid": series.study_uid, "generation": 1})}
    assert not (tmp_path / "data" / "index.sqlite3").exists()  # nothing but the run folder
    return SimpleNamespace(dir=run, series=series, context=context)


def test_sends_the_outputs_and_keeps_a_ledger(run, storescp):
    op = DicomSendOperator(task_id="send_0_node", sources=["dst"], host="127.0.0.1", port=storescp.port,
                           ae_title=storescp.ae_title)
    result = op.execute(run.context)
    assert (result["accepted"], result["failed"]) == (3, 0)
    assert len(storescp.files()) == 3
    assert sorted(json.loads(run.dir.sent_ledger("send_0_node").read_text())) == sorted(map(str, run.series.files))
    # A retry sends nothing the node already accepted.
    again = op.execute(run.context)
    assert (again["accepted"], again["failed"]) == (3, 0) and len(storescp.files()) == 3


def test_return_to_sender_reads_the_sender_from_the_manifest(run, tmp_path):
    sender = StoreSCP(tmp_path / "sender", ae_title="CT_SCANNER")  # the modality, listening for results
    try:
        manifest.record(run.dir, manifest.RUN_PART, {"sender": {"calling_ae": "CT_SCANNER", "host": "127.0.0.1"}})
        op = DicomSendOperator(task_id="send_to_sender", sources=["dst"], return_to_sender_port=sender.port)
        assert op.execute(run.context)["accepted"] == 3
        assert len(sender.files()) == 3
    finally:
        sender.stop()


def test_return_to_sender_without_a_recorded_sender_says_so(run):
    op = DicomSendOperator(task_id="send_to_sender", sources=["dst"], return_to_sender_port=104)
    with pytest.raises(AirflowException, match=r"no sender is recorded for run .* \(manifest.json\)"):
        op.execute(run.context)


def test_an_unreachable_node_fails_with_every_file_reported(run, storescp):
    port = storescp.port
    storescp.stop()
    op = DicomSendOperator(task_id="send_0_node", sources=["dst"], host="127.0.0.1", port=port, ae_title="GONE")
    with pytest.raises(SendError) as info:
        op.execute(run.context)
    assert len(info.value.report.failed) == 3 and info.value.report.accepted == []
    assert json.loads(run.dir.sent_ledger("send_0_node").read_text()) == []


def test_empty_outputs_are_an_error(run, storescp):
    shutil.rmtree(run.dir.mount("dst"))
    run.dir.mount("dst").mkdir()
    op = DicomSendOperator(task_id="send_0_node", sources=["dst"], host="127.0.0.1", port=storescp.port,
                           ae_title=storescp.ae_title)
    with pytest.raises(AirflowException, match="nothing to send: outputs dst are empty"):
        op.execute(run.context)
