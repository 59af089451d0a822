"""The listener service: storage SCP + study store + flow matching + outbox delivery.

Run as ``raddeploy listen``. Needs no Airflow installation: it reaches Airflow over REST.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

from raddeploy_provider.airflow_client import AirflowClient
from raddeploy_provider.config import Settings, configure_logging, load_settings
from raddeploy_provider.dicom.allowlist import AllowList
from raddeploy_provider.dicom.dimse import Status
from raddeploy_provider.flows import matched_triggers
from raddeploy_provider.flows.registry import FlowRegistry
from raddeploy_provider.store import IngestResult, StudyStore
from raddeploy_provider.store.header import InstanceHeader

from .association import Sender
from .outbox import OutboxDelivery
from .policy import AcceptPolicy, ingest_verdict
from .server import DicomServer, tls_context

log = logging.getLogger("raddeploy.listener")

#: How long past its flow's grouping timeout a run that was never closed blocks a new one.
ABANDON_SLACK = 600.0


class Listener:
    """Everything the listener runs, started and stopped together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = StudyStore(settings.data_dir, fsync=settings.fsync)
        self.flows = FlowRegistry(settings.flows_dir)
        self.client = AirflowClient(settings.airflow_url, settings.airflow_user, settings.airflow_password)
        self.outbox = OutboxDelivery(self.store.index, self.client)
        self._stopping = threading.Event()
        self._hasher = threading.Thread(target=self._hash_when_idle, name="hasher", daemon=True)
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
                                  on_association_end=lambda sender: self.store.index.association_ended(sender.association))

    def handle_store(self, path: Path, sender: Sender, head: bytes) -> int:
        """A received file (consumed either way): into the store, runs opened, the DIMSE status for the sender."""
        try:
            result = self.store.ingest(path, self.select_flows, calling_ae=sender.calling_ae, peer=sender.peer,
                                       association=sender.association, head=head)
        except Exception as exc:
            verdict = ingest_verdict(exc)
            log.log(verdict.level, verdict.message, sender.calling_ae, sender.host, exc,
                    exc_info=exc if verdict.traceback else None)
            return verdict.status
        finally:
            path.unlink(missing_ok=True)
        self.on_ingested(result)
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
        self._clear_incoming()
        self.store.index.clear_receiving()
        self.flows.current()
        self.outbox.start()  # replays whatever a previous process left pending
        self._hasher.start()
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.outbox.stop()
        self._stopping.set()
        self._hasher.join(timeout=10)

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


def serve(settings: Settings | None = None) -> None:
    """Run until SIGINT or SIGTERM."""
    listener = Listener(settings or load_settings())
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    listener.start()
    try:
        done.wait()
    finally:
        log.info("stopping")
        listener.stop()


def main() -> int:
    """``python -m listener`` and ``raddeploy listen``."""
    configure_logging()
    serve(load_settings())
    return 0
