"""The accept policy, without a network: who may associate (the exact A-ASSOCIATE-RJ values)
and the DIMSE status each outcome of the study store's ingest is answered with."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import shutil
import sqlite3
import struct
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from listener.policy import AcceptPolicy, ingest_verdict
from raddeploy_provider.dicom.dimse import APPLICATION_CONTEXT, Status
from raddeploy_provider.store import InvalidUID, StoreError

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


BAD_DATA = {
    "not DICOM (pydicom)": _invalid_dicom(),
    "refused by the store": StoreError("no StudyInstanceUID"),
    "invalid UID": InvalidUID("'../etc' is not a DICOM UID"),
    "malformed value": ValueError("invalid literal for int()"),
    "truncated": EOFError("unexpected end of file"),
    "truncated element": struct.error("unpack requires a buffer of 8 bytes"),
}
NO_RESOURCES = {
    "disk full": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "index full": sqlite3.OperationalError("database or disk is full"),
    "index locked": sqlite3.OperationalError("database is locked"),
}


@pytest.mark.parametrize("case", BAD_DATA, ids=list(BAD_DATA))
def test_bad_data_cannot_be_understood(case):
    exc = BAD_DATA[case]
    verdict = ingest_verdict(exc)
    assert verdict.status == Status.CANNOT_UNDERSTAND == 0xC000
    assert verdict.level == logging.WARNING and not verdict.traceback
    assert verdict.message % ("STORESCU", "10.1.2.3", exc) == f"instance from STORESCU@10.1.2.3 refused: {exc}"


@pytest.mark.parametrize("case", NO_RESOURCES, ids=list(NO_RESOURCES))
def test_no_room_is_out_of_resources(case):
    exc = NO_RESOURCES[case]
    verdict = ingest_verdict(exc)
    assert verdict.status == Status.OUT_OF_RESOURCES == 0xA700
    assert verdict.level == logging.ERROR and not verdict.traceback
    line = verdict.message % ("STORESCU", "10.1.2.3", exc)
    assert line.startswith("cannot store an instance from STORESCU@10.1.2.3: ") and str(exc) in line


def test_the_unexpected_cannot_be_understood_and_is_logged_with_its_traceback():
    exc = RuntimeError("a bug")
    verdict = ingest_verdict(exc)
    assert verdict.status == Status.CANNOT_UNDERSTAND == 0xC000
    assert verdict.level == logging.ERROR and verdict.traceback
    assert "unexpected error" in verdict.message % ("STORESCU", "10.1.2.3", exc)
