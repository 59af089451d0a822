"""``raddeploy try`` against the real Docker engine: a flow's models on local files, nothing sent.

The images are ``make images``'s (``raddeploy/busybox``, ``raddeploy/threshold``); nothing is
pulled. Each test checks what was printed, the exit code, that the input files are byte for
byte as they were, that no patient name or ID was printed and that no container is left.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import docker
import pytest

from dicom_factory import make_series
from flow_factory import write
from raddeploy.cli import main
from raddeploy_provider.operators.model import RUN_LABEL
from raddeploy_provider.store.header import read_header
from raddeploy_provider.store.snapshot import input_path

pytestmark = pytest.mark.integration

BUSYBOX = "raddeploy/busybox:latest"
THRESHOLD = "raddeploy/threshold:latest"
PATIENT_ID = "TRYPATIENT0042"
PATIENT_NAME = "Test^Phantom"  # what dicom_factory writes as PatientName


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, docker_ready: None) -> Path:
    for name in list(os.environ):
        if name.startswith("RADDEPLOY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RADDEPLOY_DATA", str(tmp_path / "real-data"))  # must be left alone
    monkeypatch.setenv("RADDEPLOY_GPUS", "")  # no nvidia-smi probe
    monkeypatch.setenv("RADDEPLOY_GPU_LOCK_DIR", str(tmp_path / "gpu-locks"))
    return tmp_path


@pytest.fixture
def ct(env: Path) -> list[Path]:
    return make_series(env / "dicom", modality="CT", slices=3, size=8, patient_id=PATIENT_ID).files


def hashes(files: list[Path]) -> dict[Path, tuple[str, int]]:
    return {f: (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mode) for f in files}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["try", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean(out: str, err: str, dag_id: str) -> None:
    """No patient name or ID printed, no container of the flow left, RADDEPLOY_DATA as it was."""
    for text in (out, err):
        assert PATIENT_ID not in text and "Phantom" not in text and PATIENT_NAME not in text
    client = docker.APIClient(base_url=os.environ.get("DOCKER_HOST", "unix://var/run/docker.sock"))
    try:
        left = [c for c in client.containers(all=True, filters={"label": RUN_LABEL})
                if c["Labels"][RUN_LABEL].startswith(f"{dag_id}/")]
    finally:
        client.close()
    assert not left
    assert os.environ["RADDEPLOY_DATA"].endswith("real-data") and "RADDEPLOY_STATIC" not in os.environ
    assert not Path(os.environ["RADDEPLOY_DATA"]).exists()


def test_chain_prints_both_steps_and_keeps_the_run_folder(env: Path, ct: list[Path], capsys) -> None:
    flow = write(env, f"""
        name: Chain try
        triggers:
          - Modality: CT
        models:
          - name: copy
            image: {BUSYBOX}
            command: ["sh", "-c", "cp -r /input/. /output/"]
            inputs: {{src: /input}}
            outputs: {{copied: /output}}
          - name: threshold
            image: {THRESHOLD}
            environment: {{THRESHOLD_HU: "-300"}}
            inputs: {{copied: /input}}
            outputs: {{dst: /output}}
        destinations:
          - {{host: 127.0.0.1, port: 9, ae_title: NOWHERE}}
        """)
    before = hashes(ct)
    keep = env / "kept"

    code, out, err = run(capsys, str(flow), str(env / "dicom"), "--keep", str(keep))

    assert code == 0, out + err
    lines = out.splitlines()
    study = read_header(ct[0]).study_uid
    run_dir = keep / "runs" / "chain_try" / f"{study}.1"
    assert "  trigger 1: satisfied by 3 files" in lines
    assert "  src: 3 files of 1 series (layout flat, whole series)" in lines
    assert f"run {study}.1: input/ holds 3 instances; 2 models to run: copy, threshold" in lines
    copy, threshold = lines.index("copy (1/2)"), lines.index("threshold (2/2)")
    assert copy < threshold
    assert lines[copy + 1].startswith(f"  image:     {BUSYBOX} (id ")
    assert lines[copy + 2] == lines[threshold + 2] == "  exit code: 0"
    assert lines[copy + 3] == lines[threshold + 3] == "  gpus:      none"
    assert lines[copy + 4].startswith("  duration:  ")
    assert lines[copy + 5] == "  output copied: 3 files"
    assert lines[copy + 6].startswith("    CT, CT Image Storage: 3 instances (series ")
    assert lines[threshold + 5] == "  output dst: 3 files (sent in a real run)"
    assert lines[threshold + 6].startswith("    CT, CT Image Storage: 3 instances (series ")
    assert "output guard: the 3 results of dst would be sent" in lines
    assert ("nothing was sent: `raddeploy try` does not contact destinations (this flow's: NOWHERE@127.0.0.1:9)"
            in lines)
    assert f"run folder: {run_dir}" in lines
    # the input as the sensor lays it out, copies (never the originals' inodes), 0640
    headers = [read_header(f) for f in ct]
    assert sorted(p.relative_to(run_dir / "input") for p in (run_dir / "input").rglob("*.dcm")) == sorted(
        input_path(h) for h in headers)
    for f, h in zip(ct, headers):
        placed = run_dir / "input" / input_path(h)
        assert placed.read_bytes() == f.read_bytes() and not os.path.samefile(placed, f)
        assert placed.stat().st_mode & 0o777 == 0o640
    assert len(list((run_dir / "dst").iterdir())) == 3
    assert (run_dir / "manifest.json").is_file()
    assert hashes(ct) == before
    assert_clean(out, err, "chain_try")


def test_failing_model_exits_1_with_its_exit_code_and_log_tail(env: Path, ct: list[Path], capsys) -> None:
    flow = write(env, f"""
        name: Broken try
        triggers: [{{Modality: CT}}]
        models:
          - name: broken
            image: {BUSYBOX}
            command: ["sh", "-c", "echo reading the input; echo no weights found >&2; exit 3"]
            inputs: {{src: /input}}
            outputs: {{seg: /output}}
          - name: after
            image: {BUSYBOX}
            command: ["sh", "-c", "cp -r /input/. /output/"]
            inputs: {{seg: /input}}
            outputs: {{dst: /output}}
        """)
    before = hashes(ct)

    code, out, err = run(capsys, str(flow), str(env / "dicom"))

    assert code == 1, out + err
    lines = out.splitlines()
    broken = lines.index("broken (1/2)")
    assert lines[broken + 2] == "  exit code: 3"
    failed = lines.index("  FAILED:")
    assert lines[failed + 1:failed + 3] == [f"    model broken ({BUSYBOX}) exited with code 3", "    last log lines:"]
    # stdout and stderr come through one stream: their lines may interleave either way
    assert sorted(lines[failed + 3:failed + 5]) == ["    no weights found", "    reading the input"]
    assert "after (2/2)" not in lines
    assert "not run: after (after the failure of broken)" in lines
    assert "the run folder was temporary and is removed (--keep DIR keeps it)" in lines
    assert hashes(ct) == before
    assert_clean(out, err, "broken_try")


def test_files_no_trigger_matches_exit_1_with_the_reason(env: Path, ct: list[Path], capsys) -> None:
    flow = write(env, f"""
        name: MR only
        triggers: [{{Modality: MR}}]
        models: [{{image: {BUSYBOX}, inputs: {{src: /input}}, outputs: {{dst: /output}}}}]
        """)
    before = hashes(ct)

    code, out, err = run(capsys, str(flow), str(env / "dicom"))

    assert code == 1
    lines = out.splitlines()
    assert f"study {read_header(ct[0]).study_uid}: 3 files, would run: no" in lines
    assert "  trigger 1: not satisfied by any file" in lines
    assert "    CT0000.dcm: Modality: pattern 'MR' did not match value 'CT'" in lines
    assert lines[-1] == ("the flow would not run on these files: no study satisfies every trigger "
                         "(`raddeploy match` lists every file's reasons)")
    assert not any(line.startswith("run ") for line in lines)
    assert hashes(ct) == before
    assert_clean(out, err, "mr_only")


def test_bad_arguments_exit_2_before_anything_runs(env: Path, ct: list[Path], capsys) -> None:
    flow = write(env, f"""
        name: Args
        triggers: [{{Modality: CT}}]
        models: [{{name: seg, image: {BUSYBOX}, inputs: {{src: /input}}, outputs: {{dst: /output}}}}]
        """)
    busy = env / "busy"
    busy.mkdir()
    (busy / "something").write_text("x")

    code, out, err = run(capsys, str(flow), str(env / "dicom"), "--model", "nope")
    assert code == 2 and not out
    assert err.splitlines()[-1] == "error: --model nope: the flow has no model of that name; its models: seg"
    code, out, err = run(capsys, str(flow), str(env / "dicom"), "--keep", str(busy))
    assert code == 2 and "exists and is not an empty folder" in err and not out
    code, _, err = run(capsys, str(env / "missing.yaml"), str(env / "dicom"))
    assert code == 2 and err.startswith("error: ")
    code, _, err = run(capsys, str(flow), str(env / "no-such-dir"))
    assert code == 2 and "no such file or folder" in err
    assert not (env / "no-such-dir").exists()
