"""Review before export (`review: required`), with a real Airflow and real DICOM peers.

The approval task stands between the model and the send task. Answered through the REST
endpoint the UI's Approve and Reject buttons use (`PATCH .../hitlDetails`): an approval
delivers to the storescp; a rejection sends nothing and the run says who rejected and why; a
review that times out with `on_review_timeout: reject` sends nothing; a user who is not
among `reviewers` is refused.
"""

from __future__ import annotations

import json

import pytest

from dicom_factory import make_series
from peers import storescu, wait_for
from raddeploy_provider.airflow_client import AirflowClient
from raddeploy_provider.utils.run_note import hitl_answer, try_state
from stack_factory import add_flow, run_finished, run_path, task_instances, task_log

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REVIEWED = "e2e_review"
TIMED_OUT = "e2e_review_timeout"
FLOW = """
name: E2E review {what}
id: {dag_id}
triggers:
  - SeriesDescription: "E2E review {what}.*"
grouping: {{quiet_period: 1s}}
review: required
reviewers: [admin]
review_timeout: {timeout}
models:
  - name: copy
    image: raddeploy/busybox:latest
    command: ["sh", "-c", "cp /input/* /output/"]
    inputs: {{src: /input}}
    outputs: {{dst: /output}}
destinations:
  - {{host: 127.0.0.1, port: {port}, ae_title: {ae}}}
"""


@pytest.fixture(scope="module")
def flows(stack, airflow, destination) -> None:
    add_flow(stack, airflow, "review.yaml", FLOW.format(what="approve", dag_id=REVIEWED, timeout="10m",
                                                        port=destination.port, ae=destination.ae_title), REVIEWED)
    add_flow(stack, airflow, "review_timeout.yaml", FLOW.format(what="late", dag_id=TIMED_OUT, timeout="3s",
                                                                port=destination.port, ae=destination.ae_title), TIMED_OUT)


def pushed(stack, tmp_path, description: str):
    series = make_series(tmp_path / "mr", modality="MR", slices=2, size=16, description=description)
    assert storescu(stack.dicom_port, series.files).returncode == 0
    return series, f"{series.study_uid}.1"


def hitl(dag_id: str, run_id: str) -> str:
    return f"{run_path(dag_id, run_id)}/taskInstances/review/-1/hitlDetails"


def awaiting_review(airflow, dag_id: str, run_id: str) -> dict:
    """The approval task's HITL detail once it is waiting for a person."""
    def waiting():
        status, detail = airflow.get(hitl(dag_id, run_id))
        state = task_instances(airflow, dag_id, run_id).get("review", {}).get("state") if status == 200 else None
        return detail if state in ("awaiting_input", "deferred") else None
    return wait_for(waiting, 120, f"the review of {run_id} to wait for a person")


def answer(airflow, dag_id: str, run_id: str, option: str, reason: str = "") -> tuple[int, object]:
    return airflow._request("PATCH", hitl(dag_id, run_id), {"chosen_options": [option], "params_input": {"reason": reason}})


def review_record(stack, dag_id: str, run_id: str) -> dict:
    """The review task's manifest part, less the number of the try that decided (1, or 2 when
    Airflow lost the first try's end: ReviewOperator._lost_answer)."""
    manifest = json.loads((stack.data_dir / "runs" / dag_id / run_id / "manifest.json").read_text())
    record = dict(manifest["tasks"]["review"])
    assert record.pop("try") in (1, 2)
    return record


def test_nothing_is_sent_before_approval_and_a_user_not_among_reviewers_is_refused(
        stack, airflow, destination, flows, tmp_path, monkeypatch):
    before = set(destination.files())
    series, run_id = pushed(stack, tmp_path, "E2E review approve 1")
    detail = awaiting_review(airflow, REVIEWED, run_id)
    body = detail["body"]
    assert "| MR | E2E review approve 1 | 2 |" in body and "`dst`: 2 × MR Image Storage" in body
    assert "Test^Phantom" not in body and "TEST0001" not in body  # never the patient
    assert task_instances(airflow, REVIEWED, run_id)["send_0_E2EDEST"]["state"] in (None, "scheduled")
    assert set(destination.files()) == before
    note = airflow.get(run_path(REVIEWED, run_id))[1]["note"]
    assert note == "Waiting for review (admin): nothing is sent before"

    listener = AirflowClient(stack.api_url, "listener", stack.passwords()["listener"])
    status, refused = answer(listener, REVIEWED, run_id, "Approve")
    assert status == 403 and "not a respondent" in str(refused)

    status, _ = answer(airflow, REVIEWED, run_id, "Approve", "contours fine")
    assert status == 200
    run = run_finished(airflow, REVIEWED, run_id)
    assert run["state"] == "success"
    assert len(destination.new_files(before, 2, "the approved results")) == 2
    assert airflow.get(run_path(REVIEWED, run_id))[1]["note"] == "Approved by admin: contours fine"
    assert review_record(stack, REVIEWED, run_id) == {"decision": "approved", "by": "admin", "reason": "contours fine"}

    # What a retry of the review task would apply when Airflow loses a resume (ReviewOperator._lost_answer),
    # read back as the listener's account reads it on a worker.
    for name, value in stack.environment().items():
        if name.startswith("RADDEPLOY_AIRFLOW_"):
            monkeypatch.setenv(name, value)
    decided_on = json.loads((stack.data_dir / "runs" / REVIEWED / run_id / "manifest.json").read_text()
                            )["tasks"]["review"]["try"]  # the try the answer went to (see review_record)
    earlier = hitl_answer(REVIEWED, run_id, "review", decided_on) or hitl_answer(REVIEWED, run_id, "review", 1)
    assert earlier["chosen_options"] == ["Approve"] and earlier["params_input"] == {"reason": "contours fine"}
    assert earlier["responded_by_user"]["name"] == "admin" and earlier["responded_at"].tzinfo is not None
    assert hitl_answer(REVIEWED, run_id, "review", decided_on + 1) is None  # no such try
    assert try_state(REVIEWED, run_id, "review", decided_on) == "success"
    assert try_state(REVIEWED, run_id, "review", decided_on + 1) is None


def test_a_rejected_run_sends_nothing_and_says_who_rejected_and_why(stack, airflow, destination, flows, tmp_path):
    before = set(destination.files())
    series, run_id = pushed(stack, tmp_path, "E2E review approve 2")
    awaiting_review(airflow, REVIEWED, run_id)
    status, _ = answer(airflow, REVIEWED, run_id, "Reject", "lung contour leaks into the stomach")
    assert status == 200
    run = run_finished(airflow, REVIEWED, run_id)
    tasks = task_instances(airflow, REVIEWED, run_id)
    states = (run["state"], tasks["review"]["state"], tasks["send_0_E2EDEST"]["state"])
    assert states == ("success", "success", "skipped"), task_log(airflow, REVIEWED, run_id, "review")
    assert run["note"] == "Rejected, nothing sent by admin: lung contour leaks into the stomach"
    assert review_record(stack, REVIEWED, run_id) == {"decision": "rejected", "by": "admin",
                                                      "reason": "lung contour leaks into the stomach"}
    assert set(destination.files()) == before  # the send task is skipped: it never ran


def test_a_review_that_times_out_with_reject_sends_nothing(stack, airflow, destination, flows, tmp_path):
    before = set(destination.files())
    series, run_id = pushed(stack, tmp_path, "E2E review late 1")
    run = run_finished(airflow, TIMED_OUT, run_id, timeout=180)
    tasks = task_instances(airflow, TIMED_OUT, run_id)
    assert (run["state"], tasks["send_0_E2EDEST"]["state"]) == ("success", "skipped")
    assert run["note"] == ("Rejected, nothing sent: no review in time: review_timeout passed: on_review_timeout is "
                           "reject")
    assert review_record(stack, TIMED_OUT, run_id)["by"] == "timeout"
    assert set(destination.files()) == before
