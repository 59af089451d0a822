"""The embedded stack (Airflow standalone + listener), started once for the e2e tests."""

from __future__ import annotations


import pytest

from peers import StoreSCP, free_port
from raddeploy_provider.airflow_client import AirflowClient
from raddeploy.embedded import EmbeddedStack

FLOW = """
name: E2E CT threshold
id: e2e_ct_threshold
triggers:
  - Modality: CT
    SeriesDescription: "~(?i)scout"
grouping:
  quiet_period: 2s
models:
  - name: threshold
    image: raddeploy/threshold:latest
    environment: {{THRESHOLD_HU: "100"}}
    inputs: {{src: /input}}
    outputs: {{dst: /output}}
    timeout: 5m
destinations:
  - {{host: 127.0.0.1, port: {port}, ae_title: {ae}}}
"""


@pytest.fixture(scope="session")
def destination(tmp_path_factory) -> StoreSCP:
    scp = StoreSCP(tmp_path_factory.mktemp("destination"), ae_title="E2EDEST")
    yield scp
    scp.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory, destination, docker_ready) -> EmbeddedStack:
    home = tmp_path_factory.mktemp("home")
    flows = home / "flows"
    flows.mkdir()
    (flows / "e2e.yaml").write_text(FLOW.format(port=destination.port, ae=destination.ae_title))
    # Two pretend GPUs, given to containers through NVIDIA_VISIBLE_DEVICES (no GPU needed).
    gpus = {"RADDEPLOY_GPUS": "0,1", "RADDEPLOY_GPU_MODE": "env", "RADDEPLOY_GPU_LOCK_DIR": str(home / "gpu-locks")}
    stack = EmbeddedStack(home=home, flows_dir=flows, api_port=free_port(), dicom_port=free_port(),
                          listen_host="127.0.0.1", extra_env=gpus)
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def airflow(stack) -> AirflowClient:
    return AirflowClient(stack.api_url, "admin", stack.passwords()["admin"])
