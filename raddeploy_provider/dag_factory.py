"""Build one Airflow DAG per flow: fingerprint sensor -> model tasks -> send tasks.

``build_all`` is what ``dags/raddeploy_flows.py`` calls. Each flow is built inside its own
try: one broken flow file becomes a paused DAG tagged ``invalid`` whose description carries
the error, and never takes the other flows' DAGs down with it.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, get_parsing_context

from raddeploy_provider.config import Settings, load_settings
from raddeploy_provider.flows import Flow, FlowError, id_cache, load_flow, load_flows
from raddeploy_provider.flows.graph import REVIEW_TASK, SENSOR_TASK, return_task_id, send_task_id, task_edges
from raddeploy_provider.flows.model import ModelSpec
from raddeploy_provider.notifications import dag_arguments as notification_arguments
from raddeploy_provider.operators.dicom_send import DicomSendOperator
from raddeploy_provider.operators.model import ModelOperator
from raddeploy_provider.operators.review import ReviewOperator
from raddeploy_provider.sensors.fingerprint import FingerprintSensor
from raddeploy_provider.units import slug

log = logging.getLogger(__name__)

SEND_RETRIES = 3
MAX_ACTIVE_RUNS = 256


def model_task(flow: Flow, model: ModelSpec, settings: Settings, **kwargs: Any) -> ModelOperator:
    """The task of one model of ``flow``: the one home of its operator's arguments, shared by
    :func:`build_dag` and ``raddeploy try`` (``kwargs``: further BaseOperator arguments)."""
    gpu = {"pool": settings.gpu_pool, "pool_slots": model.gpu, "queue": settings.gpu_queue} if model.gpu else {}
    return ModelOperator(
        task_id=model.name,
        model=model,
        flow_id=flow.dag_id,
        flow_version=flow.version,
        flow_extra=flow.extra,
        provenance=flow.provenance,
        retries=model.retries,
        execution_timeout=timedelta(seconds=model.timeout) if model.timeout else None,
        **gpu,
        **kwargs,
    )


def build_dag(flow: Flow) -> DAG:
    """The DAG of one valid flow; runs only when triggered (by the listener or by hand)."""
    dag = DAG(
        dag_id=flow.dag_id,
        description=(flow.description or flow.name)[:200],
        schedule=None,
        catchup=False,
        is_paused_upon_creation=False,
        auto_register=False,  # a build that fails half-way must not leave a half DAG behind
        # Studies arrive in bursts; waiting runs cost nothing (the sensor defers, GPU tasks
        # queue in their pool), so do not hold runs back at Airflow's default of 16.
        max_active_runs=MAX_ACTIVE_RUNS,
        max_active_tasks=MAX_ACTIVE_RUNS,
        tags=["raddeploy", *flow.tags],
        doc_md=f"Flow **{flow.name}** {flow.version} from `{flow.source}` (sha256 {flow.file_hash[:12]}).",
        **notification_arguments(flow, default_args={"retries": 0}),  # callbacks, deadline alert
    )
    settings = load_settings()
    weight = _weights(flow)
    with dag:
        # One retry. The sensor starts on the triggerer and, in the common case, ends there; when a
        # worker resumes it (decompressed input, a timeout) or runs it by hand, Airflow 3.3's
        # resume-after-defer race applies: a trigger that fires before the executor has reported the
        # deferring workload's exit has that late "success" event taken as a mismatch, and the
        # resumed sensor is marked failed (seen once in CI under load). Taking the input again is
        # idempotent (snapshot links, the closed run).
        sensor = FingerprintSensor(task_id=SENSOR_TASK, flow=flow, retries=1, retry_delay=timedelta(seconds=2),
                                   **weight["sensor"])
        tasks = {}
        for model in flow.models:
            tasks[model.name] = model_task(flow, model, settings, **weight["gpu_model" if model.gpu else "model"])
        senders = [m for m in flow.models if m.sent_outputs]
        send_args = dict(sources=[out for m in senders for out in m.sent_outputs], check_patient=not flow.new_patient,
                         check_study=not flow.new_study, retries=SEND_RETRIES,
                         retry_delay=timedelta(seconds=10), retry_exponential_backoff=2.0, **weight["send"])
        for i, dest in enumerate(flow.destinations):
            tasks[send_task_id(i, dest)] = DicomSendOperator(
                task_id=send_task_id(i, dest), dicom_conn_id=dest.connection, host=dest.host, port=dest.port,
                ae_title=dest.ae_title, calling_ae_title=dest.calling_ae_title, **send_args)
        for port in flow.return_to_sender:
            tasks[return_task_id(port)] = DicomSendOperator(
                task_id=return_task_id(port), return_to_sender_port=port, **send_args)
        if flow.review:  # between the models and every send task
            tasks[REVIEW_TASK] = ReviewOperator(task_id=REVIEW_TASK, flow=flow, sent=send_args["sources"],
                                                **weight["review"])
        tasks[SENSOR_TASK] = sensor
        for edge in task_edges(flow):  # the one reading of the graph, shared with `raddeploy graph`
            tasks[edge.upstream] >> tasks[edge.downstream]
    return dag


#: Priority of each kind of task over the others when workers are busy (Airflow picks the highest
#: ``priority_weight`` first), the flow's own ``priority`` (0-4) within a kind: runs already under
#: way finish first (sends, then GPU models, then CPU models: a free GPU slot is filled before a
#: CPU model or another study's sensor takes the worker; the GPU pool keeps GPU models from ever
#: holding more workers than there are GPU slots), and new runs start after.
STAGE_WEIGHT = {"sensor": 1, "review": 1, "model": 11, "gpu_model": 16, "send": 26}


def _weights(flow: Flow) -> dict[str, dict[str, Any]]:
    return {kind: {"priority_weight": base + flow.priority, "weight_rule": "absolute"}
            for kind, base in STAGE_WEIGHT.items()}


def build_invalid_dag(error: FlowError) -> DAG:
    """A visible placeholder for a flow file that does not load: paused, tagged, explained."""
    return DAG(
        dag_id=f"invalid_{slug(Path(str(error.file)).stem)}",
        description=f"INVALID FLOW: {error}"[:1000],
        schedule=None,
        catchup=False,
        is_paused_upon_creation=True,
        auto_register=False,
        tags=["raddeploy", "invalid"],
        doc_md=f"This flow file does not load and is never triggered:\n\n```\n{error}\n```",
    )


def build_all(flows_dir: Path) -> dict[str, DAG]:
    """Every flow under ``flows_dir`` as a DAG, keyed by DAG id (for a DAG file's globals).

    When a worker parses the file to run one task (Airflow's parsing context), only that
    task's flow is read, found through the id cache that every full parse refreshes.
    """
    wanted = get_parsing_context().dag_id
    cache = load_settings().data.flow_ids
    if wanted:
        path = id_cache.lookup(cache, flows_dir, wanted)
        if path is not None:
            try:
                return {wanted: build_dag(load_flow(path))}
            except FlowError:
                pass  # changed under us: fall back to the full parse below
    result = load_flows(flows_dir)
    dags: dict[str, DAG] = {}
    for flow in result.flows:
        if wanted and flow.dag_id != wanted:
            continue
        try:
            dags[flow.dag_id] = build_dag(flow)
        except Exception as exc:  # a bug or an unforeseen flow shape must not hide the other flows
            log.exception("flow %s could not be built", flow.source)
            error = FlowError(flow.source, None, "", f"could not build a DAG: {exc}")
            dag = build_invalid_dag(error)
            dags[dag.dag_id] = dag
    for error in result.errors:
        dag = build_invalid_dag(error)
        if not wanted or dag.dag_id == wanted:
            dags[dag.dag_id] = dag
    if not wanted:
        id_cache.save(cache, {flow.source: flow.dag_id for flow in result.flows})
    return dags
