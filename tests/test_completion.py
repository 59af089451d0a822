"""When a study is ready for a flow: triggers met, nobody still sending, quiet period over."""

from __future__ import annotations

from pathlib import Path

import pytest

from raddeploy_provider.completion import SENDING_STALE_AFTER, readiness
from raddeploy_provider.flows import load_flow
from raddeploy_provider.store import NEVER, StoredInstance, StudyIndex

STUDY = "1.2.840.99"
FLOW = """
name: Two modalities
triggers:
  - Modality: CT
  - Modality: MR
    SeriesDescription: "(?i)t1.*"
grouping: {quiet_period: 10s}
models: [{image: "m:1", inputs: {src: /in}, outputs: {dst: /out}}]
"""


def inst(n: int, modality: str, at: float, description: str = "") -> StoredInstance:
    return StoredInstance(sop_uid=f"1.2.3.{n}", study_uid=STUDY, series_uid=f"1.2.4.{modality}",
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
                          path=f"x/{n}.dcm", size=1, sha256=str(n), received_at=at,
                          tags={"Modality": modality, "SeriesDescription": description})


@pytest.fixture
def flow(tmp_path: Path):
    path = tmp_path / "flow.yaml"
    path.write_text(FLOW)
    return load_flow(path)


@pytest.fixture
def index(tmp_path: Path, index_url: str | None) -> StudyIndex:
    """On the test's backend (conftest's ``index_backend``: both)."""
    index = StudyIndex(index_url or tmp_path / "index.sqlite3")
    yield index
    index.close()


def test_nothing_received(flow, index):
    state = readiness(flow, index, STUDY, now=1000.0)
    assert not state.ready and state.instances == 0
    assert state.waiting_for == ("trigger 1: Modality=CT - not received yet; "
                                 "trigger 2: Modality=MR, SeriesDescription=(?i)t1.* - not received yet")


def test_waits_for_the_missing_trigger_then_the_quiet_period(flow, index):
    index.add(inst(1, "CT", at=1000.0), {"two_modalities": NEVER}, association="a1")
    index.association_ended("a1")
    state = readiness(flow, index, STUDY, now=1030.0)
    assert not state.ready and state.unmet == (1,)
    assert state.waiting_for == "trigger 2: Modality=MR, SeriesDescription=(?i)t1.* - not received yet"

    index.add(inst(2, "MR", at=1031.0, description="T1 MPRAGE"), {"two_modalities": NEVER}, association="a2")
    state = readiness(flow, index, STUDY, now=1035.0)
    assert not state.ready and state.unmet == () and state.sending == 1
    assert state.waiting_for == "1 association still sending the study; quiet for 4.0 s of 10 s"
    assert not state.only_quiet_left

    index.association_ended("a2")
    state = readiness(flow, index, STUDY, now=1035.0)
    assert state.only_quiet_left and state.quiet_left == pytest.approx(6.0)
    assert state.waiting_for == "quiet for 4.0 s of 10 s"

    state = readiness(flow, index, STUDY, now=1041.5)
    assert state.ready and state.waiting_for == ""


def test_a_sender_that_went_silent_long_ago_does_not_block(flow, index):
    index.add(inst(1, "CT", at=1000.0), {"f": NEVER}, association="dead")
    index.add(inst(2, "MR", at=1000.0, description="t1"), {"f": NEVER}, association="dead")
    assert readiness(flow, index, STUDY, now=1000.0 + 20).sending == 1
    later = readiness(flow, index, STUDY, now=1000.0 + SENDING_STALE_AFTER + 1)
    assert later.sending == 0 and later.ready


def test_listener_restart_forgets_old_associations(flow, index):
    index.add(inst(1, "CT", at=1000.0), {"f": NEVER}, association="old")
    index.clear_receiving()
    assert readiness(flow, index, STUDY, now=1001.0).sending == 0


def test_a_run_never_closed_is_abandoned_after_its_deadline(index):
    first = index.add(inst(1, "CT", at=1000.0), {"f": 3600.0}).opened
    assert [r.run_id for r in first] == [f"{STUDY}.1"]
    assert index.add(inst(2, "CT", at=1001.0), {"f": 3600.0}).opened == []
    # A run whose DAG run vanished stays "open"; past its deadline a new instance reopens.
    reopened = index.add(inst(3, "CT", at=1002.0), {"f": -1.0}).opened
    assert [r.run_id for r in reopened] == [f"{STUDY}.2"]
    assert index.run_state("f", f"{STUDY}.1") == "abandoned"
