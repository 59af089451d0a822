"""The accept policy, without a network: who may associate (the exact A-ASSOCIATE-RJ values)
and the DIMSE status each outcome of the study store's ingest is answered with."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import shutil
import struct
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from listener.policy import AcceptPolicy, ingest_verdict
from raddeploy_provider.dicom.dimse import APPLICATION_CONTEXT
from raddeploy_provider.store import IndexUnavailable, InvalidUID, StoreError

AE = "RADDEPLOY"
NETWORKS = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "fe80::/10"))


def refusal_values(policy: AcceptPolicy, called: str = AE, calling: str = "STORESCU", address: str = "10.1.2.3",
                   context: str = APPLICATION_CONTEXT) -> tuple[int, int, int] | None:
    refusal = policy.refusal(called, calling, address, context)
    return None if refusal is None else (refusal.result, refusal.source, refusal.diagnostic)


# -- who may associate ---------------------------------------------------------------------

def test_accepted_when_every_check_passes(tmp_path):
    policy = AcceptPolicy(AE, allowed_calling=frozenset({"STORESCU"}), allowed_networks=NETWORKS,
                          min_free_disk=1, store_dir=tmp_path)
    assert policy.refusal(AE, "STORESCU", "10.1.2.3", APPLICATION_CONTEXT) is None
    assert policy.refusal(AE, "STORESCU", "fe80::1%eth0", APPLICATION_CONTEXT) is None  # scoped IPv6
    assert AcceptPolicy(AE).refusal(AE, "ANYONE", "192.0.2.7", APPLICATION_CONTEXT) is None  # nothing restricted


def test_address_outside_the_allowed_networks_is_refused_permanently():
    policy = AcceptPolicy(AE, allowed_networks=NETWORKS)
    refusal = policy.refusal(AE, "STORESCU", "127.0.0.1", APPLICATION_CONTEXT)
    assert refusal is not None and "127.0.0.1" in refusal.why and "RADDEPLOY_ALLOWED_NETWORKS" in refusal.why
    # rejected-permanent, service user, no reason given
    assert (refusal.result, refusal.source, refusal.diagnostic) == (0x01, 0x01, 0x01)


def test_wrong_called_ae_is_refused_only_when_checked():
    refusal = AcceptPolicy(AE).refusal("OTHER", "STORESCU", "10.1.2.3", APPLICATION_CONTEXT)
    assert refusal is not None and "'OTHER'" in refusal.why
    # rejected-permanent, service user, called AE title not recognized
    assert (refusal.result, refusal.source, refusal.diagnostic) == (0x01, 0x01, 0x07)
    assert refusal_values(AcceptPolicy(AE, check_called_ae=False), called="OTHER") is None


def test_calling_ae_not_allowed_is_refused():
    policy = AcceptPolicy(AE, allowed_calling=frozenset({"GOODAE", "OTHERAE"}))
    refusal = policy.refusal(AE, "BADAE", "10.1.2.3", APPLICATION_CONTEXT)
    assert refusal is not None and "'BADAE'" in refusal.why
    # rejected-permanent, service user, calling AE title not recognized
    assert (refusal.result, refusal.source, refusal.diagnostic) == (0x01, 0x01, 0x03)
    assert refusal_values(policy, calling="GOODAE") is None


def test_free_disk_below_the_watermark_is_a_transient_rejection(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    policy = AcceptPolicy(AE, min_free_disk=free + (1 << 40), store_dir=tmp_path)
    refusal = policy.refusal(AE, "STORESCU", "10.1.2.3", APPLICATION_CONTEXT)
    assert refusal is not None and refusal.why.startswith("only ") and "RADDEPLOY_MIN_FREE_DISK" in refusal.why
    # rejected-transient, service provider (presentation), local limit exceeded: the sender retries later
    assert (refusal.result, refusal.source, refusal.diagnostic) == (0x02, 0x03, 0x02)
    assert refusal_values(AcceptPolicy(AE, min_free_disk=free + (1 << 40))) is None  # no store dir: no check


def test_another_application_context_is_refused():
    # rejected-permanent, service user, no reason given
    assert refusal_values(AcceptPolicy(AE), context="1.2.3.4") == (0x01, 0x01, 0x01)


# -- what an ingest outcome is answered --------------------------------------------------

def _invalid_dicom() -> InvalidDicomError:
    try:
        dcmread(BytesIO(b"not DICOM at all" * 16))
    except InvalidDicomError as exc:
        return exc
    raise AssertionError("pydicom read garbage")


REFUSED = (0xC000, logging.WARNING, False, "instance from STORESCU@10.1.2.3 refused: ")
CANNOT_STORE = (0xA700, logging.ERROR, False, "cannot store an instance from STORESCU@10.1.2.3: ")
# (what the store raised, (status, log level, with a traceback, how the log line starts))
OUTCOMES = {
    "not DICOM (pydicom)": (_invalid_dicom(), REFUSED),
    "refused by the store": (StoreError("no StudyInstanceUID"), REFUSED),
    "invalid UID": (InvalidUID("'../etc' is not a DICOM UID"), REFUSED),
    "malformed value": (ValueError("invalid literal for int()"), REFUSED),
    "truncated": (EOFError("unexpected end of file"), REFUSED),
    "truncated element": (struct.error("unpack requires a buffer of 8 bytes"), REFUSED),
    "disk full": (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), CANNOT_STORE),
    "index full": (IndexUnavailable("the study index (SQLite x) cannot be used now: database or disk is full"),
                   CANNOT_STORE),
    "index locked": (IndexUnavailable("the study index (SQLite x) cannot be used now: database is locked"),
                     CANNOT_STORE),
    "index unreachable": (IndexUnavailable("the study index (PostgreSQL database x on db:5432 as u) cannot be used "
                                           "now: connection refused"), CANNOT_STORE),
    "unexpected": (RuntimeError("a bug"),
                   (0xC000, logging.ERROR, True, "unexpected error storing an instance from STORESCU@10.1.2.3: ")),
}


@pytest.mark.parametrize("case", OUTCOMES, ids=list(OUTCOMES))
def test_ingest_outcome_status_and_log_line(case):
    """Bad data cannot be understood (0xC000), no room is out of resources (0xA700, the sender
    retries), the unexpected cannot be understood and is logged with its traceback."""
    exc, (status, level, traceback, starts) = OUTCOMES[case]
    verdict = ingest_verdict(exc)
    assert (verdict.status, verdict.level, verdict.traceback) == (status, level, traceback)
    line = verdict.message % ("STORESCU", "10.1.2.3", exc)
    assert line.startswith(starts) and str(exc) in line
