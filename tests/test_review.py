"""The reviewer's page (review_body) and the decision read from the approval task's answer."""

from __future__ import annotations

import shutil
from pathlib import Path

from dicom_factory import make_series
from flow_factory import write
from raddeploy_provider import review
from raddeploy_provider.flows import load_flow
from raddeploy_provider.store import RunDir

FLOW = """
name: HN review
version: "2.1"
triggers: [{Modality: CT}]
review: required
reviewers: [dr_a]
models:
  - {name: seg, image: "seg:1", inputs: {src: /in}, outputs: {dst: /out}}
destinations: [{host: tps, port: 104, ae_title: TPS}]
"""


def test_the_body_lists_input_series_results_volumes_and_previews_and_never_the_patient(tmp_path: Path) -> None:
    flow = load_flow(write(tmp_path, FLOW))
    run = RunDir(tmp_path / "runs" / "hn_review" / "1.2.3.1")
    ct = make_series(run.input, modality="CT", slices=3, size=8, description="Head | Neck")
    make_series(run.input / "mr", modality="MR", slices=1, size=8, study_uid=ct.study_uid, description="T1")
    (run.root / "dst").mkdir()
    shutil.copy(ct.files[0], run.root / "dst" / "RS.dcm")
    (run.root / "dst" / "notes.txt").write_text("not DICOM")

    body = review.review_body(flow, run, ["dst"], previews=[("axial 1", "/raddeploy/x/axial_1.png")],
                              volumes={"RS.dcm": {"BODY": 12345.678, "LUNG_L": 1500.04}})

    assert body.startswith("### HN review 2.1\n")
    assert "| CT | Head \\| Neck | 3 |" in body and "| MR | T1 | 1 |" in body
    assert "- `dst`: 1 × CT Image Storage, 1 × not DICOM" in body
    assert "  - RS.dcm: BODY 12345.7 cm³, LUNG_L 1500.0 cm³" in body
    assert "![axial 1](/raddeploy/x/axial_1.png)" in body
    assert "Test^Phantom" not in body and "TEST0001" not in body  # the generated files' patient
    assert review.rt_results(run, ["dst"]) == []  # a CT copy is no RTSTRUCT or SEG


def test_the_decision_says_who_and_why_or_that_nobody_answered_in_time() -> None:
    approved = review.decision(["Approve"], {"id": "dr_a", "name": "dr_a"}, {"reason": " fine "}, "reject")
    assert (approved.approved, approved.note(), approved.record()) == (
        True, "Approved by dr_a: fine", {"decision": "approved", "by": "dr_a", "reason": "fine"})
    rejected = review.decision(["Reject"], {"id": "7", "name": "dr_b"}, {}, "reject")
    assert rejected.note() == "Rejected, nothing sent by dr_b"
    timed_out = review.decision(["Reject"], None, None, "reject")
    assert timed_out.note() == "Rejected, nothing sent: no review in time: review_timeout passed: on_review_timeout is reject"
    assert review.decision(["Approve"], None, None, "approve").note().startswith("Approved: no review in time")
