"""Keep a DAG run's note (shown in the Airflow UI) saying what the run waits for or did.

Best effort over the REST API with the listener's credentials (``RADDEPLOY_AIRFLOW_*``): a
note that cannot be written (or a pool that cannot be read) is logged, never a task failure.
Notes hold trigger descriptions, counts and UIDs, never patient data.
"""

from __future__ import annotations

import logging
import urllib.parse

from raddeploy_provider.airflow_client import AirflowClient, AirflowUnavailable, TriggerRejected
from raddeploy_provider.config import load_settings

log = logging.getLogger(__name__)


def _client() -> AirflowClient | None:
    settings = load_settings()
    if not settings.airflow_password:
        return None
    return AirflowClient(settings.airflow_url, settings.airflow_user, settings.airflow_password, timeout=5)


def pool_slots(pool: str) -> int | None:
    """The slots of an Airflow pool in all; None when it cannot be read."""
    client = _client()
    if client is None:
        return None
    try:
        status, payload = client.get(f"/api/v2/pools/{urllib.parse.quote(pool, safe='')}")
    except AirflowUnavailable as exc:
        log.info("pool %s not read: %s", pool, exc)
        return None
    if status != 200 or not isinstance(payload, dict) or not isinstance(payload.get("slots"), int):
        log.info("pool %s not read: HTTP %s", pool, status)
        return None
    return payload["slots"]


def set_run_note(dag_id: str, run_id: str, note: str) -> bool:
    client = _client()
    if client is None:
        return False
    try:
        client.set_note(dag_id, run_id, note[:1000])
    except (AirflowUnavailable, TriggerRejected) as exc:
        log.info("run note of %s not updated: %s", run_id, exc)
        return False
    return True
