"""What a task knows of its run: its folder and its study, from the Airflow context."""

from __future__ import annotations

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from raddeploy_provider.config import load_settings
from raddeploy_provider.store import RunDir


def run_dir(context: Context) -> RunDir:
    """``<data>/runs/<dag_id>/<run_id>``: where the sensor put the input and models write."""
    return load_settings().data.run(context["dag"].dag_id, context["run_id"])


def study_uid(context: Context) -> str:
    """The run's study (``dag_run.conf["study_uid"]``, set by the listener)."""
    uid = (context["dag_run"].conf or {}).get("study_uid")
    if not uid:
        raise AirflowFailException("this run has no study_uid in its conf: flows are started by the "
                                   "listener; to start one by hand, trigger with {\"study_uid\": \"...\"}")
    return uid
