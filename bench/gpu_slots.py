"""GPU slots kept busy: 20 studies of a flow whose GPU model sleeps 2 s, on 2 GPU slots.

Starts the embedded stack with two pretend GPUs (RADDEPLOY_GPUS=0,1, environment mode: no
GPU needed), pushes 20 one-slice studies back to back with DCMTK storescu, and waits for
20 successful runs. Reports the wall time against the ideal (20 x 2 s / 2 slots = 20 s)
and, from the run manifests, the share of the busy span in which both GPUs were in use.

    .venv/bin/python bench/gpu_slots.py [--studies 20] [--sleep 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dicom_factory import make_series  # noqa: E402
from peers import free_port, storescu  # noqa: E402

from raddeploy_provider.airflow_client import AirflowClient  # noqa: E402
from raddeploy.embedded import EmbeddedStack  # noqa: E402

FLOW = """
name: Bench GPU slots
id: bench_gpu_slots
triggers: [{{Modality: CT}}]
grouping: {{quiet_period: 1s}}
models:
  - name: gpu_model
    image: "raddeploy/busybox:latest"
    command: ["sh", "-c", "echo $NVIDIA_VISIBLE_DEVICES > /output/gpu; sleep {sleep}"]
    gpu: 1
    inputs: {{src: /input}}
    outputs: {{dst: /output}}   # no destinations: nothing is sent
"""


def both_busy_share(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(span from first start to last end, share of it with >= 2 intervals open)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    busy2, open_, last = 0.0, 0, events[0][0]
    for t, delta in events:
        if open_ >= 2:
            busy2 += t - last
        open_ += delta
        last = t
    span = events[-1][0] - events[0][0]
    return span, busy2 / span if span else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--sleep", type=float, default=2.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raddeploy-bench-gpu-"))
    flows = work / "flows"
    flows.mkdir()
    (flows / "gpu.yaml").write_text(FLOW.format(sleep=args.sleep))
    stack = EmbeddedStack(home=work / "home", flows_dir=flows, api_port=free_port(), dicom_port=free_port(),
                          listen_host="127.0.0.1",
                          extra_env={"RADDEPLOY_GPUS": "0,1", "RADDEPLOY_GPU_MODE": "env",
                                     "RADDEPLOY_GPU_LOCK_DIR": str(work / "locks")})
    studies = [make_series(work / f"s{i}", slices=1, size=16) for i in range(args.studies + 1)]
    stack.start()
    client = AirflowClient(stack.api_url, "admin", stack.passwords()["admin"])

    def succeeded(study_uids: list[str]) -> int:
        runs = {r["dag_run_id"]: r["state"] for r in client.dag_runs("bench_gpu_slots")}
        return sum(runs.get(f"{uid}.1") == "success" for uid in study_uids)

    try:
        warm = studies[0]  # the first task after start is slower (lazy app build): not measured
        assert storescu(stack.dicom_port, warm.files).returncode == 0
        while succeeded([warm.study_uid]) < 1:
            time.sleep(0.5)
        t0 = time.monotonic()
        for s in studies[1:]:
            assert storescu(stack.dicom_port, s.files).returncode == 0
        uids = [s.study_uid for s in studies[1:]]
        while succeeded(uids) < len(uids):
            if time.monotonic() - t0 > 600:
                raise SystemExit(f"not all runs succeeded in 600 s; see {stack.logs_dir}")
            time.sleep(0.5)
        wall = time.monotonic() - t0
    finally:
        stack.stop()
    intervals, per_gpu = [], {}
    for uid in uids:
        task = json.loads((stack.data_dir / "runs" / "bench_gpu_slots" / f"{uid}.1" / "manifest.json")
                          .read_text())["tasks"]["gpu_model"]
        start, end = (datetime.fromisoformat(task[k]).timestamp() for k in ("started", "ended"))
        intervals.append((start, end))
        per_gpu[task["gpus"][0]] = per_gpu.get(task["gpus"][0], 0) + 1
    span, share = both_busy_share(intervals)
    ideal = args.studies * args.sleep / 2
    print(f"{args.studies} studies, model sleeps {args.sleep:g} s on 1 GPU, 2 GPU slots")
    print(f"wall time, first push -> last run succeeded: {wall:.1f} s   (ideal {ideal:.0f} s: {ideal / wall:.2f}x of ideal)")
    print(f"GPU tasks: first start -> last end {span:.1f} s; both GPUs busy {share * 100:.0f}% of it")
    print(f"tasks per GPU id: {dict(sorted(per_gpu.items()))}")
    shutil.rmtree(work, ignore_errors=True)  # kept only when the benchmark failed, to look into


if __name__ == "__main__":
    main()
