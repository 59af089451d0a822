"""The listener service: storage SCP + study store + flow matching + outbox delivery.

Run as ``raddeploy listen``. Needs no Airflow installation: it reaches Airflow over REST.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from raddeploy_provider.airflow_client import AirflowClient
from raddeploy_provider.config import PROCESS_UMASK, Settings, configure_logging, load_settings
from raddeploy_provider.dicom.allowlist import AllowList
from raddeploy_provider.dicom.dimse import Status
from raddeploy_provider.flows import matched_triggers
from raddeploy_provider.flows.registry import FlowRegistry
from raddeploy_provider.store import IngestResult, StudyStore
from raddeploy_provider.store.audit import AuditRecord
from raddeploy_provider.store.header import InstanceHeader

from .association import Association, Sender, StoreRequest
from .audit_writer import AuditWriter
from .outbox import OutboxDelivery
from .policy import AcceptPolicy, DataSetMismatch, data_set_mismatch, ingest_verdict
from .server import DicomServer, tls_context

log = logging.getLogger("raddeploy.listener")

#: How long past its flow's grouping timeout a run that was never closed blocks a new one.
ABANDON_SLACK = 600.0


class Listener:
    """Everything the listener runs, started and stopped together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = StudyStore(settings.data_dir, fsync=settings.fsync, index_url=settings.index_url)
        self.flows = FlowRegistry(settings.flows_dir)
        self.client = AirflowClient(settings.airflow_url, settings.airflow_user, settings.airflow_password)
        self.outbox = OutboxDelivery(self.store.index, self.client, give_up_after=settings.outbox_give_up)
        self.audit = AuditWriter(self.store.index)
        self._studies_of: dict[str, set[str]] = {}  # association id -> studies it stored (for its audit record)
        self._stopping = threading.Event()
        self._hasher = threading.Thread(target=self._hash_when_idle, name="hasher", daemon=True)
        self._watcher = threading.Thread(target=self._watch_flows, name="flows", daemon=True)
        allow = AllowList.parse(settings.allowed_calling_aets, settings.allowed_networks)
        policy = AcceptPolicy(
            settings.ae_title, check_called_ae=settings.check_called_ae,
            allowed_calling=allow.calling, allowed_networks=allow.networks,
            min_free_disk=settings.min_free_disk, store_dir=settings.data_dir,
        )
        tls = None
        if settings.tls_cert or settings.tls_key:
            if not (settings.tls_cert and settings.tls_key):
                raise ValueError("DICOM TLS needs both RADDEPLOY_TLS_CERT and RADDEPLOY_TLS_KEY")
            tls = tls_context(settings.tls_cert, settings.tls_key, settings.tls_ca)
        self.server = DicomServer(settings.listen_host, settings.listen_port, policy, self.handle_store,
                                  self.store.layout.incoming, tls=tls,
                                  on_association_end=self._association_ended,
                                  on_refused=self._connection_refused,
                                  idle_timeout=settings.association_idle_timeout,
                                  setup_timeout=settings.association_setup_timeout,
                                  max_connections=settings.max_connections,
                                  max_connections_per_host=settings.max_connections_per_host)

    def _association_ended(self, assoc: Association) -> None:
        """In the association's thread, as it ends: it goes into the audit trail, its studies are no
        longer being received, and the thread's index connection is closed (a thread per
        association: else a few descriptors per association stay open until the garbage collector
        finds them)."""
        index = self.store.index
        try:
            if assoc.handed_to_store:
                index.association_ended(assoc.id)
            accepted = assoc.established
            studies = sorted(self._studies_of.pop(assoc.id, ()))
            self.audit.put(AuditRecord(
                "association", outcome="success" if accepted and not assoc.refused else
                ("minor_failure" if accepted else "serious_failure"), actor=assoc.calling_ae, peer=assoc.peer_host,
                study_uid=studies[0] if len(studies) == 1 else "", at=assoc.started_at,
                detail={"called_ae": assoc.called_ae, "association": assoc.id, "stored": assoc.stored,
                        "refused": assoc.refused, "result": assoc.result,
                        **({"why": assoc.why} if assoc.why else {}),
                        **({"study_uids": studies} if len(studies) > 1 else {})}))
        finally:
            if assoc.handed_to_store:
                index.release()

    def _connection_refused(self, host: str, why: str, count: int) -> None:
        """Connections refused over a cap, one record per log line (a flood is counted, not written row by row)."""
        self.audit.put(AuditRecord("association", outcome="serious_failure", peer=host, detail={
            "result": "refused", "why": why, "refused_connections": count}))

    def handle_store(self, path: Path, sender: Sender, head: bytes, request: StoreRequest | None = None) -> int:
        """A received file (consumed either way): into the store, runs opened, the DIMSE status for the sender.

        ``request``: what the C-STORE request said the data set is; a data set that says
        otherwise is refused (0xA900) from the header the store reads, before anything is kept.
        """
        def select(header: InstanceHeader) -> dict[str, float]:  # the store asks before it indexes
            why = request and data_set_mismatch(header.sop_class_uid, header.sop_uid, request.sop_class_uid,
                                                request.sop_instance_uid)
            if why:
                raise DataSetMismatch(why)
            return self.select_flows(header)

        try:
            result = self.store.ingest(path, select, calling_ae=sender.calling_ae, peer=sender.peer,
                                       association=sender.association, head=head)
        except Exception as exc:
            verdict = ingest_verdict(exc)
            log.log(verdict.level, verdict.message, sender.calling_ae, sender.host, exc,
                    exc_info=exc if verdict.traceback else None)
            return verdict.status
        finally:
            path.unlink(missing_ok=True)
        self.on_ingested(result)
        self._studies_of.setdefault(sender.association, set()).add(result.header.study_uid)
        return Status.SUCCESS

    def select_flows(self, header: InstanceHeader) -> dict[str, float]:
        """The valid flows with a trigger this instance satisfies: DAG id -> seconds after which
        a run that never closed counts as abandoned (the flow's grouping timeout, plus slack)."""
        return {flow.dag_id: flow.grouping.timeout + ABANDON_SLACK
                for flow in self.flows.current().flows if matched_triggers(flow, header.tags)}

    def on_ingested(self, result: IngestResult) -> None:
        for run in result.opened:
            log.info("study %s opened run %s of %s", run.study_uid, run.run_id, run.dag_id)
        if result.opened:
            self.outbox.wake()

    def start(self) -> None:
        log.info("study index: %s", self.store.index.where)
        self._clear_incoming()
        self.store.index.clear_receiving()
        self.flows.current()
        self.outbox.start()  # replays whatever a previous process left pending
        self.audit.start()
        self._hasher.start()
        self._watcher.start()
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.outbox.stop()
        self.audit.stop()
        self._stopping.set()
        self._hasher.join(timeout=10)
        self._watcher.join(timeout=10)
        self.store.index.close()

    def _watch_flows(self) -> None:
        """Reload a changed flows folder as it changes, not at the next association: a new flow
        matches the first instance after it, and a broken file's error is logged when it is saved."""
        while not self._stopping.wait(self.flows.interval):
            try:
                self.flows.current()
            except OSError as exc:  # gone, unreadable, or no descriptor left for a moment: the next look says
                log.warning("flows folder %s could not be read (%s); looking again in %.0f s",
                            self.settings.flows_dir, exc.strerror or exc, self.flows.interval)

    def _hash_when_idle(self) -> None:
        """Record the files' sha256 while no association is sending (or every 30 s at least):
        hashing competes with receiving for the CPU, and nobody waits for a hash."""
        last = time.monotonic()
        while not self._stopping.wait(1.0):
            if self.server.active_associations and time.monotonic() - last < 30:
                continue
            try:
                while self.store.fill_missing_hashes(200) and not self._stopping.is_set():
                    if self.server.active_associations:
                        break
            except Exception:
                log.exception("recording file hashes failed; will retry")
            last = time.monotonic()

    def _clear_incoming(self) -> None:
        """Partial files of associations that died with a previous process: never acknowledged."""
        for leftover in Path(self.store.layout.incoming).iterdir():
            if leftover.is_file():
                leftover.unlink()


#: Addresses that mean "every interface".
ALL_INTERFACES = ("", "0.0.0.0", "::", "[::]")


def open_to_everyone(settings: Settings) -> str | None:
    """The start-up warning for a listener on every interface with no allow-list, or None."""
    if settings.listen_host not in ALL_INTERFACES or settings.allowed_calling_aets or settings.allowed_networks:
        return None
    return (f"listening on every interface ({settings.listen_host or '*'} port {settings.listen_port}) with no "
            "allow-list: any host that reaches this port may store DICOM here and start flows. Set "
            "RADDEPLOY_ALLOWED_NETWORKS (e.g. 10.0.0.0/24) and/or RADDEPLOY_ALLOWED_CALLING_AETS, or "
            "RADDEPLOY_LISTEN_HOST to one address (127.0.0.1 for this host only)")


def serve(settings: Settings | None = None) -> None:
    """Run until SIGINT or SIGTERM, with umask 027 (the store's files 0640, its folders 0750)."""
    os.umask(PROCESS_UMASK)
    settings = settings or load_settings()
    warning = open_to_everyone(settings)
    if warning:
        log.warning(warning)
    listener = Listener(settings)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    listener.server.on_fatal = lambda exc: done.set()  # the accept loop failed: exit non-zero, be restarted
    listener.start()
    try:
        done.wait()
    finally:
        log.info("stopping")
        listener.stop()
    if listener.server.failed is not None:
        raise SystemExit(1)


def main() -> int:
    """``python -m listener`` and ``raddeploy listen``."""
    configure_logging()
    serve(load_settings())
    return 0
