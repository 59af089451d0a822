"""The DICOM side of the listener: a pynetdicom storage SCP that writes what it receives.

pynetdicom writes each incoming dataset to a temporary Part 10 file as it arrives (chunked
receive, no decode); the C-STORE handler hands that file to the study store and answers
success only once the store has it on disk and indexed. The handler maps store errors to
DIMSE statuses; the policy lives in the store.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import Callable

from pydicom.errors import InvalidDicomError
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from raddeploy_provider.store import IngestResult, StoreError, StudyStore
from raddeploy_provider.store.header import InstanceHeader

log = logging.getLogger("raddeploy.listener")

# Storage service statuses (PS3.4 Table B.2-1).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


@dataclass
class ScpConfig:
    ae_title: str = "RADDEPLOY"
    host: str = "0.0.0.0"
    port: int = 11112
    network_timeout: float = 60.0
    dimse_timeout: float = 60.0


class StorageSCP:
    """Owns the pynetdicom AE; ``select`` picks the flows an instance is relevant to."""

    def __init__(self, config: ScpConfig, store: StudyStore,
                 select: Callable[[InstanceHeader], list[str]],
                 on_ingested: Callable[[IngestResult], None]) -> None:
        self.config = config
        self.store = store
        self.select = select
        self.on_ingested = on_ingested
        self._server: ThreadedAssociationServer | None = None

    def handle_store(self, event: evt.Event) -> int:
        temp = event.dataset_path
        requestor = event.assoc.requestor
        try:
            result = self.store.ingest(temp, self.select, calling_ae=requestor.ae_title,
                                       peer=f"{requestor.address}:{requestor.port}")
        except (InvalidDicomError, StoreError, ValueError, EOFError) as exc:
            log.warning("instance from %s@%s refused: %s", requestor.ae_title, requestor.address, exc)
            return CANNOT_UNDERSTAND
        except OSError as exc:
            log.error("cannot store instance from %s@%s: %s (check free space and permissions "
                      "of the data dir)", requestor.ae_title, requestor.address, exc)
            return OUT_OF_RESOURCES
        except Exception:
            log.exception("unexpected error storing an instance from %s@%s", requestor.ae_title,
                          requestor.address)
            temp.unlink(missing_ok=True)
            return CANNOT_UNDERSTAND
        self.on_ingested(result)
        return SUCCESS

    @staticmethod
    def handle_accepted(event: evt.Event) -> None:
        requestor = event.assoc.requestor
        log.info("association accepted from %s@%s", requestor.ae_title, requestor.address)

    def start(self) -> None:
        # pynetdicom writes the chunked temp file with tempfile's default folder: point it at
        # the store's incoming folder so the final rename stays on one file system.
        tempfile.tempdir = str(self.store.layout.incoming)
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_HANDLER_LEVEL = "none"
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_pdu_size = 0  # unlimited: senders use large PDVs
        ae.network_timeout = self.config.network_timeout
        ae.dimse_timeout = self.config.dimse_timeout
        # Every storage SOP class in every transfer syntax pynetdicom knows: the bytes are
        # stored as received, never decoded, so compressed data costs nothing extra.
        ae.supported_contexts = [build_context(Verification)] + [
            build_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES) for cx in AllStoragePresentationContexts
        ]
        handlers = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_ACCEPTED, self.handle_accepted)]
        self._server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)
        log.info("listening as %s on %s:%d", self.config.ae_title, self.config.host, self.config.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
