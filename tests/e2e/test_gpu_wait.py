"""A GPU model its host cannot run, without the CPU fallback: the run says why it waits.

The session stack has two (pretend) GPUs, two pool slots each (RADDEPLOY_GPU_QUEUE_DEPTH's default)
and no RADDEPLOY_GPU_FALLBACK; a model asking for five can never be scheduled from a pool of four
slots, exactly as a `gpu: true` model on a host without GPUs (a pool of none). Airflow leaves such a task in `scheduled` and says nothing; the sensor says
it in the run note and in its own task log.
"""

from __future__ import annotations

import pytest

from dicom_factory import make_series
from peers import storescu, wait_for
from stack_factory import add_flow, run_path, task_instances, task_log

from raddeploy_provider.utils import run_note

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

DAG_ID = "e2e_gpu_wait"
FLOW = f"""
name: E2E GPU wait
id: {DAG_ID}
triggers:
  - SeriesDescription: "E2E gpu wait"
grouping: {{quiet_period: 1s}}
models:
  - name: huge
    image: raddeploy/busybox:latest
    command: ["sh", "-c", "cp /input/* /output/"]
    gpu: 5
    inputs: {{src: /input}}
    outputs: {{dst: /output}}
"""
WHY = ("waiting for a GPU: pool raddeploy_gpu has 4 slots, 2 per GPU: 2 GPUs; 'huge' needs 5; set RADDEPLOY_GPUS "
       "(the host's GPU ids) "
       "or RADDEPLOY_GPU_FALLBACK=cpu to run GPU models on the CPU")


def test_a_gpu_task_that_cannot_be_scheduled_says_why_in_the_note_and_the_log(stack, airflow, tmp_path):
    add_flow(stack, airflow, "gpu_wait.yaml", FLOW, DAG_ID)
    series = make_series(tmp_path / "ct", slices=2, size=16, description="E2E gpu wait")
    assert storescu(stack.dicom_port, series.files).returncode == 0
    run_id = f"{series.study_uid}.1"

    def noted():
        status, run = airflow.get(run_path(DAG_ID, run_id))
        return run if status == 200 and WHY[1:] in (run.get("note") or "") else None

    run = wait_for(noted, 120, "the run note to say why the GPU task waits")
    assert run["note"].startswith("Flow E2E GPU wait: input 2 instances, 1 series. Waiting for a GPU: pool")
    # The note is written as the input is taken, on the triggerer, before it ends the sensor.
    tasks = wait_for(lambda: (t := task_instances(airflow, DAG_ID, run_id))["fingerprint"]["state"] == "success"
                     and t, 30, "the sensor to end")
    assert tasks["huge"]["state"] in ("scheduled", None)  # never queued: the pool cannot hold it
    assert WHY in task_log(airflow, DAG_ID, run_id, "fingerprint")
    # leave no run waiting in the session stack
    status, _ = airflow._request("PATCH", run_path(DAG_ID, run_id), {"state": "failed"})
    assert status == 200


def test_a_pools_size_is_read_once_per_ttl_by_a_long_lived_process(stack, airflow, monkeypatch):
    """The triggerer takes every run's input and reads the GPU pool for its shortfall note: once per
    POOL_READ_TTL, not once per run, then the pool as it is now."""
    for name, value in stack.environment().items():
        if name.startswith("RADDEPLOY_AIRFLOW_"):
            monkeypatch.setenv(name, value)
    pool = "e2e_pool_read"
    airflow.ensure_pool(pool, 3, "e2e: read once per TTL")
    try:
        run_note._pool_reads.clear()
        assert run_note.pool_slots(pool) == 3
        airflow.ensure_pool(pool, 5, "e2e: read once per TTL")
        assert airflow.get(f"/api/v2/pools/{pool}")[1]["slots"] == 5
        assert run_note.pool_slots(pool) == 3  # within the TTL: the size read before
        monkeypatch.setattr(run_note, "POOL_READ_TTL", 0.0)
        assert run_note.pool_slots(pool) == 5
        assert run_note.pool_slots("e2e_no_such_pool") is None  # a 404 is not kept
    finally:
        airflow._request("DELETE", f"/api/v2/pools/{pool}", None)
