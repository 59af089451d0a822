"""docker-compose.yaml is a valid Compose file with the services the design names."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def test_compose_file_validates_with_the_example_env(tmp_path: Path) -> None:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed: run `make test` (scripts/ensure-system.sh installs it)")
    shutil.copy(REPO / "docker-compose.yaml", tmp_path / "docker-compose.yaml")
    shutil.copy(REPO / "deploy" / "env.example", tmp_path / ".env")
    done = subprocess.run(["docker-compose", "config"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    services = config["services"]
    assert set(services) >= {"postgres", "redis", "api-server", "scheduler", "dag-processor", "triggerer",
                             "worker-cpu", "worker-gpu", "listener"}
    assert services["worker-gpu"]["command"][-3:] == ["gpu", "--concurrency", "1"]
    data = "/srv/raddeploy/data"
    for name in ("worker-cpu", "worker-gpu"):  # bind mounts of model containers resolve on the host
        volumes = {v.removesuffix(":rw") for v in services[name]["volumes"]}  # compose 1.29 writes strings
        assert f"{data}:{data}" in volumes
        assert "/var/run/docker.sock:/var/run/docker.sock" in volumes
    assert services["listener"]["environment"]["RADDEPLOY_AIRFLOW_URL"] == "http://api-server:8080"
