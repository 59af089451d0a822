"""A RadDeploy-style 5-fold ensemble, added to the running stack as a new flow file.

Five fold models read the matched DICOM (`src`) and each write their own output; a merge
model reads all five and writes `dst`. The test writes the flow file while the stack runs
(a new flow takes effect within seconds), pushes an MR series, and checks from the
containers' own clocks that the folds ran in parallel, from Airflow's task start (and in the
merge container) that the merge began only after every fold had ended, and through the REST
API that the DAG has the fan-out/fan-in shape. The flow stays for the rest of the session;
it triggers only on this test's MR series.
"""

from __future__ import annotations

import time
import urllib.parse
from datetime import datetime

import pytest
from pydicom import dcmread

from peers import storescu, wait_for
from dicom_factory import make_series
from flow_factory import ensemble_flow
from stack_factory import add_flow, run_finished, task_instances

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

DAG_ID = "e2e_fan_out_fan_in"
FLOW_FILE = "fan_out_fan_in.yaml"  # a broken file would show up as DAG invalid_fan_out_fan_in
FOLDS = 5
SLICES = 4
DESCRIPTION = "E2E fan-out ensemble"

# Busybox's `date` has no %N: adjtimex (read-only, no privilege needed) gives the time, its
# `tv_usec` in nanoseconds when the kernel's status has STA_NANO (8192; these machines do): read
# as microseconds, a time in the first tenth of a second came out up to 0.9 s late.
NOW = """\
now() {
  t=$(adjtimex 2>/dev/null | awk '/tv_sec/ {s=$2} /tv_usec/ {u=$2} /status:/ {st=$2} END {
    if (s) printf (and(st, 8192) ? "%d.%09d" : "%d.%06d"), s, u }')
  [ -n "$t" ] && echo "$t" || date +%s
}
"""
FOLD_SCRIPT = NOW + """\
now > /output/start
mkdir /output/dicom
cp /input/* /output/dicom/
sleep 3
now > /output/end
"""
MERGE_SCRIPT = NOW + f"""\
start=$(now)
echo "merge started at $start"
for i in $(seq 0 {FOLDS - 1}); do
  end=$(cat /seg$i/end)
  awk -v s="$start" -v e="$end" 'BEGIN {{exit !(s >= e)}}' || {{ echo "fold $i ended at $end"; exit 1; }}
  [ "$(ls /seg$i/dicom | wc -l)" -eq "$(ls /seg0/dicom | wc -l)" ] || {{ echo "fold $i lost files"; exit 1; }}
done
cp /seg0/dicom/* /output/
"""  # only DICOM goes to dst: everything there is sent (and every output must be read or sent)


def flow_yaml(destination) -> str:
    """Even folds in the RadDeploy spelling (timeout in seconds), odd ones in the native one: both load alike."""
    return ensemble_flow(
        name="E2E fan-out fan-in ensemble", folds=FOLDS, image="raddeploy/busybox:latest",
        head=f"""\
id: {DAG_ID}
description: five folds in parallel, then a merge
triggers:
  - Modality: MR
    SeriesDescription: "^{DESCRIPTION}$"
grouping:
  quiet_period: 1s
""",
        fold=lambda i: {"name": f"fold{i}", "command": ["sh", "-c", FOLD_SCRIPT], "native": i % 2 == 1,
                        "timeout": "2m" if i % 2 else 120},
        merge={"name": "merge", "command": ["sh", "-c", MERGE_SCRIPT], "timeout": 120}, merge_mount="/seg{i}",
        host="127.0.0.1", port=destination.port, ae_title=destination.ae_title)


def max_concurrency(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end before a start at the same time)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    open_now = most = 0
    for _, step in events:
        open_now += step
        most = max(most, open_now)
    return most


def test_new_flow_fans_out_to_parallel_folds_and_in_to_merge(stack, airflow, destination, tmp_path):
    dag_path = f"/api/v2/dags/{urllib.parse.quote(DAG_ID, safe='')}"

    # 1. A new flow file in the running stack's flows folder; 2. Airflow parses it within seconds, no restart.
    written = time.monotonic()
    dag = add_flow(stack, airflow, FLOW_FILE, flow_yaml(destination), DAG_ID)
    print(f"\nnew flow file -> DAG {DAG_ID} parsed: {time.monotonic() - written:.1f} s")
    assert not dag["is_paused"]

    # 5 (before the run: the shape is the DAG's, not the run's). Fan-out, fan-in, send.
    status, body = airflow.get(f"{dag_path}/tasks")
    assert status == 200, body
    edges = {task["task_id"]: set(task["downstream_task_ids"]) for task in body["tasks"]}
    folds = {f"fold{i}" for i in range(FOLDS)}
    send = f"send_0_{destination.ae_title}"
    expected = {"fingerprint": folds, **{fold: {"merge"} for fold in folds}, "merge": {send}, send: set()}
    assert edges == expected

    # 3. An MR series only this flow wants (the CT flow of the other e2e test ignores it).
    series = make_series(tmp_path / "mr", modality="MR", slices=SLICES, size=32, description=DESCRIPTION)
    before = set(destination.files())
    start = time.monotonic()
    pushed = storescu(stack.dicom_port, series.files)
    assert pushed.returncode == 0, pushed.stderr

    # 4. The run succeeds; the folds overlapped; the merge came after every fold.
    run_id = f"{series.study_uid}.1"
    finished = run_finished(airflow, DAG_ID, run_id)
    tasks = task_instances(airflow, DAG_ID, run_id)
    assert finished["state"] == "success", \
        f"run {run_id} failed; task states: { {t: ti['state'] for t, ti in tasks.items()} }"
    print(f"push -> run succeeded: {time.monotonic() - start:.1f} s")

    # Fold intervals by the containers' own clocks (the host's: containers share its kernel).
    run_dir = stack.data_dir / "runs" / DAG_ID / run_id
    intervals = []
    for i in range(FOLDS):
        seg = run_dir / f"seg{i}"
        fold_start, fold_end = (float((seg / name).read_text()) for name in ("start", "end"))
        assert fold_end - fold_start >= 2.9, f"fold{i}: {fold_start} -> {fold_end}"
        assert len(list((seg / "dicom").iterdir())) == SLICES
        intervals.append((fold_start, fold_end))
    # The merge task's start as Airflow recorded it: before its container starts, so the stricter
    # test (the container also checks it started after every fold's `end`, or fails the run).
    merge_start = datetime.fromisoformat(tasks["merge"]["start_date"]).timestamp()
    origin = min(s for s, _ in intervals)
    for i, (s, e) in enumerate(intervals):
        print(f"  fold{i}: {s - origin:5.2f} s -> {e - origin:5.2f} s")
    print(f"  merge task started: {merge_start - origin:5.2f} s")
    concurrency = max_concurrency(intervals)
    print(f"max concurrent folds: {concurrency} of {FOLDS} (Airflow parallelism 4)")
    assert concurrency >= 2, f"the folds ran one after another: {intervals}"
    assert merge_start >= max(e for _, e in intervals), "merge started before every fold had ended"

    # The destination got the merge's DICOM (fold 0's copy of the input), and nothing else.
    received = wait_for(lambda: [p for p in destination.files() if p not in before]
                        if len(set(destination.files()) - before) >= SLICES else None, 30, "the merged series")
    assert len(received) == SLICES
    inputs = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series.files}
    assert {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in received} == inputs
