"""How a received instance becomes a DIMSE status: the policy, apart from the protocol.

The study store does the work; this maps its outcome to the storage service's statuses
(PS3.4 Table B.2-1) so the sender knows whether to keep the instance and try again.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from struct import error as struct_error

from pydicom.errors import InvalidDicomError

from raddeploy_provider.store import IngestResult, StoreError, StudyStore
from raddeploy_provider.store.study_store import FlowSelector

from .association import Sender

log = logging.getLogger("raddeploy.listener")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


def store_status(store: StudyStore, path: Path, select: FlowSelector, sender: Sender,
                 head: bytes | None = None) -> tuple[int, IngestResult | None]:
    """Ingest ``path`` (consumed either way) and return the status to answer with."""
    calling_ae, host = sender.calling_ae, sender.host
    try:
        return SUCCESS, store.ingest(path, select, calling_ae=calling_ae, peer=sender.peer,
                                     association=sender.association, head=head)
    except (InvalidDicomError, StoreError, ValueError, EOFError, struct_error) as exc:
        log.warning("instance from %s@%s refused: %s", calling_ae, host, exc)
        return CANNOT_UNDERSTAND, None
    except (OSError, sqlite3.OperationalError) as exc:  # the index's disk full or locked too: retry later
        log.error("cannot store an instance from %s@%s: %s (check free space and permissions of the "
                  "data dir)", calling_ae, host, exc)
        return OUT_OF_RESOURCES, None
    except Exception:
        log.exception("unexpected error storing an instance from %s@%s", calling_ae, host)
        return CANNOT_UNDERSTAND, None
    finally:
        path.unlink(missing_ok=True)



