"""`make run` on a machine without a GPU (a laptop, CI): RadDeploy GPU flows run on the CPU.

A stack of its own, as a new user's: no GPU found (``RADDEPLOY_GPUS`` empty, no nvidia-smi) and
``RADDEPLOY_GPU_FALLBACK=cpu``. RadDeploy's five-fold ensemble (here three folds, every fold
``gpu: true``) completes and is delivered; the containers were told they run on the CPU.
"""

from __future__ import annotations

import json

import pytest

from dicom_factory import make_series
from flow_factory import ensemble_flow
from peers import StoreSCP, storescu
from raddeploy_provider.airflow_client import AirflowClient
from stack_factory import add_flow, run_finished, running_stack, task_instances, task_log

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

FOLDS = 3
ENSEMBLE_ID = "laptop_ensemble"
# Each fold writes where it ran; the merge refuses to go on unless every fold was told "CPU".
FOLD = "sh -c 'cp /input/* /output/ && echo \"$RADDEPLOY_GPU_FALLBACK\" > /output/fallback.txt'"
MERGE = ("sh -c 'for i in " + " ".join(str(i) for i in range(FOLDS)) + "; do [ \"$(cat /input$i/fallback.txt)\" = 1 ]"
         " || exit 4; done; cp /input0/*.dcm /output/'")


@pytest.fixture(scope="module")
def destination(tmp_path_factory) -> StoreSCP:
    scp = StoreSCP(tmp_path_factory.mktemp("laptop-destination"), ae_title="LAPTOPDEST")
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def laptop(tmp_path_factory, docker_ready):
    home = tmp_path_factory.mktemp("laptop")
    env = {"RADDEPLOY_GPUS": "", "RADDEPLOY_GPU_FALLBACK": "cpu", "RADDEPLOY_GPU_LOCK_DIR": str(home / "gpu-locks")}
    with running_stack(home, {}, extra_env=env) as stack:
        yield stack


@pytest.fixture(scope="module")
def airflow(laptop) -> AirflowClient:
    return AirflowClient(laptop.api_url, "admin", laptop.passwords()["admin"])


def test_raddeploy_gpu_ensemble_runs_on_the_cpu_with_the_fallback(laptop, airflow, destination, tmp_path):
    text = ensemble_flow(
        name="Laptop ensemble", folds=FOLDS, image="raddeploy/busybox:latest",
        head=("id: laptop_ensemble\ngrouping: {quiet_period: 1s}\ntriggers:\n"
              "  - Modality: ['^MR$']\n    SeriesDescription: ['^E2E laptop ensemble$']\n"),
        fold=lambda i: {"command": FOLD, "gpu": True}, merge={"command": MERGE},
        host="127.0.0.1", port=destination.port, ae_title=destination.ae_title)
    add_flow(laptop, airflow, "ensemble.yaml", text, ENSEMBLE_ID)
    # what `raddeploy run` prints at start-up, and the pool it made
    summary = laptop.gpu_summary()
    assert summary[0].startswith("GPUs: none found; pool raddeploy_gpu: 2 slots (no GPU on this host")
    folds = ", ".join(f"model_{i} (1 GPU)" for i in range(FOLDS))
    assert f"  flow {ENSEMBLE_ID}: {folds}: runs on the CPU (RADDEPLOY_GPU_FALLBACK=cpu)" in summary
    assert airflow.get("/api/v2/pools/raddeploy_gpu")[1]["slots"] == 2

    series = make_series(tmp_path / "mr", modality="MR", slices=3, size=16, description="E2E laptop ensemble")
    before = set(destination.files())
    assert storescu(laptop.dicom_port, series.files).returncode == 0
    run_id = f"{series.study_uid}.1"
    run = run_finished(airflow, ENSEMBLE_ID, run_id, timeout=240)

    tasks = task_instances(airflow, ENSEMBLE_ID, run_id)
    assert run["state"] == "success", {t: ti["state"] for t, ti in tasks.items()}
    assert len(destination.new_files(before, len(series.files), "the ensemble's result")) == len(series.files)
    assert "running it on the CPU (RADDEPLOY_GPU_FALLBACK=cpu)" in task_log(airflow, ENSEMBLE_ID, run_id, "model_0")
    manifest = json.loads((laptop.data_dir / "runs" / ENSEMBLE_ID / run_id / "manifest.json").read_text())
    assert [manifest["tasks"][f"model_{i}"].get("gpu_fallback") for i in range(FOLDS)] == ["cpu"] * FOLDS
    assert "gpu_fallback" not in manifest["tasks"][f"model_{FOLDS}"]  # the merge is a CPU model
