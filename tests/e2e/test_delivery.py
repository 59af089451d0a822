"""Delivery through the whole stack: Orthanc receives results with provenance, a re-run
re-sends, and the output guard stops a model's result of another patient and its links.

Three flow files are added to the running session stack, each triggered only by its own
series description. Each test pushes an MR series with DCMTK storescu and reads what arrived from
the peer itself (Orthanc's REST API, storescp's folder) and Airflow's REST API.
"""

from __future__ import annotations

import json

import pytest
from pydicom import dcmread

from dicom_factory import make_series
from orthanc import Orthanc
from peers import storescu, wait_for
from stack_factory import add_flow, run_finished, run_path, task_instances, task_log
from raddeploy_provider import __version__

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

SLICES = 3

# A model that copies its input with another Patient ID: what the guard exists for.
OTHER_PATIENT = """\
import pathlib, pydicom
for path in sorted(pathlib.Path('/input').iterdir()):
    ds = pydicom.dcmread(path)
    ds.PatientID = 'SOMEONE-ELSE'
    ds.save_as(pathlib.Path('/output') / path.name)
"""

FLOWS = {
    "delivery_orthanc.yaml": """
id: e2e_delivery_orthanc
version: "2.1"
triggers: [{{SeriesDescription: "^E2E delivery orthanc$"}}]
grouping: {{quiet_period: 1s}}
models:
  - name: threshold
    image: raddeploy/threshold:latest
    inputs: {{src: /input}}
    outputs: {{dst: /output}}
destinations: [{{host: 127.0.0.1, port: {orthanc_port}, ae_title: {orthanc_ae}}}]
""",
    "delivery_other_patient.yaml": """
id: e2e_guard_other_patient
triggers: [{{SeriesDescription: "^E2E guard patient$"}}]
grouping: {{quiet_period: 1s}}
models:
  - name: relabel
    image: raddeploy/threshold:latest
    entrypoint: ["python3", "-c", {script}]
    inputs: {{src: /input}}
    outputs: {{dst: /output}}
destinations: [{{host: 127.0.0.1, port: {scp_port}, ae_title: {scp_ae}}}]
""",
    "delivery_symlink.yaml": """
id: e2e_guard_symlink
triggers: [{{SeriesDescription: "^E2E guard symlink$"}}]
grouping: {{quiet_period: 1s}}
models:
  - name: linker
    image: raddeploy/busybox:latest
    command: ["sh", "-c", "cp /input/* /output/ && ln -s /etc/hostname /output/host-file.dcm"]
    inputs: {{src: /input}}
    outputs: {{dst: /output}}
destinations: [{{host: 127.0.0.1, port: {scp_port}, ae_title: {scp_ae}}}]
""",
}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    peer = Orthanc(tmp_path_factory.mktemp("orthanc"))
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def flows(stack, airflow, orthanc, destination):
    values = dict(orthanc_port=orthanc.port, orthanc_ae=orthanc.ae_title, scp_port=destination.port,
                  scp_ae=destination.ae_title, script=json.dumps(OTHER_PATIENT))
    for (name, text), dag_id in zip(FLOWS.items(), ("e2e_delivery_orthanc", "e2e_guard_other_patient",
                                                    "e2e_guard_symlink")):
        add_flow(stack, airflow, name, text.format(**values), dag_id)
    return values


def task_states(airflow, dag_id: str, run_id: str) -> dict[str, str]:
    return {task_id: ti["state"] for task_id, ti in task_instances(airflow, dag_id, run_id).items()}


def push(stack, tmp_path, description: str):
    """An MR series: the session's CT flow (tests/e2e/conftest.py) must not run on it too."""
    series = make_series(tmp_path / "mr", modality="MR", slices=SLICES, size=32, description=description)
    pushed = storescu(stack.dicom_port, series.files)
    assert pushed.returncode == 0, pushed.stderr
    return series, f"{series.study_uid}.1"


def test_orthanc_receives_results_with_provenance_and_a_rerun_resends(stack, airflow, flows, orthanc, tmp_path):
    dag_id = "e2e_delivery_orthanc"
    series, run_id = push(stack, tmp_path, "E2E delivery orthanc")
    run = run_finished(airflow, dag_id, run_id)
    assert run["state"] == "success", task_states(airflow, dag_id, run_id)
    instances = wait_for(lambda: orthanc.instances() if len(orthanc.instances()) >= SLICES else None, 30,
                         "Orthanc to hold the results")
    assert len(instances) == SLICES
    received = [orthanc.dataset(i) for i in instances]
    inputs = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series.files}
    for ds in received:
        assert ds.StudyInstanceUID == series.study_uid and ds.PatientID == "TEST0001"
        assert ds.SOPInstanceUID not in inputs  # the model's derived series
        (item,) = ds.ContributingEquipmentSequence
        assert item.Manufacturer == "raddeploy-provider" and item.SoftwareVersions == __version__
        assert item.ManufacturerModelName == "e2e_delivery_orthanc 2.1"
        assert "model threshold, image raddeploy/threshold:latest (sha256:" in item.ContributionDescription
    first = {ds.SOPInstanceUID for ds in received}

    # Clear the model (and what follows it), as a user does in the UI: its new output is sent.
    status, body = airflow.post(f"/api/v2/dags/{dag_id}/clearTaskInstances", {
        "dry_run": False, "task_ids": ["threshold"], "dag_run_id": run_id, "include_downstream": True,
        "only_failed": False, "reset_dag_runs": True})
    assert status == 200, body
    rerun = run_finished(airflow, dag_id, run_id, after=run["end_date"])
    assert rerun["state"] == "success", task_states(airflow, dag_id, run_id)
    after = wait_for(lambda: orthanc.instances() if len(orthanc.instances()) >= 2 * SLICES else None, 30,
                     "Orthanc to hold the re-run's results")
    second = {orthanc.dataset(i).SOPInstanceUID for i in after} - first
    assert len(after) == 2 * SLICES and len(second) == SLICES


def test_a_result_of_another_patient_is_never_sent(stack, airflow, flows, destination, tmp_path):
    dag_id = "e2e_guard_other_patient"
    before = set(destination.files())
    series, run_id = push(stack, tmp_path, "E2E guard patient")
    run = run_finished(airflow, dag_id, run_id)
    states = task_states(airflow, dag_id, run_id)
    send = f"send_0_{destination.ae_title}"
    assert run["state"] == "failed" and states["relabel"] == "success" and states[send] == "failed", states
    log = task_log(airflow, dag_id, run_id, send)
    assert "nothing is sent: 3 of 3 output files refused by the output guard" in log
    assert "PatientID: differs from the input's (a result of another patient)" in log
    assert "SOMEONE-ELSE" not in log
    assert set(destination.files()) == before


def test_a_models_link_to_a_host_file_sends_nothing(stack, airflow, flows, destination, tmp_path):
    dag_id = "e2e_guard_symlink"
    before = set(destination.files())
    series, run_id = push(stack, tmp_path, "E2E guard symlink")
    run = run_finished(airflow, dag_id, run_id)
    states = task_states(airflow, dag_id, run_id)
    send = f"send_0_{destination.ae_title}"
    assert run["state"] == "failed" and states[send] == "failed", states
    assert "dst/host-file.dcm: file: a symbolic link: a model may only send files it wrote" in \
        task_log(airflow, dag_id, run_id, send)
    assert set(destination.files()) == before
