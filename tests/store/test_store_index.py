"""The index: instances, run generations, the trigger outbox, and concurrent writers."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from raddeploy_provider.store import NEVER, RunRef, StoredInstance, StudyIndex, run_id_for

STUDY = "1.2.826.0.1.1"
OTHER_STUDY = "1.2.826.0.1.2"


def inst(n: int, study: str = STUDY, series: str = "1.2.3", **tags: object) -> StoredInstance:
    return StoredInstance(
        sop_uid=f"1.2.3.{n}", study_uid=study, series_uid=series, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1", path=f"studies/{study}/{series}/1.2.3.{n}.dcm", size=100 + n,
        sha256=f"{n:064x}", received_at=time.time(), tags={"Modality": "CT", **tags},
        calling_ae="SCANNER", peer="10.0.0.1:104",
    )


@pytest.fixture
def index(tmp_path: Path) -> StudyIndex:
    idx = StudyIndex(tmp_path / "data" / "index.sqlite3")
    yield idx
    idx.close()


def test_rows_round_trip(index: StudyIndex) -> None:
    row = inst(1, ImageType=["ORIGINAL", "PRIMARY"], SeriesDescription="Head")
    assert index.add(row, {}).duplicate is False
    assert index.instances(STUDY) == [row]
    assert index.instances_by_sop(["1.2.3.1", "9.9"]) == {"1.2.3.1": row}
    assert index.instances_by_sop([]) == {}
    assert index.instances(OTHER_STUDY) == []
    assert index.last_received(STUDY) == row.received_at
    assert index.last_received(OTHER_STUDY) is None


def test_reopening_the_database_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    first = StudyIndex(path)
    first.add(inst(1), {"flow": NEVER})
    first.close()
    again = StudyIndex(path)  # the schema script runs again: must be harmless
    assert [i.sop_uid for i in again.instances(STUDY)] == ["1.2.3.1"]
    assert again.runs() == [RunRef("flow", f"{STUDY}.1", STUDY, 1)]
    again.close()


def test_same_sop_twice_is_a_duplicate_and_opens_nothing(index: StudyIndex) -> None:
    assert index.add(inst(1), {"flow": NEVER}).opened == [RunRef("flow", f"{STUDY}.1", STUDY, 1)]
    index.close_run("flow", f"{STUDY}.1", STUDY)
    result = index.add(inst(1), {"flow": NEVER})
    assert result.duplicate is True and result.opened == []
    assert len(index.runs()) == 1


def test_generations(index: StudyIndex) -> None:
    run1 = RunRef("flow", f"{STUDY}.1", STUDY, 1)
    assert run_id_for(STUDY, 1) == f"{STUDY}.1"
    assert index.add(inst(1), {"flow": NEVER}).opened == [run1]
    assert run1.conf == {"study_uid": STUDY, "generation": 1}
    assert index.run_state("flow", run1.run_id) == "open"

    # an open run collects: more instances open nothing
    assert index.add(inst(2), {"flow": NEVER}).opened == []
    assert index.add(inst(3), {"flow": NEVER}).opened == []

    closed = index.close_run("flow", run1.run_id, STUDY)
    assert [i.sop_uid for i in closed] == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    assert index.run_state("flow", run1.run_id) == "closing"

    # after the close, a new instance opens the next generation
    run2 = RunRef("flow", f"{STUDY}.2", STUDY, 2)
    assert index.add(inst(4), {"flow": NEVER}).opened == [run2]
    assert index.add(inst(5), {"flow": NEVER}).opened == []
    assert [r.run_id for r in index.runs("flow")] == [f"{STUDY}.1", f"{STUDY}.2"]

    # closing again returns the study as of that moment, and changes nothing for run 1
    assert [i.sop_uid for i in index.close_run("flow", run2.run_id, STUDY)] == [f"1.2.3.{n}" for n in range(1, 6)]
    assert index.close_run("flow", run1.run_id, STUDY) and index.run_state("flow", run1.run_id) == "closing"
    assert index.add(inst(6), {"flow": NEVER}).opened == [RunRef("flow", f"{STUDY}.3", STUDY, 3)]


def test_flows_and_studies_have_their_own_runs(index: StudyIndex) -> None:
    assert [r.dag_id for r in index.add(inst(1), {"a": NEVER, "b": NEVER}).opened] == ["a", "b"]
    index.close_run("a", f"{STUDY}.1", STUDY)
    assert index.add(inst(2), {"a": NEVER, "b": NEVER}).opened == [RunRef("a", f"{STUDY}.2", STUDY, 2)]
    assert index.add(inst(3, study=OTHER_STUDY), {"a": NEVER}).opened == [RunRef("a", f"{OTHER_STUDY}.1", OTHER_STUDY, 1)]
    assert index.add(inst(4), {}).opened == []
    assert {(r.dag_id, r.run_id) for r in index.runs()} == {
        ("a", f"{STUDY}.1"), ("b", f"{STUDY}.1"), ("a", f"{STUDY}.2"), ("a", f"{OTHER_STUDY}.1")}
    assert [r.run_id for r in index.runs("b")] == [f"{STUDY}.1"]


def test_close_run_of_a_run_triggered_by_hand(index: StudyIndex) -> None:
    index.add(inst(1), {})
    index.add(inst(2), {})
    manual = "manual__2024-05-01T10:00:00+00:00"
    assert index.run_state("flow", manual) is None

    closed = index.close_run("flow", manual, STUDY)

    assert [i.sop_uid for i in closed] == ["1.2.3.1", "1.2.3.2"]
    assert index.run_state("flow", manual) == "closing"
    assert RunRef("flow", manual, STUDY, 0) in index.runs("flow")
    # the manual run is not collecting: the listener's next instance opens generation 1
    assert index.add(inst(3), {"flow": NEVER}).opened == [RunRef("flow", f"{STUDY}.1", STUDY, 1)]
    # a retried sensor closing the same manual run again is harmless
    assert len(index.close_run("flow", manual, STUDY)) == 3
    assert [r.run_id for r in index.runs("flow")].count(manual) == 1
    # nothing was put in the outbox for the manual run: Airflow already has it
    assert [i.run_id for i in index.pending_triggers()] == [f"{STUDY}.1"]


def test_close_run_of_an_unknown_study_is_empty(index: StudyIndex) -> None:
    assert index.close_run("flow", "manual__x", "1.2.999") == []


def test_outbox(index: StudyIndex, tmp_path: Path) -> None:
    index.add(inst(1), {"a": NEVER, "b": NEVER})
    index.close_run("a", f"{STUDY}.1", STUDY)
    index.add(inst(2), {"a": NEVER, "b": NEVER})

    pending = index.pending_triggers()
    assert [(p.dag_id, p.run_id, p.conf, p.attempts) for p in pending] == [
        ("a", f"{STUDY}.1", {"study_uid": STUDY, "generation": 1}, 0),
        ("b", f"{STUDY}.1", {"study_uid": STUDY, "generation": 1}, 0),
        ("a", f"{STUDY}.2", {"study_uid": STUDY, "generation": 2}, 0),
    ]
    assert [p.run_id for p in index.pending_triggers(limit=1)] == [f"{STUDY}.1"]

    first, second, third = pending
    index.mark_failed_attempt(first.id, "connection refused " * 100)
    index.mark_failed_attempt(first.id, "HTTP 503")
    index.mark_delivered(second.id)

    still = index.pending_triggers()
    assert [(p.id, p.attempts) for p in still] == [(first.id, 2), (third.id, 0)]

    index.mark_delivered(first.id)
    assert [p.id for p in index.pending_triggers()] == [third.id]

    with sqlite3.connect(index.path) as db:
        rows = dict((r[0], r[1:]) for r in db.execute(
            "SELECT id, attempts, last_error, delivered_at IS NOT NULL FROM outbox"))
    assert rows[first.id] == (3, "", 1)  # delivered clears the error
    assert rows[second.id] == (1, "", 1)
    assert rows[third.id] == (0, "", 0)


def test_failed_attempt_keeps_a_short_error(index: StudyIndex) -> None:
    index.add(inst(1), {"a": NEVER})
    [item] = index.pending_triggers()
    index.mark_failed_attempt(item.id, "x" * 2000)
    with sqlite3.connect(index.path) as db:
        [(error,)] = db.execute("SELECT last_error FROM outbox").fetchall()
    assert error == "x" * 500


def test_concurrent_writers(index: StudyIndex) -> None:
    """pynetdicom serves each association in its own thread: one run, every row present."""
    threads_n, per_thread = 8, 25
    opened: list[RunRef] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads_n)

    def writer(t: int) -> None:
        try:
            barrier.wait()
            for k in range(per_thread):
                result = index.add(inst(t * 1000 + k, series=f"1.2.3.{t}"), {"flow_a": NEVER, "flow_b": NEVER})
                with lock:
                    opened.extend(result.opened)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            index.close()  # this thread's connection

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert len(index.instances(STUDY)) == threads_n * per_thread
    assert sorted(opened, key=lambda r: r.dag_id) == [RunRef("flow_a", f"{STUDY}.1", STUDY, 1),
                                                      RunRef("flow_b", f"{STUDY}.1", STUDY, 1)]
    assert len(index.runs()) == 2 and len(index.pending_triggers()) == 2


def test_concurrent_writers_and_a_closing_sensor(index: StudyIndex) -> None:
    """Every instance lands in the run being closed or opens the next generation."""
    closed_with: list[set[str]] = []
    done = threading.Event()

    def sensor() -> None:
        generation = 1
        while not done.is_set() or index.run_state("flow", run_id_for(STUDY, generation)) == "open":
            if index.run_state("flow", run_id_for(STUDY, generation)) == "open":
                closed_with.append({i.sop_uid for i in index.close_run("flow", run_id_for(STUDY, generation), STUDY)})
                generation += 1
        index.close()

    def writer(t: int) -> None:
        for k in range(30):
            index.add(inst(t * 1000 + k), {"flow": NEVER})
        index.close()

    watcher = threading.Thread(target=sensor)
    watcher.start()
    writers = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    done.set()
    watcher.join(timeout=30)
    assert not watcher.is_alive()

    all_sops = {i.sop_uid for i in index.instances(STUDY)}
    assert len(all_sops) == 120
    runs = index.runs("flow")
    assert [r.generation for r in runs] == list(range(1, len(runs) + 1))
    assert len(closed_with) == len(runs)
    # the last close saw everything; each close saw at least what the one before saw
    assert closed_with[-1] == all_sops
    assert all(a <= b for a, b in zip(closed_with, closed_with[1:]))


def test_refused_triggers_wait_their_own_back_off_and_newer_ones_come_first(index: StudyIndex) -> None:
    for n in range(3):
        index.add(inst(n, study=f"1.2.826.0.9.{n}"), {"gone_flow": NEVER})
    refused = index.pending_triggers()
    assert len(refused) == 3
    now = time.time()
    for item in refused:
        assert index.mark_refused(item.id, "HTTP 404: DAG not found", now + 60, give_up_after=3600) is False
    index.add(inst(9, study="1.2.826.0.9.9"), {"good_flow": NEVER})
    assert [i.dag_id for i in index.pending_triggers()] == ["good_flow"]  # the refused wait; the new one flows
    assert [i.dag_id for i in index.pending_triggers(now=now + 61)] == ["good_flow"] + ["gone_flow"] * 3
    assert index.next_trigger_due() <= time.time()
    later = index.pending_triggers(now=now + 61)[1]
    assert (later.attempts, later.last_error) == (1, "HTTP 404: DAG not found")
    assert later.first_refused_at is not None and later.first_refused_at <= time.time()


def test_a_trigger_refused_longer_than_the_give_up_time_is_given_up(index: StudyIndex) -> None:
    index.add(inst(1), {"gone_flow": NEVER})
    [item] = index.pending_triggers()
    assert index.mark_refused(item.id, "HTTP 404", time.time(), give_up_after=0.2) is False
    time.sleep(0.25)  # the give-up time is measured from the first refusal: let it pass
    assert index.mark_refused(item.id, "HTTP 404", time.time(), give_up_after=0.2) is True
    assert index.pending_triggers(now=time.time() + 1e6) == [] and index.next_trigger_due() is None
    assert [(g.run_id, g.attempts) for g in index.given_up_triggers()] == [(f"{STUDY}.1", 2)]


def test_an_index_made_before_the_outbox_back_off_gets_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:  # the outbox table as the first release made it
        db.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, dag_id TEXT NOT NULL, run_id TEXT "
                   "NOT NULL, conf TEXT NOT NULL, created_at REAL NOT NULL, delivered_at REAL, attempts INTEGER NOT "
                   "NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '', UNIQUE (dag_id, run_id))")
        db.execute("INSERT INTO outbox (dag_id, run_id, conf, created_at) VALUES ('f', 'r.1', '{}', 1)")
    index = StudyIndex(path)
    [item] = index.pending_triggers()
    assert (item.dag_id, item.attempts, item.first_refused_at) == ("f", 0, None)
    assert index.mark_refused(item.id, "HTTP 404", time.time() + 30, give_up_after=60) is False
    index.close()
