"""The header index, the run register and the trigger outbox, in one database: SQLite in the
data dir (WAL), or PostgreSQL when ``RADDEPLOY_INDEX_URL`` names one.

One database so that "index this instance" and "open a run for it" commit in the same
transaction: the listener can crash at any point and either both happened or neither did.
The fingerprint sensor closes a run in a transaction of its own before it reads the study,
so every instance lands in the run being closed or opens the next generation (the
invariant in docs/architecture.md).

Two backends, one :class:`StudyIndex`: SQLite for one machine (the default; a file in the
data dir), PostgreSQL when the listener, the workers and the triggerer run on several hosts
(the data dir is then on NFS, where an SQLite file must not be shared: its locks do not hold
there). The SQL is written once, with ``?`` marks, in the words both dialects share (upserts,
``FILTER``, ``DOUBLE PRECISION``); what they spell differently lives in :class:`_SQLite` and
:class:`_Postgres`, and nowhere else. The transactions that open or close runs are
serialised per study: SQLite has one writer at a time anyway (``BEGIN IMMEDIATE``), PostgreSQL
takes an advisory lock on the study in the transaction (:meth:`_Postgres.transaction`), at
READ COMMITTED, so every statement after it sees every commit before it. What fails because
the database cannot take the work now (locked, full, unreachable) is raised as one type,
:class:`IndexUnavailable`, whichever backend said it.

Connections: SQLite's are per thread (the listener serves each association in a thread of
its own; a sensor or trigger may check from several); PostgreSQL's come from a small pool
per index that all threads share (up to 200 associations, and the server's default
``max_connections`` is 100), and its transactions are pipelined (the eight or so statements
of an :meth:`StudyIndex.add` wait for the server a few times, not once each).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol, Sequence

from . import audit
from .errors import IndexUnavailable, OtherPatient

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

#: The tables, in the types both dialects read alike: ``DOUBLE PRECISION`` (PostgreSQL's REAL
#: is 4 bytes; SQLite gives it REAL affinity), ``BIGINT`` (SQLite: INTEGER affinity). Only the
#: outbox's own id differs: ``{serial}`` (the backend's ``serial``).
SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path TEXT NOT NULL,            -- relative to the data dir
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,          -- '' until the listener's hasher gets to it
    received_at DOUBLE PRECISION NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    peer TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL             -- JSON: keyword -> text or list of texts
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid, received_at);
CREATE INDEX IF NOT EXISTS instances_unhashed ON instances (sha256) WHERE sha256 = '';
CREATE TABLE IF NOT EXISTS runs (
    dag_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    generation BIGINT NOT NULL,
    state TEXT NOT NULL,           -- open: collecting; closing: its sensor took the input (later
                                   -- instances open the next generation); abandoned: left open past
                                   -- its flow's timeout, replaced by the next generation
    opened_at DOUBLE PRECISION NOT NULL,
    closed_at DOUBLE PRECISION,
    PRIMARY KEY (dag_id, run_id)
);
CREATE INDEX IF NOT EXISTS runs_study ON runs (dag_id, study_uid, state);
CREATE TABLE IF NOT EXISTS receiving (   -- associations still sending a study
    study_uid TEXT NOT NULL,
    association TEXT NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (study_uid, association)
);
CREATE TABLE IF NOT EXISTS outbox (
    id {serial},
    dag_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    conf TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    delivered_at DOUBLE PRECISION,
    attempts BIGINT NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0, -- a refused trigger waits (its own back-off)
    first_refused_at DOUBLE PRECISION,                   -- when Airflow first refused it
    given_up_at DOUBLE PRECISION,                        -- refused for longer than the give-up time: not retried
    UNIQUE (dag_id, run_id)
);
""" + audit.TABLE

#: (table, column, declaration) of every column added to SCHEMA after its first release, in
#: order: an index made by an older version gets them when it is opened (SCHEMA's CREATE TABLE
#: IF NOT EXISTS leaves an existing table as it is).
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("outbox", "next_attempt_at", "DOUBLE PRECISION NOT NULL DEFAULT 0"),
    ("outbox", "first_refused_at", "DOUBLE PRECISION"),
    ("outbox", "given_up_at", "DOUBLE PRECISION"),
    # retention deleted the study's instances and run folders; the row stays, so that the study
    # sent again opens the next generation (a new run id) and never an old one Airflow knows
    ("runs", "purged_at", "DOUBLE PRECISION"),
)

#: The columns of ``instances``, in SCHEMA's order (StoredInstance's fields by these names).
INSTANCE_COLUMNS = ("sop_uid", "study_uid", "series_uid", "sop_class_uid", "transfer_syntax", "path", "size",
                    "sha256", "received_at", "calling_ae", "peer", "tags")


@dataclass(frozen=True)
class StoredInstance:
    """One index row. ``path`` is relative to the data dir so the dir can move between hosts."""

    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    size: int
    sha256: str
    received_at: float
    tags: dict[str, Any] = field(default_factory=dict)
    calling_ae: str = ""
    peer: str = ""  # "<address>:<port>" of the association that sent it

    @property
    def peer_host(self) -> str:
        return peer_host(self.peer)


@dataclass(frozen=True)
class RunRef:
    """A run of one flow on one study generation; ``run_id`` is ``<StudyUID>.<generation>``."""

    dag_id: str
    run_id: str
    study_uid: str
    generation: int

    @property
    def conf(self) -> dict[str, Any]:
        """The ``dag_run.conf`` Airflow gets: UIDs only, never patient data."""
        return {"study_uid": self.study_uid, "generation": self.generation}


@dataclass(frozen=True)
class RegisteredRun(RunRef):
    """A run as the register holds it: ``state`` open, closing or abandoned (see SCHEMA)."""

    state: str = "open"
    opened_at: float = 0.0
    closed_at: float | None = None


@dataclass(frozen=True)
class StudySummary:
    """What the index holds of one study (no header values but UIDs, unless ``patient_name`` was asked for)."""

    study_uid: str
    first_received: float
    last_received: float
    instances: int
    series: int
    size: int
    calling_ae: str  # the sender of its first instance
    patient_name: str | None = None


@dataclass(frozen=True)
class AddResult:
    """What indexing one instance did."""

    duplicate: bool  # the SOP instance was already indexed (``existing``); nothing was added
    opened: list[RunRef]
    existing: StoredInstance | None = None
    replaced: StoredInstance | None = None  # the version this one superseded (``replaces`` of add())


@dataclass(frozen=True)
class OutboxItem:
    id: int
    dag_id: str
    run_id: str
    conf: dict[str, Any]
    attempts: int
    first_refused_at: float | None = None
    last_error: str = ""


def patient_id(tags: Mapping[str, Any]) -> str:
    """The Patient ID as the one-patient-per-study rule compares it: the text without DICOM's
    padding, "" when absent or empty (so empty and set differ); several values joined by ``\\``."""
    value = tags.get("PatientID", "")
    if isinstance(value, list):
        return "\\".join(str(v).strip(" \x00") for v in value)
    return str(value if value is not None else "").strip(" \x00")


def peer_host(peer: str) -> str:
    """The address of a peer written ``<address>:<port>``, without the (ephemeral) port."""
    return peer.rpartition(":")[0]


#: ``abandon_after`` for a flow whose open runs are never taken as abandoned.
NEVER = math.inf


def run_id_for(study_uid: str, generation: int) -> str:
    return f"{study_uid}.{generation}"


class StudyIndex:
    """Thread-safe access to the index at ``target``: an SQLite file (a path), or a PostgreSQL
    database (a ``postgresql://user:password@host:port/db`` URL).

    ``durable``: each commit is on disk before it returns (SQLite ``synchronous=FULL``,
    PostgreSQL ``synchronous_commit`` as the server has it, on by default); when False, on
    its way there (``NORMAL``; ``synchronous_commit=off``): a crash of the process loses
    nothing, a crash of the machine may lose the last commits, never consistency. Opening
    creates the tables (or adds :data:`ADDED_COLUMNS` to an older index), safe while other
    processes open the same index.
    """

    def __init__(self, target: Path | str, durable: bool = True) -> None:
        self._backend: _SQLite | _Postgres = open_backend(target, durable)
        self.target = target
        self.durable = durable
        #: What this index is, for messages: never a password.
        self.where = self._backend.where
        self._patient_sql = ("SELECT " + self._backend.json_text("tags", "PatientID") + " AS id FROM instances "
                             "WHERE study_uid = ? AND sop_uid != ? LIMIT 1")
        with self._unavailable_as_ours(), self._backend.schema_transaction() as db:
            db.execute_script(SCHEMA.format(serial=self._backend.serial))
            for table, column, declaration in ADDED_COLUMNS:
                if column not in self._backend.columns(db, table):
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            db.execute_script(self._backend.append_only)

    @contextmanager
    def _unavailable_as_ours(self) -> Iterator[None]:
        """The backend's "cannot do it now" (locked, full, unreachable) as :class:`IndexUnavailable`."""
        try:
            yield
        except self._backend.unavailable as exc:
            raise IndexUnavailable(f"the study index ({self.where}) cannot be used now: "
                                   f"{self._backend.scrub(str(exc)).strip()}") from exc

    @contextmanager
    def _read(self) -> Iterator[_Session]:
        """A connection for statements that read (each sees what was committed when it ran)."""
        with self._unavailable_as_ours(), self._backend.session() as db:
            yield db

    @contextmanager
    def _tx(self, study_uid: str = "", sop_uid: str = "") -> Iterator[_Session]:
        """One transaction, serialised with every other that names the same study (those that
        open or close its runs, or check its patient) or the same SOP instance (whose row may be
        in another study, if it was sent with another Study Instance UID)."""
        locks = ([f"study {study_uid}"] if study_uid else []) + ([f"sop {sop_uid}"] if sop_uid else [])
        with self._unavailable_as_ours(), self._backend.transaction(locks) as db:
            yield db

    def release(self) -> None:
        """The calling thread is done with the index for now (its association ended): its SQLite
        connection is closed. PostgreSQL's connections are the pool's, returned after each call."""
        self._backend.release()

    def close(self) -> None:
        """Done with the index: SQLite closes the calling thread's connection (other threads'
        close with :meth:`release` or as their threads end), PostgreSQL closes the pool. A
        later call opens them again."""
        self._backend.close()

    # -- instances ---------------------------------------------------------------------
    def add(self, inst: StoredInstance, abandon_after: Mapping[str, float], association: str = "",
            place: Callable[[], None] | None = None, replaces: str | None = None) -> AddResult:
        """Index ``inst`` and open a run for each flow in ``abandon_after`` that has none collecting.

        ``abandon_after`` maps the DAG id of each flow the instance is relevant to, to the
        seconds after which a run still "open" is taken as abandoned (its DAG run was deleted
        or failed before its sensor closed it; :data:`NEVER` for never), so a study is never
        locked out of a flow for good. A re-sent identical instance changes nothing and opens
        nothing, so pushing the same study twice never runs a flow twice. ``association``
        marks the study as still being sent until :meth:`association_ended`. ``place`` (put
        the file where ``inst.path`` says) runs inside the transaction, once the instance is
        known to be new: one round trip, and no other writer can index the same instance in
        between.

        ``replaces``: the path of the indexed version of this SOP instance that the caller found
        to hold other bytes; ``inst`` (at a path of its own) then takes its row and opens runs as
        a new instance does. If the row no longer has that path, nothing changes (``duplicate``,
        with the row as it is now). Raises :class:`OtherPatient`, before anything is placed, if
        the study's other instances have another Patient ID (:func:`patient_id`).
        """
        with self._tx(inst.study_uid, sop_uid=inst.sop_uid) as db:
            # Every read is sent before the first answer is read: PostgreSQL gets them in one round
            # trip with the lock (its transactions are pipelined), SQLite reads each at once.
            found = db.execute("SELECT * FROM instances WHERE sop_uid = ?", (inst.sop_uid,))
            same_study = db.execute(self._patient_sql, (inst.study_uid, inst.sop_uid))
            runs = {dag_id: db.execute(_RUNS_OF_STUDY, (time.time() - after, dag_id, inst.study_uid))
                    for dag_id, after in abandon_after.items()}
            row = found.fetchone()
            if row is not None and (replaces is None or row["path"] != replaces):
                return AddResult(duplicate=True, opened=[], existing=_instance(row))
            _check_patient(same_study.fetchone(), inst)
            if place is not None:
                place()
            if association:
                db.execute(_UPSERT_RECEIVING, (inst.study_uid, association, inst.received_at))
            # the upsert: a new version takes the row of the one it supersedes (``replaces``)
            db.execute(_UPSERT_INSTANCE, (
                inst.sop_uid, inst.study_uid, inst.series_uid, inst.sop_class_uid,
                inst.transfer_syntax, inst.path, inst.size, inst.sha256, inst.received_at,
                inst.calling_ae, inst.peer, json.dumps(inst.tags, separators=(",", ":"))))
            opened = [run for dag_id, runs_now in runs.items()
                      if (run := self._open_run(db, dag_id, inst, runs_now.fetchone()))]
        return AddResult(duplicate=False, opened=opened, replaced=_instance(row) if row is not None else None)

    def _open_run(self, db: _Session, dag_id: str, inst: StoredInstance, runs_now: Mapping[str, Any]) -> RunRef | None:
        """Open the next generation unless a run is collecting; ``runs_now``: :data:`_RUNS_OF_STUDY`'s row.
        The audit trail records it in the same transaction."""
        if runs_now["n_open"]:
            return None
        study_uid = inst.study_uid
        db.execute("UPDATE runs SET state = 'abandoned' WHERE dag_id = ? AND study_uid = ? AND state = 'open'",
                   (dag_id, study_uid))
        generation = (runs_now["g"] or 0) + 1
        run = RunRef(dag_id, run_id_for(study_uid, generation), study_uid, generation)
        now = time.time()
        db.execute("INSERT INTO runs (dag_id, run_id, study_uid, generation, state, opened_at, closed_at) VALUES (?,?,?,?, 'open', ?, NULL)",
                   (dag_id, run.run_id, study_uid, run.generation, now))
        db.execute("INSERT INTO outbox (dag_id, run_id, conf, created_at) VALUES (?,?,?,?)",
                   (dag_id, run.run_id, json.dumps(run.conf), now))
        db.execute(audit.INSERT, audit.AuditRecord(
            "run_opened", study_uid=study_uid, dag_id=dag_id, run_id=run.run_id, actor=inst.calling_ae,
            peer=peer_host(inst.peer), detail={"generation": generation, "sop_uids": [inst.sop_uid]}).row(now))
        return run

    def missing_hashes(self, limit: int) -> list[tuple[str, str]]:
        """(SOP Instance UID, path) of instances whose sha256 is not recorded yet."""
        with self._read() as db:
            rows = db.execute("SELECT sop_uid, path FROM instances WHERE sha256 = '' LIMIT ?", (limit,)).fetchall()
        return [(r["sop_uid"], r["path"]) for r in rows]

    def set_hashes(self, hashes: Sequence[tuple[str, str]]) -> None:
        if hashes:
            with self._tx() as db:
                db.executemany("UPDATE instances SET sha256 = ? WHERE sop_uid = ?", [(h, s) for s, h in hashes])

    def association_ended(self, association: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM receiving WHERE association = ?", (association,))

    def clear_receiving(self) -> None:
        """At listener start: no association of an earlier process is still sending."""
        with self._tx() as db:
            db.execute("DELETE FROM receiving")

    def sending(self, study_uid: str, seen_since: float) -> int:
        """Associations that sent an instance of the study since ``seen_since`` and are still open."""
        with self._read() as db:
            row = db.execute("SELECT COUNT(*) AS n FROM receiving WHERE study_uid = ? AND last_seen >= ?",
                             (study_uid, seen_since)).fetchone()
        return row["n"]

    def instances(self, study_uid: str) -> list[StoredInstance]:
        with self._read() as db:
            rows = db.execute(_STUDY_INSTANCES, (study_uid,)).fetchall()
        return [_instance(r) for r in rows]

    def instances_by_sop(self, sop_uids: Sequence[str]) -> dict[str, StoredInstance]:
        if not sop_uids:  # PostgreSQL has no empty IN ()
            return {}
        marks = ",".join("?" * len(sop_uids))
        with self._read() as db:
            rows = db.execute(f"SELECT * FROM instances WHERE sop_uid IN ({marks})", tuple(sop_uids)).fetchall()
        return {r["sop_uid"]: _instance(r) for r in rows}

    def last_received(self, study_uid: str) -> float | None:
        with self._read() as db:
            row = db.execute("SELECT MAX(received_at) AS t FROM instances WHERE study_uid = ?",
                             (study_uid,)).fetchone()
        return row["t"]

    # -- runs --------------------------------------------------------------------------
    def close_run(self, dag_id: str, run_id: str, study_uid: str) -> list[StoredInstance]:
        """Stop ``run_id`` collecting and return the study's instances as of that moment.

        Anything indexed after this commit opens the next generation instead. A run the
        listener did not open (triggered by hand) is registered here as it closes.
        """
        with self._tx(study_uid) as db:
            now = time.time()
            db.execute("INSERT INTO runs (dag_id, run_id, study_uid, generation, state, opened_at, closed_at) VALUES (?,?,?,0,'closing',?,?) ON CONFLICT DO NOTHING",
                       (dag_id, run_id, study_uid, now, now))
            db.execute("UPDATE runs SET state = 'closing', closed_at = ? WHERE dag_id = ? AND run_id = ? "
                       "AND state = 'open'", (now, dag_id, run_id))
            rows = db.execute(_STUDY_INSTANCES, (study_uid,)).fetchall()
        return [_instance(r) for r in rows]

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        with self._read() as db:
            row = db.execute("SELECT state FROM runs WHERE dag_id = ? AND run_id = ?", (dag_id, run_id)).fetchone()
        return row["state"] if row else None

    def runs(self, dag_id: str | None = None) -> list[RunRef]:
        return [RunRef(r.dag_id, r.run_id, r.study_uid, r.generation) for r in self.registered_runs(dag_id)]

    def registered_runs(self, dag_id: str | None = None, study_uid: str | None = None,
                        purged: bool = True) -> list[RegisteredRun]:
        """The register's runs, oldest first (of one flow, of one study; ``purged=False``: not those
        whose study retention deleted)."""
        where = [(clause, value) for clause, value in (("dag_id = ?", dag_id), ("study_uid = ?", study_uid))
                 if value is not None]
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(c for c, _ in where) if where else "")
        if not purged:
            sql += (" AND " if where else " WHERE ") + "purged_at IS NULL"
        with self._read() as db:
            rows = db.execute(sql + " ORDER BY opened_at", tuple(v for _, v in where)).fetchall()
        return [RegisteredRun(r["dag_id"], r["run_id"], r["study_uid"], r["generation"], r["state"], r["opened_at"],
                              r["closed_at"]) for r in rows]

    # -- studies as a whole (status, retention) ------------------------------------------
    def studies(self, limit: int | None = None, with_names: bool = False) -> list[StudySummary]:
        """Every study the index holds instances of, the last received first (``limit`` of them)."""
        name = (", MIN(" + self._backend.json_text("tags", "PatientName") + ") AS patient_name") if with_names else ""
        sql = ("SELECT study_uid, MIN(received_at) AS first, MAX(received_at) AS last, COUNT(*) AS n, "
               "COUNT(DISTINCT series_uid) AS series, SUM(size) AS size, MIN(calling_ae) AS ae" + name +
               " FROM instances GROUP BY study_uid ORDER BY MAX(received_at) DESC")
        args: tuple[Any, ...] = ()
        if limit is not None:
            sql, args = sql + " LIMIT ?", (limit,)
        with self._read() as db:
            rows = db.execute(sql, args).fetchall()
        return [StudySummary(r["study_uid"], r["first"], r["last"], r["n"], r["series"], int(r["size"] or 0),
                             r["ae"] or "", _name(r["patient_name"]) if with_names else None) for r in rows]

    def purge_study(self, study_uid: str, *, planned_at: float, move_away: Callable[[], None],
                    record: audit.AuditRecord) -> bool:
        """Delete the study's instances from the index (its runs stay in the register, marked
        purged, so that the study sent again opens the next generation), with ``record`` in the
        audit trail, in one transaction; ``move_away`` (take its files and run folders out of the
        data dir, by rename) runs inside it, after the checks. Nothing happens, and False is
        returned, if the study changed since ``planned_at``: an instance received, a run opened,
        an association sending it."""
        with self._tx(study_uid) as db:
            changed = db.execute(
                "SELECT (SELECT COUNT(*) FROM instances WHERE study_uid = ? AND received_at > ?) + "
                "(SELECT COUNT(*) FROM runs WHERE study_uid = ? AND opened_at > ?) + "
                "(SELECT COUNT(*) FROM receiving WHERE study_uid = ?) AS n",
                (study_uid, planned_at, study_uid, planned_at, study_uid)).fetchone()["n"]
            if changed:
                return False
            move_away()
            now = time.time()
            db.execute("DELETE FROM instances WHERE study_uid = ?", (study_uid,))
            db.execute("DELETE FROM outbox WHERE delivered_at IS NOT NULL AND run_id IN "
                       "(SELECT run_id FROM runs WHERE study_uid = ?)", (study_uid,))
            db.execute("UPDATE runs SET purged_at = ? WHERE study_uid = ? AND purged_at IS NULL", (now, study_uid))
            db.execute(audit.INSERT, record.row(now))
        return True

    # -- the audit trail -------------------------------------------------------------------
    def record_audit(self, *records: audit.AuditRecord) -> None:
        """Append ``records`` to the audit trail (one transaction)."""
        if records:
            now = time.time()
            with self._tx() as db:
                db.executemany(audit.INSERT, [r.row(now) for r in records])

    def audit_records(self, since: float | None = None, until: float | None = None, study_uid: str | None = None,
                      after_id: int | None = None, up_to_id: int | None = None,
                      limit: int | None = None) -> list[audit.AuditRecord]:
        """The trail's records in the order of their times, filtered by time, study and id."""
        where = [(clause, value) for clause, value in (
            ("at >= ?", since), ("at < ?", until), ("study_uid = ?", study_uid), ("id > ?", after_id),
            ("id <= ?", up_to_id)) if value is not None]
        sql = ("SELECT * FROM audit" + (" WHERE " + " AND ".join(c for c, _ in where) if where else "")
               + " ORDER BY at, id")
        args = tuple(v for _, v in where)
        if limit is not None:
            sql, args = sql + " LIMIT ?", args + (limit,)
        with self._read() as db:
            rows = db.execute(sql, args).fetchall()
        return [audit.from_row(r) for r in rows]

    # -- outbox ------------------------------------------------------------------------
    def pending_triggers(self, limit: int = 100, now: float | None = None) -> list[OutboxItem]:
        """Triggers to post now: not delivered, not given up, due (a refused one waits its back-off)."""
        with self._read() as db:
            rows = db.execute(
                "SELECT * FROM outbox WHERE delivered_at IS NULL AND given_up_at IS NULL AND next_attempt_at <= ? "
                "ORDER BY next_attempt_at, id LIMIT ?", (time.time() if now is None else now, limit)).fetchall()
        return [_outbox_item(r) for r in rows]

    def next_trigger_due(self) -> float | None:
        """When the next pending trigger is due (a time), or None when none is pending."""
        with self._read() as db:
            row = db.execute("SELECT MIN(next_attempt_at) AS due FROM outbox WHERE delivered_at IS NULL "
                             "AND given_up_at IS NULL").fetchone()
        return row["due"]

    def given_up_triggers(self) -> list[OutboxItem]:
        """Triggers Airflow refused for longer than the give-up time: never posted (``raddeploy status``)."""
        with self._read() as db:
            rows = db.execute("SELECT * FROM outbox WHERE given_up_at IS NOT NULL AND delivered_at IS NULL "
                              "ORDER BY id").fetchall()
        return [_outbox_item(r) for r in rows]

    def mark_delivered(self, item_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE outbox SET delivered_at = ?, attempts = attempts + 1, last_error = '' "
                       "WHERE id = ?", (time.time(), item_id))

    def mark_failed_attempt(self, item_id: int, error: str) -> None:
        """Airflow could not be reached: the trigger stays due (the delivery loop backs off as a whole)."""
        with self._tx() as db:
            db.execute("UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                       (error[:500], item_id))

    def mark_refused(self, item_id: int, error: str, retry_at: float, give_up_after: float) -> bool:
        """Airflow refused the trigger: it waits until ``retry_at``, or, refused for longer than
        ``give_up_after`` seconds since its first refusal, is given up. True when given up now."""
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?, "
                       "first_refused_at = COALESCE(first_refused_at, ?) WHERE id = ?",
                       (error[:500], retry_at, now, item_id))
            db.execute("UPDATE outbox SET given_up_at = ? WHERE id = ? AND first_refused_at <= ?",
                       (now, item_id, now - give_up_after))
            given_up = db.execute("SELECT COUNT(*) AS n FROM outbox WHERE id = ? AND given_up_at = ?",
                                  (item_id, now)).fetchone()["n"]
        return bool(given_up)


def _check_patient(same_study: Mapping[str, Any] | None, inst: StoredInstance) -> None:
    """Raise OtherPatient if the study's other instances have another Patient ID than ``inst``.

    ``same_study``: one of them (one is enough: every instance of a study went through this
    check), its Patient ID as JSON text (a text or a list of texts; ``null`` or NULL when absent).
    """
    if same_study is None:
        return
    if patient_id({"PatientID": json.loads(same_study["id"] or "null")}) != patient_id(inst.tags):
        raise OtherPatient(inst.study_uid, inst.sop_uid)


_STUDY_INSTANCES = "SELECT * FROM instances WHERE study_uid = ? ORDER BY received_at"
#: A flow's runs of a study: its last generation, and how many are collecting (open, not abandoned).
_RUNS_OF_STUDY = ("SELECT MAX(generation) AS g, COUNT(*) FILTER (WHERE state = 'open' AND opened_at > ?) AS n_open "
                  "FROM runs WHERE dag_id = ? AND study_uid = ?")
_UPSERT_RECEIVING = ("INSERT INTO receiving VALUES (?,?,?) ON CONFLICT (study_uid, association) "
                     "DO UPDATE SET last_seen = excluded.last_seen")
_UPSERT_INSTANCE = (f"INSERT INTO instances ({', '.join(INSTANCE_COLUMNS)}) "
                    f"VALUES ({','.join('?' * len(INSTANCE_COLUMNS))}) ON CONFLICT (sop_uid) DO UPDATE SET "
                    + ", ".join(f"{c} = excluded.{c}" for c in INSTANCE_COLUMNS[1:]))


def _name(text: str | None) -> str:
    """A PatientName from the JSON text of its tag (a text, a list, or nothing)."""
    value = json.loads(text) if text else None
    if isinstance(value, list):
        value = "\\".join(str(v) for v in value)
    return str(value or "")


def _outbox_item(row: Mapping[str, Any]) -> OutboxItem:
    return OutboxItem(row["id"], row["dag_id"], row["run_id"], json.loads(row["conf"]), row["attempts"],
                      row["first_refused_at"], row["last_error"])


def _instance(row: Mapping[str, Any]) -> StoredInstance:
    return StoredInstance(
        sop_uid=row["sop_uid"], study_uid=row["study_uid"], series_uid=row["series_uid"],
        sop_class_uid=row["sop_class_uid"], transfer_syntax=row["transfer_syntax"], path=row["path"],
        size=row["size"], sha256=row["sha256"], received_at=row["received_at"],
        tags=json.loads(row["tags"]), calling_ae=row["calling_ae"], peer=row["peer"],
    )


# -- the backends ----------------------------------------------------------------------------
#: The URL schemes that put the index on PostgreSQL (``RADDEPLOY_INDEX_URL``).
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_backend(target: Path | str, durable: bool) -> _SQLite | _Postgres:
    """The backend ``target`` names: a PostgreSQL URL, else the path of an SQLite file."""
    text = os.fspath(target)
    if text.startswith(POSTGRES_SCHEMES):
        return _Postgres(text, durable)
    if "://" in text:
        raise ValueError(f"the study index must be a postgresql:// URL or the path of an SQLite file, "
                         f"not {text.split('://')[0]}://...")
    return _SQLite(Path(text), durable)


class _Session(Protocol):
    """One connection as the shared SQL uses it: ``execute(sql, args)`` with ``?`` marks, rows
    read by column name, in the backend's open transaction if any. :class:`_SQLiteSession`
    and :class:`_PgSession` are the two."""

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any: ...
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any: ...
    def execute_script(self, script: str) -> None: ...


class _SQLiteSession(sqlite3.Connection):
    """sqlite3's connection with :meth:`execute_script` (statements run in the open transaction)."""

    def execute_script(self, script: str) -> None:
        # executescript() would COMMIT first: run each complete statement instead.
        statement = ""
        for line in script.splitlines(keepends=True):
            statement += line
            if sqlite3.complete_statement(statement):
                self.execute(statement)
                statement = ""


class _SQLite:
    """The index as an SQLite file in WAL mode; one connection per thread."""

    serial = "INTEGER PRIMARY KEY AUTOINCREMENT"
    unavailable: tuple[type[Exception], ...] = (sqlite3.OperationalError,)
    #: The audit trail cannot be changed or deleted (sqlite3.IntegrityError).
    append_only = "".join(
        f"CREATE TRIGGER IF NOT EXISTS audit_no_{verb.lower()} BEFORE {verb} ON audit "
        f"BEGIN SELECT RAISE(ABORT, '{audit.APPEND_ONLY}'); END;\n" for verb in ("UPDATE", "DELETE"))

    def __init__(self, path: Path, durable: bool) -> None:
        self.path = path
        self.durable = durable
        self.where = f"SQLite {path}"
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def json_text(column: str, key: str) -> str:
        """The JSON text of a top-level key of a JSON text column (``null`` or NULL when absent).
        ``->`` would say it shorter, from SQLite 3.38 on (Ubuntu 22.04 has 3.37)."""
        return f"json_quote(json_extract({column}, '$.{key}'))"

    @staticmethod
    def columns(db: _Session, table: str) -> set[str]:
        return {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}

    @staticmethod
    def scrub(message: str) -> str:
        return message

    def _db(self) -> _SQLiteSession:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False,
                                 factory=_SQLiteSession)
            self._wal(db)
            # FULL: each commit is on disk (survives a power cut); NORMAL: on the OS, synced at
            # checkpoints (survives a crash of the process). WAL keeps either consistent.
            db.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    @staticmethod
    def _wal(db: sqlite3.Connection, tries: int = 100) -> None:
        """WAL mode (it stays with the file). A new file's first switch, made by several
        connections at once, can fail "locked" at once, past the busy timeout (each reads the
        file, then each wants it alone): try again."""
        for attempt in range(tries):
            try:
                db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == tries - 1:
                    raise
                time.sleep(0.01)

    @contextmanager
    def session(self) -> Iterator[_Session]:
        yield self._db()

    @contextmanager
    def transaction(self, locks: Sequence[str] = ()) -> Iterator[_Session]:
        """SQLite's one write lock, taken at the start (``locks`` need no more)."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    schema_transaction = transaction

    def release(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    close = release


#: Connections of one index's pool: enough for the listener's writers to overlap their round
#: trips, few enough for many processes on one server (default max_connections = 100).
POOL_SIZE = 8
#: Seconds to wait for the server when connecting, and for a free connection of the pool.
CONNECT_TIMEOUT = 10
POOL_TIMEOUT = 30.0


def _lock_key(name: str) -> int:
    """A name as a key of PostgreSQL's advisory locks (64-bit); a collision only serialises more."""
    return int.from_bytes(hashlib.blake2b(f"raddeploy index {name}".encode(), digest_size=8).digest(),
                          "big", signed=True)


@lru_cache(maxsize=256)
def _pg_sql(sql: str) -> str:
    """The shared SQL in psycopg's paramstyle (our SQL has no ``?`` or ``%`` in its literals)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PgSession:
    """A psycopg connection taking the shared SQL."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> psycopg.Cursor:
        return self._conn.execute(_pg_sql(sql), args)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(_pg_sql(sql), rows)

    def execute_script(self, script: str) -> None:
        self._conn.execute(script)  # no parameters: several statements in one go


class _Postgres:
    """The index in a PostgreSQL database; a pool of :data:`POOL_SIZE` connections shared by threads.

    Every transaction runs at READ COMMITTED, and one that opens or closes runs first takes a
    transaction-scoped advisory lock on its study (and SOP instance; ``pg_advisory_xact_lock``):
    writers of one study queue there as SQLite's do at its write lock, and each statement after
    the lock sees every commit made before it was granted (a statement's snapshot is taken as it
    starts: the lock must be a statement of its own, before the reads). Writers of other studies
    go on in parallel. Its sessions say ``application_name=raddeploy-index`` (``pg_stat_activity``)
    unless the URL names one.
    """

    serial = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
    #: The audit trail cannot be changed, deleted or truncated (psycopg's RaiseException).
    append_only = f"""
CREATE OR REPLACE FUNCTION raddeploy_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION '{audit.APPEND_ONLY}'; END $$;
CREATE OR REPLACE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION raddeploy_audit_append_only();
CREATE OR REPLACE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION raddeploy_audit_append_only();
"""

    def __init__(self, url: str, durable: bool) -> None:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        self.url = url
        self.durable = durable
        self.unavailable: tuple[type[Exception], ...] = (psycopg.OperationalError,)
        try:
            params = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise ValueError(f"RADDEPLOY_INDEX_URL is not a valid PostgreSQL URL: {self.scrub(str(exc))} "
                             "(write postgresql://user:password@host:port/database)") from None
        self._password = str(params.get("password") or "")
        self.where = (f"PostgreSQL database {params.get('dbname') or params.get('user') or '(default)'} on "
                      f"{params.get('host') or 'the local socket'}:{params.get('port') or 5432}"
                      + (f" as {params['user']}" if params.get("user") else ""))
        defaults = {"connect_timeout": CONNECT_TIMEOUT, "application_name": "raddeploy-index"}
        self._connect_args = {"autocommit": True, **{k: v for k, v in defaults.items() if k not in params}}
        self._pool: psycopg_pool.ConnectionPool | None = None
        self._lock = threading.Lock()

    @staticmethod
    def json_text(column: str, key: str) -> str:
        return f"({column}::json -> '{key}')::text"

    @staticmethod
    def columns(db: _Session, table: str) -> set[str]:
        rows = db.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                          "AND table_name = ?", (table,)).fetchall()
        return {row["column_name"] for row in rows}

    def scrub(self, message: str) -> str:
        """``message`` without the password (libpq does not print it; a URL in an error might)."""
        return message.replace(self._password, "***") if self._password else message

    def _configure(self, conn: psycopg.Connection) -> None:
        from psycopg import IsolationLevel
        from psycopg.rows import dict_row

        conn.row_factory = dict_row
        conn.isolation_level = IsolationLevel.READ_COMMITTED  # whatever the server's default: see the class
        if not self.durable:
            conn.execute("SET synchronous_commit = off")

    def _connections(self) -> psycopg_pool.ConnectionPool:
        pool = self._pool
        if pool is None:
            with self._lock:
                if self._pool is None:
                    from psycopg_pool import ConnectionPool

                    self._pool = ConnectionPool(self.url, kwargs=self._connect_args, configure=self._configure,
                                                min_size=1, max_size=POOL_SIZE, timeout=POOL_TIMEOUT, open=True,
                                                name="raddeploy-index")
                pool = self._pool
        return pool

    @contextmanager
    def session(self) -> Iterator[_Session]:
        with self._connections().connection() as conn:
            yield _PgSession(conn)

    @contextmanager
    def transaction(self, locks: Sequence[str] = ()) -> Iterator[_Session]:
        """Pipelined: statements go out as they are executed, and the client waits only when it
        reads a result and at COMMIT. That matters with a server on another host (a round trip
        each would cost more than the rest of an add()); on loopback it is about even."""
        with self._connections().connection() as conn, conn.pipeline(), conn.transaction():
            if locks:  # the study's lock first (see StudyIndex._tx)
                conn.execute("SELECT " + ", ".join(["pg_advisory_xact_lock(%s)"] * len(locks)),
                             [_lock_key(name) for name in locks])
            yield _PgSession(conn)

    @contextmanager
    def schema_transaction(self) -> Iterator[_Session]:
        """A connection of its own, made now: a server that cannot be reached says why here, at
        open (the pool would only log it and time out), serialised with other processes opening."""
        import psycopg

        try:
            conn = psycopg.connect(self.url, **self._connect_args)
        except psycopg.OperationalError as exc:
            raise psycopg.OperationalError(
                f"{self.scrub(str(exc)).strip()} (check RADDEPLOY_INDEX_URL, that the server is up and that "
                "this host may connect: pg_hba.conf, password, database created)") from None
        with conn:
            self._configure(conn)
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [_lock_key("schema")])
                yield _PgSession(conn)

    def release(self) -> None:
        pass

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
