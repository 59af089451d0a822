"""The embedded default: Airflow standalone (SQLite, LocalExecutor) plus the listener.

``raddeploy run`` and the end-to-end tests start the product through this one class, so the
tests prove the path a user runs. The Airflow settings in :meth:`EmbeddedStack.environment`
were measured on 2 cores (README "Settings"); standalone forwards a shutdown only on
SIGINT, so it is stopped with SIGINT and its stragglers escalated per process group. The
passwords are generated once and kept in ``<home>/passwords.json`` (mode 0600).

Secure by default (README "Security"): every process listens on 127.0.0.1 only (the
listener unless ``RADDEPLOY_LISTEN_HOST`` says otherwise; the API server; Airflow's worker
and triggerer log servers, which Airflow itself binds to every interface: see
:func:`airflow_process_started`), and every process runs with umask 027.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from raddeploy_provider.config import PROCESS_UMASK

REPO_ROOT = Path(__file__).resolve().parents[1]
DAGS_FOLDER = REPO_ROOT / "dags"
LOOPBACK = "127.0.0.1"
#: The app Airflow's ``serve_logs`` gives uvicorn, with ``host=""`` (all interfaces) written in.
SERVE_LOGS_APP = "airflow.utils.serve_logs.log_server:get_app"
#: Written into ``$AIRFLOW_HOME/config`` (on Airflow's sys.path): every Airflow process imports it.
LOCAL_SETTINGS = '''"""Written by raddeploy (raddeploy/embedded.py) at each start of the embedded stack."""
from raddeploy.embedded import airflow_process_started

__all__: list[str] = []  # nothing for airflow.settings to take over
airflow_process_started()
'''


@dataclass
class EmbeddedStack:
    """Airflow standalone + listener under ``home`` (``home/airflow``, ``home/data``, ``home/logs``)."""

    home: Path
    flows_dir: Path
    api_port: int = 8080
    dicom_port: int = 11112
    ae_title: str = "RADDEPLOY"
    listen_host: str | None = None  # None: RADDEPLOY_LISTEN_HOST if set, else 127.0.0.1
    extra_env: dict[str, str] = field(default_factory=dict)
    listener_output: int | None = None  # None: to home/logs/listener.log
    _airflow: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _listener: subprocess.Popen | None = field(default=None, init=False, repr=False)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    def passwords(self) -> dict[str, str]:
        """Generated on first use, then kept, so the admin's password survives restarts."""
        path = self.home / "passwords.json"
        if not path.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            values = {"admin": secrets.token_urlsafe(12), "listener": secrets.token_urlsafe(24)}
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(values, fh)
        return json.loads(path.read_text())

    @property
    def dicom_host(self) -> str:
        """The address the listener binds: this host only unless told (``RADDEPLOY_LISTEN_HOST``)."""
        return self.listen_host or os.environ.get("RADDEPLOY_LISTEN_HOST") or LOOPBACK

    def environment(self) -> dict[str, str]:
        """The environment both processes get: Airflow's settings and ours."""
        venv_bin = str(Path(sys.executable).parent)
        env = {
            **os.environ,
            "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(self.home / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": os.environ.get("AIRFLOW__CORE__PARALLELISM", "8"),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__API__HOST": LOOPBACK,
            # The served-log URLs name this host as 127.0.0.1, where the log servers listen.
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "raddeploy.embedded.loopback_hostname",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,listener:user",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            # The "Test" button of a connection (a dicom one answers with a C-ECHO); Airflow: Disabled.
            "AIRFLOW__CORE__TEST_CONNECTION": os.environ.get("AIRFLOW__CORE__TEST_CONNECTION", "Enabled"),
            "RADDEPLOY_DATA": str(self.data_dir),
            "RADDEPLOY_FLOWS": str(self.flows_dir),
            "RADDEPLOY_AIRFLOW_URL": self.api_url,
            "RADDEPLOY_AIRFLOW_USER": "listener",
            "RADDEPLOY_AIRFLOW_PASSWORD": self.passwords()["listener"],
            "RADDEPLOY_LISTEN_HOST": self.dicom_host,
            "RADDEPLOY_LISTEN_PORT": str(self.dicom_port),
            "RADDEPLOY_AE_TITLE": self.ae_title,
            "PYTHONUNBUFFERED": "1",
        }
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 180.0) -> None:
        """Start Airflow, wait until it answers, start the listener, wait until it listens."""
        self.home.mkdir(mode=0o750, parents=True, exist_ok=True)
        for folder in (self.logs_dir, self.home / "airflow", self.home / "airflow" / "config"):
            folder.mkdir(mode=0o750, parents=True, exist_ok=True)
        if not self.data_dir.exists():  # files 0640 and folders 0750 in the data dir's group (setgid)
            self.data_dir.mkdir(mode=0o750)
            self.data_dir.chmod(0o2750)
        (self.home / "airflow" / "config" / "airflow_local_settings.py").write_text(LOCAL_SETTINGS)
        env = self.environment()
        for port in (self.api_port, self.dicom_port):
            if _port_open(port):
                raise RuntimeError(f"port {port} is already in use: stop what uses it or choose another port")
        self.start_airflow(timeout)
        self._ensure_gpu_pool(env)
        self._start_listener()

    def start_airflow(self, timeout: float = 180.0) -> None:
        """Airflow standalone, until its API, scheduler, triggerer and dag-processor are healthy."""
        self._airflow = subprocess.Popen(
            ["airflow", "standalone"], env=self.environment(), cwd=self.home,
            stdout=open(self.logs_dir / "airflow.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us; we stop Airflow in order
            preexec_fn=_airflow_child,
        )
        self._wait(lambda: self._airflow_healthy(), timeout, "Airflow", self._airflow)

    def stop_airflow(self) -> None:
        """Airflow alone (the listener keeps receiving): for tests of an Airflow outage."""
        _stop_process(self._airflow, signal.SIGINT, grace=30)
        self._airflow = None

    def _start_listener(self) -> None:
        out = self.listener_output if self.listener_output is not None else open(self.logs_dir / "listener.log", "ab")
        self._listener = subprocess.Popen(
            [sys.executable, "-m", "listener"], env=self.environment(), cwd=self.home,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_restrict_umask,
        )
        self._wait(lambda: _port_open(self.dicom_port), 30, "listener", self._listener)

    def _ensure_gpu_pool(self, env: dict[str, str]) -> None:
        """One slot per GPU of this host, so GPU model tasks are scheduled (or wait visibly)."""
        from raddeploy_provider.airflow_client import AirflowClient

        from raddeploy_provider.gpu import host_gpu_ids

        ids = host_gpu_ids(env)
        client = AirflowClient(self.api_url, "admin", self.passwords()["admin"])
        client.ensure_pool(env.get("RADDEPLOY_GPU_POOL", "raddeploy_gpu"), len(ids),
                           f"GPUs of this host ({', '.join(ids) or 'none found'}); one slot each")

    def _airflow_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/api/v2/monitor/health", timeout=2) as resp:
                health = json.loads(resp.read())
        except OSError:
            return False
        return all(health.get(part, {}).get("status") == "healthy"
                   for part in ("metadatabase", "scheduler", "triggerer", "dag_processor"))

    def _wait(self, ready, timeout: float, what: str, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if proc is not None and proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{what} exited with code {proc.returncode}; see {self.logs_dir}")
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{what} not ready after {timeout:.0f} s; see {self.logs_dir}")

    def restart_listener(self, kill: bool = False) -> None:
        """Stop (or SIGKILL) the listener and start it again: for tests of crash recovery."""
        _stop_process(self._listener, signal.SIGKILL if kill else signal.SIGTERM)
        self._start_listener()

    def stop(self) -> None:
        """Listener first (it stops accepting), then Airflow with SIGINT, escalating for stragglers."""
        _stop_process(self._listener, signal.SIGTERM)
        _stop_process(self._airflow, signal.SIGINT, grace=30)
        self._listener = self._airflow = None


def _restrict_umask() -> None:
    """In a child before exec: files 0640, folders 0750 (README "Security")."""
    os.umask(PROCESS_UMASK)


def _airflow_child() -> None:
    """Airflow standalone before exec: the umask, and SIGINT back (a background shell ignores it)."""
    _restrict_umask()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def loopback_hostname() -> str:
    """``[core] hostname_callable`` of the embedded stack: served-log URLs point at the loopback."""
    return LOOPBACK


def airflow_process_started() -> None:
    """Run by every Airflow process of the embedded stack (``airflow_local_settings``).

    Airflow's ``serve_logs`` (the worker log server the scheduler starts, [logging]
    worker_log_server_port, 8793; the triggerer's, trigger_log_server_port, 8794) passes
    ``host=""`` to uvicorn, which binds every interface, and no setting changes it. In the
    scheduler and the triggerer, the two processes that start one, uvicorn is told 127.0.0.1
    instead: the api-server on this host reads the logs from there.
    """
    if sys.argv[1:2] not in (["scheduler"], ["triggerer"]):
        return  # no log server here (and no uvicorn import for every task and CLI call)
    import uvicorn

    if getattr(uvicorn.run, "raddeploy_loopback", False):
        return
    run = uvicorn.run

    def loopback_run(app, *args, **kwargs):
        if app == SERVE_LOGS_APP:
            kwargs["host"] = LOOPBACK
            print(f"raddeploy: this log server listens on {LOOPBACK}:{kwargs.get('port')} only",
                  file=sys.stderr, flush=True)
        return run(app, *args, **kwargs)

    loopback_run.raddeploy_loopback = True  # type: ignore[attr-defined]
    uvicorn.run = loopback_run


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stop_process(proc: subprocess.Popen | None, sig: int, grace: float = 10.0) -> None:
    """Signal ``proc``, wait, then TERM and KILL its whole process group (its children too)."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    for escalate in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, escalate)
        except ProcessLookupError:
            break
        time.sleep(1.0 if escalate == signal.SIGTERM else 0)
    proc.wait()
