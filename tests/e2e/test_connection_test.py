"""The ``dicom`` connection in a running Airflow: its form, the Test button, and a stored one.

Through the REST API the UI uses (JWT from ``/auth/token``): the form's fields
(``GET /ui/connections/hook_meta``), the Test button (``POST /api/v2/connections/test``, which
runs ``DicomHook.test_connection`` in the API server: a C-ECHO to a live storescp, then to a
dead port), and a connection stored in Airflow's metadata DB used by ``raddeploy echo``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from peers import free_port
from raddeploy_provider.hooks.dicom_node import FIELDS

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

#: The extra the UI's form saves for a new dicom connection: every field, defaults filled in.
FORM_EXTRA = {f.name: f.default for f in FIELDS}


def test_the_form_has_every_dicom_field(airflow) -> None:
    status, metas = airflow.get("/ui/connections/hook_meta")
    assert status == 200, metas
    [meta] = [m for m in metas if m["connection_type"] == "dicom"]

    assert meta["hook_name"] == "DICOM node"
    assert set(meta["extra_fields"]) == {f.name for f in FIELDS}
    assert meta["extra_fields"]["tls"]["schema"]["type"] == ["boolean", "null"]
    assert meta["extra_fields"]["max_associations"]["schema"]["minimum"] == 1
    assert meta["extra_fields"]["calling_ae_title"]["value"] == "RADDEPLOY"
    standard = meta["standard_fields"]
    assert standard["host"]["placeholder"] == "pacs.hospital.local" and standard["port"]["placeholder"] == "104"
    assert standard["login"]["hidden"] and standard["password"]["hidden"] and standard["url_schema"]["hidden"]

    status, config = airflow.get("/ui/config")
    assert status == 200 and config["test_connection"] == "Enabled"  # the Test button is shown and works


def connection_test(airflow, port: int, **extra) -> dict:
    body = {"connection_id": "e2e_dicom_form", "conn_type": "dicom", "host": "127.0.0.1", "port": port,
            "extra": json.dumps({**FORM_EXTRA, **extra})}
    status, answer = airflow.post("/api/v2/connections/test", body)
    assert status == 200, answer
    return answer


def test_the_test_button_echoes_a_live_node(airflow, destination) -> None:
    answer = connection_test(airflow, destination.port, ae_title=destination.ae_title)

    assert answer == {"status": True,
                      "message": f"C-ECHO to {destination.ae_title}@127.0.0.1:{destination.port}: success (0x0000)"}


def test_the_test_button_on_a_dead_port_says_what_to_check(airflow) -> None:
    port = free_port()

    answer = connection_test(airflow, port, ae_title="NOBODY")

    assert answer["status"] is False
    assert f"NOBODY@127.0.0.1:{port} cannot be reached" in answer["message"] and "check" in answer["message"]


def test_the_test_button_names_a_bad_field(airflow, destination) -> None:
    answer = connection_test(airflow, destination.port, ae_title=destination.ae_title, max_associations=0)

    assert answer["status"] is False
    assert answer["message"].startswith("connection ") and "max_associations is 0: set how many" in answer["message"]


def test_a_connection_stored_in_airflow_is_a_raddeploy_echo_target(airflow, stack, destination) -> None:
    conn_id = "e2e_dicom_stored"
    body = {"connection_id": conn_id, "conn_type": "dicom", "host": "127.0.0.1", "port": destination.port,
            "extra": json.dumps({**FORM_EXTRA, "ae_title": destination.ae_title, "timeout": 10})}
    status, answer = airflow.post("/api/v2/connections", body)
    assert status in (201, 409), answer
    try:
        env = {k: v for k, v in stack.environment().items() if not k.startswith("AIRFLOW_CONN_")}
        done = subprocess.run([str(Path(sys.executable).with_name("raddeploy")), "echo", conn_id], env=env,
                              capture_output=True, text=True, timeout=120)

        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"C-ECHO to {destination.ae_title}@127.0.0.1:{destination.port}: success (0x0000)"
    finally:
        airflow._request("DELETE", f"/api/v2/connections/{urllib.parse.quote(conn_id)}", None)
