"""Retention: which studies' data may go now, and deleting it safely.

The unit is the study: its instances (files and index rows) and the run folders of its runs
go together. What decides is the study's runs (:class:`RunFacts`):

- a run still open or running keeps the study, whatever its age;
- a run that delivered keeps it ``RADDEPLOY_RETAIN_DELIVERED`` after its last activity, a run
  that failed or whose review rejected it ``RADDEPLOY_RETAIN_FAILED``: the study goes when its
  last run's time is up (the longer of them);
- a study no flow ran on goes ``RADDEPLOY_RETAIN_UNMATCHED`` after its last instance.

Below the low-water mark of free disk (``RADDEPLOY_DISK_LOW_WATER``) studies whose runs all
delivered go ahead of their time, oldest first, then unmatched ones, until the disk is above
it again; failed and rejected runs are kept for whoever investigates them, open runs always.

:func:`verdict` and :func:`plan` are pure (a decision as a value that explains itself, like
``completion.readiness``); :func:`gather` reads the facts, :func:`purge` acts on a plan. Each
deletion is one :meth:`StudyIndex.purge_study` transaction with its audit record, serialised
with the listener's writes to the study: an instance that arrives meanwhile keeps the study
(the purge sees it and does nothing), and one that arrives after it starts a new study folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .audit import AuditRecord
from .index import RegisteredRun, StudyIndex, StudySummary
from ..units import format_gb
from .layout import DataDir, RunDir

log = logging.getLogger(__name__)

#: Which retention a study (or one of its runs) falls under.
OPEN, DELIVERED, FAILED, REJECTED, UNMATCHED = "open", "delivered", "failed", "rejected", "unmatched"

#: A DAG run's state as Airflow has it ("queued", "running", "success", "failed"), None when Airflow
#: has no such run (deleted, or never triggered): the lookup the caller gives.
RunStates = Callable[[str, str], "str | None"]


@dataclass(frozen=True)
class Policy:
    """Seconds to keep each kind; ``low_water``: free bytes under which delivered data goes early (0: off)."""

    delivered: float
    failed: float
    unmatched: float
    low_water: int = 0

    @classmethod
    def from_settings(cls, settings) -> "Policy":  # noqa: ANN001 - config.Settings (config imports store)
        return cls(settings.retain_delivered, settings.retain_failed, settings.retain_unmatched,
                   settings.disk_low_water)

    def keep(self, kind: str) -> float:
        return {DELIVERED: self.delivered, FAILED: self.failed, REJECTED: self.failed,
                UNMATCHED: self.unmatched}[kind]


@dataclass(frozen=True)
class RunFacts:
    """One run of a study: where it stands, and since when nothing happened to it."""

    dag_id: str
    run_id: str
    kind: str  # OPEN, DELIVERED, FAILED or REJECTED
    last_activity: float
    why: str  # how the kind was found, for the explanation

    @property
    def name(self) -> str:
        return f"{self.dag_id}/{self.run_id}"


@dataclass(frozen=True)
class StudyFacts:
    study: StudySummary
    runs: tuple[RunFacts, ...]


@dataclass(frozen=True)
class Verdict:
    """What retention does with one study now, and why."""

    study_uid: str
    kind: str  # OPEN, DELIVERED, FAILED (failed or rejected runs among its runs), UNMATCHED
    due_at: float | None  # when it may go (None: not while a run is open)
    reason: str
    size: int
    last_activity: float
    runs: tuple[str, ...]  # dag_id/run_id of its runs
    instances: int = 0

    def due(self, now: float) -> bool:
        return self.due_at is not None and now >= self.due_at

    def __str__(self) -> str:
        return f"study {self.study_uid}: {self.reason}"


def verdict(facts: StudyFacts, policy: Policy, now: float) -> Verdict:
    """Whether ``facts``' study may go at ``now`` (see the module's rules)."""
    study, runs = facts.study, facts.runs
    names = tuple(r.name for r in runs)
    last = max([study.last_received] + [r.last_activity for r in runs])
    open_runs = [r for r in runs if r.kind == OPEN]
    if open_runs:
        return Verdict(study.study_uid, OPEN, None, f"kept: run {open_runs[0].name} {open_runs[0].why}", study.size,
                       last, names, study.instances)
    if not runs:
        due = study.last_received + policy.unmatched
        return Verdict(study.study_uid, UNMATCHED, due, _when(f"no flow ran on it; unmatched data is kept "
                                                              f"{_days(policy.unmatched)}", due, now),
                       study.size, last, names, study.instances)
    due_run = max(runs, key=lambda r: r.last_activity + policy.keep(r.kind))
    due = max(due_run.last_activity + policy.keep(due_run.kind), study.last_received)
    kind = DELIVERED if all(r.kind == DELIVERED for r in runs) else FAILED
    return Verdict(study.study_uid, kind, due,
                   _when(f"run {due_run.name} {due_run.why}; {due_run.kind} data is kept "
                         f"{_days(policy.keep(due_run.kind))}", due, now), study.size, last, names,
                   study.instances)


def _when(text: str, due: float, now: float) -> str:
    return f"{text}: due now" if now >= due else f"{text}: due in {_days(due - now)}"


def _days(seconds: float) -> str:
    return f"{seconds / 86400:.3g} d" if seconds >= 86400 else f"{seconds / 3600:.3g} h"


@dataclass(frozen=True)
class Plan:
    """Retention's decision for all studies at ``now``: what goes because its time is up
    (``due``), and, in order, what may go early while the disk is below the low-water mark."""

    now: float
    verdicts: tuple[Verdict, ...]
    free_bytes: int | None
    low_water: int
    gathered_at: float  # when the facts were read: anything newer keeps its study (StudyIndex.purge_study)

    @property
    def due(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.due(self.now)]

    @property
    def low(self) -> bool:
        return bool(self.low_water) and self.free_bytes is not None and self.free_bytes < self.low_water

    @property
    def early(self) -> list[Verdict]:
        """Studies that may go ahead of their time when the disk is low: all runs delivered first,
        then unmatched, the oldest activity first in each; never open, failed or rejected."""
        if not self.low:
            return []
        order = {DELIVERED: 0, UNMATCHED: 1}
        kept = [v for v in self.verdicts if not v.due(self.now) and v.kind in order]
        return sorted(kept, key=lambda v: (order[v.kind], v.last_activity))


def plan(facts: Iterable[StudyFacts], policy: Policy, now: float, free_bytes: int | None,
         gathered_at: float | None = None) -> Plan:
    """``gathered_at``: when ``facts`` were read (default ``now``)."""
    return Plan(now, tuple(verdict(f, policy, now) for f in facts), free_bytes, policy.low_water,
                now if gathered_at is None else gathered_at)


# -- the facts -----------------------------------------------------------------------------------
def run_facts(run: RegisteredRun, data: DataDir, states: RunStates) -> RunFacts:
    """One registered run's kind: the register says whether its sensor took the input, Airflow
    whether it finished, the manifest whether a reviewer rejected it."""
    folder = data.run(run.dag_id, run.run_id)
    last = max(run.opened_at, run.closed_at or 0.0, _mtime(folder.manifest))
    if run.state == "abandoned":
        return RunFacts(run.dag_id, run.run_id, FAILED, last, "was abandoned (never started)")
    state = states(run.dag_id, run.run_id)
    if state in ("queued", "running") or (state is None and run.state == "open" and _recent(run, last)):
        return RunFacts(run.dag_id, run.run_id, OPEN, last,
                        "is still " + (state or "waiting to be triggered"))
    if state is None:
        return RunFacts(run.dag_id, run.run_id, FAILED, last, "is not in Airflow (deleted or never triggered)")
    if state == "success":
        if _rejected(folder):
            return RunFacts(run.dag_id, run.run_id, REJECTED, last, "was rejected in review")
        return RunFacts(run.dag_id, run.run_id, DELIVERED, last, "delivered")
    return RunFacts(run.dag_id, run.run_id, FAILED, last, f"ended {state}")


#: A run opened but not yet in Airflow (its trigger in the outbox, Airflow down) is open for this long.
UNTRIGGERED_GRACE = 7 * 86400.0


def _recent(run: RegisteredRun, last: float) -> bool:
    return time.time() - last < UNTRIGGERED_GRACE


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _rejected(run: RunDir) -> bool:
    try:
        tasks = json.loads(run.manifest.read_text()).get("tasks", {})
    except (OSError, ValueError):
        return False
    return any(isinstance(part, dict) and part.get("decision") == "rejected" for part in tasks.values())


def gather(index: StudyIndex, data: DataDir, states: RunStates) -> list[StudyFacts]:
    """Every study the index holds, with its runs (``states``: Airflow's state of a DAG run)."""
    runs: dict[str, list[RegisteredRun]] = {}
    for run in index.registered_runs(purged=False):
        runs.setdefault(run.study_uid, []).append(run)
    return [StudyFacts(study, tuple(run_facts(r, data, states) for r in runs.get(study.study_uid, ())))
            for study in index.studies()]


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# -- acting on a plan ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Deleted:
    verdict: Verdict
    early: bool  # below the low-water mark, ahead of its time


@dataclass(frozen=True)
class Outcome:
    deleted: tuple[Deleted, ...]
    skipped: tuple[str, ...]  # study UIDs that changed since the plan: kept
    low_water_alert: str | None  # what to tell the operators when the disk was low


def purge(plan_: Plan, index: StudyIndex, data: DataDir, *, actor: str, dry_run: bool = False,
          free: Callable[[], int] | None = None) -> Outcome:
    """Delete what ``plan_`` says may go: the due studies, then, while ``free()`` (the data dir's
    free bytes, measured after each deletion) is below the low-water mark, the early ones.
    ``dry_run``: nothing deleted, the outcome lists what would go (and records nothing)."""
    free = free or (lambda: free_bytes(data.root))
    deleted: list[Deleted] = []
    skipped: list[str] = []
    for v in plan_.due:
        if dry_run or _purge_one(v, plan_.gathered_at, index, data, actor, early=False):
            deleted.append(Deleted(v, early=False))
        else:
            skipped.append(v.study_uid)
    alert = None
    if plan_.low:
        freed = sum(d.verdict.size for d in deleted)
        early_done = 0
        for v in plan_.early:
            now_free = (plan_.free_bytes or 0) + freed if dry_run else free()
            if now_free >= plan_.low_water:
                break
            if dry_run or _purge_one(v, plan_.gathered_at, index, data, actor, early=True):
                deleted.append(Deleted(v, early=True))
                freed += v.size
                early_done += 1
            else:
                skipped.append(v.study_uid)
        after = (plan_.free_bytes or 0) + freed if dry_run else free()
        alert = (f"free disk of the data dir {format_gb(plan_.free_bytes or 0)} is below the low-water mark "
                 f"{format_gb(plan_.low_water)} (RADDEPLOY_DISK_LOW_WATER): {early_done} delivered or unmatched "
                 f"studies deleted ahead of their retention, oldest first; now {format_gb(after)} free"
                 + ("" if after >= plan_.low_water else
                    ": still below, and nothing more may go (open runs, failed or rejected runs are kept): "
                    "add disk or shorten RADDEPLOY_RETAIN_FAILED"))
        if not dry_run:
            index.record_audit(AuditRecord("disk_low", outcome="serious_failure" if after < plan_.low_water
                                           else "minor_failure", actor=actor,
                                           detail={"free_bytes": after, "low_water": plan_.low_water,
                                                   "studies": early_done}))
    return Outcome(tuple(deleted), tuple(skipped), alert)


def _purge_one(v: Verdict, planned_at: float, index: StudyIndex, data: DataDir, actor: str, early: bool) -> bool:
    """One study out of the data dir and the index, its audit record in the same transaction.
    Its folders are renamed into ``.trash/`` inside the transaction (undone if it fails) and
    removed after it: a crash leaves them there, and the next purge empties the trash."""
    trash = data.trash / f"{v.study_uid}.{int(time.time() * 1000)}"
    folders = [data.studies / v.study_uid] + [data.runs / name for name in v.runs]
    moved: list[tuple[Path, Path]] = []
    series = sorted(p.name for p in folders[0].iterdir()) if folders[0].is_dir() else []

    def move_away() -> None:
        for i, folder in enumerate(folders):
            if folder.exists():
                target = trash / str(i)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(folder, target)
                moved.append((folder, target))

    record = AuditRecord("deletion", study_uid=v.study_uid, actor=actor, detail={
        "kind": v.kind + (" early" if early else ""), "bytes": v.size, "instances": v.instances, "runs": list(v.runs),
        "series_uids": series, "why": v.reason})
    try:
        done = index.purge_study(v.study_uid, planned_at=planned_at, move_away=move_away, record=record)
    except BaseException:
        for folder, target in reversed(moved):
            os.rename(target, folder)
        raise
    empty_trash(data)
    if done:
        log.info("retention: deleted %s", v)
    else:
        log.info("retention: study %s changed since the plan (an instance or run came): kept", v.study_uid)
    return done


def empty_trash(data: DataDir) -> None:
    if data.trash.is_dir():
        for entry in data.trash.iterdir():
            shutil.rmtree(entry, ignore_errors=True)


def describe(outcome: Outcome, plan_: Plan, dry_run: bool) -> list[str]:
    """Lines for the log and ``raddeploy purge``: what went (or would), what was kept and why."""
    verb = "would delete" if dry_run else "deleted"
    lines = [f"{verb} {d.verdict}" + (" (early: disk below the low-water mark)" if d.early else "")
             for d in outcome.deleted]
    lines += [f"kept study {uid}: it changed since the plan" for uid in outcome.skipped]
    gone = {d.verdict.study_uid for d in outcome.deleted} | set(outcome.skipped)
    lines += [f"kept {v}" for v in plan_.verdicts if v.study_uid not in gone]
    if outcome.low_water_alert:
        lines.append(outcome.low_water_alert)
    return lines


def summary(outcome: Outcome, plan_: Plan) -> dict[str, int]:
    return {"studies": len(plan_.verdicts), "deleted": len(outcome.deleted),
            "early": sum(d.early for d in outcome.deleted), "skipped": len(outcome.skipped),
            "bytes": sum(d.verdict.size for d in outcome.deleted)}

