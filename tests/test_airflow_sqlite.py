"""The embedded Airflow's SQLite busy timeouts: short in the API server, long elsewhere
(raddeploy/airflow_sqlite.py says why), and set only when Airflow's database is SQLite."""

from __future__ import annotations

from pathlib import Path

from raddeploy import airflow_sqlite
from raddeploy.embedded import EmbeddedStack


def test_the_api_server_gives_up_on_the_lock_first() -> None:
    api = airflow_sqlite.busy_timeout(["/venv/bin/airflow", "api-server"])
    for component in ("scheduler", "triggerer", "dag-processor", "standalone"):
        assert airflow_sqlite.busy_timeout(["/venv/bin/airflow", component]) > 10 * api
    assert airflow_sqlite.busy_timeout(["/venv/bin/airflow", "scheduler", "api-server"]) > api  # argv[1] only


def test_the_stack_sets_them_for_sqlite_only(tmp_path: Path, monkeypatch) -> None:
    stack = EmbeddedStack(home=tmp_path, flows_dir=tmp_path / "flows", api_port=1, dicom_port=2)
    monkeypatch.delenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", raising=False)
    assert stack.environment()["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"] == "raddeploy.airflow_sqlite.CONNECT_ARGS"
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://airflow@db/airflow")
    monkeypatch.delenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS", raising=False)
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS" not in stack.environment()  # pysqlite's argument only
