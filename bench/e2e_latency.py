"""End-to-end latency of the embedded stack: push a CT study -> derived series delivered.

Starts `raddeploy run`'s stack (EmbeddedStack) on free ports, a DCMTK storescp as the
destination, and pushes N fresh CT studies one after another with DCMTK storescu. For
scale, the same files are pushed straight to a DCMTK storescp in the same run.

    .venv/bin/python bench/e2e_latency.py [--studies 5] [--slices 50] [--size 512]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_env_option, stack_env  # noqa: E402
from dicom_factory import make_series  # noqa: E402
from peers import StoreSCP, free_port, storescu  # noqa: E402

from raddeploy.embedded import EmbeddedStack  # noqa: E402
from raddeploy_provider.airflow_client import AirflowClient  # noqa: E402

QUIET = 2.0
FLOW = f"""
name: Bench CT threshold
id: bench_ct_threshold
triggers: [{{Modality: CT}}]
grouping: {{quiet_period: {QUIET:g}s}}
models:
  - {{name: threshold, image: "raddeploy/threshold:latest", inputs: {{src: /input}}, outputs: {{dst: /output}}}}
destinations:
  - {{host: 127.0.0.1, port: PORT, ae_title: BENCHDEST}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--slices", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    add_env_option(parser)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="raddeploy-bench-"))
    dest = StoreSCP(work / "dest", ae_title="BENCHDEST")
    plain = StoreSCP(work / "plain", ae_title="PLAIN")
    flows = work / "flows"
    flows.mkdir()
    (flows / "bench.yaml").write_text(FLOW.replace("PORT", str(dest.port)))
    stack = EmbeddedStack(home=work / "home", flows_dir=flows, api_port=free_port(), dicom_port=free_port(),
                          listen_host="127.0.0.1", extra_env=stack_env(args))
    stack.start()
    totals, pushes, direct, to_model = [], [], [], []
    stages: dict[str, list[float]] = {}
    client = AirflowClient(stack.api_url, "admin", stack.passwords()["admin"])
    try:
        for i in range(args.studies + 1):  # study 0 warms Airflow's lazily built parts up
            series = make_series(work / f"ct{i}", slices=args.slices, size=args.size)
            t0 = time.monotonic()
            done = storescu(plain.port, series.files, ae_title="PLAIN")
            direct_s = time.monotonic() - t0
            assert done.returncode == 0, done.stderr
            before = len(dest.files())
            t0 = time.monotonic()
            done = storescu(stack.dicom_port, series.files)
            push_s = time.monotonic() - t0
            pushed_at = time.time()  # wall clock, to compare with the manifest's task start
            assert done.returncode == 0, done.stderr
            deadline = time.monotonic() + 300
            while len(dest.files()) < before + args.slices:
                if time.monotonic() > deadline:
                    raise SystemExit(f"study {i} not delivered in 300 s; see {stack.logs_dir}")
                time.sleep(0.05)
            total = time.monotonic() - t0
            run = stack.data_dir / "runs" / "bench_ct_threshold" / f"{series.study_uid}.1" / "manifest.json"
            started = datetime.fromisoformat(json.loads(run.read_text())["tasks"]["threshold"]["started"])
            beyond_quiet = started.timestamp() - pushed_at - QUIET
            tag = "warm-up" if i == 0 else f"study {i}"
            print(f"{tag:>8}: push {push_s:5.2f} s (storescp {direct_s:5.2f} s)   push -> delivered {total:6.2f} s"
                  f"   last instance -> model start {beyond_quiet:+5.2f} s beyond the quiet period")
            if i:
                for name, seconds in _stages(client, stack, series.study_uid, pushed_at + QUIET).items():
                    stages.setdefault(name, []).append(seconds)
                to_model.append(beyond_quiet)
                totals.append(total)
                pushes.append(push_s)
                direct.append(direct_s)
    finally:
        stack.stop()
        dest.stop()
        plain.stop()
    med = statistics.median
    mb = args.slices * args.size * args.size * 2 / 1e6
    print(f"\n{args.studies} studies of {args.slices} slices {args.size}x{args.size} ({mb:.0f} MB each), "
          f"quiet period {QUIET:g} s")
    print(f"push to listener       median {med(pushes):6.2f} s   ratio to DCMTK storescp: {med(direct) / med(pushes):.2f}x")
    print(f"push -> delivered      median {med(totals):6.2f} s   (min {min(totals):.2f}, max {max(totals):.2f})")
    print(f"  of which beyond the quiet period and the push: {med(totals) - QUIET - med(pushes):.2f} s")
    print(f"last instance -> first model task start: median {med(to_model):.2f} s beyond the quiet period "
          f"(min {min(to_model):.2f}, max {max(to_model):.2f})")
    print("  where it goes (Airflow's own timestamps, median s from the end of the quiet period):")
    for name, values in stages.items():
        print(f"    {name:<44} {med(values):5.2f}  (min {min(values):.2f}, max {max(values):.2f})")
    shutil.rmtree(work, ignore_errors=True)  # kept only when the benchmark failed, to look into


def _stages(client: AirflowClient, stack: EmbeddedStack, study_uid: str, quiet_end: float) -> dict[str, float]:
    """The run's milestones from Airflow's records and the trigger's log, in seconds after the
    quiet period ended."""
    run = next(r for r in client.dag_runs("bench_ct_threshold") if study_uid in json.dumps(r["conf"]))
    status, body = client.get(f"/api/v2/dags/bench_ct_threshold/dagRuns/{run['dag_run_id']}/taskInstances")
    assert status == 200, body
    tis = {t["task_id"]: t for t in body["task_instances"]}
    sensor = next(t for t in tis.values() if t["operator"] and "Sensor" in t["operator"])
    model = tis["threshold"]

    def at(value: str | None) -> float:
        return datetime.fromisoformat(value).timestamp() - quiet_end if value else float("nan")
    logs = stack.home / "airflow" / "logs" / "dag_id=bench_ct_threshold" / f"run_id={run['dag_run_id']}"
    events = [json.loads(line) for f in logs.glob("task_id=*/attempt=1.log.trigger.*.log")
              for line in f.read_text().splitlines()]
    fired = [e["timestamp"] for e in events if e.get("event") == "Trigger fired event"]
    ready = [e["timestamp"] for e in events if str(e.get("event", "")).startswith("input ready")]
    return {
        "run queued (listener's trigger)": at(run["queued_at"]),
        "run started (scheduler)": at(run["start_date"]),
        "sensor started (deferred to the triggerer)": at(sensor["start_date"]),
        "input taken (the trigger's log)": at(ready[0].replace("Z", "+00:00")) if ready else float("nan"),
        "trigger fired (its log)": at(fired[0].replace("Z", "+00:00")) if fired else float("nan"),
        "sensor ended (triggerer's event handled)": at(sensor["end_date"]),
        "model task queued (scheduler)": at(model["queued_when"]),
        "model task started (worker)": at(model["start_date"]),
    }


if __name__ == "__main__":
    main()
