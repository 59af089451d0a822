"""A flow's text reaches the container literally: nothing of it is a Jinja template.

DockerOperator templates its image, command and environment, and reads a command ending in
``.sh`` as a template file. A flow's strings are data: `{{ conn.<id>.password }}` in its
environment must not put an Airflow connection's password into the container, and
``command: sh /scripts/run.sh`` must run that script, not look for a template file
``run.sh``. The test adds such a flow to the running stack (a connection with a password
exists, so rendering would leak it), pushes an MR series only this flow wants, and reads
what the container wrote in the run folder.
"""

from __future__ import annotations

import time
import urllib.parse

import pytest

from dicom_factory import make_series
from peers import storescu
from raddeploy import cli
from stack_factory import add_flow, run_finished, task_instances

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

DAG_ID = "e2e_literal_flow_text"
FLOW_FILE = "literal_flow_text.yaml"
DESCRIPTION = "E2E literal flow text"
CONN_ID = "e2e_literal_secret"
PASSWORD = "never-in-a-container-7f3a"
TEMPLATE = "{{ conn.%s.password }}" % CONN_ID
SLICES = 3

FLOW = f"""\
name: E2E literal flow text
id: {DAG_ID}
description: flow text with Jinja syntax and a .sh command, passed literally
triggers:
  - Modality: MR
    SeriesDescription: "^{DESCRIPTION}$"
grouping:
  quiet_period: 1s
models:
  - name: literal
    image: raddeploy/busybox:latest
    command: sh /scripts/run.sh
    environment:
      SECRET: "{TEMPLATE}"
    static_mounts: {{scripts: /scripts}}
    input_mounts: {{src: /input}}
    output_mounts: {{result: /output}}  # RadDeploy spelling: an output nobody reads is a warning
    timeout: 120
"""

RUN_SH = """\
set -e
mkdir /output/copies
cp /input/* /output/copies/
printf '%s' "$SECRET" > /output/secret.txt
"""


def test_flow_text_is_not_a_template(stack, airflow, tmp_path, capsys):
    # A connection whose password a rendered `{{ conn... }}` would hand the container.
    status, body = airflow.post("/api/v2/connections", {"connection_id": CONN_ID, "conn_type": "generic",
                                                        "password": PASSWORD})
    assert status in (201, 409), body
    scripts = stack.data_dir / "static" / "scripts"  # RADDEPLOY_STATIC is not set: <data>/static
    scripts.mkdir(parents=True, exist_ok=True)
    (scripts / "run.sh").write_text(RUN_SH)

    flow_path = tmp_path / FLOW_FILE
    flow_path.write_text(FLOW)
    assert cli.main(["validate", str(flow_path)]) == 0
    validated = capsys.readouterr().out
    assert f"ok: {flow_path}: {DAG_ID}" in validated and "1 flow ok, 0 errors" in validated

    add_flow(stack, airflow, FLOW_FILE, FLOW, DAG_ID)

    try:
        series = make_series(tmp_path / "mr", modality="MR", slices=SLICES, size=16, description=DESCRIPTION)
        start = time.monotonic()
        pushed = storescu(stack.dicom_port, series.files)
        assert pushed.returncode == 0, pushed.stderr
        run_id = f"{series.study_uid}.1"
        finished = run_finished(airflow, DAG_ID, run_id)
        states = {task_id: ti["state"] for task_id, ti in task_instances(airflow, DAG_ID, run_id).items()}
        assert finished["state"] == "success", f"run {run_id} failed; task states: {states}"
        print(f"\npush -> run with literal flow text succeeded: {time.monotonic() - start:.1f} s")
    finally:
        airflow._request("DELETE", f"/api/v2/connections/{urllib.parse.quote(CONN_ID)}", None)

    result = stack.data_dir / "runs" / DAG_ID / run_id / "result"
    assert (result / "secret.txt").read_text() == TEMPLATE  # the text, not the password
    assert len(list((result / "copies").iterdir())) == SLICES  # run.sh ran, from the static mount
    assert all(PASSWORD not in p.read_text(errors="replace") for p in result.rglob("*") if p.is_file())
