"""Shared fixtures: DCMTK peers, the Docker engine and the test images."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from orthanc import Orthanc
from peers import StoreSCP, require_tool


@pytest.fixture
def storescp(tmp_path: Path):
    scp = StoreSCP(tmp_path / "storescp")
    yield scp
    scp.stop()


@pytest.fixture(scope="session")
def docker_ready() -> None:
    """The Docker engine `make test` started, and the test images it built."""
    require_tool("docker")
    probe = subprocess.run(["docker", "image", "inspect", "raddeploy/threshold:latest"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail("the image raddeploy/threshold:latest is missing or dockerd is down: run `make test` "
                    f"(scripts/ensure-system.sh and scripts/build-images.sh); docker said: {probe.stderr.strip()}")


def pytest_configure(config: pytest.Config) -> None:
    """Airflow imported by unit tests must not write to ~/airflow."""
    import os
    import tempfile

    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="raddeploy-test-airflow-"))



@pytest.fixture
def orthanc(tmp_path: Path):
    """A fresh Orthanc, AE title ORTHANC, accepting every transfer syntax; see tests/orthanc.py."""
    peer = Orthanc(tmp_path / "orthanc")
    yield peer
    peer.stop()
