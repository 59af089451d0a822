"""DicomSendOperator: deliver a run's results to one DICOM node, safely and exactly once."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timezone
from functools import cached_property
from typing import TYPE_CHECKING, Any, Sequence

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from raddeploy_provider.config import load_settings
from raddeploy_provider.dicom.allowlist import AllowList
from raddeploy_provider.store import RunDir, manifest, outputs
from raddeploy_provider.utils import audit
from raddeploy_provider.utils.runs import run_dir

if TYPE_CHECKING:  # pynetdicom (and pydicom) at execute: a DAG parse for another task needs neither
    from raddeploy_provider.dicom.scu import SendReport
    from raddeploy_provider.hooks.dicom import DicomHook

#: How many refused instances the task log lists one by one (the XCom summary holds up to 50).
LOGGED_REFUSALS = 20


class DicomSendOperator(BaseOperator):
    """Send every file of the named outputs of this run to a DICOM node.

    Before anything is sent, the output guard (:mod:`raddeploy_provider.store.outputs`) checks
    every file: a regular file the model wrote (no links), valid DICOM Part 10, carrying the
    input's Patient ID and Study Instance UID. One problem and nothing is sent: the task fails
    (no retry: the outputs will not change) naming each file and field.

    The ledger (``sent/<task>.json``) keys what the node accepted by SOP Instance UID and
    content hash: a retry sends only what is missing, and a result that a re-run of its model
    regenerated is sent again. Reads its run folder only: the outputs, the input (whose
    identity the results must carry), the ledger, and (to return results) the sender the
    fingerprint sensor recorded in the manifest.

    Returns, for XCom, the destination's counts: accepted (now and in earlier tries), warned,
    refused, with the refused instances' SOP Instance UIDs and statuses.

    :param sources: output mount names whose files are sent (the flow's ``dst*`` outputs).
    :param dicom_conn_id: an Airflow connection of type ``dicom``; or give the node directly:
    :param host: the node's host.
    :param port: the node's port.
    :param ae_title: the node's AE title.
    :param calling_ae_title: our AE title towards the node.
    :param return_to_sender_port: instead of a fixed node, send back to the node the study's
        matched input came from, on this port; only when that node is on the listener's
        allow-list (``RADDEPLOY_ALLOWED_CALLING_AETS`` / ``RADDEPLOY_ALLOWED_NETWORKS``).
    :param check_patient: every result must carry the input's Patient ID (the flow's
        ``new_patient: allowed`` turns it off).
    :param check_study: every result must carry the input's Study Instance UID (``new_study: allowed``).
    """

    template_fields: Sequence[str] = ()  # flow text is passed literally, never rendered by Jinja
    ui_color = "#f4e1c7"

    def __init__(self, *, sources: Sequence[str], dicom_conn_id: str | None = None, host: str | None = None,
                 port: int | None = None, ae_title: str | None = None, calling_ae_title: str | None = None,
                 return_to_sender_port: int | None = None, check_patient: bool = True, check_study: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sources = list(sources)
        self.return_to_sender_port = return_to_sender_port
        self.check_patient, self.check_study = check_patient, check_study
        # The node, as DicomHook takes it: a connection, or given directly.
        self.dicom_conn_id, self.calling_ae_title = dicom_conn_id, calling_ae_title
        self.host, self.port, self.ae_title = host, port, ae_title

    @cached_property
    def hook(self) -> DicomHook:
        from raddeploy_provider.hooks.dicom import DicomHook

        return DicomHook(dicom_conn_id=self.dicom_conn_id, host=self.host, port=self.port,
                         ae_title=self.ae_title, calling_ae_title=self.calling_ae_title)

    def _resolve_sender(self, run: RunDir) -> None:
        """Point this task at the node the study's matched input came from, if that is safe."""
        part = manifest.run_part(run)
        sender = part.get("sender")
        if not sender:
            why = part.get("sender_refused") or "no sender is recorded for this run (manifest.json)"
            raise AirflowFailException(f"results are not returned to the sender: {why}")
        settings = load_settings()
        allow = AllowList.parse(settings.allowed_calling_aets, settings.allowed_networks)
        if not allow.configured:
            raise AirflowFailException(
                "results are not returned to the sender: the listener has no allow-list, so any node on the "
                "network could have sent the study. Set RADDEPLOY_ALLOWED_CALLING_AETS and/or "
                "RADDEPLOY_ALLOWED_NETWORKS to the nodes that may send (and so receive results back)")
        refused = allow.refusal(sender["calling_ae"], sender["host"])
        if refused:
            raise AirflowFailException(f"results are not returned to the sender: {refused} (the allow-list of "
                                       "the listener decides who may receive results back)")
        self.ae_title, self.host = sender["calling_ae"], sender["host"]
        self.port = self.return_to_sender_port

    def _guard(self, run: RunDir) -> outputs.OutputCheck:
        try:
            identity = outputs.input_identity(run.input, patient=self.check_patient, study=self.check_study)
        except (ValueError, OSError) as exc:
            raise AirflowFailException(f"nothing is sent: {exc}") from None
        check = outputs.check_outputs([run.mount(name) for name in self.sources], run.root, identity)
        if not check.ok:
            for problem in check.problems[:LOGGED_REFUSALS]:
                self.log.error("output guard: %s", problem)
            raise AirflowFailException(check.explain())
        if not check.outputs:
            raise AirflowFailException(f"nothing to send: outputs {', '.join(self.sources)} are empty")
        return check

    def execute(self, context: Context) -> dict[str, Any]:
        from raddeploy_provider.dicom.scu import SendError, SendReport

        run = run_dir(context)
        if self.return_to_sender_port:
            self._resolve_sender(run)
        check = self._guard(run)
        ledger_path = run.sent_ledger(self.task_id)
        ledger = _read_ledger(ledger_path)
        hashes = {str(o.path): _sha256(o.path) for o in check.outputs}
        todo = [o for o in check.outputs if ledger.get(o.header.sop_uid) != hashes[str(o.path)]]
        node = self.hook.node()
        self.log.info("sending %d results (%d already accepted in an earlier try) to %s", len(todo),
                      len(check.outputs) - len(todo), node)
        report = self.hook.send([o.path for o in todo]) if todo else SendReport(node=str(node), results=[])
        uid_of = {str(o.path): o.header.sop_uid for o in check.outputs}
        for result in report.results:
            if result.accepted:
                ledger[uid_of[result.path]] = hashes[result.path]
        ledger_path.parent.mkdir(parents=True, exist_ok=True)
        ledger_path.write_text(json.dumps(ledger, indent=1, sort_keys=True))
        self._record(run, report, uid_of, hashes)
        summary = {**report.summary(), "accepted": len(check.outputs) - len(report.refused),
                   "accepted_now": len(report.accepted)}
        audit.record(context, "send", outcome="success" if report.ok else "serious_failure",
                     actor=node.calling_ae_title, peer=str(node), destination=self.hook.dicom_conn_id or str(node),
                     accepted=summary["accepted"], refused=len(report.refused), warned=len(report.warned),
                     sop_uids=[uid_of[path] for path in report.accepted],
                     **({"why": report.unreachable} if report.unreachable else {}))
        self.log.info("send result: %s", json.dumps({k: v for k, v in summary.items() if not k.endswith("_instances")}))
        if report.unreachable:
            self.log.error("%s cannot be reached: %s; %s", node, report.unreachable, self._next_try(context))
            raise SendError(report)
        if not report.ok:
            for result in report.refused[:LOGGED_REFUSALS]:
                status = f"0x{result.status:04X}" if result.status is not None else "no status"
                self.log.error("refused by %s: SOP Instance UID %s: %s (%s)", node, result.sop_instance_uid, status,
                               result.reason)
            self.log.error("%d refused; %s", len(report.refused), self._next_try(context))
            raise SendError(report)
        for result in report.warned[:LOGGED_REFUSALS]:
            self.log.warning("accepted with a warning: SOP Instance UID %s: 0x%04X %s", result.sop_instance_uid,
                             result.status, result.reason)
        return summary

    def _record(self, run: RunDir, report: SendReport, uid_of: dict[str, str], hashes: dict[str, str]) -> None:
        """What was sent where and when, in the run manifest (merged over tries)."""
        path = run.manifest_parts / f"{self.task_id}.json"
        part = json.loads(path.read_text()) if path.exists() else {"sent": {}}
        now = _now()
        part.update(node=report.node, last_try=now)
        for result in report.results:
            uid = uid_of[result.path]
            part["sent"][uid] = {"sha256": hashes[result.path], "at": now,
                                 "status": None if result.status is None else f"0x{result.status:04X}",
                                 **({"reason": result.reason} if result.reason else {}),
                                 **({"converted_to": result.converted} if result.converted else {})}
        if report.unreachable:
            part["unreachable"] = report.unreachable
        manifest.record(run, self.task_id, part)

    def _next_try(self, context: Context) -> str:
        """When Airflow tries again (its own rule for ``retry_delay`` and the backoff multiplier)."""
        ti = context.get("ti")
        try_number = getattr(ti, "try_number", 1) or 1
        if try_number > self.retries:
            return f"no tries left (try {try_number} of {self.retries + 1}): clear the task to send again"
        delay = self.retry_delay.total_seconds()
        multiplier = float(self.retry_exponential_backoff or 1.0)
        if multiplier == 1.0:
            return f"Airflow tries again in {delay:.0f} s (try {try_number} of {self.retries + 1})"
        low = max(1, math.ceil(delay * multiplier ** (try_number - 1)))
        return f"Airflow tries again in {low}-{2 * low} s (try {try_number} of {self.retries + 1})"


def _read_ledger(path) -> dict[str, str]:
    """SOP Instance UID -> sha256 of what the node accepted; an older ledger (paths) counts as nothing sent."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
