"""The embedded stack's task processes start with their imports done: the LocalExecutor's workers
come from a forkserver that imported ``raddeploy.embedded.TASK_PRELOAD`` (Airflow 3.3's
``[scheduler] mp_start_method`` and ``mp_forkserver_preload``). Python's forkserver skips a preload
module it cannot import without a word, so a renamed module would silently cost every task start
its imports again: each one must import, and the stack must ask for them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from raddeploy.embedded import TASK_PRELOAD, EmbeddedStack


def test_every_preloaded_module_imports_in_a_fresh_interpreter() -> None:
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('ok')"
    done = subprocess.run([sys.executable, "-c", code, *TASK_PRELOAD], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_what_a_task_start_imports_lazily_is_preloaded() -> None:
    """Airflow's task runner imports some modules inside the functions every task start runs (its
    parse imports the DagBag: 0.4-0.7 s of CPU on these machines). Each must be in the preload, or
    every task pays for it again; an Airflow upgrade that adds one fails here."""
    code = """
import ast, importlib, sys
from raddeploy.embedded import TASK_PRELOAD
for name in TASK_PRELOAD:
    importlib.import_module(name)
import airflow.sdk.execution_time.task_runner as runner
on_every_start = {"startup", "parse", "_run_execute_callable", "_execute_task"}
tree = ast.parse(open(runner.__file__).read())
found, missing = set(), set()
for fn in ast.walk(tree):
    if isinstance(fn, ast.FunctionDef) and fn.name in on_every_start:
        for node in ast.walk(fn):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found.update(names)
            missing.update(n for n in names if n not in sys.modules)
print(sorted(found))
print(sorted(missing))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    found, missing = done.stdout.strip().split("\n")[-2:]
    assert "airflow.dag_processing.dagbag" in found, found  # the walk sees the runner's imports
    assert missing == "[]", f"imported at every task start, not preloaded: {missing}"


def test_the_stack_asks_airflow_for_a_preloading_forkserver(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("AIRFLOW__SCHEDULER__MP_START_METHOD", raising=False)
    monkeypatch.delenv("AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD", raising=False)
    env = EmbeddedStack(home=tmp_path, flows_dir=tmp_path / "flows", api_port=1, dicom_port=2).environment()
    assert env["AIRFLOW__SCHEDULER__MP_START_METHOD"] == "forkserver"
    assert env["AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD"].split(",") == list(TASK_PRELOAD)


def test_the_dag_processor_imports_the_dag_factory_once_at_its_first_fork() -> None:
    """Every parse of the flows file runs in a child the DAG processor forks; the DAG factory's
    imports are done once in the DAG processor, at its first fork (not while `import airflow` runs
    airflow_local_settings), and each child has them."""
    code = """
import os, sys
sys.argv = ["airflow", "dag-processor"]
from raddeploy.embedded import DAG_PROCESSOR_PRELOAD, airflow_process_started
airflow_process_started()
before = [m for m in DAG_PROCESSOR_PRELOAD if m in sys.modules]
pid = os.fork()
if pid == 0:
    os._exit(0 if all(m in sys.modules for m in DAG_PROCESSOR_PRELOAD) else 3)
_, status = os.waitpid(pid, 0)
print(before, os.waitstatus_to_exitcode(status), all(m in sys.modules for m in DAG_PROCESSOR_PRELOAD))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == "[] 0 True", done.stdout


def test_other_airflow_processes_do_not_preload_the_dag_factory() -> None:
    code = """
import os, sys
sys.argv = ["airflow", "api-server"]
from raddeploy.embedded import DAG_PROCESSOR_PRELOAD, airflow_process_started
airflow_process_started()
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print(any(m in sys.modules for m in DAG_PROCESSOR_PRELOAD))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split("\n")[-2] == "False", (done.stdout, done.stderr[-3000:])
