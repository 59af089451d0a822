"""A task's record in the audit trail (``store.audit``): best effort, never a task failure.

The trail is in the study index, which every worker reaches already (the fingerprint sensor
closes runs there). A record that cannot be written (the index locked for longer than its
timeout, PostgreSQL down) is an error in the task log with the record's event, and the task
goes on: a clinical result is not held back for its audit line. `raddeploy audit` then lacks
it, and the task log says so.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from airflow.sdk import Context

from raddeploy_provider.config import load_settings
from raddeploy_provider.store import StudyIndex
from raddeploy_provider.store.audit import AuditRecord

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=2)
def _index(target: str, durable: bool) -> StudyIndex:
    return StudyIndex(target, durable=durable)


def index() -> StudyIndex:
    """The study index of this deployment, opened once per process."""
    settings = load_settings()
    return _index(settings.index_url or str(settings.data.index), settings.fsync)


def record(context: Context, event: str, *, outcome: str = "success", actor: str = "", peer: str = "",
           **detail: Any) -> None:
    """Record ``event`` of the task in ``context`` (its run, study, task id and try are added)."""
    ti = context.get("ti")
    try:
        entry = AuditRecord(
            event, outcome=outcome, study_uid=str((context["dag_run"].conf or {}).get("study_uid") or ""),
            dag_id=context["dag"].dag_id, run_id=context["run_id"], actor=actor, peer=peer,
            detail={"task": getattr(ti, "task_id", ""), "try": getattr(ti, "try_number", 0), **detail})
        index().record_audit(entry)
    except Exception as exc:  # noqa: BLE001 - see the module: logged, never a failure of the task
        log.error("audit record %s not written: %s", event, exc)
