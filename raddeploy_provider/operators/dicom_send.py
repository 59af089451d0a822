"""DicomSendOperator: deliver a run's results to one DICOM node."""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any, Sequence

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowException

from raddeploy_provider.dicom.scu import SendError, dicom_files
from raddeploy_provider.hooks.dicom import DicomHook
from raddeploy_provider.store import RunDir, manifest
from raddeploy_provider.utils.runs import run_dir


class DicomSendOperator(BaseOperator):
    """Send every file of the named outputs of this run to a DICOM node.

    Files the node already accepted in an earlier try are not sent again, so a retry after a
    partial failure sends only what is missing. Reads its run folder only: the outputs, the
    ledger of what was accepted, and (to return results) the sender the manifest records.

    :param sources: output mount names whose files are sent (the flow's ``dst*`` outputs).
    :param dicom_conn_id: an Airflow connection of type ``dicom``; or give the node directly:
    :param host: the node's host.
    :param port: the node's port.
    :param ae_title: the node's AE title.
    :param calling_ae_title: our AE title towards the node.
    :param return_to_sender_port: instead of a fixed node, send back to the address and AE
        title the study came from, on this port.
    """

    template_fields: Sequence[str] = ("dicom_conn_id", "host", "ae_title")
    ui_color = "#f4e1c7"

    def __init__(self, *, sources: Sequence[str], dicom_conn_id: str | None = None, host: str | None = None,
                 port: int | None = None, ae_title: str | None = None, calling_ae_title: str | None = None,
                 return_to_sender_port: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sources = list(sources)
        self.return_to_sender_port = return_to_sender_port
        # The node, as DicomHook takes it: a connection, or given directly.
        self.dicom_conn_id, self.calling_ae_title = dicom_conn_id, calling_ae_title
        self.host, self.port, self.ae_title = host, port, ae_title

    @cached_property
    def hook(self) -> DicomHook:
        return DicomHook(dicom_conn_id=self.dicom_conn_id, host=self.host, port=self.port,
                         ae_title=self.ae_title, calling_ae_title=self.calling_ae_title)

    def _resolve_sender(self, run: RunDir) -> None:
        """Point this task at the node the study came from (its calling AE, its address)."""
        sender = manifest.run_part(run).get("sender")
        if not sender:
            raise AirflowException(f"no sender is recorded for run {run.run_id} (manifest.json): nothing to "
                                   "return results to")
        self.ae_title, self.host = sender["calling_ae"], sender["host"]
        self.port = self.return_to_sender_port

    def execute(self, context: Context) -> dict[str, Any]:
        run = run_dir(context)
        if self.return_to_sender_port:
            self._resolve_sender(run)
        files = dicom_files([run.mount(name) for name in self.sources])
        if not files:
            raise AirflowException(f"nothing to send: outputs {', '.join(self.sources)} are empty")
        ledger = run.sent_ledger(self.task_id)
        done = set(json.loads(ledger.read_text())) if ledger.exists() else set()
        todo = [p for p in files if str(p) not in done]
        self.log.info("sending %d files (%d already accepted earlier) to %s", len(todo), len(done),
                      self.hook.node())
        report = self.hook.send(todo)
        ledger.parent.mkdir(parents=True, exist_ok=True)
        ledger.write_text(json.dumps(sorted(done | set(report.accepted))))
        self.log.info("send result: %s", report.summary())
        if not report.ok:
            for path, why in list(report.failed.items())[:20]:
                self.log.error("not accepted: %s: %s", path, why)
            raise SendError(report)
        return {**report.summary(), "accepted": len(report.accepted) + len(done)}
