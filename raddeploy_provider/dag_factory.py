"""Build one Airflow DAG per flow: fingerprint sensor -> model tasks -> send tasks.

``build_all`` is what ``dags/raddeploy_flows.py`` calls. Each flow is built inside its own
try: one broken flow file becomes a paused DAG tagged ``invalid`` whose description carries
the error, and never takes the other flows' DAGs down with it.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from pathlib import Path

from airflow.sdk import DAG, get_parsing_context

from raddeploy_provider.flows import Flow, FlowError, load_flows
from raddeploy_provider.flows.graph import upstream
from raddeploy_provider.flows.loader import slug
from raddeploy_provider.operators.dicom_send import DicomSendOperator
from raddeploy_provider.operators.model import ModelOperator
from raddeploy_provider.sensors.fingerprint import FingerprintSensor

log = logging.getLogger(__name__)

SEND_RETRIES = 3


def build_dag(flow: Flow) -> DAG:
    """The DAG of one valid flow; runs only when triggered (by the listener or by hand)."""
    dag = DAG(
        dag_id=flow.dag_id,
        description=(flow.description or flow.name)[:200],
        schedule=None,
        catchup=False,
        is_paused_upon_creation=False,
        tags=["raddeploy"],
        doc_md=f"Flow **{flow.name}** {flow.version} from `{flow.source}` (sha256 {flow.file_hash[:12]}).",
        default_args={"retries": 0},
    )
    with dag:
        sensor = FingerprintSensor(task_id="fingerprint", flow=flow)
        tasks = {}
        for model in flow.models:
            tasks[model.name] = ModelOperator(
                task_id=model.name,
                image=model.image,
                command=list(model.command) if isinstance(model.command, tuple) else model.command,
                environment=dict(model.environment),
                inputs=model.inputs,
                outputs=model.outputs,
                network=model.network,
                flow_id=flow.dag_id,
                execution_timeout=timedelta(seconds=model.timeout) if model.timeout else None,
            )
        for name, deps in upstream(flow).items():
            if deps:
                for dep in deps:
                    tasks[dep] >> tasks[name]
            else:
                sensor >> tasks[name]
        senders = [m for m in flow.models if m.sent_outputs]
        sources = [out for m in senders for out in m.sent_outputs]
        for i, dest in enumerate(flow.destinations):
            send = DicomSendOperator(
                task_id=f"send_{i}_{_task_slug(dest.connection or dest.ae_title or 'node')}",
                sources=sources,
                dicom_conn_id=dest.connection,
                host=dest.host,
                port=dest.port,
                ae_title=dest.ae_title,
                calling_ae_title=dest.calling_ae_title,
                retries=SEND_RETRIES,
                retry_delay=timedelta(seconds=10),
                retry_exponential_backoff=True,
            )
            for model in senders:
                tasks[model.name] >> send
    return dag


def build_invalid_dag(error: FlowError) -> DAG:
    """A visible placeholder for a flow file that does not load: paused, tagged, explained."""
    return DAG(
        dag_id=f"invalid_{slug(Path(str(error.file)).stem)}",
        description=f"INVALID FLOW: {error}"[:1000],
        schedule=None,
        catchup=False,
        is_paused_upon_creation=True,
        tags=["raddeploy", "invalid"],
        doc_md=f"This flow file does not load and is never triggered:\n\n```\n{error}\n```",
    )


def build_all(flows_dir: Path) -> dict[str, DAG]:
    """Every flow under ``flows_dir`` as a DAG, keyed by DAG id (for a DAG file's globals)."""
    wanted = get_parsing_context().dag_id  # set when a worker runs one task: build only that DAG
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
    return dags


def _task_slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "node"
