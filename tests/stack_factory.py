"""The embedded stack of the e2e tests: started with given flow files, and read back.

``running_stack`` is how every e2e test gets an EmbeddedStack: the session stack of
tests/e2e/conftest.py, and test_durability's own (it stops and restarts Airflow and the
listener, so it never shares). The readers are the listener's own records, the positive
signals a test waits for before it asserts that nothing more happened: its index, run
register and trigger outbox (``<data>/index.sqlite3``) and its log (one line per association
released). ``push_settled`` waits on all of them.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from pydicom import dcmread

from peers import free_port, storescu, wait_for
from raddeploy.embedded import EmbeddedStack
from raddeploy_provider.units import slug

#: The listener's log line for an association the sender released (listener/association.py).
RELEASED = re.compile(r"association from \S*@\S+ released after (\d+) instances")
#: The listener's log line for the flows it (re)loaded (raddeploy_provider/flows/registry.py).
LOADED = re.compile(r"flows loaded: \d+ valid \(([^)]*)\)")


@contextmanager
def running_stack(home: Path, flows: dict[str, str], extra_env: dict[str, str] | None = None,
                  ) -> Iterator[EmbeddedStack]:
    """A stack under ``home`` with these flow files (file name -> YAML), on free ports of 127.0.0.1; stopped after."""
    flows_dir = home / "flows"
    flows_dir.mkdir()
    for name, text in flows.items():
        (flows_dir / name).write_text(text)
    stack = EmbeddedStack(home=home, flows_dir=flows_dir, api_port=free_port(), dicom_port=free_port(),
                          listen_host="127.0.0.1", extra_env=extra_env or {})
    started = time.monotonic()
    stack.start()
    print(f"\n[e2e] stack started in {time.monotonic() - started:.1f} s (home {home})")
    try:
        yield stack
    finally:
        stack.stop()


def query(stack: EmbeddedStack, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
    """A read of the listener's index (SQLite WAL: readers never block its writer)."""
    with closing(sqlite3.connect(stack.data_dir / "index.sqlite3", timeout=30)) as db:
        db.row_factory = sqlite3.Row
        return db.execute(sql, args).fetchall()


def released(stack: EmbeddedStack) -> list[int]:
    """How many instances each association the listener released had stored, oldest first (from its log)."""
    log = stack.logs_dir / "listener.log"
    return [int(n) for n in RELEASED.findall(log.read_text(errors="replace"))] if log.exists() else []


def pending_triggers(stack: EmbeddedStack) -> list[sqlite3.Row]:
    """Outbox rows not yet posted to Airflow."""
    return query(stack, "SELECT dag_id, run_id, attempts, last_error FROM outbox WHERE delivered_at IS NULL")


def push_settled(stack: EmbeddedStack, files: list[Path], timeout: float = 60) -> subprocess.CompletedProcess:
    """Push ``files`` in one association and wait until the listener has caught up with them.

    Caught up: the association was released with every instance stored (each C-STORE answered:
    the instance is in the index, with any run it opened and that run's trigger, in one
    transaction), every instance is in the index, and the outbox has posted every trigger.
    A run this push opened then shows in the index's ``runs`` and in Airflow: a test may
    assert that none did.
    """
    before = len(released(stack))
    pushed = storescu(stack.dicom_port, files)
    assert pushed.returncode == 0, pushed.stderr
    counts = wait_for(lambda: released(stack)[before:], timeout, "the listener to log the push's association released")
    assert counts == [len(files)], f"associations released since the push, instances stored by each: {counts}"
    sops = {dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    marks = ",".join("?" * len(sops))
    indexed = {r["sop_uid"] for r in query(stack, f"SELECT sop_uid FROM instances WHERE sop_uid IN ({marks})",
                                           tuple(sops))}
    assert indexed == sops, f"{len(sops - indexed)} pushed instances are not in the index"
    wait_for(lambda: not pending_triggers(stack), timeout, "the outbox to post every trigger to Airflow")
    return pushed


def add_flow(stack: EmbeddedStack, airflow, file_name: str, text: str, dag_id: str, timeout: float = 120) -> dict:
    """Write a flow file into the running stack (any with a ``flows_dir``: the compose one too),
    renamed in whole, never half-read, and wait for its DAG through the REST API; a file that
    does not load fails at once with its error (its placeholder DAG ``invalid_<file stem>`` says
    why). Returns the DAG's JSON."""
    dag_path = f"/api/v2/dags/{urllib.parse.quote(dag_id, safe='')}"
    assert airflow.get(dag_path)[0] == 404, f"DAG {dag_id} exists before its flow file: stale stack?"
    loads_before = len(LOADED.findall(listener_log(stack)))
    tmp = stack.flows_dir / f".{file_name}.tmp"
    tmp.write_text(text)
    tmp.rename(stack.flows_dir / file_name)
    invalid = f"/api/v2/dags/invalid_{slug(Path(file_name).stem)}"

    def parsed():
        status, body = airflow.get(dag_path)
        if status == 200:
            return body
        bad_status, bad = airflow.get(invalid)
        assert bad_status != 200, f"the flow file {file_name} did not load: {bad.get('description')}"
        return None

    dag = wait_for(parsed, timeout, f"Airflow to parse DAG {dag_id}", interval=0.5)
    # ... and the listener to match against it: it reloads changed flow files every 2 s
    wait_for(lambda: any(dag_id in names.split(", ") for names in LOADED.findall(listener_log(stack))[loads_before:]),
             timeout, f"the listener to load flow {dag_id}", interval=0.2)
    return dag


def listener_log(stack) -> str:
    """What the listener logged: its log file (embedded stack) or its container's output (compose)."""
    if hasattr(stack, "logs"):
        return stack.logs("listener", tail=5000)
    path = stack.logs_dir / "listener.log"
    return path.read_text(errors="replace") if path.exists() else ""


def run_path(dag_id: str, run_id: str) -> str:
    return f"/api/v2/dags/{urllib.parse.quote(dag_id, safe='')}/dagRuns/{urllib.parse.quote(run_id, safe='')}"


def run_finished(airflow, dag_id: str, run_id: str, timeout: float = 180, after: str | None = None) -> dict:
    """The DAG run (REST JSON) once it has ended, success or failed; with ``after`` (an end
    date), once it has ended again later than that (a cleared run)."""
    def ended():
        status, run = airflow.get(run_path(dag_id, run_id))
        if status == 200 and run["state"] in ("success", "failed") and (after is None or run["end_date"] > after):
            return run
        return None
    return wait_for(ended, timeout, f"run {run_id} of {dag_id} to end")


def task_instances(airflow, dag_id: str, run_id: str) -> dict[str, dict]:
    """The run's task instances by task id (REST JSON)."""
    status, body = airflow.get(f"{run_path(dag_id, run_id)}/taskInstances")
    assert status == 200, body
    return {ti["task_id"]: ti for ti in body["task_instances"]}


def task_log(airflow, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
    """The task's log of one try, as the UI shows it (REST), as text."""
    status, body = airflow.get(f"{run_path(dag_id, run_id)}/taskInstances/{task_id}/logs/{try_number}")
    assert status == 200, body
    return str(body)
