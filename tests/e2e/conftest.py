"""The embedded stack (Airflow standalone + listener), started once for the e2e tests."""

from __future__ import annotations

import pytest

from peers import StoreSCP
from raddeploy.embedded import EmbeddedStack
from raddeploy_provider.airflow_client import AirflowClient
from stack_factory import running_stack

FLOW = """
name: E2E CT threshold
id: e2e_ct_threshold
triggers:
  - Modality: CT
    SeriesDescription: "~(?i).*scout.*"
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
    # Two pretend GPUs, given to containers through NVIDIA_VISIBLE_DEVICES (no GPU needed).
    gpus = {"RADDEPLOY_GPUS": "0,1", "RADDEPLOY_GPU_MODE": "env", "RADDEPLOY_GPU_LOCK_DIR": str(home / "gpu-locks")}
    # Retention by hand only (test_years_of_operation triggers it, last), delivered data due at once.
    retention = {"RADDEPLOY_RETENTION_SCHEDULE": "off", "RADDEPLOY_RETAIN_DELIVERED": "1s"}
    with running_stack(home, {"e2e.yaml": FLOW.format(port=destination.port, ae=destination.ae_title)},
                       extra_env={**gpus, **retention}) as started:
        yield started


@pytest.fixture(scope="session")
def airflow(stack) -> AirflowClient:
    return AirflowClient(stack.api_url, "admin", stack.passwords()["admin"])
