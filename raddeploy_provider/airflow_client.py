"""A small client of Airflow's REST API, with no Airflow import: the core's one way to Airflow.

The listener triggers runs with it (``POST /api/v2/dags/{dag_id}/dagRuns`` with a
deterministic run id; 409 means the run exists: the trigger is done), the provider's tasks
keep run notes, the embedded deployment sets the GPU pool. ``POST /auth/token`` gives a JWT,
renewed on 401.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any


class AirflowUnavailable(Exception):
    """Airflow did not answer or answered with a server error: try again later."""


class TriggerRejected(Exception):
    """Airflow refused the trigger for a reason a retry may fix later (e.g. DAG not parsed yet)."""


@dataclass(frozen=True)
class TriggerOutcome:
    created: bool  # False: the run already existed (409), which counts as done


class AirflowClient:
    def __init__(self, base_url: str, username: str, password: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.username = username
        self.password = password
        self.timeout = timeout
        self._token: str | None = None

    def _request(self, method: str, path: str, body: dict[str, Any] | None, auth: bool = True) -> tuple[int, Any]:
        """One call; with ``auth``, a 401 (the JWT expired) logs in again and retries once."""
        status, payload = self._send(method, path, body, auth)
        if status == 401 and auth:
            self._token = None
            status, payload = self._send(method, path, body, auth)
        return status, payload

    def _send(self, method: str, path: str, body: dict[str, Any] | None, auth: bool) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {self._get_token()}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, _json(resp.read())
        except urllib.error.HTTPError as exc:
            payload = _json(exc.read())
            if exc.code >= 500:
                raise AirflowUnavailable(f"{method} {path}: HTTP {exc.code}") from None
            return exc.code, payload
        except (urllib.error.URLError, OSError) as exc:
            raise AirflowUnavailable(f"{method} {path}: {getattr(exc, 'reason', exc)}") from None

    def _get_token(self) -> str:
        if self._token is None:
            status, payload = self._request("POST", "/auth/token",
                                            {"username": self.username, "password": self.password}, auth=False)
            if status not in (200, 201) or not isinstance(payload, dict) or "access_token" not in payload:
                raise TriggerRejected(f"Airflow refused the login of user {self.username!r} (HTTP {status}); "
                                      "check RADDEPLOY_AIRFLOW_USER / RADDEPLOY_AIRFLOW_PASSWORD")
            self._token = payload["access_token"]
        return self._token

    def healthy(self) -> bool:
        try:
            status, _ = self._request("GET", "/api/v2/monitor/health", None, auth=False)
        except AirflowUnavailable:
            return False
        return status == 200

    def get(self, path: str) -> tuple[int, Any]:
        """An authenticated GET of an API path (``/api/v2/...``): the HTTP status and the JSON body."""
        return self._request("GET", path, None)

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """An authenticated POST of a JSON body to an API path: the HTTP status and the JSON body."""
        return self._request("POST", path, body)

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        """The DAG's runs as the REST API lists them (run id, state, conf, ...)."""
        status, payload = self.get(f"/api/v2/dags/{urllib.parse.quote(dag_id, safe='')}/dagRuns?limit=100")
        if status != 200:
            raise TriggerRejected(f"listing runs of {dag_id}: HTTP {status}: {payload}")
        return payload["dag_runs"]

    def set_note(self, dag_id: str, run_id: str, note: str) -> None:
        path = (f"/api/v2/dags/{urllib.parse.quote(dag_id, safe='')}/dagRuns/"
                f"{urllib.parse.quote(run_id, safe='')}")
        status, payload = self._request("PATCH", path + "?update_mask=note", {"note": note})
        if status != 200:
            raise TriggerRejected(f"note of {run_id}: HTTP {status}: {payload}")

    def ensure_pool(self, name: str, slots: int, description: str) -> None:
        """Create the pool, or set its slots: a task in a missing pool is never scheduled."""
        path = f"/api/v2/pools/{urllib.parse.quote(name, safe='')}"
        status, _ = self._request("GET", path, None)
        body = {"name": name, "slots": slots, "description": description, "include_deferred": False}
        if status == 404:
            status, payload = self._request("POST", "/api/v2/pools", body)
        else:
            status, payload = self._request("PATCH", path, body)
        if status not in (200, 201):
            raise TriggerRejected(f"pool {name}: HTTP {status}: {payload}")

    def trigger(self, dag_id: str, run_id: str, conf: dict[str, Any], note: str | None = None) -> TriggerOutcome:
        path = f"/api/v2/dags/{urllib.parse.quote(dag_id, safe='')}/dagRuns"
        body: dict[str, Any] = {"dag_run_id": run_id, "logical_date": None, "conf": conf}
        if note:
            body["note"] = note
        status, payload = self._request("POST", path, body)
        if status in (200, 201):
            return TriggerOutcome(created=True)
        if status == 409:
            return TriggerOutcome(created=False)
        detail = payload.get("detail") if isinstance(payload, dict) else payload
        raise TriggerRejected(f"HTTP {status}: {detail}")


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return raw.decode(errors="replace")[:200]
