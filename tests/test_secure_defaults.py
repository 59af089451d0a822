"""Secure defaults: who may connect, and who may read what we write.

- The embedded stack (``raddeploy run``) listens on 127.0.0.1 only unless told: the listener
  (``RADDEPLOY_LISTEN_HOST`` honoured), the API server, and Airflow's own worker and
  triggerer log servers, which Airflow binds to every interface unless we step in. Checked
  with ``ss`` on a running stack (e2e).
- A listener on every interface with no allow-list says so at start, and what to set.
- Our processes run with umask 027: the study index and every stored file 0640, folders
  0750, nothing for other users (the listener on its own, and each process of the stack,
  read from ``/proc/<pid>/status``).
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicom_factory import make_series
from peers import free_port, storescu, wait_for, wait_port
from raddeploy import embedded
from raddeploy.embedded import EmbeddedStack
from raddeploy_provider.config import load_settings

REPO = Path(__file__).resolve().parents[1]
WARNING = "with no allow-list"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _umask(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Umask:\s+([0-7]+)$", status, re.MULTILINE).group(1), 8)


# -- where the embedded stack listens ----------------------------------------------------------

def test_embedded_listener_on_loopback_unless_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RADDEPLOY_LISTEN_HOST", raising=False)
    stack = EmbeddedStack(home=tmp_path / "home", flows_dir=tmp_path / "flows")
    env = stack.environment()
    assert env["RADDEPLOY_LISTEN_HOST"] == "127.0.0.1"
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1"
    assert env["AIRFLOW__CORE__HOSTNAME_CALLABLE"] == "raddeploy.embedded.loopback_hostname"
    monkeypatch.setenv("RADDEPLOY_LISTEN_HOST", "0.0.0.0")  # the operator's choice is honoured
    assert stack.environment()["RADDEPLOY_LISTEN_HOST"] == "0.0.0.0"
    explicit = EmbeddedStack(home=tmp_path / "home", flows_dir=tmp_path / "flows", listen_host="127.0.0.2")
    assert explicit.environment()["RADDEPLOY_LISTEN_HOST"] == "127.0.0.2"


def test_standalone_listener_default_is_every_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RADDEPLOY_LISTEN_HOST", raising=False)
    assert load_settings().listen_host == "0.0.0.0"  # production: a PACS elsewhere sends to it


def test_log_servers_are_told_loopback_only_in_the_processes_that_start_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, *args, **kwargs: calls.append((app, kwargs)))
    monkeypatch.setattr(sys, "argv", ["/venv/bin/airflow", "dag-processor"])
    embedded.airflow_process_started()
    assert not getattr(uvicorn.run, "raddeploy_loopback", False)
    for component in ("scheduler", "triggerer"):
        monkeypatch.setattr(sys, "argv", ["/venv/bin/airflow", component])
        embedded.airflow_process_started()
        embedded.airflow_process_started()  # once only, however often settings are imported
        uvicorn.run(embedded.SERVE_LOGS_APP, host="", port=8793, log_level="info")
        uvicorn.run("some.other:app", host="0.0.0.0", port=1)
    assert calls[0] == (embedded.SERVE_LOGS_APP, {"host": "127.0.0.1", "port": 8793, "log_level": "info"})
    assert calls[1] == ("some.other:app", {"host": "0.0.0.0", "port": 1})  # nothing else is touched
    assert len(calls) == 4


# -- the standalone listener: its warning and its umask ------------------------------------------

def _listener(tmp_path: Path, name: str, **settings: str) -> tuple[subprocess.Popen, Path, Path, int]:
    home = tmp_path / name
    (home / "flows").mkdir(parents=True)
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("RADDEPLOY_")}
    env.update({"RADDEPLOY_DATA": str(home / "data"), "RADDEPLOY_FLOWS": str(home / "flows"),
                "RADDEPLOY_LISTEN_PORT": str(port), "RADDEPLOY_AIRFLOW_URL": f"http://127.0.0.1:{free_port()}",
                "RADDEPLOY_AIRFLOW_PASSWORD": "x", "PYTHONUNBUFFERED": "1"})
    env.update({f"RADDEPLOY_{key.upper()}": value for key, value in settings.items()})
    log = home / "listener.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "listener"], env=env, cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_port(port, 20)
    except TimeoutError:
        proc.kill()
        pytest.fail(f"the listener did not start:\n{log.read_text(errors='replace')}")
    return proc, home / "data", log, port


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)


@pytest.mark.integration
def test_listener_on_every_interface_without_allow_list_warns_and_keeps_data_private(tmp_path: Path) -> None:
    os.umask(old := os.umask(0o022))  # whatever started it: the listener sets its own
    proc, data, log, port = _listener(tmp_path, "open", listen_host="0.0.0.0")
    try:
        assert _umask(proc.pid) == 0o027
        series = make_series(tmp_path / "ct", modality="CT", slices=2, size=16)
        pushed = storescu(port, series.files)
        assert pushed.returncode == 0, pushed.stderr
        stored = wait_for(lambda: sorted((data / "studies").rglob("*.dcm")) if len(
            list((data / "studies").rglob("*.dcm"))) == 2 else None, 20, "both instances stored")
    finally:
        _stop(proc)
    text = log.read_text(errors="replace")
    warning = [line for line in text.splitlines() if WARNING in line]
    assert len(warning) == 1 and "WARNING" in warning[0], text
    for advice in ("RADDEPLOY_ALLOWED_NETWORKS", "RADDEPLOY_ALLOWED_CALLING_AETS", "RADDEPLOY_LISTEN_HOST"):
        assert advice in warning[0]

    index = [data / name for name in ("index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm")]
    assert index[0].exists()
    for path in [p for p in index if p.exists()]:
        assert _mode(path) == 0o640, f"{path} is {_mode(path):04o}"
    for path in stored:  # received into a file listener/tempfiles.py opens 0600: owner only, for now
        assert _mode(path) & 0o137 == 0, f"{path} is {_mode(path):04o}"
    folders = [p for p in data.rglob("*") if p.is_dir()]
    assert folders and all(_mode(p) & 0o007 == 0 for p in folders), \
        {str(p): f"{_mode(p):04o}" for p in folders if _mode(p) & 0o007}
    assert old == 0o022


@pytest.mark.integration
@pytest.mark.parametrize("settings", [{"listen_host": "127.0.0.1"},
                                      {"listen_host": "0.0.0.0", "allowed_networks": "10.0.0.0/24"},
                                      {"listen_host": "0.0.0.0", "allowed_calling_aets": "PACS"}],
                         ids=["loopback", "networks", "aets"])
def test_no_warning_with_an_allow_list_or_one_address(tmp_path: Path, settings: dict[str, str]) -> None:
    proc, _, log, _ = _listener(tmp_path, "closed", **settings)
    time.sleep(0.5)
    _stop(proc)
    assert WARNING not in log.read_text(errors="replace")


# -- a running embedded stack: nothing on every interface, umask 027 everywhere ---------------------

def _listening() -> list[tuple[str, list[int]]]:
    """(local address:port, pids) of every listening TCP socket, from `ss -ltnpH`."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [(line.split()[3], [int(pid) for pid in re.findall(r"pid=(\d+)", line)]) for line in out.splitlines()]


def _group(pgid: int) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    pids.add(int(entry.name))
            except ProcessLookupError:
                pass
    return pids


@pytest.mark.e2e
@pytest.mark.integration
def test_embedded_stack_listens_on_loopback_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RADDEPLOY_LISTEN_HOST", raising=False)
    (tmp_path / "flows").mkdir()
    # Own log-server ports, so another stack on this machine (the e2e session's) cannot hold them.
    worker_logs, trigger_logs = free_port(), free_port()
    stack = EmbeddedStack(home=tmp_path / "home", flows_dir=tmp_path / "flows", api_port=free_port(),
                          dicom_port=free_port(), extra_env={
                              "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(worker_logs),
                              "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(trigger_logs),
                              "RADDEPLOY_GPUS": ""})
    stack.start()
    try:
        ours = _group(stack._airflow.pid) | _group(stack._listener.pid)
        expected = {f"127.0.0.1:{port}" for port in (stack.api_port, stack.dicom_port, worker_logs, trigger_logs)}

        def all_up() -> list[tuple[str, list[int]]] | None:
            found = [(address, pids) for address, pids in _listening() if set(pids) & ours]
            return found if expected <= {address for address, _ in found} else None

        seen = wait_for(all_up, 30, f"our servers on {sorted(expected)}")
        umasks = {pid: _umask(pid) for pid in ours if Path(f"/proc/{pid}").exists()}
    finally:
        stack.stop()
    print("\n".join(f"  {address}  pids {pids}" for address, pids in seen))
    exposed = [address for address, _ in seen if not address.startswith(("127.0.0.1:", "[::1]:"))]
    assert exposed == [], f"listening beyond the loopback: {exposed}"
    assert {address for address, _ in seen} == expected  # and nothing else of ours listens
    assert umasks and set(umasks.values()) == {0o027}, umasks
    assert _mode(stack.data_dir) == 0o2750
    assert _mode(stack.data_dir / "index.sqlite3") == 0o640
    assert _mode(stack.home / "airflow" / "airflow.db") == 0o640
