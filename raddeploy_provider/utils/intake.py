"""Taking a run's input, once its study is ready: the fingerprint sensor's work.

One home for both places it happens: :class:`~raddeploy_provider.triggers.study_ready.
StudyReadyTrigger` on the triggerer (the sensor starts there, and a run whose input is links
never costs a worker start) and :class:`~raddeploy_provider.sensors.fingerprint.FingerprintSensor`
on a worker (when the input must be decompressed, or the triggerer could not take it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from raddeploy_provider import gpu
from raddeploy_provider.config import load_settings
from raddeploy_provider.flows import Flow
from raddeploy_provider.flows.matching import select_inputs
from raddeploy_provider.store import StoredInstance, StudyIndex, manifest, snapshot
from raddeploy_provider.utils.run_note import pool_slots, set_run_note


class InputRefused(Exception):
    """The input cannot be taken, and trying again will not change that (the task fails, no retry)."""


def take_input(flow: Flow, index: StudyIndex, data_root: Path, run_id: str, uid: str, *, noted: bool,
               log: logging.Logger | Any) -> dict[str, Any]:
    """Close the run in the index (later instances open the next generation), link the matched
    instances into the run's ``input/`` folder as the flow lays it out (decompressed copies for
    ``input.transfer_syntax: uncompressed``), and record flow, input UIDs and the study's sender in
    the manifest, so that the tasks after it need their run folder alone. Idempotent: a retry
    links the same files into the same folder. Returns a summary (counts and UIDs, no patient data).

    The run note is written only when there is something to say (a GPU shortfall) or an earlier
    note to replace (``noted``: a "Waiting" note): every note is a write to Airflow's public API,
    and on SQLite each one can stall its API server under load (docs/architecture.md, "Cost per run").
    """
    from raddeploy_provider.dicom.transcode import CannotConvert  # pydicom's codecs: not at DAG parse

    instances = index.close_run(flow.dag_id, run_id, uid)
    chosen = [instances[i] for i in select_inputs(flow, [(x.series_uid, x.tags) for x in instances])]
    if not chosen:
        raise InputRefused(f"study {uid} has no instance any trigger matches")
    run = load_settings().data.run(flow.dag_id, run_id)
    try:
        made = snapshot(chosen, data_root, run.input, flow.input.layout,
                        uncompressed=flow.input.transfer_syntax == "uncompressed")
    except CannotConvert as exc:  # the same file fails the same way
        raise InputRefused(f"an input instance cannot be given uncompressed: {exc}. Its sender's transfer syntax "
                           "needs a codec we lack: have it send uncompressed, or remove `input.transfer_syntax: "
                           "uncompressed` if the model has codecs") from None
    series = sorted({x.series_uid for x in chosen})
    manifest.record(run, manifest.RUN_PART, {
        "flow": {"dag_id": flow.dag_id, "name": flow.name, "version": flow.version,
                 "file": str(flow.source), "sha256": flow.file_hash},
        "study_uid": uid, "input": {"series": series, "sop_instance_uids": sorted(x.sop_uid for x in chosen)},
        **sender(chosen),
    })
    summary = {"study_uid": uid, "instances": len(made), "series": series}
    log.info("input ready: %d instances of %d series", len(made), len(series))
    note = f"Flow {' '.join(filter(None, (flow.name, flow.version)))}: input {len(made)} instances, {len(series)} series"
    waiting = gpu_shortfall(flow)
    if waiting:  # the model tasks will sit in "scheduled": say why where people look
        log.warning("%s", waiting)
        note += f". {waiting[0].upper()}{waiting[1:]}"
    if waiting or noted:
        set_run_note(flow.dag_id, run_id, note)
    return summary


def gpu_shortfall(flow: Flow) -> str | None:
    """Why the flow's GPU models will not be scheduled (the GPU pool is too small for them), or None."""
    models = [(m.name, m.gpu) for m in flow.models if m.gpu]
    if not models:
        return None
    settings = load_settings()
    slots = pool_slots(settings.gpu_pool)
    return None if slots is None else gpu.shortfall(settings.gpu_pool, slots, models, settings.gpu_fallback,
                                                     settings.gpu_queue_depth)


def sender(instances: list[StoredInstance]) -> dict[str, Any]:
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
