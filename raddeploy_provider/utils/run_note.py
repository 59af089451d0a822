"""Keep a DAG run's note (shown in the Airflow UI) saying what the run waits for or did.

Best effort over the REST API with the listener's credentials (``RADDEPLOY_AIRFLOW_*``): a
note that cannot be written is logged, never a task failure. Notes hold trigger
descriptions, counts and UIDs, never patient data.
"""

from __future__ import annotations

import logging

from raddeploy_provider.airflow_client import AirflowClient, AirflowUnavailable, TriggerRejected
from raddeploy_provider.config import load_settings

log = logging.getLogger(__name__)


def set_run_note(dag_id: str, run_id: str, note: str) -> bool:
    settings = load_settings()
    if not settings.airflow_password:
        return False
    client = AirflowClient(settings.airflow_url, settings.airflow_user, settings.airflow_password, timeout=5)
    try:
        client.set_note(dag_id, run_id, note[:1000])
    except (AirflowUnavailable, TriggerRejected) as exc:
        log.info("run note of %s not updated: %s", run_id, exc)
        return False
    return True
