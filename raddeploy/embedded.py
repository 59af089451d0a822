"""The embedded default: Airflow standalone (SQLite, LocalExecutor) plus the listener.

``raddeploy run`` and the end-to-end tests start the product through this one class, so the
tests prove the path a user runs. The Airflow settings in :meth:`EmbeddedStack.environment`
were measured on 2 cores (README "Settings"); standalone forwards a shutdown only on
SIGINT, so it is stopped with SIGINT and its stragglers escalated per process group. The
passwords are generated once and kept in ``<home>/passwords.json`` (mode 0600).

Supervised (README "The two commands"): :meth:`EmbeddedStack.supervise`, the loop ``raddeploy
run`` drives, restarts a child that dies, after a back-off (:class:`RestartPolicy`), and when
restarting does not help it stops everything and raises :class:`StackGaveUp`: the DICOM port
never stays open while Airflow is gone for good, nor Airflow without a listener. Airflow
standalone starts its components once and never again (measured, Airflow 3.3.2: a killed
scheduler, api-server, ... stays a zombie and standalone runs on without it), so the death of
a component restarts standalone as a whole. ``start()``, ``stop()``, ``stop_airflow()`` and
``restart_listener()`` supervise nothing: the tests drive them, and an Airflow stopped by
``stop_airflow()`` is an outage the supervisor leaves alone.

Secure by default (README "Security"): every process listens on 127.0.0.1 only (the
listener unless ``RADDEPLOY_LISTEN_HOST`` says otherwise; the API server; Airflow's worker
and triggerer log servers, which Airflow itself binds to every interface: see
:func:`airflow_process_started`), and every process runs with umask 027.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from raddeploy_provider.config import PROCESS_UMASK

log = logging.getLogger(__name__)

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
#: What a task process would import at its start: Airflow's task runner and what its start imports
#: lazily (the DagBag its parse builds: 0.4-0.7 s of CPU a task here; its process title; the
#: execution timeout), the DAG factory (a flow's DAG parse), the Docker provider (model tasks),
#: pydicom's reader and writer (provenance, sends).
TASK_PRELOAD = ("airflow.sdk.execution_time.task_runner", "airflow.sdk.execution_time.supervisor",
                "airflow.dag_processing.dagbag", "setproctitle", "airflow.sdk.execution_time.timeout",
                "raddeploy_provider.dag_factory", "airflow.providers.docker.operators.docker",
                "raddeploy_provider.dicom.provenance", "raddeploy_provider.dicom.scu", "pydicom")
#: What the DAG processor imports once, at its start: each parse of the flows file (every refresh,
#: and one for every sensor a trigger ends: Airflow's success callback) runs in a child forked from
#: it, which then skips these imports (~0.4 s of CPU each on these machines).
DAG_PROCESSOR_PRELOAD = ("raddeploy_provider.dag_factory",)
#: The children ``airflow standalone`` starts (as ``airflow <name>``; the api-server retitles
#: itself ``airflow api_server -- host:...``). It starts each once: a dead one is not restarted.
AIRFLOW_COMPONENTS = ("scheduler", "dag-processor", "triggerer", "api-server")
#: How long a restarted child may take to be ready (Airflow healthy; the listener listening).
AIRFLOW_START_TIMEOUT = 180.0
LISTENER_START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Restart:
    """Start the child again after ``delay`` seconds; ``deaths`` within the window, this one included."""

    delay: float
    deaths: int


@dataclass(frozen=True)
class GiveUp:
    """Restarting does not help: ``deaths`` within ``window`` seconds. Stop everything."""

    deaths: int
    window: float


@dataclass
class RestartPolicy:
    """When a child that died is started again, and when to stop trying. Pure: no clock, no I/O.

    The caller passes the time (monotonic seconds). The delay starts at ``first_delay`` and
    doubles up to ``max_delay``; a child that ran ready for ``healthy_reset`` seconds starts at
    ``first_delay`` again. ``max_deaths`` deaths within ``window`` seconds: give up.
    """

    first_delay: float = 1.0
    max_delay: float = 60.0
    healthy_reset: float = 120.0
    max_deaths: int = 5
    window: float = 600.0
    deaths: list[float] = field(default_factory=list)
    next_delay: float | None = None  # None: first_delay
    up_since: float | None = None

    def up(self, now: float) -> None:
        """The child is ready (again)."""
        self.up_since = now

    def died(self, now: float) -> Restart | GiveUp:
        if self.up_since is not None and now - self.up_since >= self.healthy_reset:
            self.next_delay = None
        self.up_since = None
        self.deaths = [t for t in self.deaths if now - t < self.window] + [now]
        if len(self.deaths) >= self.max_deaths:
            return GiveUp(len(self.deaths), self.window)
        delay = self.first_delay if self.next_delay is None else self.next_delay
        self.next_delay = min(delay * 2, self.max_delay)
        return Restart(delay, len(self.deaths))

    def describe(self, decision: Restart) -> str:
        return f"death {decision.deaths}; {self.max_deaths} within {_minutes(self.window)} stop everything"


class StackGaveUp(RuntimeError):
    """A child kept dying: the supervisor stopped everything. The message names the log to read."""


@dataclass
class _Watch:
    """What the supervisor knows of one child: ``up``, ``waiting`` to restart (until ``at``),
    ``starting`` (ready by ``at``), or (Airflow) ``adopt``: stopped by stop_airflow(), not ours to restart."""

    name: str
    policy: RestartPolicy
    state: str = "up"
    at: float = 0.0
    since: float = 0.0  # when it died
    cause: str = ""  # the log line of its last death
    started: float = 0.0  # epoch seconds of its last restart
    components: dict[str, int] = field(default_factory=dict)  # Airflow: name -> pid, while up


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
            # The LocalExecutor's workers come from a forkserver that has imported what a task's DAG
            # parse and model and send tasks import (Airflow 3.3's [scheduler] mp_start_method and
            # mp_forkserver_preload): each task process is a fork of a worker that holds them, so a
            # task start no longer imports them (docs/architecture.md, "Cost per run").
            "AIRFLOW__SCHEDULER__MP_START_METHOD": os.environ.get("AIRFLOW__SCHEDULER__MP_START_METHOD", "forkserver"),
            "AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD": os.environ.get(
                "AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD", ",".join(TASK_PRELOAD)),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__API__HOST": LOOPBACK,
            # The served-log URLs name this host as 127.0.0.1, where the log servers listen.
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "raddeploy.embedded.loopback_hostname",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            # An idle scheduler loop costs ~26 ms of CPU here: at 0.1 s it took a quarter of a core doing
            # nothing, CPU the burst's task starts wanted (bench/gpu_slots.py: 0.3 s cut the CPU per run
            # 2.2-2.3 -> 1.9 s and the wall time ~2 s; the latency bench no worse).
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.3",
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
        if env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "sqlite").startswith("sqlite"):
            # SQLite's busy timeouts, per component (raddeploy/airflow_sqlite.py says why).
            env.setdefault("AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS", "raddeploy.airflow_sqlite.CONNECT_ARGS")
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

    def start_airflow(self, timeout: float = AIRFLOW_START_TIMEOUT) -> None:
        """Airflow standalone, until its API, scheduler, triggerer and dag-processor are healthy."""
        self._spawn_airflow()
        self._wait(lambda: self._airflow_healthy(), timeout, "Airflow", self._airflow)

    def _spawn_airflow(self, note: str | None = None) -> None:
        with open(self.logs_dir / "airflow.log", "ab") as out:
            if note:  # a restart: say why in the file the operator reads
                out.write(f"---- raddeploy {time.strftime('%Y-%m-%d %H:%M:%S')}: {note} ----\n".encode())
                out.flush()
            self._airflow = subprocess.Popen(
                ["airflow", "standalone"], env=self.environment(), cwd=self.home,
                stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us; we stop Airflow in order
                preexec_fn=_airflow_child,
            )

    def stop_airflow(self) -> None:
        """Airflow alone (the listener keeps receiving): for tests of an Airflow outage."""
        _stop_process(self._airflow, signal.SIGINT, grace=30)
        self._airflow = None

    def _start_listener(self) -> None:
        self._spawn_listener()
        self._wait(lambda: _port_open(self.dicom_port), LISTENER_START_TIMEOUT, "listener", self._listener)

    def _spawn_listener(self) -> None:
        if self.listener_output is not None:
            out = self.listener_output
        else:
            out = os.open(self.logs_dir / "listener.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            self._listener = subprocess.Popen(
                [sys.executable, "-m", "listener"], env=self.environment(), cwd=self.home,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_restrict_umask,
            )
        finally:
            if out != self.listener_output:
                os.close(out)  # the child has its own copy

    @property
    def listener_log(self) -> str:
        """Where the listener writes, for messages: its log file, or the output it shares."""
        if self.listener_output is None:
            return str(self.logs_dir / "listener.log")
        return "the listener's lines above (its output is this command's)"

    def _ensure_gpu_pool(self, env: dict[str, str]) -> None:
        """``RADDEPLOY_GPU_QUEUE_DEPTH`` slots per GPU of this host (or the CPU fallback's), so GPU
        model tasks are scheduled (or their runs say why they wait)."""
        from raddeploy_provider.airflow_client import AirflowClient
        from raddeploy_provider.gpu import host_gpu_ids, pool_size

        slots, description = pool_size(host_gpu_ids(env), env.get("RADDEPLOY_GPU_FALLBACK", "none").strip().lower(),
                                       self._gpu_queue_depth(env))
        from raddeploy_provider.airflow_client import AirflowUnavailable

        client = AirflowClient(self.api_url, "admin", self.passwords()["admin"])
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ensure_pool(env.get("RADDEPLOY_GPU_POOL", "raddeploy_gpu"), slots, description)
                return
            except AirflowUnavailable:  # measured: a 500 while the API server's SQLite is busy at start-up
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def gpu_summary(self) -> list[str]:
        """The GPUs found and each flow with GPU models (``raddeploy run`` prints it at start-up)."""
        from raddeploy_provider.flows import load_flows
        from raddeploy_provider.gpu import host_gpu_ids, summary

        env = self.environment()
        flows = [(flow.dag_id, [(m.name, m.gpu) for m in flow.models]) for flow in load_flows(self.flows_dir).flows]
        return summary(env.get("RADDEPLOY_GPU_POOL", "raddeploy_gpu"), host_gpu_ids(env),
                       env.get("RADDEPLOY_GPU_FALLBACK", "none").strip().lower(), flows, self._gpu_queue_depth(env))

    @staticmethod
    def _gpu_queue_depth(env: dict[str, str]) -> int:
        """``RADDEPLOY_GPU_QUEUE_DEPTH`` as the stack's tasks read it (config.py's one reading)."""
        from raddeploy_provider.config import SETTINGS

        setting = next(s for s in SETTINGS if s.field == "gpu_queue_depth")
        return setting.parse(setting.name, env.get(f"RADDEPLOY_{setting.name}") or setting.default)

    def _airflow_healthy(self, since: float | None = None) -> bool:
        """All healthy, and the task execution API answering; with ``since`` (epoch seconds),
        heartbeats after it too: a restarted Airflow reports the old components' heartbeats
        healthy for a while (30 s threshold)."""
        try:
            with urllib.request.urlopen(f"{self.api_url}/api/v2/monitor/health", timeout=2) as resp:
                health = json.loads(resp.read())
        except OSError:
            return False
        parts = ("scheduler", "triggerer", "dag_processor")
        if not all(health.get(part, {}).get("status") == "healthy" for part in ("metadatabase", *parts)):
            return False
        if since is not None:
            try:
                beats = [datetime.fromisoformat(health[part][f"latest_{part}_heartbeat"]).timestamp()
                         for part in parts]
            except (KeyError, TypeError, ValueError):
                return False
            if min(beats) < since:
                return False
        return _execution_api_ready(self.api_url)

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
        self._remove_netns_holders()

    def _remove_netns_holders(self) -> None:
        """The GPUs' network-namespace holders of this stack's lease folder go with it (best effort:
        the next model on a GPU starts its holder again)."""
        from raddeploy_provider.config import load_settings
        from raddeploy_provider.gpu import remove_netns_holders

        try:
            import docker

            lock_dir = load_settings(self.environment()).gpu_lock_dir
            client = docker.from_env(timeout=10)
            try:
                remove_netns_holders(client.api, lock_dir)
            finally:
                client.close()
        except Exception as exc:  # noqa: BLE001 - no Docker here, or it is down: nothing to leave behind
            log.debug("GPU namespace holders not removed: %s", exc)

    # -- supervision: the loop of `raddeploy run` ---------------------------------------------

    def supervise(self, stop: threading.Event, policy: Callable[[], RestartPolicy] = RestartPolicy,
                  tick: float = 0.5) -> None:
        """Watch the started stack until ``stop`` is set; the caller then calls :meth:`stop`.

        A dead listener is started again after the policy's delay: the gap is safe (what it
        acknowledged is durable, its outbox posts the triggers later). Airflow is restarted as
        a whole when standalone or one of its components dies; the listener keeps receiving
        meanwhile. A child that keeps dying (:class:`GiveUp`): everything is stopped, listener
        first, and :class:`StackGaveUp` raised. An Airflow stopped by :meth:`stop_airflow` is
        not watched (until start_airflow() starts it again). Not to be run alongside
        restart_listener(): both would start a listener.
        """
        now = time.monotonic()
        watches = {"listener": _Watch("listener", policy()), "Airflow": _Watch("Airflow", policy())}
        for watch in watches.values():
            watch.policy.up(now)
        while not stop.wait(tick):
            self._watch_listener(watches["listener"], time.monotonic())
            if not stop.is_set():
                self._watch_airflow(watches["Airflow"], time.monotonic())

    def _watch_listener(self, watch: _Watch, now: float) -> None:
        proc = self._listener
        if proc is None:
            return
        if watch.state == "waiting":
            if now >= watch.at:
                self._spawn_listener()
                watch.state, watch.at = "starting", now + LISTENER_START_TIMEOUT
            return
        if proc.poll() is not None:
            what = "died while starting" if watch.state == "starting" else "died"
            self._died(watch, now, f"listener (pid {proc.pid}) {what} ({exit_text(proc.returncode)})",
                       self.listener_log)
        elif watch.state == "starting":
            if _port_open(self.dicom_port):
                watch.state = "up"
                watch.policy.up(now)
                log.info("listener (pid %d) listening again on port %d, %.0f s after it died",
                         proc.pid, self.dicom_port, now - watch.since)
            elif now >= watch.at:  # _died kills it
                self._died(watch, now, f"listener (pid {proc.pid}) not listening {LISTENER_START_TIMEOUT:.0f} s "
                           "after its start", self.listener_log)

    def _watch_airflow(self, watch: _Watch, now: float) -> None:
        proc = self._airflow
        if proc is None:  # stopped on purpose (stop_airflow): an outage we leave alone
            watch.state = "adopt"
            return
        if watch.state == "adopt":  # started again by start_airflow(): watched once it is healthy
            watch.state, watch.at, watch.since = "starting", now + AIRFLOW_START_TIMEOUT, now
            watch.started = time.time()
        airflow_log = str(self.logs_dir / "airflow.log")
        if watch.state == "waiting":
            if now >= watch.at:
                watch.started = time.time()
                self._spawn_airflow(note=f"restarting Airflow standalone: {watch.cause}")
                watch.state, watch.at = "starting", now + AIRFLOW_START_TIMEOUT
                log.info("Airflow standalone started again (pid %d); waiting until it is healthy", self._airflow.pid)
            return
        if proc.poll() is not None:
            what = "died while starting" if watch.state == "starting" else "died"
            self._died(watch, now, f"Airflow standalone (pid {proc.pid}) {what} ({exit_text(proc.returncode)})",
                       airflow_log)
            return
        children = airflow_components(proc.pid)
        if watch.state == "up":
            if not watch.components:  # the first look at a stack start() made
                watch.components = _running_components(children)
            dead = [f"Airflow's {name} (pid {pid}) died "
                    f"({exit_text(children[pid][1] if pid in children else None, wait_status=True)})"
                    for name, pid in watch.components.items() if pid not in children or children[pid][1] is not None]
            dead += [f"Airflow's {name} is not running" for name in AIRFLOW_COMPONENTS if name not in watch.components]
            if dead:
                self._died(watch, now, "; ".join(dead), airflow_log,
                           restart="standalone does not restart its components: restarting Airflow standalone")
        elif watch.state == "starting":
            running = _running_components(children)
            if len(running) == len(AIRFLOW_COMPONENTS) and self._airflow_healthy(since=watch.started):
                watch.state, watch.components = "up", running
                watch.policy.up(now)
                log.info("Airflow healthy again (standalone pid %d), %.0f s after it went down", proc.pid,
                         now - watch.since)
            elif now >= watch.at:
                self._died(watch, now, f"Airflow standalone (pid {proc.pid}) not healthy "
                           f"{AIRFLOW_START_TIMEOUT:.0f} s after its start", airflow_log)

    def _died(self, watch: _Watch, now: float, cause: str, log_file: str, restart: str = "restarting it") -> None:
        """One log line for a death, then the policy's decision: restart later, or stop everything."""
        decision = watch.policy.died(now)
        watch.cause = cause
        if isinstance(decision, GiveUp):
            message = (f"{cause}: {watch.name} died {decision.deaths} times in {_minutes(decision.window)}, "
                       f"restarting does not help; stopped everything. Read {log_file}")
            log.error("%s; stopping everything", cause)
            if watch.name == "Airflow":  # listener first, then what is left of Airflow
                _stop_process(self._listener, signal.SIGTERM)
                _stop_group(self._airflow)
            self.stop()
            raise StackGaveUp(message)
        log.warning("%s; %s in %g s (%s)", cause, restart, decision.delay, watch.policy.describe(decision))
        if watch.name == "Airflow":
            _stop_group(self._airflow)
        else:  # dead (or not listening in time): it and anything left in its process group
            _stop_process(self._listener, signal.SIGKILL)
        watch.state, watch.at, watch.since = "waiting", now + decision.delay, now


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
    scheduler and the triggerer, the two processes that start one (the scheduler's from its
    forkserver), uvicorn is told 127.0.0.1 instead: the api-server on this host reads the logs
    from there.
    """
    if sys.argv[1:2] == ["dag-processor"]:
        # At its first fork, not now: this runs inside `import airflow`, before Airflow is set up.
        os.register_at_fork(before=_preload_once)
        return
    # The scheduler's log server runs in a child of its forkserver (TASK_PRELOAD: [scheduler]
    # mp_start_method), a fresh interpreter whose argv is Python's, not Airflow's.
    forkserver = "multiprocessing.forkserver" in " ".join(getattr(sys, "orig_argv", ()))
    if sys.argv[1:2] not in (["scheduler"], ["triggerer"]) and not forkserver:
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


@functools.cache
def _preload_once() -> None:
    """Import DAG_PROCESSOR_PRELOAD in this process, once, for the children it forks from now on."""
    preload(DAG_PROCESSOR_PRELOAD)


def preload(names: tuple[str, ...]) -> None:
    """Import ``names`` in this process, for the children it forks. A module that fails is said on
    stderr and left to each child, whose parse or task reports the error where people look (the
    UI's import errors, the task log): a parent that will not start or fork would say less."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - said, and left to the children
            print(f"raddeploy: preloading {name} failed ({exc}); each child will import it", file=sys.stderr)


def exit_text(status: int | None, wait_status: bool = False) -> str:
    """``exit code 1`` or ``killed by SIGKILL``: from a Popen return code, or a raw wait status."""
    if status is None:
        return "exit status unknown"
    if wait_status:
        status = -(status & 0x7F) if status & 0x7F else status >> 8
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit code {status}"


def airflow_components(standalone_pid: int) -> dict[int, tuple[str | None, int | None]]:
    """Standalone's children now: pid -> (component name, None while it runs, else its wait status).

    Read from /proc (Linux): the direct children of ``standalone_pid``; a running one is named
    by its title (``airflow <name>``). Standalone never reaps a component that died: it stays
    a zombie (no title) with its exit status (``/proc/<pid>/stat`` field 52).
    """
    return {pid: (name, status) for pid, _, _, name, status in _processes(ppid=standalone_pid)}


def _processes(ppid: int | None = None, pgid: int | None = None):
    """(pid, ppid, pgid, component name or None, None or a zombie's wait status) of each process
    (with this parent, in this process group)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
            parent, group = int(fields[1]), int(fields[2])
            if (ppid is not None and parent != ppid) or (pgid is not None and group != pgid):
                continue
            if fields[0] == "Z":
                yield int(entry.name), parent, group, None, int(fields[49]) if len(fields) > 49 else 0
                continue
            words = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        name = next((w.replace("_", "-") for w in words[:3] if w.replace("_", "-") in AIRFLOW_COMPONENTS), None)
        yield int(entry.name), parent, group, name, None


def _running_components(children: dict[int, tuple[str | None, int | None]]) -> dict[str, int]:
    return {name: pid for pid, (name, status) in children.items() if name is not None and status is None}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


#: The task execution API's health path. Its first request makes the API server build the
#: API's versioned routers (Cadwyn, lazily): ~7 s of CPU on its event loop on 2 cores, during
#: which it answers nobody (measured: a task's first call took 7.8 s, the UI and REST calls
#: waited as long, a test's 10 s read timed out on a slower machine). Asked once at start-up,
#: before anything waits on the API server, it costs nothing later.
EXECUTION_API_HEALTH = "/execution/health"
#: Seconds that first request may take.
EXECUTION_API_WARM_UP_TIMEOUT = 120.0


def _execution_api_ready(api_url: str) -> bool:
    """The execution API answers (the first call builds its routers, see EXECUTION_API_HEALTH)."""
    try:
        with urllib.request.urlopen(f"{api_url}{EXECUTION_API_HEALTH}", timeout=EXECUTION_API_WARM_UP_TIMEOUT) as resp:
            return resp.status == 200
    except OSError:
        return False


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stop_group(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM to Airflow's whole process group; once standalone and its components are gone
    (or after ``grace``), SIGKILL to what is left.

    For an Airflow that lost standalone or a component. Not SIGINT to standalone: with a dead
    component it does not exit (measured: still there after 30 s; it waits for the end of the
    dead one's output, and the dead scheduler's orphaned workers hold that pipe). A dead
    standalone leaves its components running, the api-server on the API port. The components
    stop on SIGTERM in ~4 s; a dead scheduler's idle LocalExecutor workers ignore it.
    """
    if proc is None:
        return
    # standalone's components, its children or (standalone dead) orphans still in its group
    waited = {pid for pid, _, _, name, status in _processes(pgid=proc.pid) if name and status is None}
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (proc.poll() is None or any(_alive(pid) for pid in waited)):
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _alive(pid: int) -> bool:
    """``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


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
