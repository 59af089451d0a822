"""The listener as a real process (``python -m listener``), started per test with extra settings,
its index on each backend (conftest's ``index_backend``: SQLite, PostgreSQL)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from peers import DCMTK_ENV, REPO, free_port, require_tool, wait_port

FLOW = """
name: Listener test flow
id: listener_test
triggers:
  - Modality: CT
models:
  - image: raddeploy/busybox:latest
    command: ["sh", "-c", "cp /input/* /output/"]
    inputs: {src: /input}
    outputs: {dst: /output}
"""


@dataclass
class RunningListener:
    """One listener process; Airflow is "down" (nothing listens at its URL), so runs wait in the outbox."""

    port: int
    data: Path
    log: Path
    proc: subprocess.Popen
    env: dict[str, str] = field(repr=False, default_factory=dict)
    index: Path | str = ""  # its index: the SQLite file, or the PostgreSQL URL (for postgres.query)

    def __getitem__(self, key: str):  # the dict-style access test_listener_dcmtk.py uses
        return getattr(self, key)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def vm_kb(self, field: str = "VmRSS") -> int:
        """A memory figure of the process from /proc/<pid>/status: VmRSS (now), VmHWM (peak RSS)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"no {field} in /proc/{self.proc.pid}/status")

    def echo(self, ae_title: str = "RADDEPLOY") -> subprocess.CompletedProcess:
        return subprocess.run([require_tool("echoscu"), "-aec", ae_title, "127.0.0.1", str(self.port)],
                              env=DCMTK_ENV, capture_output=True, text=True, timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def start_listener(tmp_path: Path, new_index_url):
    """``start_listener(name="listener", data=None, **env)``: a listener with RADDEPLOY_<KEY>=value extra settings.

    Each call gets its own port and, unless ``data`` is given, its own data dir
    ``tmp_path/<name>/data``, with an index of its own on the test's backend (one data dir,
    one index: a listener started again on the same data dir finds its index);
    ``wait=False`` returns without waiting for the port (for settings the listener refuses
    at start). All are stopped at teardown.
    """
    started: list[RunningListener] = []
    index_urls: dict[Path, str | None] = {}
    flows = tmp_path / "flows"
    flows.mkdir(exist_ok=True)
    (flows / "listener_test.yaml").write_text(FLOW)

    def start(name: str = "listener", data: Path | None = None, wait: bool = True, **settings: str) -> RunningListener:
        home = tmp_path / name
        home.mkdir(parents=True, exist_ok=True)
        data = data or home / "data"
        port = free_port()
        dead_airflow = free_port()  # nothing listens there: Airflow is "down"
        env = {**os.environ, "RADDEPLOY_DATA": str(data), "RADDEPLOY_FLOWS": str(flows),
               "RADDEPLOY_LISTEN_PORT": str(port), "RADDEPLOY_LISTEN_HOST": "127.0.0.1",
               "RADDEPLOY_AIRFLOW_URL": f"http://127.0.0.1:{dead_airflow}", "RADDEPLOY_AIRFLOW_PASSWORD": "x"}
        if data not in index_urls:
            index_urls[data] = new_index_url()
        env["RADDEPLOY_INDEX_URL"] = index_urls[data] or ""  # empty: SQLite in the data dir
        env.update({f"RADDEPLOY_{key.upper()}": str(value) for key, value in settings.items()})
        log_path = home / "listener.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "listener"], env=env, cwd=REPO, stdout=log,
                                    stderr=subprocess.STDOUT)
        running = RunningListener(port, data, log_path, proc, env, index_urls[data] or data / "index.sqlite3")
        started.append(running)
        if wait:
            try:
                wait_port(port, 20)
            except TimeoutError:
                pytest.fail(f"the listener did not start; its log:\n{log_path.read_text(errors='replace')}")
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def listener(start_listener) -> RunningListener:
    """A listener with the default settings."""
    return start_listener()
