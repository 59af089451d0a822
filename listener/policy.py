"""The listener's policy, apart from the protocol: who may associate, and what a stored instance is answered.

Pure decisions on plain values: no network, no sockets. The one outside call is the free-disk
check, ``os.statvfs`` of the store's file system (a few microseconds), made for each
association request and again for each instance (and every few MiB of a large one).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from struct import error as struct_error

from pydicom.errors import InvalidDicomError
from pynetdicom.presentation import PresentationContext

from raddeploy_provider.dicom.allowlist import AllowList, Network
from raddeploy_provider.dicom.dimse import (
    APPLICATION_CONTEXT,
    PROVIDER_LOCAL_LIMIT_EXCEEDED,
    REJECTED_PERMANENT,
    REJECTED_TRANSIENT,
    SOURCE_PROVIDER_PRESENTATION,
    SOURCE_SERVICE_USER,
    USER_CALLED_AE_NOT_RECOGNIZED,
    USER_CALLING_AE_NOT_RECOGNIZED,
    USER_NO_REASON,
    Status,
)
from raddeploy_provider.store import IndexUnavailable, StoreError
from raddeploy_provider.store.errors import OtherPatient

#: What to check when the data dir cannot be written (said by every log line about it).
DATA_DIR_HINT = "check free space and permissions of the data dir"


@dataclass(frozen=True)
class Refusal:
    """An A-ASSOCIATE-RJ: result, source, diagnostic (PS3.8 Table 9-21), and why (for the log)."""

    result: int
    source: int
    diagnostic: int
    why: str

    @classmethod
    def permanent(cls, diagnostic: int, why: str) -> Refusal:
        """Refused by us, the service user: the sender should not retry as it is."""
        return cls(REJECTED_PERMANENT, SOURCE_SERVICE_USER, diagnostic, why)


@dataclass
class AcceptPolicy:
    """Who may associate, and when. A refusal is an A-ASSOCIATE-RJ, decided before any data flows.

    ``allowed_networks``: addresses or CIDR blocks (empty: any). ``min_free_disk``: bytes
    that must stay free on the store's file system, else associations are refused as
    "transient, local limit exceeded" so senders retry later, and instances on an open
    association "out of resources" (0xA700; :meth:`disk_refusal`).
    """

    ae_title: str
    check_called_ae: bool = True
    allowed_calling: frozenset[str] = frozenset()  # empty: any calling AE title
    allowed_networks: tuple[Network, ...] = ()
    min_free_disk: int = 0
    store_dir: Path | None = None
    contexts: list[PresentationContext] = field(default_factory=list)

    def refusal(self, called: str, calling: str, address: str, application_context: str) -> Refusal | None:
        """Why a request to associate is refused (called and calling AE titles, the peer's IP
        address, the application context name asked for), or None: accepted."""
        allow = AllowList(self.allowed_calling, self.allowed_networks)
        why = allow.address_refusal(address)
        if why:
            return Refusal.permanent(USER_NO_REASON, why)
        if self.check_called_ae and called != self.ae_title:
            return Refusal.permanent(USER_CALLED_AE_NOT_RECOGNIZED,
                                     f"called AE title {called!r} is not {self.ae_title!r}")
        why = allow.calling_refusal(calling)
        if why:
            return Refusal.permanent(USER_CALLING_AE_NOT_RECOGNIZED, why)
        why = self.disk_refusal()
        if why:
            return Refusal(REJECTED_TRANSIENT, SOURCE_PROVIDER_PRESENTATION, PROVIDER_LOCAL_LIMIT_EXCEEDED, why)
        if application_context != APPLICATION_CONTEXT:
            return Refusal.permanent(USER_NO_REASON, "not the DICOM application context")
        return None

    def disk_refusal(self) -> str | None:
        """Why nothing more may be received now (the store's free space is below the
        watermark), or None. Asked per association and per instance: a statvfs call."""
        if not self.min_free_disk or self.store_dir is None:
            return None
        try:
            st = os.statvfs(self.store_dir)
        except OSError as exc:
            return f"cannot check the store's free space: {exc}"
        free = st.f_bavail * st.f_frsize
        if free >= self.min_free_disk:
            return None
        return (f"only {free // 2**20} MiB free on the store, below "
                f"RADDEPLOY_MIN_FREE_DISK ({self.min_free_disk // 2**20} MiB)")


class DataSetMismatch(Exception):
    """The data set names another SOP class or instance than the C-STORE request that carried it."""


def data_set_mismatch(sop_class: str, sop_instance: str, request_class: str, request_instance: str) -> str | None:
    """Why a data set with these UIDs does not match its C-STORE request (Affected SOP Class UID,
    Affected SOP Instance UID), or None. Answered 0xA900, as DCMTK's storescp does for both."""
    if sop_class != request_class:
        return f"the data set's SOP Class UID {sop_class} is not the request's {request_class[:64]}"
    if sop_instance != request_instance:
        return f"the data set's SOP Instance UID {sop_instance} is not the request's {request_instance[:64]}"
    return None


#: What the study store raises for an instance it cannot understand (pydicom's, its own, a
#: truncated or malformed header; RecursionError: pydicom on sequences nested too deep).
BAD_DATA = (InvalidDicomError, StoreError, ValueError, EOFError, struct_error, RecursionError)
#: What it raises when it cannot write now: the disk (OSError) or the index (full, locked, unreachable).
NO_RESOURCES = (OSError, IndexUnavailable)


@dataclass(frozen=True)
class IngestVerdict:
    """The status for an instance the store did not take, and the log line saying why.

    ``message`` is a %-format of (calling AE, host, exception); ``traceback``: the unexpected,
    whose stack goes into the log too.
    """

    status: Status
    level: int
    message: str
    traceback: bool = False


_MISMATCH = IngestVerdict(Status.DATA_SET_MISMATCH, logging.WARNING, "instance from %s@%s refused: %s")
_REFUSED = IngestVerdict(Status.CANNOT_UNDERSTAND, logging.WARNING, "instance from %s@%s refused: %s")
_OTHER_PATIENT = IngestVerdict(Status.OTHER_PATIENT, logging.WARNING, "instance from %s@%s refused: %s")
_CANNOT_STORE = IngestVerdict(Status.OUT_OF_RESOURCES, logging.ERROR,
                              f"cannot store an instance from %s@%s: %s ({DATA_DIR_HINT})")
_UNEXPECTED = IngestVerdict(Status.CANNOT_UNDERSTAND, logging.ERROR,
                            "unexpected error storing an instance from %s@%s: %s", traceback=True)


def ingest_verdict(exc: Exception) -> IngestVerdict:
    """The answer to an instance whose ingest raised ``exc`` (PS3.4 B.2.3): bad data cannot be
    understood (resending it won't help); out of resources, the sender keeps it and retries."""
    if isinstance(exc, DataSetMismatch):
        return _MISMATCH
    if isinstance(exc, OtherPatient):
        return _OTHER_PATIENT
    if isinstance(exc, BAD_DATA):
        return _REFUSED
    if isinstance(exc, NO_RESOURCES):
        return _CANNOT_STORE
    return _UNEXPECTED
