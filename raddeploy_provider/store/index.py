"""The header index, the run register and the trigger outbox, in one SQLite database (WAL).

One database so that "index this instance" and "open a run for it" commit in the same
transaction: the listener can crash at any point and either both happened or neither did.
The fingerprint sensor closes a run in a transaction of its own before it reads the study,
so every instance lands in the run being closed or opens the next generation (the
invariant in docs/architecture.md). Connections are per thread: the listener serves each
association in a thread of its own, and a sensor or trigger may check from several.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from .errors import OtherPatient

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path TEXT NOT NULL,            -- relative to the data dir
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,          -- '' until the listener's hasher gets to it
    received_at REAL NOT NULL,
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
    generation INTEGER NOT NULL,
    state TEXT NOT NULL,           -- open: collecting; closing: its sensor took the input (later
                                   -- instances open the next generation); abandoned: left open past
                                   -- its flow's timeout, replaced by the next generation
    opened_at REAL NOT NULL,
    closed_at REAL,
    PRIMARY KEY (dag_id, run_id)
);
CREATE INDEX IF NOT EXISTS runs_study ON runs (dag_id, study_uid, state);
CREATE TABLE IF NOT EXISTS receiving (   -- associations still sending a study
    study_uid TEXT NOT NULL,
    association TEXT NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (study_uid, association)
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dag_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    conf TEXT NOT NULL,
    created_at REAL NOT NULL,
    delivered_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    next_attempt_at REAL NOT NULL DEFAULT 0, -- a refused trigger waits (its own back-off)
    first_refused_at REAL,                   -- when Airflow first refused it
    given_up_at REAL,                        -- refused for longer than the give-up time: not retried
    UNIQUE (dag_id, run_id)
);
"""


#: (table, column, declaration) of every column added to SCHEMA after its first release, in
#: order: an index made by an older version gets them when it is opened (SCHEMA's CREATE TABLE
#: IF NOT EXISTS leaves an existing table as it is).
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("outbox", "next_attempt_at", "REAL NOT NULL DEFAULT 0"),
    ("outbox", "first_refused_at", "REAL"),
    ("outbox", "given_up_at", "REAL"),
)


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
    """Thread-safe access to the index database at ``path``."""

    def __init__(self, path: Path, durable: bool = True) -> None:
        self.path = path
        self.durable = durable
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db().executescript(SCHEMA)  # idempotent; executescript manages its own transaction
        self._add_columns()

    def _add_columns(self) -> None:
        """Columns added since an index was first made: given to an older index file as it opens."""
        db = self._db()
        for table, column, declaration in ADDED_COLUMNS:
            if column not in {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: each commit is on disk (survives a power cut); NORMAL: on the OS, synced at
            # checkpoints (survives a crash of the process). WAL keeps either consistent.
            db.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

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
        with self._tx() as db:
            row = db.execute("SELECT * FROM instances WHERE sop_uid = ?", (inst.sop_uid,)).fetchone()
            if row is not None and (replaces is None or row["path"] != replaces):
                return AddResult(duplicate=True, opened=[], existing=_instance(row))
            self._check_patient(db, inst)
            if place is not None:
                place()
            if association:
                db.execute("INSERT INTO receiving VALUES (?,?,?) ON CONFLICT (study_uid, association) "
                           "DO UPDATE SET last_seen = excluded.last_seen", (inst.study_uid, association, inst.received_at))
            db.execute(
                # REPLACE: a new version takes the row of the one it supersedes (``replaces``)
                f"INSERT{' OR REPLACE' if row is not None else ''} INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (inst.sop_uid, inst.study_uid, inst.series_uid, inst.sop_class_uid,
                 inst.transfer_syntax, inst.path, inst.size, inst.sha256, inst.received_at,
                 inst.calling_ae, inst.peer, json.dumps(inst.tags, separators=(",", ":"))),
            )
            opened = [run for dag_id, after in abandon_after.items()
                      if (run := self._open_run(db, dag_id, inst.study_uid, after))]
        return AddResult(duplicate=False, opened=opened, replaced=_instance(row) if row is not None else None)

    @staticmethod
    def _check_patient(db: sqlite3.Connection, inst: StoredInstance) -> None:
        """Raise OtherPatient if the study's other instances have another Patient ID than ``inst``.

        One row is enough: every instance of a study went through this check.
        """
        other = db.execute(
            "SELECT json_extract(tags, '$.PatientID') AS id, json_type(tags, '$.PatientID') AS type "
            "FROM instances WHERE study_uid = ? AND sop_uid != ? LIMIT 1", (inst.study_uid, inst.sop_uid)).fetchone()
        if other is None:
            return
        theirs = patient_id({"PatientID": json.loads(other["id"]) if other["type"] == "array" else other["id"] or ""})
        if theirs != patient_id(inst.tags):
            raise OtherPatient(inst.study_uid, inst.sop_uid)

    def _open_run(self, db: sqlite3.Connection, dag_id: str, study_uid: str, abandon_after: float) -> RunRef | None:
        row = db.execute(
            "SELECT MAX(generation) AS g, SUM(state = 'open' AND opened_at > ?) AS n_open FROM runs "
            "WHERE dag_id = ? AND study_uid = ?", (time.time() - abandon_after, dag_id, study_uid)).fetchone()
        if row["n_open"]:
            return None
        db.execute("UPDATE runs SET state = 'abandoned' WHERE dag_id = ? AND study_uid = ? AND state = 'open'",
                   (dag_id, study_uid))
        generation = (row["g"] or 0) + 1
        run = RunRef(dag_id, run_id_for(study_uid, generation), study_uid, generation)
        now = time.time()
        db.execute("INSERT INTO runs VALUES (?,?,?,?, 'open', ?, NULL)",
                   (dag_id, run.run_id, study_uid, run.generation, now))
        db.execute("INSERT INTO outbox (dag_id, run_id, conf, created_at) VALUES (?,?,?,?)",
                   (dag_id, run.run_id, json.dumps(run.conf), now))
        return run

    def missing_hashes(self, limit: int) -> list[tuple[str, str]]:
        """(SOP Instance UID, path) of instances whose sha256 is not recorded yet."""
        rows = self._db().execute("SELECT sop_uid, path FROM instances WHERE sha256 = '' LIMIT ?", (limit,))
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
        row = self._db().execute("SELECT COUNT(*) AS n FROM receiving WHERE study_uid = ? AND last_seen >= ?",
                                 (study_uid, seen_since)).fetchone()
        return row["n"]

    def instances(self, study_uid: str) -> list[StoredInstance]:
        rows = self._db().execute(
            "SELECT * FROM instances WHERE study_uid = ? ORDER BY received_at", (study_uid,)).fetchall()
        return [_instance(r) for r in rows]

    def instances_by_sop(self, sop_uids: Sequence[str]) -> dict[str, StoredInstance]:
        marks = ",".join("?" * len(sop_uids))
        rows = self._db().execute(f"SELECT * FROM instances WHERE sop_uid IN ({marks})", tuple(sop_uids))
        return {r["sop_uid"]: _instance(r) for r in rows}

    def last_received(self, study_uid: str) -> float | None:
        row = self._db().execute(
            "SELECT MAX(received_at) AS t FROM instances WHERE study_uid = ?", (study_uid,)).fetchone()
        return row["t"]

    # -- runs --------------------------------------------------------------------------
    def close_run(self, dag_id: str, run_id: str, study_uid: str) -> list[StoredInstance]:
        """Stop ``run_id`` collecting and return the study's instances as of that moment.

        Anything indexed after this commit opens the next generation instead. A run the
        listener did not open (triggered by hand) is registered here as it closes.
        """
        with self._tx() as db:
            now = time.time()
            db.execute("INSERT OR IGNORE INTO runs VALUES (?,?,?,0,'closing',?,?)",
                       (dag_id, run_id, study_uid, now, now))
            db.execute("UPDATE runs SET state = 'closing', closed_at = ? WHERE dag_id = ? AND run_id = ? "
                       "AND state = 'open'", (now, dag_id, run_id))
            rows = db.execute("SELECT * FROM instances WHERE study_uid = ? ORDER BY received_at",
                              (study_uid,)).fetchall()
        return [_instance(r) for r in rows]

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        row = self._db().execute("SELECT state FROM runs WHERE dag_id = ? AND run_id = ?",
                                 (dag_id, run_id)).fetchone()
        return row["state"] if row else None

    def runs(self, dag_id: str | None = None) -> list[RunRef]:
        sql, args = "SELECT * FROM runs", ()
        if dag_id is not None:
            sql, args = sql + " WHERE dag_id = ?", (dag_id,)
        return [RunRef(r["dag_id"], r["run_id"], r["study_uid"], r["generation"])
                for r in self._db().execute(sql + " ORDER BY opened_at", args)]

    # -- outbox ------------------------------------------------------------------------
    def pending_triggers(self, limit: int = 100, now: float | None = None) -> list[OutboxItem]:
        """Triggers to post now: not delivered, not given up, due (a refused one waits its back-off)."""
        rows = self._db().execute(
            "SELECT * FROM outbox WHERE delivered_at IS NULL AND given_up_at IS NULL AND next_attempt_at <= ? "
            "ORDER BY next_attempt_at, id LIMIT ?", (time.time() if now is None else now, limit)).fetchall()
        return [_outbox_item(r) for r in rows]

    def next_trigger_due(self) -> float | None:
        """When the next pending trigger is due (a time), or None when none is pending."""
        row = self._db().execute("SELECT MIN(next_attempt_at) AS due FROM outbox WHERE delivered_at IS NULL "
                                 "AND given_up_at IS NULL").fetchone()
        return row["due"]

    def given_up_triggers(self) -> list[OutboxItem]:
        """Triggers Airflow refused for longer than the give-up time: never posted (``raddeploy status``)."""
        rows = self._db().execute("SELECT * FROM outbox WHERE given_up_at IS NOT NULL AND delivered_at IS NULL "
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
            given_up = db.execute("UPDATE outbox SET given_up_at = ? WHERE id = ? AND first_refused_at <= ?",
                                  (now, item_id, now - give_up_after)).rowcount
        return bool(given_up)

def _outbox_item(row: sqlite3.Row) -> OutboxItem:
    return OutboxItem(row["id"], row["dag_id"], row["run_id"], json.loads(row["conf"]), row["attempts"],
                      row["first_refused_at"], row["last_error"])


def _instance(row: sqlite3.Row) -> StoredInstance:
    return StoredInstance(
        sop_uid=row["sop_uid"], study_uid=row["study_uid"], series_uid=row["series_uid"],
        sop_class_uid=row["sop_class_uid"], transfer_syntax=row["transfer_syntax"], path=row["path"],
        size=row["size"], sha256=row["sha256"], received_at=row["received_at"],
        tags=json.loads(row["tags"]), calling_ae=row["calling_ae"], peer=row["peer"],
    )
