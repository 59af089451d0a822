"""What a notification says (raddeploy_provider.notices): the formats, the targets, and no patient data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_factory import make_series
from raddeploy_provider import notices
from raddeploy_provider.flows.model import NotifySpec
from raddeploy_provider.flows.schema import keys_of
from raddeploy_provider.notices import DEADLINE, DELIVERY, FAILURE, REJECTION, Targets

PHI = ("Test^Phantom", "Phantom", "TEST0001")


def test_the_events_are_the_flow_schemas() -> None:
    assert notices.EVENTS == keys_of("notify")["on"].choices
    assert set(notices.DEFAULT_EVENTS) == set(notices.EVENTS) - {DELIVERY}
    assert set(notices.HEADLINES) == set(notices.EVENTS) | {notices.DISK}  # DISK: the deployment's own alert


def test_a_flow_overrides_the_deployment_field_by_field() -> None:
    deployment = dict(on=notices.DEFAULT_EVENTS, webhook="ops_hook", email=("physics@x.example",), smtp="smtp_default")
    assert notices.targets(NotifySpec(), **deployment) == Targets(notices.DEFAULT_EVENTS, "ops_hook",
                                                                  ("physics@x.example",), "smtp_default")
    mine = notices.targets(NotifySpec(on=(DEADLINE,), email=("dr@x.example",)), **deployment)
    assert mine == Targets((DEADLINE,), "ops_hook", ("dr@x.example",), "smtp_default")
    silent = notices.targets(NotifySpec(webhook="", email=()), **deployment)  # "none" in the flow wins
    assert (silent.webhook, silent.email, silent.wants(FAILURE)) == (None, (), False)
    assert not notices.targets(NotifySpec(on=()), **deployment).wants(FAILURE)
    assert mine.wants(DEADLINE) and not mine.wants(FAILURE)


def test_the_webhook_json_and_the_mail() -> None:
    notice = notices.notice(FAILURE, flow="HN OARs", dag_id="hn_oars", run_id="1.2.826.0.1.3680043.8.498.1.2",
                            state="failed", reason="task segment failed: model segment (hn:1) exited with code 3",
                            ui_url="https://airflow.clinic.example/")
    assert notice.payload() == {
        "event": "failure", "flow": "HN OARs", "dag_id": "hn_oars", "run_id": "1.2.826.0.1.3680043.8.498.1.2",
        "state": "failed", "reason": "task segment failed: model segment (hn:1) exited with code 3",
        "url": "https://airflow.clinic.example/dags/hn_oars/runs/1.2.826.0.1.3680043.8.498.1.2"}
    json.dumps(notice.payload())
    assert notice.subject == "[raddeploy] failure: HN OARs 1.2.826.0.1.3680043.8.498.1.2"
    text = notice.text()
    assert text.splitlines()[0] == notices.HEADLINES[FAILURE]
    assert "Run:    1.2.826.0.1.3680043.8.498.1.2" in text and notice.url in text and len(text) < 600
    assert notice.html() == f"<pre>{text}</pre>"  # nothing in it to escape here


def test_reasons_are_one_short_line_and_html_is_escaped() -> None:
    notice = notices.notice(DEADLINE, flow="<b>x</b> & y", dag_id="d", run_id="1.2", state="running",
                            reason="a\nb " + "c" * 500, ui_url="http://h")
    assert "\n" not in notice.reason and len(notice.reason) == notices.MAX_REASON
    assert "<b>" not in notice.html() and "&lt;b&gt;" in notice.html()
    with pytest.raises(ValueError, match="unknown notification event"):
        notices.notice("late", flow="f", dag_id="d", run_id="r", state="s", reason="", ui_url="http://h")
    # A hand-made run id (":" and "+") is quoted in the link.
    assert notices.run_url("http://h:8080", "d", "manual__2026-12-02T10:00:00+00:00") == (
        "http://h:8080/dags/d/runs/manual__2026-12-02T10%3A00%3A00%2B00%3A00")


def test_what_each_event_says() -> None:
    assert notices.deadline_reason(1200, "running") == "not delivered 20m after it was queued; the run is running"
    assert notices.deadline_reason(5, "success") == "delivered later than 5s after it was queued"
    assert notices.delivery_reason(1) == "results sent to the destination"
    assert notices.delivery_reason(3) == "results sent to all 3 destinations"
    assert notices.rejection_reason("dr_hansen") == "rejected by dr_hansen"
    assert notices.rejection_reason(None, timed_out=True) == "the review timed out, which rejects the results"
    assert notices.failure_reason("send_0", None) == "task send_0 failed"


def _raise(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as caught:
        return caught


def test_only_our_own_first_lines_are_quoted() -> None:
    from raddeploy_provider.exceptions import ModelFailed  # the provider's, raised here as the operator does

    ours = ModelFailed("segment", "raddeploy/busybox:latest", 3, log_tail=["patient Test^Phantom TEST0001"])
    # Raised by this test (not our package): a class name only, whatever it says.
    assert notices.error_line(_raise(ours)) == "ModelFailed"
    from raddeploy_provider import units

    # Raised by a line of ours: its first line (and never the log tail under it).
    try:
        units.parse_duration("Test^Phantom")
    except ValueError as builtin_of_ours:  # a builtin error of our code quotes its input: not quoted
        assert notices.error_line(builtin_of_ours) == "ValueError"
    assert notices.error_line("Test^Phantom died") == ""  # text Airflow gives for a dead task: not ours
    assert notices.error_line(None) == ""


def test_a_failed_model_of_the_phantom_notifies_without_its_name_or_id(tmp_path: Path) -> None:
    """The phantom's study through a failing model: the run id is its StudyUID, the model printed
    the patient's name and ID; nothing of them reaches the webhook JSON, the subject or the mail."""
    series = make_series(tmp_path / "ct")
    run_id = f"{series.study_uid}.1"
    conf = {"study_uid": series.study_uid, "generation": 1}  # what the listener puts in dag_run.conf
    error = _model_failure_raised_by_the_operator_code(["Loading Test^Phantom (TEST0001)", "Traceback ..."])
    reason = notices.failure_reason("segment", error)
    assert reason == "task segment failed: model segment (raddeploy/busybox:latest) exited with code 3"
    made = [notices.notice(event, flow="HN OARs", dag_id="hn_oars", run_id=run_id, state="failed", reason=why,
                           ui_url="http://127.0.0.1:8080")
            for event, why in ((FAILURE, reason), (DEADLINE, notices.deadline_reason(5, "running")),
                               (REJECTION, notices.rejection_reason("dr_hansen")),
                               (DELIVERY, notices.delivery_reason(2)))]
    for notice in made:
        assert notice.run_id == run_id and conf["study_uid"] in notice.url
        for shown in (json.dumps(notice.payload()), notice.subject, notice.text(), notice.html()):
            for phi in PHI:
                assert phi not in shown, (notice.event, shown)


def _model_failure_raised_by_the_operator_code(log_tail: list[str]) -> BaseException:
    """A ModelFailed with its traceback ending in our package, as ModelOperator raises it."""
    from raddeploy_provider.exceptions import ModelFailed

    namespace: dict = {"ModelFailed": ModelFailed, "tail": log_tail}
    code = compile("def fail():\n    raise ModelFailed('segment', 'raddeploy/busybox:latest', 3, log_tail=tail)\n",
                   str(Path(notices.__file__).parent / "operators" / "model.py"), "exec")
    exec(code, namespace)
    try:
        namespace["fail"]()
    except ModelFailed as error:
        return error
    raise AssertionError("not raised")
