"""Shared fixtures: DCMTK peers, the Docker engine and the test images, the index's backends."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable

import pytest

from orthanc import Orthanc
from peers import StoreSCP, require_tool
from postgres import PostgresServer, PostgresUnavailable


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


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the session (tests/postgres.py), started when a test first needs it."""
    try:
        server = PostgresServer.start()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def index_backend(request) -> str:
    """The backend of the study index; a test that uses it runs on both (``[sqlite]``,
    ``[postgresql]``). ``@pytest.mark.parametrize("index_backend", ["sqlite"])`` keeps one to SQLite."""
    return request.param


@pytest.fixture
def new_index_url(index_backend: str, request) -> Callable[[], str | None]:
    """Makes a fresh, empty index on the test's backend: its RADDEPLOY_INDEX_URL (a schema of its
    own on the session's server), or None: SQLite in the data dir."""
    if index_backend == "sqlite":
        return lambda: None
    return request.getfixturevalue("postgres").new_index_url


@pytest.fixture
def index_url(new_index_url: Callable[[], str | None]) -> str | None:
    """One fresh index on the test's backend (see ``new_index_url``)."""
    return new_index_url()
