"""The audit trail: an append-only record of what came in, what ran, what left and what was deleted.

One row per event in the index's ``audit`` table (the same database as the instances, so an
event that changes the index, a run opened or a study deleted, is recorded in the transaction
that makes the change), and a daily JSON-lines export in the data dir (:func:`export`), which a
hospital's log collector can ship and which outlives the index.

A record holds times, UIDs, AE titles, network addresses, Airflow user names, image digests,
counts and outcomes: never a patient's name, ID or birth date, never a DICOM header value
other than a UID. :data:`DETAIL_KEYS` is the whole list of what ``detail`` may say, checked
when a record is made, so nothing else can slip in.

Shaped for IHE ATNA (RFC 3881 / DICOM PS3.15 A.5) export: each :data:`EVENTS` entry names the
DICOM audit message it maps to, ``outcome`` is one of RFC 3881's four outcome levels, ``actor``
and ``peer`` are the active participants and the Study Instance UID the participant object.
docs/operations.md ("Audit trail") says how to turn them into messages.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:
    from .index import StudyIndex


@dataclass(frozen=True)
class Event:
    """One kind of audit record: what it says, and the DICOM audit message it becomes."""

    doc: str
    atna: str  # the DICOM audit message (PS3.15 A.5.3) with its EventID code


#: Every event the trail records, in the order a study meets them.
EVENTS: dict[str, Event] = {
    "association": Event("a DICOM association asked for: calling and called AE, address, accepted or refused "
                         "and why, instances stored and refused",
                         "DICOM Instances Transferred (110104, DCM); a refusal: Security Alert (110113)"),
    "run_opened": Event("the listener opened a run of a flow for a study (the trigger then goes to Airflow)",
                        "Begin Transferring DICOM Instances (110102, DCM)"),
    "model_run": Event("a model container ran on a run's input: image, digest, exit code, GPUs",
                       "DICOM Instances Accessed (110103, DCM), Read; the image as a participant object"),
    "review": Event("a person (or the review timeout) approved or rejected a run's results",
                    "DICOM Instances Accessed (110103, DCM), Read; the reviewer as the user participant"),
    "send": Event("a send task sent a run's results to a destination: node, instances accepted and refused",
                  "DICOM Instances Transferred (110104, DCM)"),
    "deletion": Event("retention deleted a study's files, index rows and run folders: why, counts, UIDs",
                      "DICOM Study Deleted (110105, DCM)"),
    "disk_low": Event("the data dir's free space fell below the low-water mark: what was done",
                      "Security Alert (110113, DCM), Emergency Override"),
}

#: RFC 3881 EventOutcomeIndicator: 0 success, 4 minor failure, 8 serious failure, 12 major failure.
OUTCOMES: dict[str, int] = {"success": 0, "minor_failure": 4, "serious_failure": 8, "major_failure": 12}

#: Everything a record's ``detail`` may hold. Values are UIDs, AE titles, addresses, counts,
#: digests, task ids and short reasons our code wrote (never a header value but a UID).
DETAIL_KEYS: dict[str, str] = {
    "called_ae": "the AE title the sender called",
    "association": "the listener's id of the association (pid-number)",
    "study_uids": "the studies an association stored instances of, when more than one",
    "result": "accepted, refused, aborted, lost, timed out",
    "why": "why it was refused or ended so (our words)",
    "stored": "instances stored",
    "refused": "instances refused",
    "refused_connections": "connections refused over a cap since the last such record",
    "generation": "the run's generation of the study",
    "task": "the Airflow task id",
    "try": "the task's try number",
    "image": "the model's Docker image as the flow names it",
    "digest": "the image id (sha256) the container ran",
    "exit_code": "the container's exit code",
    "gpus": "GPU device ids leased",
    "outputs": "result files written",
    "decision": "approved or rejected",
    "destination": "the node: connection id or AE@host:port",
    "accepted": "instances the node accepted (now and on earlier tries)",
    "warned": "instances accepted with a warning",
    "not_sent": "instances not sent (unreachable, not known whether stored)",
    "sop_uids": "SOP Instance UIDs concerned",
    "series_uids": "Series Instance UIDs concerned",
    "instances": "instances deleted",
    "studies": "studies deleted",
    "bytes": "bytes deleted",
    "runs": "run folders deleted (dag_id/run_id)",
    "kind": "which retention applied: delivered, failed, unmatched; early: below the low-water mark",
    "free_bytes": "free space of the data dir",
    "low_water": "the low-water mark in bytes",
    "dry_run": "true: listed, not deleted",
}


class AuditError(ValueError):
    """A record our code tried to make that the trail does not allow (a bug: fix the caller)."""


@dataclass(frozen=True)
class AuditRecord:
    """One event. ``at`` and ``id`` are set by the index when it is recorded."""

    event: str
    outcome: str = "success"
    study_uid: str = ""
    dag_id: str = ""
    run_id: str = ""
    actor: str = ""  # who did it: calling AE, Airflow user, "raddeploy_retention"
    peer: str = ""  # the other side's address or node
    detail: Mapping[str, Any] = field(default_factory=dict)
    at: float | None = None
    id: int | None = None

    def __post_init__(self) -> None:
        if self.event not in EVENTS:
            raise AuditError(f"{self.event!r} is no audit event; add it to store.audit.EVENTS")
        if self.outcome not in OUTCOMES:
            raise AuditError(f"{self.outcome!r} is no audit outcome: use one of {', '.join(OUTCOMES)}")
        unknown = sorted(set(self.detail) - set(DETAIL_KEYS))
        if unknown:
            raise AuditError(f"audit detail {unknown[0]!r} is not allowed: add it to store.audit.DETAIL_KEYS "
                             "if it holds no patient data")

    def row(self, at: float) -> tuple[Any, ...]:
        """The values of ``audit``'s columns after its id, in order (:data:`INSERT`); ``at`` unless the
        record has its own time (an association: when it began)."""
        return (self.at if self.at is not None else at, self.event, self.outcome, self.study_uid, self.dag_id, self.run_id, self.actor, self.peer,
                json.dumps(dict(self.detail), separators=(",", ":"), sort_keys=True, default=str))

    def as_json(self) -> dict[str, Any]:
        """The record as its export line holds it (time in UTC ISO 8601 and as seconds)."""
        return {"id": self.id, "time": iso(self.at or 0.0), "at": self.at, "event": self.event,
                "outcome": self.outcome, "outcome_code": OUTCOMES[self.outcome], "study_uid": self.study_uid,
                "dag_id": self.dag_id, "run_id": self.run_id, "actor": self.actor, "peer": self.peer,
                "detail": dict(self.detail)}

    def line(self) -> str:
        """One line for people (``raddeploy audit``)."""
        where = f" {self.dag_id}/{self.run_id}" if self.run_id else (f" {self.dag_id}" if self.dag_id else "")
        who = " ".join(part for part in (f"by {self.actor}" if self.actor else "",
                                         f"peer {self.peer}" if self.peer else "") if part)
        said = " ".join(f"{key}={_short(value)}" for key, value in sorted(self.detail.items()))
        study = f" study {self.study_uid}" if self.study_uid else ""
        return " ".join(part for part in (f"{iso(self.at or 0.0)} {self.event:<11} {self.outcome:<15}"
                                          f"{study}{where}", who, said) if part)


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"[{len(value)}]" if len(value) > 3 else ",".join(str(v) for v in value)
    return str(value)


#: The table (created with the index's others: index.SCHEMA) and its statements.
TABLE = """
CREATE TABLE IF NOT EXISTS audit (   -- append-only: the backends refuse UPDATE and DELETE
    id {serial},
    at DOUBLE PRECISION NOT NULL,
    event TEXT NOT NULL,
    outcome TEXT NOT NULL,
    study_uid TEXT NOT NULL DEFAULT '',
    dag_id TEXT NOT NULL DEFAULT '',
    run_id TEXT NOT NULL DEFAULT '',
    actor TEXT NOT NULL DEFAULT '',
    peer TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '{{}}'
);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
CREATE INDEX IF NOT EXISTS audit_study ON audit (study_uid, at);
"""
INSERT = ("INSERT INTO audit (at, event, outcome, study_uid, dag_id, run_id, actor, peer, detail) "
          "VALUES (?,?,?,?,?,?,?,?,?)")
#: What the backends say when something tries to change or delete a record.
APPEND_ONLY = "the audit trail is append-only"


def from_row(row: Mapping[str, Any]) -> AuditRecord:
    return AuditRecord(event=row["event"], outcome=row["outcome"], study_uid=row["study_uid"], dag_id=row["dag_id"],
                       run_id=row["run_id"], actor=row["actor"], peer=row["peer"], detail=json.loads(row["detail"]),
                       at=row["at"], id=row["id"])


# -- the JSON-lines export ---------------------------------------------------------------------
#: The export's file of one UTC day, in the data dir's ``audit/`` (DataDir.audit).
def day_file(folder: Path, day: str) -> Path:
    return folder / f"audit-{day}.jsonl"


_EXPORTED = ".exported-id"


def _day(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d")


def export(index: StudyIndex, folder: Path) -> int:
    """Bring the daily files in ``folder`` up to date with the table; returns the records new to them.

    Each day that has records the export has not seen is written again whole (write, then
    rename), so a crash half-way leaves every file complete and the next export finishes the
    job; a file never holds a record twice. Which record was exported last is kept in
    ``folder/.exported-id``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / _EXPORTED
    try:
        done = int(marker.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        done = 0
    new = sorted(index.audit_records(after_id=done), key=lambda r: r.id or 0)
    if not new:
        return 0
    for day in sorted({_day(r.at or 0.0) for r in new}):
        start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp()
        records = index.audit_records(since=start, until=start + 86400, up_to_id=new[-1].id)
        _write_lines(day_file(folder, day), (json.dumps(r.as_json(), sort_keys=True) for r in records))
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(str(new[-1].id))
    os.replace(tmp, marker)
    return len(new)


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        for line in lines:
            fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def since(seconds: float, now: float | None = None) -> float:
    """The time ``seconds`` ago."""
    return (time.time() if now is None else now) - seconds
