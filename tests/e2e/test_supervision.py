"""`raddeploy run` supervises its children: the real command, real processes, real signals.

The command runs as a subprocess with its own home and ports; its children are found in /proc
(children of its pid, by their titles), never through EmbeddedStack's internals. What is
asserted is waited on first: a log line of the supervisor, a C-ECHO answered, the command's exit.

1. A SIGKILLed listener is restarted (one log line: who, how it died, when it restarts), the
   DICOM port answers again and an instance pushed is stored. A SIGKILLed scheduler (Airflow
   standalone never restarts its components) restarts Airflow standalone as a whole, without
   the dead scheduler's orphans, while the listener runs on; then SIGTERM: exit 0, no process left.
2. A listener that keeps dying (killed at each restart): the command stops everything (the
   DICOM and API ports closed, no process left) and exits 1 naming where to read.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_factory import make_series
from peers import DCMTK_ENV, free_port, require_tool, storescu, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

RADDEPLOY = Path(sys.executable).with_name("raddeploy")


# -- /proc ------------------------------------------------------------------------------------

def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of ``pid``, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2])


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def children(pid: int) -> dict[int, str]:
    """Live children of ``pid``: pid -> command line (titles included)."""
    found = {}
    for child in _all_pids():
        stat = _stat(child)
        if stat and stat[1] == pid and stat[0] != "Z":
            try:
                found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                pass
    return found


def child(pid: int, pattern: str) -> int:
    """The one live child of ``pid`` whose command line matches ``pattern``."""
    matches = [c for c, cmd in children(pid).items() if re.search(pattern, cmd)]
    assert len(matches) == 1, f"children of {pid} matching {pattern!r}: {children(pid)}"
    return matches[0]


def in_groups(pgids: set[int]) -> dict[int, str]:
    """Live processes in these process groups: pid -> state."""
    return {pid: stat[0] for pid in _all_pids() if (stat := _stat(pid)) and stat[2] in pgids and stat[0] != "Z"}


# -- the command ------------------------------------------------------------------------------

@dataclass
class Run:
    proc: subprocess.Popen
    output: Path
    dicom_port: int
    api_port: int
    home: Path

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def line(self, pattern: str, timeout: float, after: int = 0) -> re.Match:
        """Wait for a line of its output (from offset ``after``) matching ``pattern``; fail if it exits first."""
        def seen():
            found = re.search(pattern, self.text()[after:], re.MULTILINE)
            if found is None and self.proc.poll() is not None:
                raise AssertionError(f"raddeploy run exited ({self.proc.returncode}) before {pattern!r}:\n"
                                     + self.text()[-4000:])
            return found
        return wait_for(seen, timeout, f"a line {pattern!r} from raddeploy run", interval=0.2)

    def echo(self) -> bool:
        done = subprocess.run([require_tool("echoscu"), "-aec", "RADDEPLOY", "127.0.0.1", str(self.dicom_port)],
                              env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
        return done.returncode == 0

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/api/v2/monitor/health", timeout=2) as r:
                return b'"unhealthy"' not in r.read()
        except OSError:
            return False

    def standalone(self) -> int:
        return child(self.proc.pid, r"airflow standalone")

    def listener(self) -> int:
        return child(self.proc.pid, r" -m listener$")

    def groups(self) -> set[int]:
        """The process groups of its children (each child leads its own session)."""
        return {stat[2] for c in children(self.proc.pid) if (stat := _stat(c))}


@contextmanager
def raddeploy_run(tmp_path: Path) -> Iterator[Run]:
    """`raddeploy run` on free ports under ``tmp_path``, until it answers C-ECHO and Airflow is healthy."""
    (tmp_path / "flows").mkdir()
    dicom_port, api_port = free_port(), free_port()
    env = {**os.environ,
           # own log-server ports: another stack on this machine (the e2e session's) may hold 8793/8794
           "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
           "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
           "RADDEPLOY_GPUS": ""}
    output = tmp_path / "run.out"
    with open(output, "wb") as out:
        proc = subprocess.Popen([str(RADDEPLOY), "run", "--home", str(tmp_path / "home"),
                                 "--flows", str(tmp_path / "flows"), "--port", str(dicom_port),
                                 "--api-port", str(api_port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    run = Run(proc, output, dicom_port, api_port, tmp_path / "home")
    groups: set[int] = set()
    try:
        started = time.monotonic()
        run.line(r"^raddeploy is running\.$", 240)
        wait_for(lambda: run.echo() and run.healthy(), 60, "C-ECHO and a healthy Airflow")
        print(f"\n[supervision] raddeploy run ready in {time.monotonic() - started:.1f} s")
        yield run
    finally:
        if proc.poll() is None:
            groups = run.groups()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
        for pid in in_groups(groups | {proc.pid}):  # a failed test leaves nothing behind
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _stored(run: Run, sop_uid: str) -> bool:
    with closing(sqlite3.connect(run.home / "data" / "index.sqlite3", timeout=30)) as db:
        return db.execute("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone() is not None


def _port_closed(port: int) -> bool:
    import socket
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


# -- the tests --------------------------------------------------------------------------------

def test_run_restarts_a_dead_listener_and_airflow_and_stops_clean_on_sigterm(tmp_path: Path) -> None:
    with raddeploy_run(tmp_path) as run:
        # 1. the listener, SIGKILLed
        listener = run.listener()
        mark = len(run.text())
        t0 = time.monotonic()
        os.kill(listener, signal.SIGKILL)
        run.line(rf"listener \(pid {listener}\) died \(killed by SIGKILL\); restarting it in 1 s", 10, mark)
        run.line(r"listener \(pid \d+\) listening again on port", 30, mark)
        assert run.echo()
        restarted = run.listener()
        assert restarted != listener
        print(f"[supervision] listener SIGKILLed -> answering C-ECHO again in {time.monotonic() - t0:.1f} s")

        ct = make_series(tmp_path / "ct", slices=1, size=16)
        pushed = storescu(run.dicom_port, ct.files)
        assert pushed.returncode == 0, pushed.stderr
        assert _stored(run, dcmread(ct.files[0], stop_before_pixels=True).SOPInstanceUID)

        # 2. Airflow's scheduler, SIGKILLed: standalone runs on without it, so it is restarted whole
        standalone = run.standalone()
        scheduler = child(standalone, r"^\S+ \S*airflow scheduler")
        orphans = set(children(scheduler))  # its workers and log server: they outlive it
        mark = len(run.text())
        t0 = time.monotonic()
        os.kill(scheduler, signal.SIGKILL)
        run.line(rf"Airflow's scheduler \(pid {scheduler}\) died \(killed by SIGKILL\); standalone does not "
                 r"restart its components: restarting Airflow standalone in 1 s", 10, mark)
        run.line(r"Airflow healthy again \(standalone pid \d+\)", 240, mark)
        print(f"[supervision] scheduler SIGKILLed -> Airflow healthy again in {time.monotonic() - t0:.1f} s")
        assert run.healthy()
        assert run.standalone() != standalone
        assert not in_groups({standalone}), "the old standalone's processes (the scheduler's orphans) are gone"
        assert orphans and not (orphans & set(_all_pids()))
        assert run.listener() == restarted, "the listener ran on while Airflow restarted"
        assert run.echo()

        # 3. SIGTERM: everything stops, listener first, and the command exits 0
        groups = run.groups()
        assert len(groups) == 2
        t0 = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(timeout=90) == 0, run.text()[-4000:]
        print(f"[supervision] SIGTERM -> exit 0 in {time.monotonic() - t0:.1f} s")
        assert in_groups(groups) == {}
        assert children(run.proc.pid) == {}
        assert _port_closed(run.dicom_port) and _port_closed(run.api_port)
        assert "stopping ..." in run.text()
        print("\n".join(line for line in run.text().splitlines() if " raddeploy.embedded: " in line))


def test_run_stops_everything_when_the_listener_keeps_dying(tmp_path: Path) -> None:
    with raddeploy_run(tmp_path) as run:
        groups = run.groups()
        t0 = time.monotonic()
        for death, delay in enumerate((1, 2, 4, 8), start=1):  # 4 restarts, each killed once it listens
            listener = run.listener()
            mark = len(run.text())
            os.kill(listener, signal.SIGKILL)
            run.line(rf"listener \(pid {listener}\) died \(killed by SIGKILL\); restarting it in {delay} s "
                     rf"\(death {death}; 5 within 10 min stop everything\)", 10, mark)
            run.line(r"listener \(pid \d+\) listening again", 30 + delay, mark)
            groups |= run.groups()
        listener = run.listener()
        os.kill(listener, signal.SIGKILL)
        assert run.proc.wait(timeout=90) == 1, run.text()[-4000:]
        print(f"[supervision] 5 listener deaths -> everything stopped, exit 1, in {time.monotonic() - t0:.1f} s")
        assert re.search(rf"raddeploy run stopped: listener \(pid {listener}\) died \(killed by SIGKILL\): "
                         r"listener died 5 times in 10 min, restarting does not help; stopped everything\. Read ",
                         run.text())
        assert in_groups(groups) == {}
        assert _port_closed(run.dicom_port) and _port_closed(run.api_port)
        print("\n".join(line for line in run.text().splitlines()
                        if "raddeploy.embedded: " in line or "stopped: " in line))
