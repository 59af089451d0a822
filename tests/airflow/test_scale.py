"""300 flow files: every DAG is built, a task's parse builds one, and the listener's matching
cost per instance stays small. Timings are printed (bench/flows_scale.py), never asserted."""

from __future__ import annotations

import time

from flow_factory import CT_HEADER, write_flows
from raddeploy_provider.dag_factory import build_all
from raddeploy_provider.flows import load_flows, matched_triggers


def test_300_flows_parse_and_match(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RADDEPLOY_DATA", str(tmp_path / "data"))
    write_flows(tmp_path, 300)
    t0 = time.perf_counter()
    loaded = load_flows(tmp_path)
    load_s = time.perf_counter() - t0
    assert len(loaded.flows) == 300 and loaded.errors == []

    t0 = time.perf_counter()
    dags = build_all(tmp_path)
    all_s = time.perf_counter() - t0
    assert len(dags) == 300
    assert all(len(dag.tasks) == 4 for dag in dags.values())

    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "headneck_sct_0")
    t0 = time.perf_counter()
    one = build_all(tmp_path)
    one_s = time.perf_counter() - t0
    assert list(one) == ["headneck_sct_0"]
    assert len(one["headneck_sct_0"].tasks) == 4

    # An edited flow file makes the cache stale: the full parse still finds the right DAG.
    (tmp_path / "flow_000.yaml").write_text((tmp_path / "flow_000.yaml").read_text().replace("t1|t2", "t1"))
    assert list(build_all(tmp_path)) == ["headneck_sct_0"]

    rounds = 200
    t0 = time.perf_counter()
    for _ in range(rounds):
        hits = [f.dag_id for f in loaded.flows if matched_triggers(f, CT_HEADER)]
    match_ms = (time.perf_counter() - t0) / rounds * 1000
    assert hits == [f.dag_id for f in loaded.flows if "HeadNeck" in f.name and "auto-segmentation" in f.name]

    with capsys.disabled():
        print(f"\n300 flows: load {load_s * 1000:.0f} ms, build all DAGs {all_s * 1000:.0f} ms, "
              f"build one (parsing context) {one_s * 1000:.0f} ms, match one instance {match_ms:.2f} ms")
