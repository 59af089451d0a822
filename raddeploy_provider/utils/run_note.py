"""Keep a DAG run's note (shown in the Airflow UI) saying what the run waits for or did.

Best effort over the REST API with the listener's credentials (``RADDEPLOY_AIRFLOW_*``): a
note that cannot be written (or a pool that cannot be read) is logged, never a task failure.
Notes hold trigger descriptions, counts and UIDs, never patient data.
"""

from __future__ import annotations

import functools
import logging
import time
import urllib.parse

from raddeploy_provider.airflow_client import AirflowClient, AirflowUnavailable, TriggerRejected
from raddeploy_provider.config import load_settings

log = logging.getLogger(__name__)


def _client() -> AirflowClient | None:
    """One client per task process (one login for all its notes and reads)."""
    settings = load_settings()
    if not settings.airflow_password:
        return None
    return _client_for(settings.airflow_url, settings.airflow_user, settings.airflow_password)


@functools.lru_cache(maxsize=4)
def _client_for(url: str, user: str, password: str) -> AirflowClient:
    return AirflowClient(url, user, password, timeout=5)


#: Seconds a pool's size read here is used again: the triggerer takes every run's input and would
#: otherwise ask the API server once per GPU run, in a burst when it is busiest. An admin's change
#: of the pool shows in run notes this much later.
POOL_READ_TTL = 30.0
_pool_reads: dict[str, tuple[float, int]] = {}


def pool_slots(pool: str) -> int | None:
    """The slots of an Airflow pool in all (read at most every ``POOL_READ_TTL`` s per process);
    None when it cannot be read."""
    read = _pool_reads.get(pool)
    if read and time.monotonic() - read[0] < POOL_READ_TTL:
        return read[1]
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
    _pool_reads[pool] = (time.monotonic(), payload["slots"])
    return payload["slots"]


def _read_try(dag_id: str, run_id: str, task_id: str, try_number: int, what: str) -> dict | None:
    """``GET .../taskInstances/<task>/<what>`` of one try (``tries/N`` or ``-1/hitlDetails/tries/N``,
    N filled in): the payload of a 200, else None (logged when Airflow cannot be reached)."""
    client = _client()
    if client is None:
        return None
    path = (f"/api/v2/dags/{urllib.parse.quote(dag_id, safe='')}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
            f"/taskInstances/{urllib.parse.quote(task_id, safe='')}/{what.format(try_number)}")
    try:
        status, found = client.get(path)
    except AirflowUnavailable as exc:
        log.info("%s not read: %s", path, exc)
        return None
    return found if status == 200 and isinstance(found, dict) else None


def hitl_answer(dag_id: str, run_id: str, task_id: str, try_number: int) -> dict | None:
    """The answer a person gave to one try of a human-in-the-loop task, as the event its
    ``execute_complete`` takes (chosen options, params input, user, time); None when that try
    was not answered or its detail cannot be read."""
    from datetime import datetime

    detail = _read_try(dag_id, run_id, task_id, try_number, "-1/hitlDetails/tries/{}")
    if not detail or not detail.get("chosen_options") or not detail.get("responded_at"):
        return None
    return {"chosen_options": detail["chosen_options"], "params_input": detail.get("params_input") or {},
            "responded_by_user": detail.get("responded_by_user"),
            "responded_at": datetime.fromisoformat(detail["responded_at"].replace("Z", "+00:00"))}


def try_state(dag_id: str, run_id: str, task_id: str, try_number: int) -> str | None:
    """The state one try of a task ended in (``success``, ``failed``, ``up_for_retry``, ...); None
    when it cannot be read."""
    found = _read_try(dag_id, run_id, task_id, try_number, "tries/{}")
    return found.get("state") if found else None


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
