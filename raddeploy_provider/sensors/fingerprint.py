"""FingerprintSensor: wait until the study holds what the flow needs, then freeze the input."""

from __future__ import annotations

import time
from datetime import timedelta
from functools import cached_property
from typing import Any

from airflow.sdk import BaseSensorOperator, Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from raddeploy_provider import gpu
from raddeploy_provider.completion import readiness
from raddeploy_provider.config import load_settings
from raddeploy_provider.flows import Flow
from raddeploy_provider.flows.matching import select_inputs
from raddeploy_provider.store import StoredInstance, StudyStore, manifest, snapshot
from raddeploy_provider.triggers.study_ready import StudyReadyTrigger
from raddeploy_provider.utils.run_note import pool_slots, set_run_note
from raddeploy_provider.utils.runs import run_dir, study_uid


#: Seconds of quiet period left that the sensor waits out on the worker instead of deferring.
SHORT_WAIT = 5.0


class FingerprintSensor(BaseSensorOperator):
    """Proceeds when the study satisfies every trigger of ``flow``, no association is still
    sending it, and it has been quiet for ``grouping.quiet_period``.

    It checks once on a worker, then defers to :class:`StudyReadyTrigger` on the triggerer
    (no worker slot held while a study trickles in). When ready it closes the run in the
    index (later instances open the next generation), hard-links the matched instances
    into the run's ``input/`` folder, laid out as the flow says, and records the run in its
    manifest: flow, input UIDs and the study's sender (calling AE, address), so the tasks
    after it need their run folder alone, never the index. At ``grouping.timeout`` it
    follows ``grouping.on_timeout``: ``skip``, ``fail``, or ``proceed`` with what matched.
    Returns a small summary (counts and UIDs, no patient data).

    :param flow: the flow this DAG runs.
    :param poll_interval: seconds between checks on the triggerer.
    """

    ui_color = "#e8f4c7"

    def __init__(self, *, flow: Flow, poll_interval: float = 1.0, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", flow.grouping.timeout)
        super().__init__(poke_interval=poll_interval, **kwargs)
        self.flow = flow

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
            timeout=timedelta(seconds=self.flow.grouping.timeout + 300),
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
        """Close the run and snapshot its input; the run note is written when there is something
        to say (a GPU shortfall) or an earlier note to replace (``noted``: the sensor deferred with
        a "Waiting" note). Every note is a write to Airflow's public API, and on SQLite each one
        can stall its API server under load (see docs/architecture.md, "Cost per run")."""
        from raddeploy_provider.dicom.transcode import CannotConvert  # pydicom's codecs: not at DAG parse

        store = self.store
        instances = store.index.close_run(self.flow.dag_id, context["run_id"], uid)
        chosen = [instances[i] for i in select_inputs(self.flow, [(x.series_uid, x.tags) for x in instances])]
        if not chosen:
            raise AirflowException(f"study {uid} has no instance any trigger matches")
        run = run_dir(context)
        try:
            made = snapshot(chosen, store.layout.root, run.input, self.flow.input.layout,
                            uncompressed=self.flow.input.transfer_syntax == "uncompressed")
        except CannotConvert as exc:  # no retry: the same file fails the same way
            raise AirflowFailException(f"an input instance cannot be given uncompressed: {exc}. Its sender's "
                                       "transfer syntax needs a codec we lack: have it send uncompressed, or "
                                       "remove `input.transfer_syntax: uncompressed` if the model has codecs") from None
        series = sorted({x.series_uid for x in chosen})
        manifest.record(run, manifest.RUN_PART, {
            "flow": {"dag_id": self.flow.dag_id, "name": self.flow.name, "version": self.flow.version,
                     "file": str(self.flow.source), "sha256": self.flow.file_hash},
            "study_uid": uid, "input": {"series": series, "sop_instance_uids": sorted(x.sop_uid for x in chosen)},
            **_sender(chosen),
        })
        summary = {"study_uid": uid, "instances": len(made), "series": series}
        self.log.info("input ready: %d instances of %d series", len(made), len(series))
        note = (f"Flow {' '.join(filter(None, (self.flow.name, self.flow.version)))}: "
                f"input {len(made)} instances, {len(series)} series")
        waiting = self._gpu_shortfall()
        if waiting:  # the model tasks will sit in "scheduled": say why where people look
            self.log.warning("%s", waiting)
            note += f". {waiting[0].upper()}{waiting[1:]}"
        if waiting or noted:
            set_run_note(self.flow.dag_id, context["run_id"], note)
        return summary

    def _gpu_shortfall(self) -> str | None:
        """Why the flow's GPU models will not be scheduled (the GPU pool is too small for them), or None."""
        models = [(m.name, m.gpu) for m in self.flow.models if m.gpu]
        if not models:
            return None
        settings = load_settings()
        slots = pool_slots(settings.gpu_pool)
        return None if slots is None else gpu.shortfall(settings.gpu_pool, slots, models, settings.gpu_fallback)


def _sender(instances: list[StoredInstance]) -> dict[str, Any]:
    """The node the matched input came from (calling AE title and address, no names), for
    results returned to it: ``{"sender": ...}``, or ``{"sender": None, "sender_refused": why}``
    when returning results would be unsafe. Only the instances the triggers matched count, not
    whoever added an instance to the study; and only one node, sending one patient."""
    nodes = sorted({(x.calling_ae, x.peer_host) for x in instances if x.calling_ae and x.peer})
    patients = {str(x.tags.get("PatientID", "")) for x in instances}
    why = None
    if not nodes:
        why = "the matched input has no recorded sender"
    elif len(nodes) > 1:
        why = (f"the matched input came from {len(nodes)} nodes ("
               + ", ".join(f"{ae}@{host}" for ae, host in nodes[:5]) + "): results go back to none of them")
    elif len(patients) > 1:
        why = "the matched input instances carry different Patient IDs"
    if why:
        return {"sender": None, "sender_refused": why}
    calling_ae, host = nodes[0]
    return {"sender": {"calling_ae": calling_ae, "host": host}}
