"""`make run` on a machine without a GPU (a laptop, CI), as a new user tries it.

A stack of its own: no GPU found (``RADDEPLOY_GPUS`` empty, no nvidia-smi) and
``RADDEPLOY_GPU_FALLBACK=cpu``.

- RadDeploy's five-fold ensemble (here three folds, every fold ``gpu: true``) completes and is
  delivered; the containers were told they run on the CPU.
- The example flow ``flows/body_contour.yaml`` as shipped (its destination moved to the test's
  DCMTK storescp): a phantom CT pushed with DCMTK storescu together with an RTSTRUCT and an
  RTDOSE of the same study runs the flow once, on the CT alone; the RTSTRUCT it sends back
  passes dicom3tools' ``dciodvfy`` and a strict reading of every reference
  (``raddeploy.rtcheck``), and its BODY area on the middle slice is within 5 % of the phantom's.
- ``raddeploy demo`` against this stack: its own receiver and phantom, its checks; the run's page
  it points at, in a real headless browser, is README's picture (``RADDEPLOY_DOCS_SCREENSHOTS``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from browser import screenshot
from dicom_factory import make_series
from flow_factory import ensemble_flow
from peers import StoreSCP, free_port, storescu, wait_for
from raddeploy import phantom, rtcheck
from raddeploy_provider.airflow_client import AirflowClient
from stack_factory import add_flow, run_finished, run_path, running_stack, task_instances, task_log

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]

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
    received = destination.new_files(before, len(series.files), "the ensemble's result", study_uid=series.study_uid)
    assert len(received) == len(series.files)
    assert "running it on the CPU (RADDEPLOY_GPU_FALLBACK=cpu)" in task_log(airflow, ENSEMBLE_ID, run_id, "model_0")
    manifest = json.loads((laptop.data_dir / "runs" / ENSEMBLE_ID / run_id / "manifest.json").read_text())
    assert [manifest["tasks"][f"model_{i}"].get("gpu_fallback") for i in range(FOLDS)] == ["cpu"] * FOLDS
    assert "gpu_fallback" not in manifest["tasks"][f"model_{FOLDS}"]  # the merge is a CPU model


def rt_object(sample: str, like: Path, folder: Path) -> Path:
    """pydicom's sample RT object (an RTSTRUCT, an RTDOSE) moved into the study and patient of ``like``."""
    ds = dcmread(get_testdata_file(sample), force=True)
    ct = dcmread(like, stop_before_pixels=True)
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID"):
        setattr(ds, keyword, ct.get(keyword, ""))
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = folder / f"{ds.Modality}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


SHIPPED = REPO / "flows" / "body_contour.yaml"
DCMTK_ID = "body_contour_dcmtk"
DESTINATION = "  - {host: 127.0.0.1, port: 11113, ae_title: STORESCP}"
EXCLUDE_SCOUTS = '    SeriesDescription: "~(?i).*(scout|topogram|localizer).*"'


def shipped(**changes: str) -> str:
    """flows/body_contour.yaml with each of its lines ``old`` replaced by ``new`` (``changes``: old=new by name)."""
    text = SHIPPED.read_text()
    for old, new in changes.values():
        assert old in text, f"flows/body_contour.yaml has no line {old!r} any more: update this test"
        text = text.replace(old, new)
    return text


def test_body_contour_flow_on_a_phantom_ct_pushed_with_its_rtstruct_and_rtdose(laptop, airflow, destination, tmp_path):
    # the shipped flow, sending to the test's storescp, and for this test's series only (the demo's is another)
    add_flow(laptop, airflow, "body_contour_dcmtk.yaml", shipped(
        id=("id: body_contour\n", "id: body_contour_dcmtk\n"),
        series=(EXCLUDE_SCOUTS, EXCLUDE_SCOUTS.replace(': "~', ': ["E2E body contour", "~') + "]"),
        destination=(DESTINATION, f"  - {{host: 127.0.0.1, port: {destination.port}, ae_title: {destination.ae_title}}}"),
    ), "body_contour_dcmtk")
    made = phantom.write_phantom(tmp_path / "ct", slices=12, series_description="E2E body contour")
    (tmp_path / "rt").mkdir()
    others = [rt_object(sample, made.files[0], tmp_path / "rt") for sample in ("rtstruct.dcm", "rtdose.dcm")]
    before = set(destination.files())

    pushed = storescu(laptop.dicom_port, made.files + others)  # one association, CT, RTSTRUCT and RTDOSE
    assert pushed.returncode == 0, pushed.stderr
    run_id = f"{made.study_uid}.1"
    run = run_finished(airflow, DCMTK_ID, run_id, timeout=300)
    assert run["state"] == "success", {t: ti["state"] for t, ti in task_instances(airflow, DCMTK_ID, run_id).items()}

    # one run of the flow for the study, on the CT alone
    assert [r["dag_run_id"] for r in airflow.dag_runs(DCMTK_ID) if r["conf"].get("study_uid") == made.study_uid] == [run_id]
    given = sorted((laptop.data_dir / "runs" / DCMTK_ID / run_id / "input").rglob("*.dcm"))
    assert sorted(dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in given) == sorted(made.sop_uids)
    assert {dcmread(p, stop_before_pixels=True).Modality for p in given} == {"CT"}

    (rtstruct,) = destination.new_files(before, 1, "the body-contour RTSTRUCT", study_uid=made.study_uid)
    assert dcmread(rtstruct, stop_before_pixels=True).Modality == "RTSTRUCT"
    assert rtcheck.check_rtstruct(rtstruct, made.files) == []
    errors = rtcheck.dciodvfy(rtstruct)
    assert errors is not None, "dciodvfy (dicom3tools) is missing: run `make test` (scripts/ensure-system.sh)"
    assert errors == []
    areas = rtcheck.roi_areas(rtstruct)
    assert set(areas) == {"BODY", "LUNG_L", "LUNG_R"}
    middle = made.slice_z[len(made.slice_z) // 2]
    body = min(areas["BODY"].items(), key=lambda item: abs(item[0] - middle))[1]
    assert abs(body - made.body_area_mm2) / made.body_area_mm2 < 0.05



def test_raddeploy_demo_against_the_running_stack(laptop, airflow, tmp_path):
    """README's first thing to try: its receiver, its phantom, its checks, and the run it points at. The
    shipped flow as it is, but for its destination's port (11113 may be taken on a test machine)."""
    port = free_port()
    add_flow(laptop, airflow, "body_contour.yaml", shipped(
        destination=(DESTINATION, DESTINATION.replace("11113", str(port)))), "body_contour")
    done = subprocess.run([str(Path(sys.executable).with_name("raddeploy")), "demo", "--port", str(laptop.dicom_port),
                           "--ui", laptop.api_url, "--receive-port", str(port), "--timeout", "180",
                           "--keep", str(tmp_path / "demo")], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    study = lines[0].split("study ")[1].split()[0]
    assert lines[0].startswith("phantom CT: 20 slices, study ")
    assert any(line.startswith("  BODY area vs the phantom's") and line.split(": ")[1].startswith(("0.", "1."))
               for line in lines), done.stdout
    assert f"See the run in the Airflow UI: {laptop.api_url}/dags/body_contour/runs/{study}.1" in lines
    assert airflow.get(run_path("body_contour", f"{study}.1"))[1]["state"] == "success"
    kept = sorted((tmp_path / "demo" / "received").iterdir())
    assert [dcmread(p, stop_before_pixels=True).Modality for p in kept] == ["RTSTRUCT"]
    assert phantom.PATIENT_NAME not in done.stdout + done.stderr and phantom.PATIENT_ID not in done.stdout + done.stderr

    # the page it points at, in a real browser: README's picture
    text = screenshot(laptop.api_url, "admin", laptop.passwords()["admin"], f"/dags/body_contour/runs/{study}.1",
                      tmp_path / "run.png", f"{study}.1", name="demo-run.png")
    assert "body_contour" in text and "fingerprint" in text and "Success" in text


def test_review_of_the_body_contour_shows_rois_volumes_and_previews_in_the_ui(laptop, airflow, destination, tmp_path):
    """`review: required` on the shipped flow: the reviewer's page lists the ROIs with their volumes and
    shows the previews (served by the provider's route); README's picture of the review step."""
    dag_id = "body_contour_review"
    add_flow(laptop, airflow, "body_contour_review.yaml", shipped(
        id=("id: body_contour\n", f"id: {dag_id}\nreview: required\nreviewers: [admin]\n"),
        series=(EXCLUDE_SCOUTS, EXCLUDE_SCOUTS.replace(': "~', ': ["E2E review contour", "~') + "]"),
        destination=(DESTINATION, f"  - {{host: 127.0.0.1, port: {destination.port}, ae_title: {destination.ae_title}}}"),
    ), dag_id)
    made = phantom.write_phantom(tmp_path / "ct", slices=12, series_description="E2E review contour")
    before = set(destination.files())
    assert storescu(laptop.dicom_port, made.files).returncode == 0
    run_id = f"{made.study_uid}.1"
    hitl = f"{run_path(dag_id, run_id)}/taskInstances/review/-1/hitlDetails"
    detail = wait_for(lambda: (lambda got: got[1] if got[0] == 200 and "Preview" in got[1].get("body", "") else None)(
        airflow.get(hitl)), 180, "the review to wait with its previews")
    body = detail["body"]
    assert "| CT | E2E review contour | 12 |" in body and "1 × RT Structure Set Storage" in body
    volumes = dict(part.rsplit(" ", 2)[:2] for part in body.split(".dcm: ")[1].splitlines()[0].split(", "))
    assert set(volumes) == {"BODY", "LUNG_L", "LUNG_R"} and float(volumes["BODY"]) > 100
    urls = [line[line.index("](") + 2:-1] for line in body.splitlines() if line.startswith("![")]
    assert len(urls) >= 3 and all(url.startswith(f"raddeploy/runs/{dag_id}/") for url in urls)
    status, png = airflow._request("GET", "/" + urls[0], None)
    assert status == 200
    assert destination.received(before, made.study_uid) == []  # nothing sent before the decision

    text = screenshot(laptop.api_url, "admin", laptop.passwords()["admin"],
                      f"/dags/{dag_id}/runs/{run_id}/tasks/review/required_actions", tmp_path / "review.png",
                      "Approve", name="review-step.png", height=1400)
    assert "BODY" in text and "Reject" in text
    assert airflow._request("PATCH", hitl, {"chosen_options": ["Approve"], "params_input": {}})[0] == 200
    assert run_finished(airflow, dag_id, run_id)["state"] == "success"
    (rtstruct,) = destination.new_files(before, 1, "the approved RTSTRUCT", study_uid=made.study_uid)
    assert dcmread(rtstruct, stop_before_pixels=True).Modality == "RTSTRUCT"
