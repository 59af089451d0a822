"""The index: instances, run generations, the trigger outbox, and concurrent writers, on both
backends (SQLite, PostgreSQL: the ``index_backend`` fixture); the backends' own matters last."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from peers import wait_for
from postgres import query, run_sql
from raddeploy_provider.store import NEVER, IndexUnavailable, RunRef, StoredInstance, StudyIndex, run_id_for

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
def target(index_url: str | None, tmp_path: Path) -> Path | str:
    """Where the test's index is: a fresh PostgreSQL schema, or an SQLite file."""
    return index_url or tmp_path / "data" / "index.sqlite3"


@pytest.fixture
def index(target: Path | str) -> StudyIndex:
    idx = StudyIndex(target)
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


def test_reopening_the_database_keeps_everything(target: Path | str) -> None:
    first = StudyIndex(target)
    first.add(inst(1), {"flow": NEVER})
    first.close()
    again = StudyIndex(target)  # the schema script runs again: must be harmless
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

    rows = {r[0]: r[1:] for r in query(index.target, "SELECT id, attempts, last_error, delivered_at IS NOT NULL "
                                                      "FROM outbox")}
    assert rows[first.id] == (3, "", 1)  # delivered clears the error
    assert rows[second.id] == (1, "", 1)
    assert rows[third.id] == (0, "", 0)


def test_failed_attempt_keeps_a_short_error(index: StudyIndex) -> None:
    index.add(inst(1), {"a": NEVER})
    [item] = index.pending_triggers()
    index.mark_failed_attempt(item.id, "x" * 2000)
    [(error,)] = query(index.target, "SELECT last_error FROM outbox")
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
            index.release()  # this thread's connection

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
        index.release()

    def writer(t: int) -> None:
        for k in range(30):
            index.add(inst(t * 1000 + k), {"flow": NEVER})
        index.release()

    race(sensor, writer, 4, done, timeout=30)

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


#: The outbox table as the first release made it, before ADDED_COLUMNS (PostgreSQL: as such
#: a release would have made it; a column added later meets this case).
OLD_OUTBOX = {
    "sqlite": "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, dag_id TEXT NOT NULL, run_id TEXT "
              "NOT NULL, conf TEXT NOT NULL, created_at REAL NOT NULL, delivered_at REAL, attempts INTEGER NOT "
              "NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '', UNIQUE (dag_id, run_id))",
    "postgresql": "CREATE TABLE outbox (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, dag_id TEXT NOT "
                  "NULL, run_id TEXT NOT NULL, conf TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, "
                  "delivered_at DOUBLE PRECISION, attempts BIGINT NOT NULL DEFAULT 0, last_error TEXT NOT NULL "
                  "DEFAULT '', UNIQUE (dag_id, run_id))",
}


def test_an_index_made_before_the_outbox_back_off_gets_its_columns(target: Path | str, index_backend: str) -> None:
    if isinstance(target, Path):
        target.parent.mkdir(parents=True)
    run_sql(target, OLD_OUTBOX[index_backend],
            "INSERT INTO outbox (dag_id, run_id, conf, created_at) VALUES ('f', 'r.1', '{}', 1)")
    index = StudyIndex(target)
    [item] = index.pending_triggers()
    assert (item.dag_id, item.attempts, item.first_refused_at) == ("f", 0, None)
    assert index.mark_refused(item.id, "HTTP 404", time.time() + 30, give_up_after=60) is False
    index.close()
    StudyIndex(target).close()  # and opened again, it has them already


# -- several processes at once (each StudyIndex its own connections, as another process's) ------

def test_processes_opening_a_new_index_at_once_make_it_once(target: Path | str) -> None:
    """The schema is made under a lock: CREATE TABLE IF NOT EXISTS alone is not safe when two
    sessions run it at the same time (PostgreSQL: a duplicate key in its catalog)."""
    barrier = threading.Barrier(8)
    opened: list[StudyIndex] = []
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            barrier.wait()
            opened.append(StudyIndex(target))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    opened[0].add(inst(1), {"flow": NEVER})
    assert all(len(i.instances(STUDY)) == 1 for i in opened)
    for i in opened:
        i.close()


def test_many_writers_of_one_study_in_several_processes_open_one_run(target: Path | str) -> None:
    """32 threads over 4 indexes (4 processes' worth; more threads than PostgreSQL connections),
    each adding instances of one study at once: one run and one trigger per flow, every row."""
    indexes = [StudyIndex(target) for _ in range(4)]
    barrier = threading.Barrier(32)
    opened: list[RunRef] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer(t: int) -> None:
        index = indexes[t % len(indexes)]
        try:
            barrier.wait()
            for k in range(5):
                result = index.add(inst(t * 100 + k, series=f"1.2.3.{t}"), {"flow_a": NEVER, "flow_b": NEVER})
                with lock:
                    opened.extend(result.opened)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            index.release()

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert sorted(opened, key=lambda r: r.dag_id) == [RunRef("flow_a", f"{STUDY}.1", STUDY, 1),
                                                      RunRef("flow_b", f"{STUDY}.1", STUDY, 1)]
    assert len(indexes[0].instances(STUDY)) == 32 * 5
    assert query(target, "SELECT dag_id, run_id FROM outbox ORDER BY dag_id") == [
        ("flow_a", f"{STUDY}.1"), ("flow_b", f"{STUDY}.1")]
    for index in indexes:
        index.close()


def test_a_sensor_closing_runs_while_other_processes_add(target: Path | str) -> None:
    """The sensor (its own process) closes each generation while two listeners' threads add:
    every instance is in the run that was closed, or in the next generation's."""
    sensor_index, writers_index = StudyIndex(target), [StudyIndex(target), StudyIndex(target)]
    closed_with: dict[int, set[str]] = {}
    done = threading.Event()

    def sensor() -> None:
        generation = 1
        while not done.is_set() or sensor_index.run_state("flow", run_id_for(STUDY, generation)) == "open":
            if sensor_index.run_state("flow", run_id_for(STUDY, generation)) == "open":
                taken = sensor_index.close_run("flow", run_id_for(STUDY, generation), STUDY)
                closed_with[generation] = {i.sop_uid for i in taken}
                generation += 1

    added: dict[str, int] = {}  # SOP Instance UID -> the generation open when its add committed (0: none opened)
    lock = threading.Lock()

    def writer(t: int) -> None:
        index = writers_index[t % 2]
        for k in range(25):
            row = inst(t * 1000 + k)
            result = index.add(row, {"flow": NEVER})
            with lock:
                added[row.sop_uid] = result.opened[0].generation if result.opened else 0
        index.release()

    race(sensor, writer, 6, done, timeout=60)

    generations = sorted(closed_with)
    assert generations == list(range(1, len(generations) + 1))
    assert closed_with[generations[-1]] == set(added)  # the last close saw everything
    for sop, opened_generation in added.items():
        first_close = min(g for g in generations if sop in closed_with[g])  # in some closed run, always
        # ... and no later than the generation open after its add: an instance that opened
        # generation g is in g's close (it was added before g was closed)
        assert opened_generation == 0 or first_close == opened_generation
    assert all(closed_with[a] <= closed_with[b] for a, b in zip(generations, generations[1:]))
    for index in (sensor_index, *writers_index):
        index.close()


# -- the backends' own matters ----------------------------------------------------------------

postgresql_only = pytest.mark.parametrize("index_backend", ["postgresql"])


@postgresql_only
def test_postgresql_columns_hold_what_sqlite_does(index: StudyIndex) -> None:
    """Times are 8-byte floats (PostgreSQL's REAL has 4: a received time would lose its seconds),
    sizes and counts 8-byte integers."""
    types = dict(query(index.target, "SELECT table_name || '.' || column_name, data_type FROM "
                                     "information_schema.columns WHERE table_schema = current_schema()"))
    assert {types[c] for c in ("instances.received_at", "runs.opened_at", "outbox.next_attempt_at",
                               "receiving.last_seen")} == {"double precision"}
    assert {types[c] for c in ("instances.size", "runs.generation", "outbox.attempts", "outbox.id")} == {"bigint"}
    row = inst(1)
    index.add(row, {})
    assert index.instances(STUDY)[0].received_at == row.received_at  # every bit


@postgresql_only
def test_postgresql_connections_are_a_small_shared_pool(postgres, index_url: str) -> None:
    """64 threads at once use at most POOL_SIZE connections (the listener: up to 200 associations)."""
    from raddeploy_provider.store.index import POOL_SIZE

    url = index_url + "&application_name=pool_test"
    index = StudyIndex(url)
    peak = 0
    barrier = threading.Barrier(64)

    def work(t: int) -> None:
        barrier.wait()
        for k in range(5):
            index.add(inst(t * 10 + k), {"flow": NEVER})

    def count() -> int:
        return query(postgres.url(), "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = 'pool_test'")[0][0]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(64)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, count())
    assert 1 <= peak <= POOL_SIZE and len(index.instances(STUDY)) == 320
    index.close()
    # close() closed the pool: the server's backends end a moment after their clients hang up.
    wait_for(lambda: count() == 0, 15, "the pool's connections to end")


@postgresql_only
def test_durable_false_commits_without_waiting_for_the_disk(index_url: str) -> None:
    """durable=True leaves the server's synchronous commits (on here, as by default), False turns them off."""
    url = index_url + "%20-csynchronous_commit%3Don"  # the test server's default is off
    for durable, setting in ((True, "on"), (False, "off")):
        index = StudyIndex(url, durable=durable)
        with index._read() as db:
            assert db.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"] == setting
        index.close()


@pytest.mark.parametrize("problem", ["no server", "wrong password", "no such database"])
def test_an_index_that_cannot_be_reached_says_where_and_what_to_do(postgres, problem: str) -> None:
    from peers import free_port

    url = {"no server": f"postgresql://raddeploy:s3cr3t-pw@127.0.0.1:{free_port()}/postgres",
           "wrong password": postgres.url().replace("index-test-secret", "s3cr3t-pw"),
           "no such database": postgres.url("nothere").replace("index-test-secret", "s3cr3t-pw")}[problem]
    with pytest.raises(IndexUnavailable) as raised:
        StudyIndex(url)
    message = str(raised.value)
    assert "s3cr3t-pw" not in message and "s3cr3t-pw" not in repr(raised.value.__cause__)
    assert "PostgreSQL database" in message and "127.0.0.1" in message and "RADDEPLOY_INDEX_URL" in message


@postgresql_only
def test_lost_server_connections_fail_a_call_then_the_pool_recovers(postgres, index_url: str) -> None:
    """The server restarted (its connections cut): a call fails as IndexUnavailable (the listener
    answers "out of resources", the sender retries), and the calls after it reconnect."""
    url = index_url + "&application_name=cut_test"
    index = StudyIndex(url)
    index.add(inst(1), {"flow": NEVER})
    postgres.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'cut_test'")
    failures = 0
    for n in range(2, 2 + 10):
        try:
            index.add(inst(n), {"flow": NEVER})
        except IndexUnavailable as exc:
            assert "PostgreSQL database" in str(exc)
            failures += 1
    assert 1 <= failures <= 8  # once per connection the pool held (at most POOL_SIZE)
    assert len(index.instances(STUDY)) == 11 - failures and len(index.runs()) == 1
    index.close()


def test_sqlite_index_is_a_wal_file_where_it_was_asked(tmp_path: Path) -> None:
    path = tmp_path / "data" / "index.sqlite3"
    index = StudyIndex(path)
    index.add(inst(1), {})
    assert index.where == f"SQLite {path}"
    assert query(path, "PRAGMA journal_mode") == [("wal",)]
    index.close()


def test_an_index_target_is_a_path_or_a_postgresql_url(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="postgresql:// URL or the path of an SQLite file, not mysql://"):
        StudyIndex("mysql://u:pw@h/db")


def race(sensor, writer, writers: int, done: threading.Event, timeout: float) -> None:
    """``sensor`` in a thread of its own while ``writers`` threads run ``writer(t)``; when they are
    done, ``done`` tells the sensor to finish, which it must within ``timeout``."""
    watcher = threading.Thread(target=sensor)
    watcher.start()
    threads = [threading.Thread(target=writer, args=(t,)) for t in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    watcher.join(timeout=timeout)
    assert not watcher.is_alive()
