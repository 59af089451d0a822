"""GPU slots kept busy: a burst of studies on 2 GPU slots, and what Airflow costs per run.

Starts the embedded stack with two pretend GPUs (RADDEPLOY_GPUS=0,1, environment mode: no GPU
needed), pushes the studies back to back with DCMTK storescu, and waits until every run has
succeeded. A flow's GPU model sleeps ``--sleep`` s; with ``--cpu-flow`` a second flow with a
CPU model (sleeping 1 s) matches every study too. Reports, from the run manifests and the REST
API:

- wall time from first push to last success against the ideal (studies x sleep / 2 slots), and
  against the raw limit measured in the same run before the stack starts: Docker alone running
  the model's container two at a time (create, start, exit, remove: a 2 s model takes more);
- the share of the GPU span in which both GPUs were in use, and the same share counted only
  while a GPU task was ready and waiting (its sensor done, its container not started);
- the longest time a ready GPU task waited while a GPU slot was free;
- CPU seconds per run spent outside the models (every process of the stack, by component:
  scheduler, API server, DAG processor, triggerer, task processes, listener);
- that every study got exactly one run of each flow (none lost, none duplicated).

    .venv/bin/python bench/gpu_slots.py            # 20 one-slice studies, one GPU flow
    .venv/bin/python bench/gpu_slots.py --burst    # 50 studies of 20 slices, GPU + CPU flows
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

from common import add_env_option, cpu_seconds_by_component, stack_env  # noqa: E402
from dicom_factory import make_series  # noqa: E402
from peers import free_port, storescu  # noqa: E402

from raddeploy_provider.airflow_client import AirflowClient  # noqa: E402
from raddeploy.embedded import EmbeddedStack  # noqa: E402

GPU_FLOW, CPU_FLOW = "bench_gpu_slots", "bench_cpu_model"
FLOW = """
name: Bench {what}
id: {dag_id}
triggers: [{{Modality: CT}}]
grouping: {{quiet_period: 1s}}
models:
  - name: model
    image: "raddeploy/busybox:latest"
    command: ["sh", "-c", "echo $NVIDIA_VISIBLE_DEVICES > /output/gpu; sleep {sleep}"]
    gpu: {gpu}
    inputs: {{src: /input}}
    outputs: {{dst: /output}}   # no destinations: nothing is sent
"""


def busy_share(intervals: list[tuple[float, float]], within: list[tuple[float, float]] | None = None
               ) -> tuple[float, float]:
    """(span from first start to last end, share of it with >= 2 intervals open); with
    ``within``, both counted only while at least one of ``within`` is open."""
    events = sorted([(s, 0, 1) for s, _ in intervals] + [(e, 0, -1) for _, e in intervals]
                    + [(s, 1, 1) for s, _ in within or []] + [(e, 1, -1) for _, e in within or []])
    busy2 = counted = 0.0
    open_, gate, last = 0, 0, events[0][0]
    for t, kind, delta in events:
        if within is None or gate > 0:
            counted += t - last
            if open_ >= 2:
                busy2 += t - last
        if kind == 0:
            open_ += delta
        else:
            gate += delta
        last = t
    return counted, busy2 / counted if counted else 0.0


def longest_wait_with_free_slot(ready: list[tuple[float, float]], running: list[tuple[float, float]]) -> float:
    """The longest stretch a task was ready (ready, started) while fewer than 2 tasks ran."""
    worst = 0.0
    for r0, r1 in ready:
        cuts = sorted({r0, r1, *(t for s, e in running for t in (s, e) if r0 < t < r1)})
        free = 0.0
        for a, b in zip(cuts, cuts[1:]):
            mid = (a + b) / 2
            if sum(s <= mid < e for s, e in running) < 2:
                free += b - a
        worst = max(worst, free)
    return worst


def when(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def docker_round(sleep: float, rounds: int = 3) -> float:
    """The raw limit's unit, measured before the stack starts: the median seconds for two containers
    of the benchmark's model run side by side (one per GPU slot), with the model tasks' safe defaults
    (no network, memory and pids limits, no capabilities) and, as theirs, each in its GPU's network-less
    namespace (RADDEPLOY_MODEL_NETNS_IMAGE), from create to removed."""
    import docker
    from concurrent.futures import ThreadPoolExecutor

    from raddeploy_provider.config import load_settings

    from raddeploy_provider.gpu import netns_holder

    client, limits = docker.from_env(), load_settings()
    command = ["sh", "-c", f"echo 0 > /dev/null; sleep {sleep:g}"]
    scope = Path(tempfile.mkdtemp(prefix="raddeploy-bench-round-"))
    # As the model tasks run it: each slot's container in its GPU's network-less namespace.
    networks = [f"container:{netns_holder(client.api, limits.model_netns_image, scope, str(i))}"
                if limits.model_netns_image else "none" for i in range(2)]

    def one(slot: int) -> None:
        client.containers.run("raddeploy/busybox:latest", command, network_mode=networks[slot], remove=True,
                              mem_limit=limits.model_mem_limit, pids_limit=limits.model_pids_limit,
                              cap_drop=["ALL"], security_opt=["no-new-privileges"])
    times = []
    try:
        with ThreadPoolExecutor(2) as pool:
            for _ in range(rounds):
                t0 = time.monotonic()
                list(pool.map(one, range(2)))
                times.append(time.monotonic() - t0)
    finally:
        for network in networks:
            if network != "none":
                client.api.remove_container(network.split(":", 1)[1], force=True)
        shutil.rmtree(scope, ignore_errors=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--slices", type=int, default=1)
    parser.add_argument("--sleep", type=float, default=2.0)
    parser.add_argument("--cpu-flow", action="store_true", help="a second flow, with a CPU model, on every study")
    parser.add_argument("--burst", action="store_true", help="50 studies of 20 slices, GPU and CPU flows")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (the stack's logs) to look into")
    add_env_option(parser)
    args = parser.parse_args()
    if args.burst:
        args.studies, args.slices, args.cpu_flow = 50, 20, True
    work = Path(tempfile.mkdtemp(prefix="raddeploy-bench-gpu-"))
    flows = work / "flows"
    flows.mkdir()
    (flows / "gpu.yaml").write_text(FLOW.format(what="GPU slots", dag_id=GPU_FLOW, sleep=args.sleep, gpu=1))
    dag_ids = [GPU_FLOW]
    if args.cpu_flow:
        (flows / "cpu.yaml").write_text(FLOW.format(what="CPU model", dag_id=CPU_FLOW, sleep=1, gpu=0))
        dag_ids.append(CPU_FLOW)
    stack = EmbeddedStack(home=work / "home", flows_dir=flows, api_port=free_port(), dicom_port=free_port(),
                          listen_host="127.0.0.1",
                          extra_env={"RADDEPLOY_GPUS": "0,1", "RADDEPLOY_GPU_MODE": "env",
                                     "RADDEPLOY_GPU_LOCK_DIR": str(work / "locks"),
                                     **stack_env(args)})
    studies = [make_series(work / f"s{i}", slices=args.slices if i else 1, size=64 if args.slices > 1 else 16)
               for i in range(args.studies + 1)]
    round_s = docker_round(args.sleep)  # on the quiet machine, before the stack starts
    stack.start()
    client = AirflowClient(stack.api_url, "admin", stack.passwords()["admin"], timeout=30)

    def runs(dag_id: str) -> dict[str, dict]:
        found, offset = {}, 0
        while True:
            status, page = client.get(f"/api/v2/dags/{dag_id}/dagRuns?limit=100&offset={offset}")
            assert status == 200, page
            found.update({r["dag_run_id"]: r for r in page["dag_runs"]})
            offset += 100
            if offset >= page["total_entries"]:
                return found

    def succeeded() -> int:
        """Successful runs, all flows: a count per flow (the poll must not load the API server the
        stack shares 2 cores with; the wall time comes from Airflow's end dates, not from it)."""
        total = 0
        for dag_id in dag_ids:
            status, page = client.get(f"/api/v2/dags/{dag_id}/dagRuns?state=success&limit=1")
            assert status == 200, page
            total += page["total_entries"]
        return total

    try:
        warm = studies[0]  # the first task after start is slower (lazy app build): not measured
        assert storescu(stack.dicom_port, warm.files).returncode == 0
        while succeeded() < len(dag_ids):
            time.sleep(0.5)
        time.sleep(2)  # let the warm-up's task processes be reaped before counting CPU
        cpu0 = cpu_seconds_by_component()
        t0, t0_wall = time.monotonic(), time.time()
        for s in studies[1:]:
            assert storescu(stack.dicom_port, s.files).returncode == 0
        pushed = time.monotonic() - t0
        uids = [s.study_uid for s in studies[1:]]
        while succeeded() < (len(uids) + 1) * len(dag_ids):
            if time.monotonic() - t0 > 900:
                raise SystemExit(f"not all runs succeeded in 900 s; see {stack.logs_dir}")
            time.sleep(1)
        time.sleep(2)
        cpu1 = cpu_seconds_by_component()
        all_runs = {d: runs(d) for d in dag_ids}
        wall = max(when(r["end_date"]) for d in dag_ids for r in all_runs[d].values()) - t0_wall
        ready, running, leases, per_gpu, phases = [], [], [], {}, []
        for uid in uids:
            run_id = f"{uid}.1"
            task = json.loads((stack.data_dir / "runs" / GPU_FLOW / run_id / "manifest.json")
                              .read_text())["tasks"]["model"]
            start, end = when(task["started"]), when(task["released"])  # the GPU lease's span
            running.append((start, end))
            leases.append((when(task["container"]["started"]) - start, end - when(task["container"]["finished"])))
            per_gpu[task["gpus"][0]] = per_gpu.get(task["gpus"][0], 0) + 1
            status, body = client.get(f"/api/v2/dags/{GPU_FLOW}/dagRuns/{run_id}/taskInstances")
            tis = {t["task_id"]: t for t in body["task_instances"]}
            sensor, model = tis["fingerprint"], tis["model"]
            ready.append((when(sensor["end_date"]), start))
            run = all_runs[GPU_FLOW][run_id]
            phases.append({"first push -> run queued": when(run["queued_at"]) - t0_wall,
                           "run queued -> sensor started": when(sensor["start_date"]) - when(run["queued_at"]),
                           "sensor ran": when(sensor["end_date"]) - when(sensor["start_date"]),
                           "sensor ended -> model queued": when(model["queued_when"]) - when(sensor["end_date"]),
                           "model queued -> task started": when(model["start_date"]) - when(model["queued_when"]),
                           "task started -> container started": start - when(model["start_date"]),
                           "container ended -> run ended": when(run["end_date"]) - end})
    finally:
        stack.stop()
    span, share = busy_share(running)
    waiting, share_waiting = busy_share(running, within=ready)
    worst = longest_wait_with_free_slot(ready, running)
    ideal = args.studies * args.sleep / 2
    expected = {f"{uid}.1" for uid in uids} | {f"{warm.study_uid}.1"}
    lost_or_extra = {d: sorted(set(r) ^ expected) for d, r in all_runs.items() if set(r) != expected}
    cpu = {name: cpu1.get(name, 0.0) - cpu0.get(name, 0.0) for name in cpu1}
    n_runs = len(uids) * len(dag_ids)
    print(f"{args.studies} studies of {args.slices} slice(s); GPU model sleeps {args.sleep:g} s on 1 GPU, 2 GPU slots"
          + ("; a CPU flow (model sleeps 1 s) on every study too" if args.cpu_flow else ""))
    print(f"wall time, first push -> last run succeeded: {wall:.1f} s   (ideal {ideal:.0f} s: "
          f"{ideal / wall:.2f}x of ideal)")
    raw = -(-args.studies // 2) * round_s
    print(f"raw limit, Docker alone: {raw:.1f} s ({-(-args.studies // 2)} rounds of 2 containers side by side, "
          f"{round_s:.2f} s a round for a {args.sleep:g} s model); wall time is {raw / wall:.2f}x of it")
    first = min(s for s, _ in running) - t0_wall
    print(f"pushes (storescu, one after another): {pushed:.1f} s; first push -> first GPU lease {first:.1f} s; "
          f"last GPU lease given back -> last run succeeded {t0_wall + wall - max(e for _, e in running):.1f} s")
    print(f"GPU tasks: first start -> last end {span:.1f} s; both GPUs busy {share * 100:.0f}% of it; "
          f"while GPU work waited ({waiting:.1f} s): {share_waiting * 100:.0f}%")
    print("GPU lease, median (max) s: lease taken -> container running "
          f"{statistics.median(a for a, _ in leases):.2f} ({max(a for a, _ in leases):.2f}); container exited -> "
          f"lease given back {statistics.median(b for _, b in leases):.2f} ({max(b for _, b in leases):.2f})")
    print(f"longest time a ready GPU task waited with a GPU slot free: {worst:.1f} s")
    print(f"CPU outside the models: {sum(cpu.values()):.0f} s for {n_runs} runs = "
          f"{sum(cpu.values()) / n_runs:.2f} s per run ("
          + ", ".join(f"{name} {seconds / n_runs:.2f}" for name, seconds in sorted(cpu.items(), key=lambda x: -x[1])
                      if seconds / n_runs >= 0.01) + ")")
    print("one GPU run, median (max) s: " + "; ".join(
        f"{name} {statistics.median(p[name] for p in phases):.2f} ({max(p[name] for p in phases):.1f})"
        for name in phases[0]))
    first_run = phases[min(range(len(running)), key=lambda i: running[i][0])]  # the first GPU lease's
    print("the first GPU run, s: " + "; ".join(f"{name} {seconds:.2f}" for name, seconds in first_run.items()))
    print(f"tasks per GPU id: {dict(sorted(per_gpu.items()))}")
    print("runs: every study exactly one run of each flow" if not lost_or_extra
          else f"RUNS LOST OR DUPLICATED: {lost_or_extra}")
    if args.keep:
        print(f"work folder kept: {work} (the stack's logs in {stack.logs_dir})")
    else:
        shutil.rmtree(work, ignore_errors=True)  # kept only when the benchmark failed, to look into
    if lost_or_extra:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
