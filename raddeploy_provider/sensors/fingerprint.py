"""FingerprintSensor: wait until the study holds what the flow needs, then freeze the input."""

from __future__ import annotations

import time
from datetime import timedelta
from functools import cached_property
from typing import Any

from airflow.sdk import BaseSensorOperator, Context
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from airflow.triggers.base import StartTriggerArgs

from raddeploy_provider.completion import readiness
from raddeploy_provider.config import load_settings
from raddeploy_provider.flows import Flow
from raddeploy_provider.store import StudyStore
from raddeploy_provider.triggers.study_ready import BACKSTOP, SHORT_WAIT, StudyReadyTrigger
from raddeploy_provider.utils.intake import InputRefused, take_input
from raddeploy_provider.utils.run_note import set_run_note
from raddeploy_provider.utils.runs import study_uid


class FingerprintSensor(BaseSensorOperator):
    """Proceeds when the study satisfies every trigger of ``flow``, no association is still
    sending it, and it has been quiet for ``grouping.quiet_period``.

    It starts on the triggerer (Airflow's ``start_from_trigger``): :class:`StudyReadyTrigger`
    waits there, holding no worker or executor slot while a study trickles in, and when the study
    is ready takes the input itself and ends the task, so the common run's sensor costs no worker
    start (docs/architecture.md, "Cost per run"). Taking the input (:func:`~raddeploy_provider.
    utils.intake.take_input`) closes the run in the index (later instances open the next
    generation), hard-links the matched instances into the run's ``input/`` folder, laid out as
    the flow says, and records the run in its manifest: flow, input UIDs and the study's sender
    (calling AE, address), so the tasks after it need their run folder alone, never the index.

    A worker resumes it (``execute_complete``) for what the triggerer leaves: decompressed input
    (``input.transfer_syntax: uncompressed``), an input the triggerer could not take, and
    ``grouping.timeout``, where it follows ``grouping.on_timeout``: ``skip``, ``fail``, or
    ``proceed`` with what matched. Run by hand on a worker (``execute``), it checks once, waits
    out a short quiet period in place, and defers to the same trigger. Returns a small summary
    (counts and UIDs, no patient data).

    :param flow: the flow this DAG runs.
    :param poll_interval: seconds between checks on the triggerer.
    """

    ui_color = "#e8f4c7"
    # Rendered on the triggerer for the start there (Airflow renders the operator's template
    # fields that are also trigger arguments); our own templates, never flow text.
    template_fields = ("run_id", "study_uid")
    start_from_trigger = True

    def __init__(self, *, flow: Flow, poll_interval: float = 1.0, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", flow.grouping.timeout)
        super().__init__(poke_interval=poll_interval, **kwargs)
        self.flow = flow
        self.run_id = "{{ run_id }}"
        self.study_uid = "{{ (dag_run.conf or {}).get('study_uid') or '' }}"
        self.start_trigger_args = StartTriggerArgs(
            trigger_cls=StudyReadyTrigger.CLASSPATH,
            trigger_kwargs={"flow_file": str(flow.source), "dag_id": flow.dag_id, "run_id": self.run_id,
                            "study_uid": self.study_uid, "data_dir": "", "deadline": 0,
                            "poll_interval": poll_interval,
                            # Decompressing is a worker's work, not the triggerer's event loop's.
                            "take_input": flow.input.transfer_syntax != "uncompressed"},
            next_method="execute_complete", next_kwargs=None,
            # Airflow's own timeout, a backstop: the trigger's deadline (BACKSTOP before it) comes first.
            timeout=timedelta(seconds=flow.grouping.timeout + BACKSTOP))

    @cached_property
    def store(self) -> StudyStore:
        """Opened once per task run, on the worker (never at DAG parse)."""
        settings = load_settings()
        return StudyStore(settings.data_dir, index_url=settings.index_url)

    def execute(self, context: Context) -> dict[str, Any]:
        uid = study_uid(context)
        settings = load_settings()
        index = self.store.index
        state = readiness(self.flow, index, uid)
        # Only the quiet period left, and little of it: wait here. Deferring costs a round
        # trip through the triggerer and the scheduler (seconds) to save a worker a moment.
        while not state.ready and state.only_quiet_left and state.quiet_left <= SHORT_WAIT:
            time.sleep(state.quiet_left + 0.05)
            state = readiness(self.flow, index, uid)
        if state.ready:
            return self._take_input(context, uid, noted=False)
        self.log.info("waiting: %s", state.waiting_for)
        set_run_note(self.flow.dag_id, context["run_id"], f"Waiting: {state.waiting_for}")
        self.defer(
            trigger=StudyReadyTrigger(
                flow_file=str(self.flow.source), dag_id=self.flow.dag_id, run_id=context["run_id"],
                study_uid=uid, data_dir=str(settings.data_dir),
                deadline=time.time() + self.flow.grouping.timeout, poll_interval=self.poke_interval,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.flow.grouping.timeout + BACKSTOP),
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        uid = study_uid(context)
        status = event.get("status")
        if status == "ready":
            return self._take_input(context, uid)
        if status == "error":
            raise AirflowFailException(event.get("message", "the study could not be checked"))
        waited = f"{self.flow.grouping.timeout:g} s"
        message = f"not complete after {waited}: {event.get('waiting_for', '')}"
        policy = self.flow.grouping.on_timeout
        if policy == "proceed" and len(event.get("unmet", [])) < len(self.flow.triggers):
            self.log.warning("%s; proceeding with the triggers that matched", message)
            return self._take_input(context, uid)
        # Close the run all the same, so that later instances open a new generation.
        self.store.index.close_run(self.flow.dag_id, context["run_id"], uid)
        set_run_note(self.flow.dag_id, context["run_id"], f"Timed out ({policy}): {message}")
        if policy == "fail":
            raise AirflowFailException(message)
        raise AirflowSkipException(message)

    def _take_input(self, context: Context, uid: str, noted: bool = True) -> dict[str, Any]:
        try:
            return take_input(self.flow, self.store.index, self.store.layout.root, context["run_id"], uid,
                              noted=noted, log=self.log)
        except InputRefused as exc:  # no retry: the same input fails the same way
            raise AirflowFailException(str(exc)) from None
