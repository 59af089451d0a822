"""``GET /raddeploy/runs/{dag_id}/{run_id}/previews/{name}``: a run's review pictures, from the API server.

The PNGs :func:`raddeploy_provider.previews.render_previews` writes into a run folder's
``previews/`` (``RunDir.previews``) are served by the API server itself, so the review text of
a run (Markdown in the UI's "Required Action" tab) can show them with a URL the browser
loads: :func:`preview_url`.

Every request is checked as Airflow's own API checks ``GET /api/v2/dags/{dag_id}/dagRuns/...``:
the dependency ``requires_access_dag(method="GET", access_entity=DagAccessEntity.RUN)`` of
``airflow.api_fastapi.core_api.security``, which takes the user from the JWT (the
``Authorization: Bearer`` header, else the UI's ``_token`` cookie: ``get_user``) and asks the
auth manager ``is_authorized_dag`` for reading that DAG's runs. No user: 401; a token that does
not verify or a user who may not read the DAG's runs: 403. Only then the file is looked at.

A name or id that would leave the run folder is 404 before the file system is touched:
the DAG and run ids must be ones ``DataDir.run`` accepts (one plain path part of
``[A-Za-z0-9_.~:+-]``, not ``.`` or ``..``), the name :data:`NAME_RE` (ending ``.png``, no
slash, no leading dot). The file is then opened component by component from the data dir's
``runs/`` down with ``O_NOFOLLOW`` (a symlink there or anywhere below it is 404, not followed),
must be a regular file of at most :data:`MAX_BYTES` and start with the PNG signature.

The FastAPI app is built on its first request: every Airflow process loads plugins, and only
the API server needs FastAPI and Airflow's API security; importing this module costs neither.
Registered through the ``airflow.plugins`` entry point (pyproject.toml), which Airflow 3.3
loads in every process, not through ``plugins`` in ``get_provider_info``, which it reads only
with ``[core] lazy_discover_providers = False``.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import urllib.parse
from pathlib import Path
from typing import Any, Awaitable, Callable

from airflow.sdk.plugins_manager import AirflowPlugin

from raddeploy_provider.store.errors import StoreError
from raddeploy_provider.store.layout import DataDir, RunDir

#: Where the app is mounted on the API server (not one of Airflow's reserved prefixes).
URL_PREFIX = "/raddeploy"
#: The route, below :data:`URL_PREFIX`.
ROUTE = "/runs/{dag_id}/{run_id}/previews/{name}"
#: The picture names served: one plain file name ending in .png (what render_previews writes fits).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,126}\.png$")
#: The largest picture served (a preview is ~50-300 kB).
MAX_BYTES = 32 * 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def preview_url(dag_id: str, run_id: str, name: str) -> str:
    """The URL of a run's picture, relative to the API server's base URL (no leading slash):
    ``raddeploy/runs/<dag_id>/<run_id>/previews/<name>``, each part percent-encoded.

    The UI's pages carry ``<base href>`` of that base URL, so the path works as it is in the
    review text's Markdown, also when Airflow is served under a sub-path (``[api] base_url``);
    outside the UI, join it to the base URL. ValueError for a name or id the route refuses.
    """
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(f"{name!r} is not a preview name the route serves (a plain file name ending in .png)")
    try:
        DataDir(Path("/")).run(dag_id, run_id)
    except StoreError as exc:
        raise ValueError(str(exc)) from None
    parts = (urllib.parse.quote(part, safe="") for part in (dag_id, run_id))
    return f"{URL_PREFIX.lstrip('/')}/runs/{'/'.join(parts)}/previews/{urllib.parse.quote(name, safe='')}"


def read_preview(data: DataDir, dag_id: str, run_id: str, name: str) -> bytes | None:
    """The bytes of ``<data>/runs/<dag_id>/<run_id>/previews/<name>``, or None when there is no
    such picture to serve (a bad name or id, a missing file, a symlink or anything else than
    a regular PNG file) - never a file outside the run's ``previews/``."""
    if not NAME_RE.fullmatch(name) or ".." in name:
        return None
    try:
        run = data.run(dag_id, run_id)
    except StoreError:
        return None
    parts = [dag_id, run_id, RunDir.previews.name, name]  # below runs/, as RunDir lays them out
    assert run.previews / name == data.runs.joinpath(*parts)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(data.runs, flags | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        for part in parts[:-1]:
            inner = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        inner = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fd)
        os.close(fd)
        fd = inner
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_BYTES:
            return None
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            content = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EACCES, errno.ENXIO, errno.EISDIR):
            raise
        return None
    finally:
        if fd >= 0:
            os.close(fd)
    return content if content.startswith(PNG_SIGNATURE) and len(content) <= MAX_BYTES else None


def build_app(data: DataDir | None = None) -> Any:
    """The FastAPI app of the route (Airflow's API security, our data dir: ``RADDEPLOY_DATA``)."""
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.responses import Response

    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag

    if data is None:
        from raddeploy_provider.config import load_settings
        data = load_settings().data
    app = FastAPI(title="RadDeploy", description="Review pictures of RadDeploy runs", docs_url=None,
                  redoc_url=None, openapi_url=None)

    @app.get(ROUTE, dependencies=[Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.RUN))],
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def preview(dag_id: str, run_id: str, name: str) -> Response:
        content = read_preview(data, dag_id, run_id, name)
        if content is None:
            raise HTTPException(status_code=404, detail="No such preview")
        return Response(content=content, media_type="image/png",
                        headers={"Cache-Control": "private, no-cache", "X-Content-Type-Options": "nosniff"})

    from raddeploy_provider.plugins.status import add_route

    add_route(app)  # GET /raddeploy/status
    return app


class LazyApp:
    """An ASGI app that builds the real one (``build()``) on its first request."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build
        self._app: Any = None

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if self._app is None:
            self._app = self._build()
        await self._app(scope, receive, send)


class RadDeployPlugin(AirflowPlugin):
    """The routes of raddeploy-provider on Airflow's API server."""

    name = "raddeploy"
    fastapi_apps = [{"app": LazyApp(build_app), "url_prefix": URL_PREFIX, "name": "RadDeploy review previews and status"}]
