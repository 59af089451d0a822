"""RetentionOperator: the ``raddeploy_retention`` maintenance DAG's one task.

Each run, in this order: empty what an earlier run left in ``.trash/``; plan (``store.retention``:
every study with its runs, their states asked of Airflow through the task SDK, the free disk);
delete what the plan says may go, each study in one index transaction with its audit record;
alert when the disk is below the low-water mark (the deployment's notification targets, and
the task log); bring the audit trail's JSON-lines export up to date. The XCom is the summary
(counts, bytes); the log says what went and why, by UID.
"""

from __future__ import annotations

import time
from typing import Any

from airflow.sdk import BaseOperator, Context

from raddeploy_provider.config import load_settings
from raddeploy_provider.store import audit, retention
from raddeploy_provider.utils.audit import index as study_index

#: The DAG id and task id of the maintenance DAG (dags/raddeploy_retention.py).
DAG_ID = "raddeploy_retention"
TASK_ID = "retention"


def airflow_state(dag_id: str, run_id: str) -> str | None:
    """A DAG run's state through the task SDK (the execution API: no credentials of ours), None when
    Airflow has no such run."""
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    try:
        state = RuntimeTaskInstance.get_dagrun_state(dag_id=dag_id, run_id=run_id)
        return str(getattr(state, "value", state))  # a DagRunState: "success", not "DagRunState.SUCCESS"
    except Exception:
        if not RuntimeTaskInstance.get_dr_count(dag_id=dag_id, run_ids=[run_id]):
            return None
        raise


class RetentionOperator(BaseOperator):
    """Apply the retention settings (``RADDEPLOY_RETAIN_*``, ``RADDEPLOY_DISK_LOW_WATER``) once."""

    ui_color = "#d9d9d9"

    def __init__(self, *, dry_run: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dry_run = dry_run

    def execute(self, context: Context) -> dict[str, Any]:
        settings = load_settings()
        data, index = settings.data, study_index()
        retention.empty_trash(data)
        policy = retention.Policy.from_settings(settings)
        started = time.time()
        facts = retention.gather(index, data, airflow_state)
        plan = retention.plan(facts, policy, time.time(), retention.free_bytes(data.root), gathered_at=started)
        outcome = retention.purge(plan, index, data, actor=DAG_ID, dry_run=self.dry_run)
        for line in retention.describe(outcome, plan, self.dry_run):
            self.log.info("%s", line)
        if outcome.low_water_alert:
            self.log.error("%s", outcome.low_water_alert)
            from raddeploy_provider.notifications import notify_disk_low

            notify_disk_low(context, outcome.low_water_alert)
        exported = audit.export(index, data.audit)
        self.log.info("audit trail: %d new record(s) exported to %s", exported, data.audit)
        return {**retention.summary(outcome, plan), "audit_exported": exported}


def retention_dag(settings: Any) -> Any:
    """The maintenance DAG: one :class:`RetentionOperator` on ``settings.retention_schedule``
    (a cron timetable: the first run comes at the next hour, not at once when the DAG appears),
    one run at a time, no catch-up (a missed hour is done by the next)."""
    from datetime import datetime, timedelta, timezone

    from airflow.sdk import DAG
    from airflow.timetables.trigger import CronTriggerTimetable

    schedule = settings.retention_schedule
    with DAG(DAG_ID, schedule=CronTriggerTimetable(schedule, timezone="UTC") if schedule else None,
             start_date=datetime(2026, 1, 1, tzinfo=timezone.utc), catchup=False, max_active_runs=1,
             tags=["raddeploy", "maintenance"],
             description="Deletes study data past its retention (RADDEPLOY_RETAIN_*), keeps free disk above "
                         "RADDEPLOY_DISK_LOW_WATER, exports the audit trail",
             doc_md=__doc__, default_args={"retries": 1, "retry_delay": timedelta(minutes=5)}) as dag:
        RetentionOperator(task_id=TASK_ID, execution_timeout=timedelta(minutes=50))
    return dag
