"""Deadlines and notifications through the session's stack (Airflow's scheduler, triggerer and
workers, the HTTP and SMTP providers' notifiers) to a webhook and a mail server this test runs.

Three flows, pushed at once: one whose model takes 15 s against a deadline of 5 s (Airflow's
DeadlineAlert: one alert to the webhook while the run still runs, then its delivery), one
delivered within its deadline of 30 s (no alert, also after the 30 s), one whose model
exits 3 (one failure mail). The connections are made through the REST API, as an
operator makes them in the UI; the stack's environment is not changed. The phantom's study
is pushed: its name and ID appear in the failing model's log and nowhere in a notification.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from datetime import datetime

import pytest

from dicom_factory import make_series
from notify_peers import PHI, Mailbox, Webhook
from peers import storescu, wait_for
from stack_factory import add_flow, run_finished, task_instances, task_log

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

HOOK = "e2e_notify_hook"
SMTP = "smtp_default"  # RADDEPLOY_NOTIFY_SMTP's default: the session stack does not set it
LATE, ON_TIME, BROKEN = "e2e_notify_deadline", "e2e_notify_on_time", "e2e_notify_failure"
ON_TIME_DEADLINE = 30  # s; the copy flow took 12-14 s here, 3 runs at once on 2 cores
FLOW = """
name: E2E notify {what}
id: {dag_id}
triggers: [{{Modality: MR, SeriesDescription: "^E2E notify {what}$"}}]
grouping: {{quiet_period: 1s}}
models:
  - name: {model}
    image: raddeploy/busybox:latest
    command: ["sh", "-c", {command}]
    inputs: {{src: /input}}
    outputs: {{dst: /output}}
destinations: [{{host: 127.0.0.1, port: {port}, ae_title: {ae}}}]
{extra}
"""


@pytest.fixture(scope="module")
def webhook():
    server = Webhook()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mailbox():
    server = Mailbox()
    yield server
    server.stop()


def connection_path(conn_id: str) -> str:
    return f"/api/v2/connections/{urllib.parse.quote(conn_id, safe='')}"


@pytest.fixture(scope="module")
def connections(airflow, webhook, mailbox):
    """The webhook's HTTP connection and the SMTP connection, made through the REST API; removed after."""
    made = [
        {"connection_id": HOOK, "conn_type": "http", "host": "127.0.0.1", "port": webhook.port, "schema": "http"},
        {"connection_id": SMTP, "conn_type": "smtp", "host": "127.0.0.1", "port": mailbox.port,
         "extra": json.dumps({"disable_ssl": True, "disable_tls": True, "from_email": "raddeploy@clinic.example"})},
    ]
    for body in made:
        assert airflow.get(connection_path(body["connection_id"]))[0] == 404, f"{body['connection_id']} exists"
        status, answer = airflow.post("/api/v2/connections", body)
        assert status in (200, 201), answer
    yield
    for body in made:
        airflow._request("DELETE", connection_path(body["connection_id"]), None)


@pytest.fixture(scope="module")
def flows(stack, airflow, destination, connections):
    where = dict(port=destination.port, ae=destination.ae_title)
    add_flow(stack, airflow, "notify_deadline.yaml", FLOW.format(
        what="deadline", dag_id=LATE, model="slow", command=json.dumps("sleep 15; cp /input/* /output/"),
        extra=f"deadline: 5s\nnotify: {{on: [deadline, delivery], webhook: {HOOK}}}", **where), LATE)
    add_flow(stack, airflow, "notify_on_time.yaml", FLOW.format(
        what="on time", dag_id=ON_TIME, model="copy", command=json.dumps("cp /input/* /output/"),
        extra=f"deadline: {ON_TIME_DEADLINE}s\nnotify: {{on: [deadline], webhook: {HOOK}}}", **where), ON_TIME)
    add_flow(stack, airflow, "notify_failure.yaml", FLOW.format(
        what="failure", dag_id=BROKEN, model="broken",
        command=json.dumps("echo 'reading Test^Phantom TEST0001'; exit 3"),
        extra="notify: {on: [failure], email: [physics@clinic.example]}", **where), BROKEN)


def push(stack, tmp_path, what: str) -> str:
    series = make_series(tmp_path / what, modality="MR", slices=2, size=16, description=f"E2E notify {what}")
    assert storescu(stack.dicom_port, series.files).returncode == 0
    return f"{series.study_uid}.1"


def test_a_late_run_alerts_once_one_on_time_never_and_a_failure_mails(stack, airflow, flows, webhook, mailbox, tmp_path):
    started = time.monotonic()
    late_run, broken_run = push(stack, tmp_path, "deadline"), push(stack, tmp_path, "failure")
    on_time_run = push(stack, tmp_path, "on time")
    on_time = run_finished(airflow, ON_TIME, on_time_run, timeout=90)
    assert on_time["state"] == "success"

    # The failing model: one mail, with the task and its exit code, nothing of the patient.
    assert run_finished(airflow, BROKEN, broken_run, timeout=90)["state"] == "failed"
    (mail,) = wait_for(lambda: list(mailbox.messages) or None, 30, "the failure mail")
    assert mail["Subject"] == f"[raddeploy] failure: E2E notify failure {broken_run}"
    assert mail["X-Envelope-To"] == "physics@clinic.example"
    body = Mailbox.body(mail)
    assert "task broken failed: model broken (raddeploy/busybox:latest) exited with code 3" in body
    assert f"/dags/{BROKEN}/runs/{broken_run}" in body
    assert "Test^Phantom" in task_log(airflow, BROKEN, broken_run, "broken")  # the model did print it; the mail does not carry it
    assert not any(phi in mail.as_string() for phi in PHI)

    # The slow model: the deadline alert arrived while the run was still going, then its delivery.
    run = run_finished(airflow, LATE, late_run, timeout=90)
    assert run["state"] == "success", {t: ti["state"] for t, ti in task_instances(airflow, LATE, late_run).items()}
    wait_for(lambda: len(webhook.received) >= 2 or None, 30, "the deadline and delivery notices")
    time.sleep(2)  # anything more would come now: the scheduler checks deadlines every loop
    # The on-time run's deadline has passed too (waited out if need be): it raised nothing.
    due = datetime.fromisoformat(on_time["queued_at"]).timestamp() + ON_TIME_DEADLINE
    assert datetime.fromisoformat(on_time["end_date"]).timestamp() < due
    time.sleep(max(0.0, due + 2 - time.time()))
    assert [notice for notice in webhook.received if notice["dag_id"] == ON_TIME] == [], (
        on_time["queued_at"], on_time["start_date"], on_time["end_date"])
    events = [notice["event"] for notice in webhook.received]
    assert events == ["deadline", "delivery"], webhook.received
    deadline, delivery = webhook.received
    assert deadline == {"event": "deadline", "flow": "E2E notify deadline", "dag_id": LATE, "run_id": late_run,
                        "state": "running", "reason": "not delivered 5s after it was queued; the run is running",
                        "url": f"{stack.api_url}/dags/{LATE}/runs/{late_run}"}
    assert delivery["state"] == "success" and delivery["reason"] == "results sent to the destination"
    assert not any(phi in json.dumps(webhook.received) for phi in PHI)
    assert len(mailbox.messages) == 1  # the deadline flow mails nobody; the failure flow once
    took = datetime.fromisoformat(on_time["end_date"]) - datetime.fromisoformat(on_time["queued_at"])
    print(f"\n[e2e] notifications: {time.monotonic() - started:.1f} s (the on-time run took {took})")
