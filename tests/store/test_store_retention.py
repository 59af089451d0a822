"""Retention: the decision (pure) and the deletion on a real store, on both index backends."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from dicom_factory import Series, make_series
from raddeploy_provider.store import NEVER, StudyStore, retention
from raddeploy_provider.store.index import StudySummary
from raddeploy_provider.store.retention import (DELIVERED, FAILED, OPEN, REJECTED, UNMATCHED, Policy, RunFacts,
                                                StudyFacts)

DAY = 86400.0
POLICY = Policy(delivered=30 * DAY, failed=90 * DAY, unmatched=7 * DAY)


def facts(uid: str, last: float, *runs: tuple[str, float], size: int = 100) -> StudyFacts:
    return StudyFacts(StudySummary(uid, last, last, 1, 1, size, "CT"),
                      tuple(RunFacts("flow", f"{uid}.{i}", kind, at, kind) for i, (kind, at) in enumerate(runs)))


def test_an_open_run_keeps_a_study_whatever_its_age() -> None:
    v = retention.verdict(facts("1.1", 0.0, (OPEN, 0.0), (DELIVERED, 0.0)), POLICY, now=1000 * DAY)
    assert v.kind == OPEN and not v.due(1000 * DAY) and "kept: run flow/1.1.0 open" in v.reason


def test_each_kind_keeps_its_own_time_and_the_longest_wins() -> None:
    now = 100 * DAY
    unmatched = retention.verdict(facts("1.2", now - 8 * DAY), POLICY, now)
    assert unmatched.kind == UNMATCHED and unmatched.due(now) and "due now" in unmatched.reason
    delivered = retention.verdict(facts("1.3", now - 31 * DAY, (DELIVERED, now - 31 * DAY)), POLICY, now)
    assert delivered.kind == DELIVERED and delivered.due(now)
    young = retention.verdict(facts("1.4", now - 29 * DAY, (DELIVERED, now - 29 * DAY)), POLICY, now)
    assert not young.due(now) and "due in 1 d" in young.reason
    mixed = retention.verdict(facts("1.5", now - 31 * DAY, (DELIVERED, now - 31 * DAY), (REJECTED, now - 31 * DAY)),
                              POLICY, now)
    assert mixed.kind == FAILED and not mixed.due(now) and "rejected data is kept 90 d" in mixed.reason


def test_below_the_low_water_mark_delivered_go_first_then_unmatched_never_failed() -> None:
    now = 10 * DAY
    studies = [facts("2.1", now - DAY, (DELIVERED, now - DAY)), facts("2.2", now - 3 * DAY, (DELIVERED, now - 3 * DAY)),
               facts("2.3", now - 5 * DAY), facts("2.4", now - 9 * DAY, (FAILED, now - 9 * DAY)),
               facts("2.5", now - 9 * DAY, (OPEN, now - 9 * DAY))]
    low = retention.plan(studies, Policy(30 * DAY, 90 * DAY, 7 * DAY, low_water=10), now, free_bytes=5)
    assert [v.study_uid for v in low.early] == ["2.2", "2.1", "2.3"]
    assert retention.plan(studies, Policy(30 * DAY, 90 * DAY, 7 * DAY, low_water=10), now, free_bytes=50).early == []


@pytest.fixture
def store(tmp_path: Path, index_url: str | None) -> StudyStore:
    store = StudyStore(tmp_path / "data", index_url=index_url)
    yield store
    store.index.close()


def push(store: StudyStore, series: Series, flows: tuple[str, ...]) -> None:
    for path in series.files:
        temp = store.layout.incoming / f"tmp_{path.name}"
        shutil.copyfile(path, temp)
        store.ingest(temp, lambda header: dict.fromkeys(flows, NEVER), calling_ae="CT")


def run_folder(store: StudyStore, dag_id: str, run_id: str) -> Path:
    run = store.layout.run(dag_id, run_id)
    run.input.mkdir(parents=True)
    run.manifest.write_text(json.dumps({"tasks": {}}))
    return run.root


def test_a_delivered_study_past_its_time_goes_from_disk_and_index_and_an_open_one_stays(
        store: StudyStore, tmp_path: Path) -> None:
    old = make_series(tmp_path / "old", slices=2, size=8)
    busy = make_series(tmp_path / "busy", slices=2, size=8)
    push(store, old, ("flow",))
    push(store, busy, ("flow",))
    for study in (old, busy):
        store.index.close_run("flow", f"{study.study_uid}.1", study.study_uid)
    old_run = run_folder(store, "flow", f"{old.study_uid}.1")
    states = {f"{old.study_uid}.1": "success", f"{busy.study_uid}.1": "running"}
    later = time.time() + 31 * DAY
    facts_now = retention.gather(store.index, store.layout, lambda dag, run: states[run])
    plan = retention.plan(facts_now, POLICY, later, free_bytes=None)

    dry = retention.purge(plan, store.index, store.layout, actor="test", dry_run=True)
    assert [d.verdict.study_uid for d in dry.deleted] == [old.study_uid]
    assert (store.layout.studies / old.study_uid).is_dir() and len(store.index.instances(old.study_uid)) == 2
    assert not [r for r in store.index.audit_records() if r.event == "deletion"]

    done = retention.purge(plan, store.index, store.layout, actor="test")
    assert [d.verdict.study_uid for d in done.deleted] == [old.study_uid]
    assert not (store.layout.studies / old.study_uid).exists() and not old_run.exists()
    assert store.index.instances(old.study_uid) == []
    assert len(store.index.instances(busy.study_uid)) == 2 and (store.layout.studies / busy.study_uid).is_dir()
    assert not any(store.layout.trash.iterdir())
    (record,) = [r for r in store.index.audit_records() if r.event == "deletion"]
    assert record.study_uid == old.study_uid and record.detail["instances"] == 2
    assert record.detail["runs"] == [f"flow/{old.study_uid}.1"] and record.detail["kind"] == DELIVERED
    assert record.detail["series_uids"] == [old.series_uid]

    push(store, old, ("flow",))  # the study sent again: a new generation, never a run id Airflow has seen
    assert [r.run_id for r in store.index.runs("flow") if r.study_uid == old.study_uid] == [
        f"{old.study_uid}.1", f"{old.study_uid}.2"]


def test_an_instance_after_the_facts_were_read_keeps_the_study(store: StudyStore, tmp_path: Path) -> None:
    study = make_series(tmp_path / "s", slices=2, size=8)
    push(store, study, ())
    read_at = time.time()
    facts_then = retention.gather(store.index, store.layout, lambda *_: None)
    push(store, make_series(tmp_path / "late", slices=1, size=8, study_uid=study.study_uid), ())
    plan = retention.plan(facts_then, POLICY, time.time() + 8 * DAY, free_bytes=None, gathered_at=read_at)
    assert [v.study_uid for v in plan.due] == [study.study_uid]
    outcome = retention.purge(plan, store.index, store.layout, actor="test")
    assert outcome.deleted == () and outcome.skipped == (study.study_uid,)
    assert len(store.index.instances(study.study_uid)) == 3 and len(list(store.layout.studies.rglob("*.dcm"))) == 3


def test_the_low_water_mark_deletes_the_oldest_delivered_first_and_alerts(store: StudyStore, tmp_path: Path) -> None:
    studies = [make_series(tmp_path / f"s{i}", slices=1, size=8) for i in range(3)]
    for i, study in enumerate(studies):
        push(store, study, ("flow",))
        store.index.close_run("flow", f"{study.study_uid}.1", study.study_uid)
        run_folder(store, "flow", f"{study.study_uid}.1")
        time.sleep(0.02)
    failed = studies[0].study_uid
    states = {f"{s.study_uid}.1": ("failed" if s.study_uid == failed else "success") for s in studies}
    plan = retention.plan(retention.gather(store.index, store.layout, lambda d, r: states[r]),
                          Policy(30 * DAY, 90 * DAY, 7 * DAY, low_water=10 ** 15), time.time(), free_bytes=1)
    readings = iter([1, 1, 10 ** 16])  # free bytes measured before each early deletion: above after two
    outcome = retention.purge(plan, store.index, store.layout, actor="test", free=lambda: next(readings))
    gone = [d.verdict.study_uid for d in outcome.deleted]
    assert gone == [studies[1].study_uid, studies[2].study_uid] and all(d.early for d in outcome.deleted)
    assert len(store.index.instances(failed)) == 1  # failed runs are kept for investigation
    assert "below the low-water mark" in outcome.low_water_alert
    (alert,) = [r for r in store.index.audit_records() if r.event == "disk_low"]
    assert alert.detail["studies"] == 2
