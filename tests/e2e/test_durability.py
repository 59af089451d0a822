"""Durability of the whole stack: studies that trickle in, new generations, a listener killed
mid-association, an Airflow outage.

These tests stop Airflow and SIGKILL the listener, so they run on a stack of their own
(own home, own ports, own destination), never on the session stack of the other e2e tests.
One flow needs a CT and an MR of the same study; its model copies the input to `dst`,
which is sent to a DCMTK storescp. Tests 1 and 2 share a study (2 continues where 1
ends); 3 and 4 use fresh studies.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_factory import make_series
from peers import DCMTK_ENV, StoreSCP, partial_files, require_tool, storescu, wait_for
from raddeploy.embedded import EmbeddedStack
from raddeploy_provider.airflow_client import AirflowClient
from stack_factory import push_settled, query, running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

DAG_ID = "e2e_durability"
#: The API server's access log line of a call to the task execution API: its path.
EXECUTION_CALL = re.compile(r"\[http\.access\].* path=(/execution/[^ ?]*)")
QUIET = 3.0
FLOW = """
name: E2E durability CT+MR
id: {dag_id}
description: needs a CT and an MR of one study; copies them to dst
triggers:
  - Modality: CT
  - Modality: MR
grouping:
  quiet_period: {quiet:g}s
models:
  - name: copy
    image: raddeploy/busybox:latest
    command: [sh, -c, "cp /input/* /output/"]
    inputs: {{src: /input}}
    outputs: {{dst: /output}}
    timeout: 2m
destinations:
  - {{host: 127.0.0.1, port: {port}, ae_title: {ae}}}
"""


# -- the stack of this module ---------------------------------------------------------------
@pytest.fixture(scope="module")
def dur_destination(tmp_path_factory) -> StoreSCP:
    scp = StoreSCP(tmp_path_factory.mktemp("dur-destination"), ae_title="DURDEST")
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def dur_stack(tmp_path_factory, dur_destination, docker_ready) -> EmbeddedStack:
    flow = FLOW.format(dag_id=DAG_ID, quiet=QUIET, port=dur_destination.port, ae=dur_destination.ae_title)
    with running_stack(tmp_path_factory.mktemp("dur-home"), {"durability.yaml": flow}) as stack:
        yield stack


@pytest.fixture(scope="module")
def dur_airflow(dur_stack) -> AirflowClient:
    client = AirflowClient(dur_stack.api_url, "admin", dur_stack.passwords()["admin"])
    # The DAG must be parsed before the first push, or the first trigger waits in the outbox.
    wait_for(lambda: client.get(f"/api/v2/dags/{DAG_ID}")[0] == 200, 90, f"DAG {DAG_ID} to be parsed", 0.5)
    return client


@pytest.fixture(scope="module")
def shared() -> dict:
    """What test 1 leaves for test 2 (the study, the files pushed)."""
    return {}


# -- helpers ----------------------------------------------------------------------------------


def indexed_sops(stack: EmbeddedStack, study_uid: str) -> list[str]:
    return [r["sop_uid"] for r in query(stack, "SELECT sop_uid FROM instances WHERE study_uid = ?", (study_uid,))]


def study_runs(airflow: AirflowClient, study_uid: str) -> list[dict]:
    return sorted((r for r in airflow.dag_runs(DAG_ID) if r["dag_run_id"].startswith(study_uid + ".")),
                  key=lambda r: r["dag_run_id"])


def run_detail(airflow: AirflowClient, run_id: str) -> dict | None:
    status, body = airflow.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}")
    return body if status == 200 else None


def wait_run_finished(airflow: AirflowClient, stack: EmbeddedStack, run_id: str, timeout: float) -> dict:
    run = wait_for(lambda: (d := run_detail(airflow, run_id)) and d["state"] in ("success", "failed") and d,
                   timeout, f"run {run_id} to finish", 0.5)
    if run["state"] != "success":
        status, body = airflow.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
                                   "/taskInstances")
        states = {ti["task_id"]: ti["state"] for ti in body.get("task_instances", [])} if status == 200 else body
        pytest.fail(f"run {run_id} {run['state']}: tasks {states}; note {run.get('note')!r}; "
                    f"logs under {stack.logs_dir} and {stack.home / 'airflow' / 'logs'}")
    return run


def input_files(stack: EmbeddedStack, run_id: str) -> list[Path]:
    folder = stack.data_dir / "runs" / DAG_ID / run_id / "input"
    return sorted(p for p in folder.rglob("*") if p.is_file())


def sop_of(path: Path) -> str:
    return dcmread(path, stop_before_pixels=True).SOPInstanceUID


def listener_log_tail(stack: EmbeddedStack, lines: int = 40) -> str:
    path = stack.logs_dir / "listener.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def clone_series(template: Path, folder: Path, count: int, study_uid: str) -> list[Path]:
    """``count`` slices of one new series from one template file (fast: no pixel generation)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = dcmread(template)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    files = []
    for i in range(count):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i) * 2.5]
        path = folder / f"CT{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


# -- 1. one run for a study whose CT and MR come in two associations 20 s apart ----------------
def test_multi_modality_in_two_associations(dur_stack, dur_airflow, dur_destination, tmp_path, shared):
    stack, airflow = dur_stack, dur_airflow
    ct = make_series(tmp_path / "ct", modality="CT", slices=5, size=64)
    mr = make_series(tmp_path / "mr", modality="MR", slices=3, size=64, study_uid=ct.study_uid,
                     description="T1")
    run_id = f"{ct.study_uid}.1"
    start = time.monotonic()
    pushed = storescu(stack.dicom_port, ct.files)
    assert pushed.returncode == 0, pushed.stderr
    print(f"\n[1] CT pushed in {time.monotonic() - start:.1f} s")

    # 20 s with only the CT: the run exists, waits, and its note says for what.
    notes: list[tuple[float, str | None, str]] = []
    while time.monotonic() - start < 20:
        detail = run_detail(airflow, run_id)
        if detail is not None and (not notes or (detail.get("note"), detail["state"]) != notes[-1][1:]):
            notes.append((time.monotonic() - start, detail.get("note"), detail["state"]))
        time.sleep(0.5)
    for at, note, state in notes:
        print(f"[1]   {at:5.1f} s  state={state}  note={note!r}")
    assert notes, f"run {run_id} was never created in 20 s; listener log:\n{listener_log_tail(stack)}"
    waiting = [n for _, n, _ in notes if n and "trigger 2" in n and "not received yet" in n]
    assert waiting, f"the note never said it waits for trigger 2 (MR): {notes}"
    assert "Modality=MR" in waiting[-1]
    assert notes[-1][2] == "running", notes  # still waiting, neither failed nor done
    assert not input_files(stack, run_id), "the run took its input before the MR arrived"

    t_mr = time.monotonic()
    pushed = storescu(stack.dicom_port, mr.files)
    assert pushed.returncode == 0, pushed.stderr
    run = wait_run_finished(airflow, stack, run_id, 120)
    print(f"[1] MR push -> run {run_id} success: {time.monotonic() - t_mr:.1f} s; final note {run.get('note')!r}")

    assert [r["dag_run_id"] for r in study_runs(airflow, ct.study_uid)] == [run_id]
    got = {sop_of(p) for p in input_files(stack, run_id)}
    assert got == {sop_of(p) for p in ct.files + mr.files}, "the input must hold both the CT and the MR"
    shared.update(study_uid=ct.study_uid, files=ct.files + mr.files)


# -- 2. generations -----------------------------------------------------------------------------
def test_new_series_opens_next_generation_and_resend_opens_nothing(dur_stack, dur_airflow, tmp_path, shared):
    if "study_uid" not in shared:
        pytest.skip("needs the study of test 1")
    stack, airflow = dur_stack, dur_airflow
    study_uid, before = shared["study_uid"], shared["files"]
    ct2 = make_series(tmp_path / "ct2", modality="CT", slices=1, size=64, study_uid=study_uid,
                      description="CT again")
    mr2 = make_series(tmp_path / "mr2", modality="MR", slices=1, size=64, study_uid=study_uid,
                      description="MR again")
    run2 = f"{study_uid}.2"
    start = time.monotonic()
    pushed = storescu(stack.dicom_port, ct2.files + mr2.files)
    assert pushed.returncode == 0, pushed.stderr
    wait_run_finished(airflow, stack, run2, 120)
    print(f"\n[2] new series push -> run {run2} success: {time.monotonic() - start:.1f} s")
    assert [r["dag_run_id"] for r in study_runs(airflow, study_uid)] == [f"{study_uid}.1", run2]
    got = {sop_of(p) for p in input_files(stack, run2)}
    assert {sop_of(p) for p in ct2.files + mr2.files} <= got  # the new generation sees the new series
    assert got == {sop_of(p) for p in before + ct2.files + mr2.files}  # (and the whole study as it is now)

    # Exactly the same files again: duplicates, no third generation. Once the listener has
    # decided about every instance and posted every trigger, a third run would be in both.
    everything = before + ct2.files + mr2.files
    push_settled(stack, everything)
    assert [r["dag_run_id"] for r in study_runs(airflow, study_uid)] == [f"{study_uid}.1", run2]
    registered = query(stack, "SELECT run_id FROM runs WHERE study_uid = ? ORDER BY generation", (study_uid,))
    assert [r["run_id"] for r in registered] == [f"{study_uid}.1", run2]
    assert len(indexed_sops(stack, study_uid)) == len(everything)
    print(f"[2] re-push of {len(everything)} identical instances opened nothing "
          f"({time.monotonic() - start:.1f} s in all)")


# -- 3. kill -9 of the listener mid-association -------------------------------------------------
def test_listener_killed_mid_association(dur_stack, dur_airflow, tmp_path):
    stack, airflow = dur_stack, dur_airflow
    slices = 400
    t_make = time.monotonic()
    template = make_series(tmp_path / "tpl", modality="CT", slices=1, size=256)
    study_uid = generate_uid()
    ct_files = clone_series(template.files[0], tmp_path / "ct", slices, study_uid)
    mr = make_series(tmp_path / "mr", modality="MR", slices=1, size=64, study_uid=study_uid, description="T1")
    print(f"\n[3] {slices} slices 256x256 written in {time.monotonic() - t_make:.1f} s")
    sop_by_file = {str(p): sop_of(p) for p in ct_files}
    study_dir = stack.data_dir / "studies" / study_uid

    args = [require_tool("storescu"), "-v", "-aec", stack.ae_title, "-aet", "STORESCU",
            "127.0.0.1", str(stack.dicom_port), *map(str, ct_files)]
    start = time.monotonic()
    push = subprocess.Popen(args, env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Kill once a fair part is stored, so the kill lands mid-association whatever the speed.
    def stored() -> int:
        return sum(1 for _ in study_dir.rglob("*.dcm")) if study_dir.exists() else 0

    wait_for(lambda: stored() >= 60 or push.poll() is not None, 60, "the push to get going", 0.02)
    assert push.poll() is None, "the push ended before the kill: make the series larger"
    killed_at = time.monotonic() - start
    on_disk_at_kill = stored()
    stack.restart_listener(kill=True)
    restarted_at = time.monotonic() - start
    out, _ = push.communicate(timeout=60)
    print(f"[3] killed after {killed_at:.2f} s ({on_disk_at_kill} files on disk), listener back after "
          f"{restarted_at:.2f} s; storescu rc={push.returncode}")
    assert push.returncode != 0, f"storescu should have failed:\n{out[-2000:]}"

    # Which C-STOREs were acknowledged before the kill.
    acked, current = [], None
    for line in out.splitlines():
        if m := re.search(r"Sending file: (.+)$", line):
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            acked.append(sop_by_file[current])
    print(f"[3] acknowledged before the kill: {len(acked)} of {slices}")
    assert 0 < len(acked) < slices
    after_restart = set(indexed_sops(stack, study_uid))
    lost = [s for s in acked if s not in after_restart]
    assert not lost, f"{len(lost)} acknowledged instances are not in the index after the kill"
    leftovers = partial_files(stack.data_dir / "incoming")
    assert not leftovers, f"incoming/ after restart: {leftovers[:5]}"

    # The sender tries again: everything, then the MR the flow also needs.
    t_again = time.monotonic()
    again = storescu(stack.dicom_port, ct_files)
    assert again.returncode == 0, again.stderr
    pushed = storescu(stack.dicom_port, mr.files)
    assert pushed.returncode == 0, pushed.stderr
    print(f"[3] re-push of {slices} + MR: {time.monotonic() - t_again:.1f} s")
    sops = indexed_sops(stack, study_uid)
    assert len(sops) == len(set(sops)) == slices + 1
    assert set(sops) == set(sop_by_file.values()) | {sop_of(mr.files[0])}
    on_disk = sorted(study_dir.rglob("*.dcm"))
    assert len(on_disk) == slices + 1, f"{len(on_disk)} files on disk (a duplicate kept as a variant?)"
    assert not partial_files(stack.data_dir / "incoming")

    run_id = f"{study_uid}.1"
    wait_run_finished(airflow, stack, run_id, 180)
    print(f"[3] push start -> run {run_id} success: {time.monotonic() - start:.1f} s")
    assert [r["dag_run_id"] for r in study_runs(airflow, study_uid)] == [run_id]
    assert len(query(stack, "SELECT 1 FROM outbox WHERE run_id LIKE ?", (study_uid + ".%",))) == 1
    assert len(input_files(stack, run_id)) == slices + 1


# -- 4. Airflow stopped for 60 s while studies arrive -------------------------------------------
def test_airflow_outage(dur_stack, dur_airflow, tmp_path):
    stack, airflow = dur_stack, dur_airflow
    log = stack.logs_dir / "listener.log"
    log_from = log.stat().st_size
    t0 = time.monotonic()
    stack.stop_airflow()
    stopped = time.monotonic() - t0
    print(f"\n[4] Airflow stopped in {stopped:.1f} s")
    assert not stack._airflow_healthy()

    studies = []
    for i in range(3):
        ct = make_series(tmp_path / f"s{i}" / "ct", modality="CT", slices=3, size=64)
        mr = make_series(tmp_path / f"s{i}" / "mr", modality="MR", slices=2, size=64, study_uid=ct.study_uid,
                         description="T1")
        pushed = storescu(stack.dicom_port, ct.files + mr.files)
        assert pushed.returncode == 0, f"the listener must keep accepting while Airflow is down: {pushed.stderr}"
        studies.append(ct.study_uid)
    print(f"[4] 3 studies pushed while Airflow was down ({time.monotonic() - t0:.1f} s into the outage)")

    run_ids = [f"{s}.1" for s in studies]
    marks = ",".join("?" * len(run_ids))

    def pending() -> list[sqlite3.Row]:
        return query(stack, f"SELECT run_id FROM outbox WHERE run_id IN ({marks}) AND delivered_at IS NULL",
                     tuple(run_ids))

    assert len(pending()) == 3

    def retries() -> int:  # the outbox counts no attempt while Airflow is unreachable: its log does
        with open(log, "rb") as fh:
            fh.seek(log_from)
            return fh.read().decode(errors="replace").count("Airflow unreachable")

    # Until its back-off has reached its cap (0.5 + 1 + 2 + 4 + 5 s): the outbox keeps trying, calmly.
    wait_for(lambda: retries() >= 6, 60, "the outbox to retry 6 times while Airflow is down", 0.5)
    assert len(pending()) == 3
    print(f"[4] after {time.monotonic() - t0:.1f} s down: 3 triggers pending, {retries()} delivery retries logged")

    airflow_log = stack.logs_dir / "airflow.log"
    airflow_log_from = airflow_log.stat().st_size
    t_up = time.monotonic()
    stack.start_airflow()
    print(f"[4] Airflow healthy again after {time.monotonic() - t_up:.1f} s "
          f"(outage {time.monotonic() - t0:.1f} s in all)")
    wait_for(lambda: not pending(), 120, "the outbox to deliver the 3 triggers", 0.5)
    print(f"[4] outbox delivered {time.monotonic() - t_up:.1f} s after the restart began")
    for run_id in run_ids:
        wait_run_finished(airflow, stack, run_id, 180)
    print(f"[4] restart -> all 3 runs success: {time.monotonic() - t_up:.1f} s")
    # The restarted stack asked the new API server to build its execution API (EmbeddedStack's
    # health check) among its first calls: a task the new scheduler started at once may come first.
    calls = EXECUTION_CALL.findall(airflow_log.read_bytes()[airflow_log_from:].decode(errors="replace"))
    assert "/execution/health" in calls[:5], calls[:5]

    for study_uid, run_id in zip(studies, run_ids):
        assert [r["dag_run_id"] for r in study_runs(airflow, study_uid)] == [run_id]
        assert len(input_files(stack, run_id)) == 5
    undelivered = query(stack, "SELECT dag_id, run_id, attempts FROM outbox WHERE delivered_at IS NULL")
    assert not undelivered, [dict(r) for r in undelivered]
