"""Notifications through Airflow's real notifiers (raddeploy_provider.notifications) to a local
HTTP server and a local SMTP server (aiosmtpd), with the connections given as AIRFLOW_CONN_*."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from dicom_factory import make_series
from flow_factory import write
from notify_peers import PHI, Mailbox, Webhook
from peers import free_port
from raddeploy_provider import notifications
from raddeploy_provider.flows import load_flow
from raddeploy_provider.flows.model import NotifySpec

FLOW = """
name: Notify unit
id: notify_unit
triggers: [{Modality: CT}]
models:
  - {name: segment, image: raddeploy/busybox:latest, inputs: {src: /input}, outputs: {dst: /output}}
destinations:
  - {host: 127.0.0.1, port: 11113, ae_title: TPS}
  - {host: 127.0.0.1, port: 11114, ae_title: PACS}
deadline: 20m
notify: {on: [failure, rejection, deadline, delivery], webhook: unit_hook, email: [physics@clinic.example]}
"""


@pytest.fixture
def webhook():
    server = Webhook()
    yield server
    server.stop()


@pytest.fixture
def mailbox():
    server = Mailbox()
    yield server
    server.stop()


@pytest.fixture
def deployment(tmp_path, monkeypatch, webhook, mailbox):
    """The data dir (the once-markers) and the two connections, as Airflow reads them from the environment."""
    monkeypatch.setenv("RADDEPLOY_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("RADDEPLOY_UI_URL", "https://airflow.clinic.example")
    monkeypatch.setenv("AIRFLOW_CONN_UNIT_HOOK", json.dumps({"conn_type": "http", "host": "127.0.0.1",
                                                             "port": webhook.port, "schema": "http"}))
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", json.dumps({
        "conn_type": "smtp", "host": "127.0.0.1", "port": mailbox.port,
        "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "raddeploy@clinic.example"}}))
    return tmp_path


@pytest.fixture
def flow(tmp_path):
    return load_flow(write(tmp_path / "flows", FLOW))


@pytest.fixture
def phantom_run(tmp_path):
    """A run of the phantom's study: ids and conf are UIDs."""
    series = make_series(tmp_path / "ct", slices=2, size=16)
    return series.study_uid, f"{series.study_uid}.1"


class FakeTI:
    def __init__(self, task_id: str, states: dict[str, str] | None = None) -> None:
        self.task_id = task_id
        self.states = states or {}

    def get_task_states(self, dag_id, task_ids, run_ids):
        return {run_ids[0]: {task: self.states.get(task, "running") for task in task_ids}}


def context(run_id: str, study_uid: str, task_id: str, *, exception=None, clear_number=0, states=None) -> dict:
    dag_run = SimpleNamespace(run_id=run_id, clear_number=clear_number,
                              conf={"study_uid": study_uid, "generation": 1})
    return {"ti": FakeTI(task_id, states), "dag_run": dag_run, "run_id": run_id, "exception": exception}


def _model_failed(log_tail: list[str]) -> BaseException:
    """A ModelFailed raised by a line of our package, as ModelOperator raises it."""
    from raddeploy_provider.exceptions import ModelFailed

    namespace = {"ModelFailed": ModelFailed, "tail": log_tail}
    exec(compile("def fail():\n    raise ModelFailed('segment', 'raddeploy/busybox:latest', 3, log_tail=tail)\n",
                 str(Path(notifications.__file__).parent / "operators" / "model.py"), "exec"), namespace)
    try:
        namespace["fail"]()
    except ModelFailed as error:
        return error


def test_the_dag_gets_callbacks_and_a_deadline_alert_only_when_wanted(deployment, flow) -> None:
    from airflow.sdk import AsyncCallback, DeadlineReference
    from airflow.serialization.serialized_objects import DagSerialization

    from raddeploy_provider.dag_factory import build_dag

    dag = build_dag(flow)
    (alert,) = dag.deadline
    assert alert.reference == DeadlineReference.DAGRUN_QUEUED_AT and alert.interval == timedelta(minutes=20)
    assert isinstance(alert.callback, AsyncCallback)
    assert alert.callback.path == "raddeploy_provider.notifications.deadline_missed"
    assert alert.callback.kwargs == {"flow": "Notify unit", "deadline": 1200.0, "webhook": "unit_hook",
                                     "email": "physics@clinic.example", "smtp": "smtp_default",
                                     "ui_url": "https://airflow.clinic.example"}
    hash(alert)  # Airflow hashes alerts: the kwargs must stay flat
    for task in dag.tasks:
        assert [cb.__func__ for cb in task.on_failure_callback] == [notifications.FlowEvents.task_failed]
        assert [cb.__func__ for cb in task.on_success_callback] == [notifications.FlowEvents.task_succeeded]
    assert dag.default_args["retries"] == 0
    # As the DAG processor stores it and the scheduler reads it back.
    restored = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    assert restored.dag_id == flow.dag_id and restored.deadline

    quiet = build_dag(replace(flow, notify=NotifySpec(webhook="", email=()), deadline=None))
    assert not quiet.deadline and all(not t.on_failure_callback and not t.on_success_callback for t in quiet.tasks)
    no_deadline_event = build_dag(replace(flow, notify=NotifySpec(on=("failure",))))
    assert not no_deadline_event.deadline and all(not t.on_success_callback for t in no_deadline_event.tasks)


def test_one_failure_notice_per_run_without_the_patient(deployment, flow, phantom_run, webhook, mailbox) -> None:
    study_uid, run_id = phantom_run
    events = notifications.FlowEvents(flow.name, flow.dag_id, notifications.targets_of(flow),
                                      "https://airflow.clinic.example", notifications.send_task_ids(flow))
    error = _model_failed(["reading Test^Phantom TEST0001", "Traceback: ..."])
    events.task_failed(context(run_id, study_uid, "segment", exception=error))
    events.task_failed(context(run_id, study_uid, "other_branch", exception=RuntimeError("Test^Phantom")))
    assert len(webhook.received) == 1 and len(mailbox.messages) == 1
    (posted,) = webhook.received
    assert posted == {"event": "failure", "flow": "Notify unit", "dag_id": "notify_unit", "run_id": run_id,
                      "state": "failed",
                      "reason": "task segment failed: model segment (raddeploy/busybox:latest) exited with code 3",
                      "url": f"https://airflow.clinic.example/dags/notify_unit/runs/{run_id}"}
    (mail,) = mailbox.messages
    assert mail["Subject"] == f"[raddeploy] failure: Notify unit {run_id}"
    assert mail["From"] == "raddeploy@clinic.example" and mail["X-Envelope-To"] == "physics@clinic.example"
    body = Mailbox.body(mail)
    assert "exited with code 3" in body and posted["url"] in body
    for shown in (json.dumps(posted), mail.as_string()):
        assert not any(phi in shown for phi in PHI)
    # The run cleared and failing again is news again.
    events.task_failed(context(run_id, study_uid, "segment", exception=error, clear_number=1))
    assert len(webhook.received) == 2


def test_delivery_is_told_by_the_last_send_task(deployment, flow, phantom_run, webhook, mailbox) -> None:
    study_uid, run_id = phantom_run
    events = notifications.FlowEvents(flow.name, flow.dag_id, notifications.targets_of(flow), "http://ui",
                                      notifications.send_task_ids(flow))
    first, second = events.sends
    events.task_succeeded(context(run_id, study_uid, "segment", states={}))  # not a send task
    events.task_succeeded(context(run_id, study_uid, first, states={first: "success"}))  # the other still runs
    assert webhook.received == []
    both = {first: "success", second: "success"}
    events.task_succeeded(context(run_id, study_uid, second, states=both))
    events.task_succeeded(context(run_id, study_uid, first, states=both))  # both saw all done: one notice
    assert [(n["event"], n["state"], n["reason"]) for n in webhook.received] == [
        ("delivery", "success", "results sent to all 2 destinations")]
    assert len(mailbox.messages) == 1


def test_rejection_names_who_never_why(deployment, flow, phantom_run, webhook, mailbox) -> None:
    study_uid, run_id = phantom_run
    ctx = context(run_id, study_uid, "review")
    assert notifications.notify_rejection(ctx, flow, "dr_hansen") is True
    assert notifications.notify_rejection(ctx, flow, "dr_hansen") is False  # once per run
    (posted,) = webhook.received
    assert (posted["event"], posted["state"], posted["reason"]) == ("rejection", "rejected", "rejected by dr_hansen")
    assert mailbox.messages[0]["Subject"] == f"[raddeploy] rejection: Notify unit {run_id}"


def test_the_deadline_callback_on_the_triggerers_event_loop(deployment, flow, phantom_run, webhook, mailbox) -> None:
    study_uid, run_id = phantom_run
    alert = notifications.dag_arguments(flow, {})["deadline"]
    airflow_context = {"dag_run": {"dag_id": flow.dag_id, "dag_run_id": run_id, "state": "running",
                                   "conf": {"study_uid": study_uid, "generation": 1}},
                       "deadline": {"id": "x", "deadline_time": "2026-12-02T10:20:00+00:00"}}
    said = asyncio.run(notifications.deadline_missed(context=airflow_context, **alert.callback.kwargs))
    assert said == "sent to 2 of 2 targets"
    assert asyncio.run(notifications.deadline_missed(context=airflow_context, **alert.callback.kwargs)) == (
        "not sent: already notified")
    (posted,) = webhook.received
    assert posted["event"] == "deadline" and posted["state"] == "running"
    assert posted["reason"] == "not delivered 20m after it was queued; the run is running"
    (mail,) = mailbox.messages
    assert mail["Subject"] == f"[raddeploy] deadline: Notify unit {run_id}"
    assert not any(phi in mail.as_string() + json.dumps(posted) for phi in PHI)
    failed = {**airflow_context, "dag_run": {**airflow_context["dag_run"], "dag_run_id": f"{study_uid}.2",
                                             "state": "failed"}}
    assert asyncio.run(notifications.deadline_missed(context=failed, **alert.callback.kwargs)) == (
        "not sent: the run had failed")


def test_a_target_that_is_down_is_logged_and_never_raises(deployment, flow, phantom_run, monkeypatch, caplog):
    study_uid, run_id = phantom_run
    dead = free_port()
    monkeypatch.setenv("AIRFLOW_CONN_UNIT_HOOK", json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": dead}))
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": dead,
                                                                "extra": {"disable_ssl": True, "disable_tls": True,
                                                                          "from_email": "r@x.example"}}))
    events = notifications.FlowEvents(flow.name, flow.dag_id, notifications.targets_of(flow), "http://ui")
    events.task_failed(context(run_id, study_uid, "segment", exception=None))
    assert "not sent to webhook unit_hook" in caplog.text and "not mailed (connection smtp_default)" in caplog.text
