"""The output guard on real files: links, non-DICOM, another patient or study, input that disagrees."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

from dicom_factory import make_series
from raddeploy_provider.store.outputs import Identity, check_outputs, input_identity, walk


def set_values(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def run(tmp_path: Path):
    source = make_series(tmp_path / "input", slices=2, patient_id="P1")
    results = make_series(tmp_path / "dst" / "sub", slices=3, patient_id="P1", study_uid=source.study_uid)
    return tmp_path, source, results


def test_results_of_the_inputs_patient_and_study_pass(run):
    root, source, results = run
    identity = input_identity(root / "input")
    assert identity == Identity("P1", source.study_uid)
    check = check_outputs([root / "dst"], root, identity)
    assert check.ok and sorted(o.path for o in check.outputs) == sorted(results.files)
    assert {o.header.sop_uid for o in check.outputs} == {pydicom.dcmread(p).SOPInstanceUID for p in results.files}


def test_every_problem_is_named_and_nothing_passes_silently(run):
    root, source, results = run
    set_values(results.files[0], PatientID="P2")
    set_values(results.files[1], StudyInstanceUID="1.2.3")
    (root / "dst" / "log.txt").write_text("done")
    (root / "dst" / "link.dcm").symlink_to(results.files[2])
    os.mkfifo(root / "dst" / "pipe")
    check = check_outputs([root / "dst"], root, input_identity(root / "input"))
    assert not check.ok and len(check.outputs) == 1
    found = {(p.file, p.field) for p in check.problems}
    assert found == {("dst/sub/CT0000.dcm", "PatientID"), ("dst/sub/CT0001.dcm", "StudyInstanceUID"),
                     ("dst/log.txt", "file"), ("dst/link.dcm", "file"), ("dst/pipe", "file")}
    text = check.explain()
    assert text.startswith("nothing is sent: 5 of 6 output files refused by the output guard: ")
    assert "P2" not in text and "P1" not in text


def test_checks_a_flow_turned_off_are_not_made(run):
    root, _, results = run
    set_values(results.files[0], PatientID="ANON", StudyInstanceUID="1.2.3")
    assert check_outputs([root / "dst"], root, input_identity(root / "input", patient=False, study=False)).ok


def test_a_linked_output_folder_is_refused_and_links_are_never_followed(run, tmp_path_factory):
    root, _, _ = run
    elsewhere = tmp_path_factory.mktemp("host")
    make_series(elsewhere, slices=1)
    (root / "dst2").symlink_to(elsewhere, target_is_directory=True)
    files, problems = walk(root / "dst2", root)
    assert files == [] and [p.why for p in problems] == ["the output folder is a symbolic link"]


def test_input_of_two_patients_has_no_identity(run):
    root, source, _ = run
    set_values(source.files[1], PatientID="P9")
    with pytest.raises(ValueError, match="the input instances carry 2 different PatientID values"):
        input_identity(root / "input")
    assert input_identity(root / "input", patient=False).patient_id is None
