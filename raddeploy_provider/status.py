"""Status at a glance: the last studies and what became of them, the outbox, disk, GPUs, the listener.

One report (:class:`StatusReport`, a value), three readings: ``raddeploy status`` prints its
:meth:`~StatusReport.text` or :meth:`~StatusReport.as_json`, the provider's status page
(``plugins/status.py``, behind Airflow's login) its :meth:`~StatusReport.html`. Whoever builds
it says how to learn a DAG run's state (the CLI over the REST API, the page from Airflow's
database) and whether the listener answers. UIDs, AE titles and counts; a patient's name only
when the deployment turns it on (``RADDEPLOY_SHOW_PATIENT_NAMES``).
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from raddeploy_provider import gpu
from raddeploy_provider.config import Settings
from raddeploy_provider.store import StudyIndex
from raddeploy_provider.store.audit import iso
from raddeploy_provider.store.retention import free_bytes
from raddeploy_provider.units import format_gb

#: A DAG run's state as Airflow has it, None when it has none (see store.retention.RunStates).
RunStates = Callable[[str, str], "str | None"]


@dataclass(frozen=True)
class RunLine:
    dag_id: str
    run_id: str
    state: str  # Airflow's state, or the register's when Airflow has none ("waiting to be triggered")
    delivered_after: float | None  # seconds from the study's last instance to the last result accepted


@dataclass(frozen=True)
class StudyLine:
    study_uid: str
    received: float  # the last instance
    sender: str
    series: int
    instances: int
    runs: list[RunLine]
    patient_name: str | None = None


@dataclass(frozen=True)
class StatusReport:
    at: float
    studies: list[StudyLine]
    outbox_waiting: int
    outbox_given_up: int
    free_bytes: int
    min_free_disk: int
    low_water: int
    gpus: dict[str, str]  # device id -> free / leased (this host)
    listener: str  # "answers C-ECHO at ...", "last association ... ago", "not reached: ..."
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        lines = [f"raddeploy status at {iso(self.at)}",
                 f"listener: {self.listener}",
                 f"outbox: {self.outbox_waiting} trigger(s) waiting for Airflow, {self.outbox_given_up} given up",
                 f"disk: {format_gb(self.free_bytes)} free (refuses instances below {format_gb(self.min_free_disk)}, "
                 f"retention's low-water mark {format_gb(self.low_water) if self.low_water else 'off'})",
                 "GPUs on this host: " + (", ".join(f"{d} {s}" for d, s in self.gpus.items()) or "none"), ""]
        lines.append(f"last {len(self.studies)} studies (newest first):")
        for s in self.studies:
            who = f" {s.patient_name}" if s.patient_name is not None else ""
            lines.append(f"  {iso(s.received)}  {s.study_uid}{who}  from {s.sender or '?'}: "
                         f"{s.series} series, {s.instances} instances")
            for r in s.runs:
                took = f", delivered {r.delivered_after:.1f} s after the last instance" if r.delivered_after else ""
                lines.append(f"      {r.dag_id} {r.run_id}: {r.state}{took}")
            if not s.runs:
                lines.append("      no flow matched")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        e = html.escape
        rows = []
        for s in self.studies:
            runs = "<br>".join(f"<code>{e(r.dag_id)}</code> {e(r.state)}"
                               + (f" ({r.delivered_after:.1f} s)" if r.delivered_after else "") for r in s.runs)
            who = f"<br>{e(s.patient_name)}" if s.patient_name is not None else ""
            rows.append(f"<tr><td>{e(iso(s.received))}</td><td><code>{e(s.study_uid)}</code>{who}</td>"
                        f"<td>{e(s.sender)}</td><td>{s.series}</td><td>{s.instances}</td>"
                        f"<td>{runs or 'no flow matched'}</td></tr>")
        gpus = ", ".join(f"{e(d)} {e(st)}" for d, st in self.gpus.items()) or "none on this host"
        return f"""<!doctype html><html><head><meta charset="utf-8"><title>RadDeploy status</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}</style></head><body>
<h1>RadDeploy status</h1><p>at {e(iso(self.at))}</p>
<ul id="health"><li>Listener: {e(self.listener)}</li>
<li>Outbox: {self.outbox_waiting} waiting for Airflow, {self.outbox_given_up} given up</li>
<li>Disk: {e(format_gb(self.free_bytes))} free (instances refused below {e(format_gb(self.min_free_disk))})</li>
<li>GPUs: {gpus}</li></ul>
<h2>Last studies</h2><table id="studies"><tr><th>received</th><th>study</th><th>sender</th><th>series</th>
<th>instances</th><th>runs (time from last instance to delivery)</th></tr>{''.join(rows)}</table></body></html>"""


def delivered_at(manifest: dict[str, Any]) -> float | None:
    """When a node last accepted one of the run's results (its send tasks' manifest parts: status
    0x0000, or a 0xB... warning), None if none was."""
    from datetime import datetime

    found = []
    for part in (manifest.get("tasks") or {}).values():
        sent = part.get("sent") if isinstance(part, dict) else None
        for entry in (sent or {}).values():
            status = str(entry.get("status") or "")
            if status == "0x0000" or status.startswith("0xB"):
                try:
                    found.append(datetime.fromisoformat(str(entry.get("at"))).timestamp())
                except ValueError:
                    continue
    return max(found) if found else None


def gather(settings: Settings, index: StudyIndex, states: RunStates, listener: str, limit: int = 20) -> StatusReport:
    data = settings.data
    studies = []
    for study in index.studies(limit=limit, with_names=settings.show_patient_names):
        lines = []
        for run in index.registered_runs(study_uid=study.study_uid):
            state = states(run.dag_id, run.run_id) or {"open": "waiting to be triggered", "closing": "not in Airflow",
                                                       "abandoned": "abandoned"}.get(run.state, run.state)
            after = None
            try:
                manifest = json.loads(data.run(run.dag_id, run.run_id).manifest.read_text())
                done = delivered_at(manifest)
                after = done - study.last_received if done else None
            except (OSError, ValueError):
                pass
            lines.append(RunLine(run.dag_id, run.run_id, state, after))
        studies.append(StudyLine(study.study_uid, study.last_received, study.calling_ae, study.series,
                                 study.instances, lines, study.patient_name))
    ids = gpu.host_gpu_ids()
    return StatusReport(
        at=time.time(), studies=studies, outbox_waiting=len(index.pending_triggers(limit=100000, now=float("inf"))),
        outbox_given_up=len(index.given_up_triggers()), free_bytes=free_bytes(data.root),
        min_free_disk=settings.min_free_disk, low_water=settings.disk_low_water,
        gpus=gpu.leases(ids, settings.gpu_lock_dir), listener=listener)


def last_association(index: StudyIndex, now: float | None = None) -> str:
    """The listener's health as the audit trail shows it: when it last had an association."""
    now = time.time() if now is None else now
    recent = index.audit_records(since=now - 86400 * 30)
    seen = [r for r in recent if r.event == "association"]
    if not seen:
        return "no association in the last 30 days"
    last = seen[-1]
    return f"last association {now - (last.at or now):.0f} s ago, from {last.actor or last.peer} ({last.detail.get('result', '')})"
