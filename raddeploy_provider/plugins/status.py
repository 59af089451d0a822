"""``GET /raddeploy/status``: the status at a glance (``raddeploy_provider.status``) as a page of the UI.

Behind Airflow's own authentication, as the preview route: ``requires_access_dag(method="GET",
access_entity=DagAccessEntity.RUN)`` with no DAG named, so a signed-in user who may read DAG
runs sees it; no user: 401. DAG run states come from Airflow's database (the API server has it);
the listener's health from the audit trail (when it last had an association). Patient names
only with ``RADDEPLOY_SHOW_PATIENT_NAMES=true``.
"""

from __future__ import annotations

from typing import Any

#: Below the plugin's URL prefix (plugins/previews.URL_PREFIX).
ROUTE = "/status"


def airflow_states() -> Any:
    """A DAG run's state from Airflow's metadata database, None when it has no such run."""
    from sqlalchemy import select

    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    def state(dag_id: str, run_id: str) -> str | None:
        with create_session() as session:
            found = session.scalar(select(DagRun.state).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
        return None if found is None else str(getattr(found, "value", found))

    return state


def add_route(app: Any) -> None:
    from fastapi import Depends
    from fastapi.responses import HTMLResponse

    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag

    @app.get(ROUTE, dependencies=[Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.RUN))],
             response_class=HTMLResponse)
    def status_page() -> HTMLResponse:
        from raddeploy_provider import status
        from raddeploy_provider.config import load_settings
        from raddeploy_provider.store import StudyIndex

        settings = load_settings()
        index = StudyIndex(settings.index_url or settings.data.index, durable=settings.fsync)
        try:
            report = status.gather(settings, index, airflow_states(), status.last_association(index))
        finally:
            index.close()
        return HTMLResponse(report.html(), headers={"Cache-Control": "private, no-cache"})
