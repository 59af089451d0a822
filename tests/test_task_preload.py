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


def test_the_stack_asks_airflow_for_a_preloading_forkserver(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("AIRFLOW__SCHEDULER__MP_START_METHOD", raising=False)
    monkeypatch.delenv("AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD", raising=False)
    env = EmbeddedStack(home=tmp_path, flows_dir=tmp_path / "flows", api_port=1, dicom_port=2).environment()
    assert env["AIRFLOW__SCHEDULER__MP_START_METHOD"] == "forkserver"
    assert env["AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD"].split(",") == list(TASK_PRELOAD)
