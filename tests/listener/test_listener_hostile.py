"""Hostile and broken peers, over the wire, against a real listener process.

Raw sockets and hand-made PDUs where pynetdicom and DCMTK will not send such things. Each
test ends with the listener answering a legitimate C-ECHO (DCMTK echoscu), its descriptor
count (/proc/<pid>/fd) and RSS back near where they started, nothing half-stored in
``incoming/`` (at most the few empty temporary files it keeps ready), no index row for a
refused instance, and no traceback in its log. Waits are for positive signals: the peer
closing the socket, a log line, descriptor counts converging, each with a bounded wait.
"""

from __future__ import annotations

import os
import random
import select
import socket
import ssl
import struct
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom.presentation import build_context

from peers import DCMTK_ENV, make_certificates, partial_files, require_tool, tmpfs
from postgres import query
from raddeploy_provider.dicom import dimse

pytestmark = pytest.mark.integration

AE_TITLE = "RADDEPLOY"
VERIFICATION = "1.2.840.10008.1.1"
SUCCESS, SOP_CLASS_NOT_SUPPORTED, OUT_OF_RESOURCES, DATA_SET_MISMATCH = 0x0000, 0x0122, 0xA700, 0xA900
MiB = 1 << 20
READY_TEMP_FILES = 9  # listener/tempfiles.py keeps 8 empty temporary files ready, and makes the next
FD_SLACK = 6  # descriptors that come and go on their own (the outbox's tries to reach Airflow, ...)
RSS_SLACK_KB = 40 * 1024


# -- a raw DICOM peer --------------------------------------------------------------------------

def pdu(pdu_type: int, body: bytes) -> bytes:
    return dimse.PDU_HEAD.pack(pdu_type, 0, len(body)) + body


def pdv(context_id: int, flags: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU holding one PDV."""
    return pdu(dimse.P_DATA_TF, dimse.PDV_HEAD.pack(len(data) + 2, context_id, flags) + data)


COMMAND, LAST = dimse.PDV_COMMAND, dimse.PDV_LAST


def associate_rq(contexts, called: str = AE_TITLE, calling: str = "HOSTILE") -> bytes:
    built = []
    for i, (abstract, syntaxes) in enumerate(contexts):
        cx = build_context(abstract, list(syntaxes))
        cx.context_id = 2 * i + 1
        built.append(cx)
    return dimse.associate_rq(called, calling, built, 0)


DEFAULT_CONTEXTS = ((MRImageStorage, (ExplicitVRLittleEndian,)), (CTImageStorage, (ExplicitVRLittleEndian,)),
                    (VERIFICATION, (ImplicitVRLittleEndian,)), (MRImageStorage, (ImplicitVRLittleEndian,)))
MR_CX, CT_CX, ECHO_CX, MR_IMPLICIT_CX = 1, 3, 5, 7


class Raw:
    """A TCP connection to the listener that sends whatever it is told."""

    def __init__(self, port: int, source: str | None = None, timeout: float = 15.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source:
            self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))

    def associate(self, contexts=DEFAULT_CONTEXTS) -> dict[int, int]:
        """Associate; the accepted contexts (id -> result)."""
        self.sock.sendall(associate_rq(contexts))
        pdu_type, body = self.read_pdu()
        assert pdu_type == dimse.ASSOCIATE_AC, f"association not accepted: PDU type {pdu_type} {body[:20]!r}"
        ac = dimse.decode_associate_ac(body)
        return {cx.context_id: cx.result for cx in ac.presentation_context_definition_results_list}

    def send(self, data: bytes) -> bool:
        """Send; False if the listener has closed the connection already."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def _exact(self, size: int) -> bytes:
        got = b""
        while len(got) < size:
            chunk = self.sock.recv(size - len(got))
            if not chunk:
                raise ConnectionError("closed by the listener")
            got += chunk
        return got

    def read_pdu(self) -> tuple[int, bytes]:
        pdu_type, _, length = dimse.PDU_HEAD.unpack(self._exact(6))
        return pdu_type, self._exact(length)

    def store(self, context_id: int, sop_class: str, sop_uid: str, data: bytes, message_id: int = 1) -> int:
        """A C-STORE; the status of its response."""
        self.sock.sendall(pdv(context_id, COMMAND | LAST, dimse.encode_store_rq(message_id, sop_class, sop_uid)))
        for start in range(0, max(len(data), 1), 256 * 1024):
            chunk = data[start:start + 256 * 1024]
            self.sock.sendall(pdv(context_id, LAST if start + len(chunk) >= len(data) else 0, chunk))
        return self.response(message_id)

    def echo(self, context_id: int = ECHO_CX, message_id: int = 1) -> int:
        self.sock.sendall(pdv(context_id, COMMAND | LAST, dimse.encode_echo_rq(message_id)))
        return self.response(message_id)

    def response(self, message_id: int) -> int:
        pdu_type, body = self.read_pdu()
        assert pdu_type == dimse.P_DATA_TF, f"no response: PDU type {pdu_type} {body[:20]!r}"
        response = dimse.parse_response(body[6:])
        assert response.message_id == message_id
        return response.status

    def ended_by_listener(self, timeout: float = 10.0) -> str:
        """Wait for the listener to end the connection: 'abort' (an A-ABORT came first), 'reject'
        (an A-ASSOCIATE-RJ), or 'closed'; fails if it is still open after ``timeout``."""
        deadline = time.monotonic() + timeout
        seen = b""
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"the listener kept the connection open for {timeout} s"
            if not select.select([self.sock], [], [], left)[0]:
                continue
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                chunk = b""
            if not chunk:
                return {dimse.ABORT: "abort", dimse.ASSOCIATE_RJ: "reject"}.get(seen[0] if seen else -1, "closed")
            seen += chunk

    def release(self) -> None:
        self.sock.sendall(dimse.RELEASE_RQ_PDU)
        assert self.read_pdu()[0] == dimse.RELEASE_RP

    def close(self) -> None:
        self.sock.close()


def instance(sop_class: str = MRImageStorage, sop_uid: str | None = None, data_sop_uid: str | None = None,
             data_sop_class: str | None = None, pixels: int = 4096, implicit: bool = False) -> tuple[str, bytes]:
    """(the request's SOP Instance UID, a data set naming ``data_sop_*`` or the same)."""
    sop_uid = sop_uid or generate_uid()
    ds = Dataset()
    ds.SOPClassUID = data_sop_class or sop_class
    ds.SOPInstanceUID = data_sop_uid or sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MR"  # no flow triggers on MR: no runs, no outbox
    ds.PatientID = "HOSTILE1"
    ds.PatientName = "Hostile^Peer"
    ds.add_new(0x7FE00010, "OB", bytes(pixels))
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dataset(fp, ds)
    return sop_uid, fp.getvalue()


# -- what the listener holds -----------------------------------------------------------------

@dataclass
class Baseline:
    fds: int
    rss_kb: int


def fd_count(listener) -> int:
    return len(os.listdir(f"/proc/{listener.proc.pid}/fd"))


def steady(listener) -> Baseline:
    """The listener's descriptors and RSS once warm (an echo and a store done) and steady."""
    with closing(Raw(listener.port)) as peer:
        peer.associate()
        assert peer.echo() == SUCCESS
        sop, data = instance()
        assert peer.store(MR_CX, MRImageStorage, sop, data) == SUCCESS
        peer.release()
    readings: list[int] = []
    deadline = time.monotonic() + 20
    while len(readings) < 8 or len(set(readings[-8:])) > 1:  # the same count for 2 s
        assert time.monotonic() < deadline, f"descriptor count never steady: {readings[-10:]}"
        readings.append(fd_count(listener))
        time.sleep(0.25)
    return Baseline(readings[-1], listener.vm_kb("VmRSS"))


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def wait_log(listener, text: str, at_least: int = 1, timeout: float = 10.0) -> list[str]:
    def found() -> list[str]:
        lines = [line for line in listener.log_text().splitlines() if text in line]
        return lines if len(lines) >= at_least else []
    return wait_for(found, timeout, f"{at_least} log line(s) with {text!r}:\n{listener.log_text()[-3000:]}")


def index_rows(listener) -> list[str]:
    return [row[0] for row in query(listener.index, "SELECT sop_uid FROM instances")]


def stored_files(listener) -> list[Path]:
    return sorted(p for p in (listener.data / "studies").rglob("*") if p.is_file())


def assert_recovered(listener, base: Baseline) -> None:
    """Back where it started: descriptors and RSS near the baseline, nothing half-received, no
    traceback, and a legitimate C-ECHO answered."""
    assert listener.proc.poll() is None, f"the listener died:\n{listener.log_text()[-3000:]}"
    wait_for(lambda: fd_count(listener) <= base.fds + FD_SLACK, 20,
             f"descriptors back near {base.fds} (now {fd_count(listener)})", interval=0.2)
    rss = listener.vm_kb("VmRSS")
    assert rss < base.rss_kb + RSS_SLACK_KB, f"RSS {rss} kB, {(rss - base.rss_kb) // 1024} MB over the baseline"
    incoming = listener.data / "incoming"
    assert partial_files(incoming) == [], "partial files left in incoming/"
    assert len(list(incoming.iterdir())) <= READY_TEMP_FILES, sorted(incoming.iterdir())
    log = listener.log_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 500:][:4000]
    echo = listener.echo()
    assert echo.returncode == 0, f"no C-ECHO answer: {echo.stdout}{echo.stderr}"


class closing:
    def __init__(self, peer: Raw) -> None:
        self.peer = peer

    def __enter__(self) -> Raw:
        return self.peer

    def __exit__(self, *exc) -> None:
        self.peer.close()


# -- 1. what one association may hold --------------------------------------------------------

def test_stacked_store_requests_without_data_abort_and_release_everything(start_listener):
    listener = start_listener()
    base = steady(listener)
    with closing(Raw(listener.port)) as peer:
        peer.associate()
        for i in range(500):  # each a C-STORE-RQ announcing a data set that never comes
            if not peer.send(pdv(MR_CX, COMMAND | LAST, dimse.encode_store_rq(i + 1, MRImageStorage,
                                                                                 generate_uid()))):
                break
        assert peer.ended_by_listener() == "abort"
    wait_log(listener, "aborted: a command while an instance's data set is still being received")
    assert index_rows(listener) and len(index_rows(listener)) == 1  # the warm-up's instance only
    assert_recovered(listener, base)


def test_associations_cut_inside_a_data_set_release_their_files(start_listener):
    listener = start_listener()
    base = steady(listener)
    for _ in range(100):  # each: a C-STORE-RQ, half its data set, then the connection is gone
        with closing(Raw(listener.port)) as peer:
            peer.associate()
            sop, data = instance(pixels=64 * 1024)
            peer.send(pdv(MR_CX, COMMAND | LAST, dimse.encode_store_rq(1, MRImageStorage, sop)))
            peer.send(pdv(MR_CX, 0, data[:len(data) // 2]))
    wait_log(listener, "lost: peer closed the connection", at_least=100)
    assert len(index_rows(listener)) == 1
    assert_recovered(listener, base)


def test_huge_command_set_aborts_with_bounded_memory(start_listener):
    listener = start_listener()
    base = steady(listener)
    fragment = pdv(MR_CX, COMMAND, b"\x00" * (MiB - 64))  # command fragments, never the last
    with closing(Raw(listener.port)) as peer:
        peer.associate()
        sent = 0
        while sent < 300 * MiB and peer.send(fragment):
            sent += len(fragment)
        assert sent < 32 * MiB, f"the listener took {sent // MiB} MiB of one command set"
        assert peer.ended_by_listener() in ("abort", "closed")
    wait_log(listener, "aborted: command set over 65536 bytes")
    peak = listener.vm_kb("VmHWM")
    assert peak - base.rss_kb < 30 * 1024, f"RSS peaked {(peak - base.rss_kb) // 1024} MB over the baseline"
    assert_recovered(listener, base)


# -- 2. floods and slow peers ------------------------------------------------------------------

def test_trickled_association_request_is_cut_at_the_setup_deadline(start_listener):
    listener = start_listener(association_setup_timeout="2")
    base = steady(listener)
    request = associate_rq(DEFAULT_CONTEXTS)
    with closing(Raw(listener.port)) as silent, closing(Raw(listener.port)) as trickle:
        started = time.monotonic()
        ended = None
        for byte in request:  # one byte every 0.2 s: each read would be well within a per-read timeout
            if not trickle.send(bytes([byte])) or select.select([trickle.sock], [], [], 0.2)[0]:
                ended = time.monotonic() - started
                break
        assert ended is not None, "the trickled request was served to its end"
        assert trickle.ended_by_listener(timeout=3) == "closed"
        assert silent.ended_by_listener(timeout=3) == "closed"  # the one that sent nothing at all
        ended = time.monotonic() - started
    assert 1.5 < ended < 4.5, f"cut after {ended:.1f} s, the deadline is 2 s"
    wait_log(listener, "not complete by the set-up deadline (RADDEPLOY_ASSOCIATION_SETUP_TIMEOUT)", at_least=2)
    assert_recovered(listener, base)


def test_silent_association_is_dropped_after_the_idle_timeout(start_listener):
    listener = start_listener(association_idle_timeout="2")
    base = steady(listener)
    with closing(Raw(listener.port)) as peer:
        peer.associate()
        assert peer.echo() == SUCCESS
        started = time.monotonic()
        assert peer.ended_by_listener(timeout=6) == "abort"
        assert 1.5 < time.monotonic() - started < 5
    wait_log(listener, "silent for 2 s (RADDEPLOY_ASSOCIATION_IDLE_TIMEOUT)")
    assert_recovered(listener, base)


def _held_open(listener, count: int, source: str) -> list[Raw]:
    return [Raw(listener.port, source=source) for _ in range(count)]


def test_connection_caps_refuse_the_extra_and_recover(start_listener):
    listener = start_listener(max_connections="6", max_connections_per_host="3")
    base = steady(listener)
    held: list[Raw] = []
    try:
        held += _held_open(listener, 3, "127.0.0.2")  # idle: accepted, counted, waiting for a request
        wait_for(lambda: fd_count(listener) >= base.fds + 3, 10, "the listener holding 3 connections")
        with closing(Raw(listener.port, source="127.0.0.2")) as extra:  # a 4th from the same host
            assert extra.ended_by_listener(timeout=5) == "reject"
        held += _held_open(listener, 3, "127.0.0.3")  # another host: room again, up to 6 in all
        wait_for(lambda: fd_count(listener) >= base.fds + 6, 10, "the listener holding 6 connections")
        with closing(Raw(listener.port, source="127.0.0.4")) as extra:  # a 7th, from a third host
            extra.send(associate_rq(DEFAULT_CONTEXTS))
            assert extra.ended_by_listener(timeout=5) == "reject"
            # A-ASSOCIATE-RJ: transient, service provider (presentation), local limit exceeded
        refused = subprocess.run([require_tool("echoscu"), "-v", "-aec", AE_TITLE, "127.0.0.1", str(listener.port)],
                                 env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
        assert refused.returncode != 0
        assert "Association Rejected" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
        assert "Transient" in refused.stdout + refused.stderr
    finally:
        for peer in held:
            peer.close()
    wait_log(listener, "(RADDEPLOY_MAX_CONNECTIONS_PER_HOST=3)")
    wait_log(listener, "(RADDEPLOY_MAX_CONNECTIONS=6)")
    assert_recovered(listener, base)  # a legitimate echo once they are gone


def test_a_flood_of_idle_connections_does_not_deafen_the_listener(start_listener):
    listener = start_listener(max_connections="40", max_connections_per_host="10")
    base = steady(listener)
    held: list[Raw] = []
    try:
        for _ in range(1000):  # one host opens 1000 connections and sends nothing: 10 are held, the rest refused
            held.append(Raw(listener.port, source="127.0.0.2", timeout=5))
        wait_for(lambda: fd_count(listener) >= base.fds + 10, 10, "the listener holding 10 connections")
        assert fd_count(listener) <= base.fds + 10 + FD_SLACK
        echo = listener.echo()  # another sender, meanwhile: served
        assert echo.returncode == 0, echo.stdout + echo.stderr
        lines = wait_log(listener, "(RADDEPLOY_MAX_CONNECTIONS_PER_HOST=10)")
        assert len(lines) < 5, "a log line per refused connection"
    finally:
        for peer in held:
            peer.close()
    assert_recovered(listener, base)


def test_tls_handshake_that_never_completes_is_cut_at_the_setup_deadline(start_listener, tmp_path):
    certs = make_certificates(tmp_path / "certs")
    listener = start_listener(tls_cert=certs["server.crt"], tls_key=certs["server.key"], tls_ca=certs["ca.crt"],
                              association_setup_timeout="2")
    tls_options = ("+tls", str(certs["client.key"]), str(certs["client.crt"]), "+cf", str(certs["ca.crt"]))

    def tls_echo() -> subprocess.CompletedProcess:
        return subprocess.run([require_tool("echoscu"), "-aec", AE_TITLE, *tls_options, "127.0.0.1",
                               str(listener.port)], env=DCMTK_ENV, capture_output=True, text=True, timeout=30)

    assert tls_echo().returncode == 0
    base = steady_fds_only(listener)
    # A real ClientHello, sent one byte every 0.2 s; and a connection that sends nothing.
    client = ssl.create_default_context()
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    handshake = client.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        handshake.do_handshake()
    hello = outgoing.read()
    assert len(hello) > 100
    with closing(Raw(listener.port)) as silent, closing(Raw(listener.port)) as trickle:
        started = time.monotonic()
        for byte in hello:
            if not trickle.send(bytes([byte])) or select.select([trickle.sock], [], [], 0.2)[0]:
                break
        assert trickle.ended_by_listener(timeout=3) == "closed"
        assert silent.ended_by_listener(timeout=3) == "closed"
        ended = time.monotonic() - started
    assert 1.5 < ended < 4.5, f"cut after {ended:.1f} s, the deadline is 2 s"
    wait_log(listener, "TLS handshake with 127.0.0.1 failed: not complete within 2 s", at_least=2)
    wait_for(lambda: fd_count(listener) <= base + FD_SLACK, 20, "descriptors back near the baseline")
    assert listener.proc.poll() is None and "Traceback" not in listener.log_text()
    assert partial_files(listener.data / "incoming") == []
    done = tls_echo()
    assert done.returncode == 0, done.stdout + done.stderr


def steady_fds_only(listener) -> int:
    readings: list[int] = []
    deadline = time.monotonic() + 20
    while len(readings) < 8 or len(set(readings[-8:])) > 1:
        assert time.monotonic() < deadline, f"descriptor count never steady: {readings[-10:]}"
        readings.append(fd_count(listener))
        time.sleep(0.25)
    return readings[-1]


# -- 3. free disk during an association ------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 160 MiB tmpfs (skips where mounting is not allowed)."""
    with tmpfs(tmp_path / "small", "160m") as mount:
        yield mount


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_free_disk_watermark_crossed_during_an_association(small_disk, start_listener):
    listener = start_listener("disk", data=small_disk / "data", min_free_disk="96m")  # its log is off the tmpfs
    try:
        base = steady(listener)
        with closing(Raw(listener.port)) as peer:
            peer.associate()
            first, data = instance()
            assert peer.store(MR_CX, MRImageStorage, first, data) == SUCCESS
            filler = small_disk / "filler"
            with open(filler, "wb") as fh:  # written, not truncated: tmpfs counts written pages
                fh.write(bytes(_free(small_disk) - 80 * MiB))
            assert _free(small_disk) < 96 * MiB
            refused = [instance() for _ in range(3)]
            assert [peer.store(MR_CX, MRImageStorage, sop, data) for sop, data in refused] == [OUT_OF_RESOURCES] * 3
            filler.unlink()
            second, data = instance()
            assert peer.store(MR_CX, MRImageStorage, second, data) == SUCCESS  # room again, same association
            # One instance that would take the free space below the watermark on its own: cut while it
            # is written (free space checked every few MiB), its partial file removed at once.
            free_before = _free(small_disk)
            big, data = instance(pixels=100 * MiB)
            assert free_before - len(data) < 96 * MiB
            assert peer.store(MR_CX, MRImageStorage, big, data) == OUT_OF_RESOURCES
            assert _free(small_disk) >= free_before - 4 * MiB, "the partial file was kept"
            third, data = instance()
            assert peer.store(MR_CX, MRImageStorage, third, data) == SUCCESS
            peer.release()
        rows = set(index_rows(listener))
        assert {first, second, third} <= rows and not rows & {big, *(sop for sop, _ in refused)}
        assert len(stored_files(listener)) == len(rows)
        lines = wait_log(listener, "cannot receive an instance from HOSTILE@127.0.0.1: only")
        assert len(lines) == 1 and "RADDEPLOY_MIN_FREE_DISK" in lines[0]  # one line per association
        wait_log(listener, "released after 3 instances (4 refused)")
        assert_recovered(listener, base)
    finally:
        listener.stop()  # before the tmpfs goes


# -- 4. requests that disagree with themselves -----------------------------------------------

def test_store_requests_that_disagree_with_their_data_set_are_refused(start_listener):
    listener = start_listener()
    base = steady(listener)
    with closing(Raw(listener.port)) as peer:
        peer.associate()
        statuses = {}
        sop, data = instance(data_sop_uid=generate_uid())
        statuses["SOP Instance UID"] = peer.store(MR_CX, MRImageStorage, sop, data, 2)
        sop, data = instance(data_sop_uid=generate_uid(), implicit=True)
        statuses["SOP Instance UID, implicit VR"] = peer.store(MR_IMPLICIT_CX, MRImageStorage, sop, data, 3)
        sop, data = instance(data_sop_class=CTImageStorage)
        statuses["SOP Class UID"] = peer.store(MR_CX, MRImageStorage, sop, data, 4)
        sop, data = instance(CTImageStorage)
        statuses["on the Verification context"] = peer.store(ECHO_CX, CTImageStorage, sop, data, 5)
        sop, data = instance(CTImageStorage)
        statuses["on another class's context"] = peer.store(MR_CX, CTImageStorage, sop, data, 6)
        good, data = instance()
        statuses["matching"] = peer.store(MR_CX, MRImageStorage, good, data, 7)
        assert peer.echo(message_id=8) == SUCCESS  # the association outlives the refusals
        peer.release()
    assert statuses == {"SOP Instance UID": DATA_SET_MISMATCH, "SOP Instance UID, implicit VR": DATA_SET_MISMATCH,
                        "SOP Class UID": DATA_SET_MISMATCH, "on the Verification context": SOP_CLASS_NOT_SUPPORTED,
                        "on another class's context": SOP_CLASS_NOT_SUPPORTED, "matching": SUCCESS}
    assert len(index_rows(listener)) == 2 and good in index_rows(listener)  # the warm-up's and the matching one
    assert len(stored_files(listener)) == 2
    wait_log(listener, "refused: the data set's SOP Instance UID", at_least=2)
    wait_log(listener, "refused: the data set's SOP Class UID")
    wait_log(listener, "on the Verification context")
    assert_recovered(listener, base)


# -- 5. malformed input ------------------------------------------------------------------------

def _rq_with_oversized_item() -> bytes:
    """A valid A-ASSOCIATE-RQ whose first presentation context item claims more than the PDU holds."""
    body = bytearray(associate_rq(DEFAULT_CONTEXTS)[6:])
    pos = 68  # after the fixed fields: the application context item
    assert body[pos] == 0x10
    pos += 4 + struct.unpack_from(">H", body, pos + 2)[0]
    assert body[pos] == 0x20
    struct.pack_into(">H", body, pos + 2, 0xFFF0)
    return pdu(dimse.ASSOCIATE_RQ, bytes(body))


BEFORE_ASSOCIATION = {  # bytes sent first, in place of a well-formed A-ASSOCIATE-RQ
    "an item longer than its PDU": _rq_with_oversized_item(),
    "a request cut short": pdu(dimse.ASSOCIATE_RQ, associate_rq(DEFAULT_CONTEXTS)[6:60]),
    "garbage after the fixed fields": pdu(dimse.ASSOCIATE_RQ, associate_rq(DEFAULT_CONTEXTS)[6:74]
                                          + bytes(random.Random(1).randrange(256) for _ in range(300))),
    "an empty request": pdu(dimse.ASSOCIATE_RQ, b""),
    "P-DATA first": pdv(1, COMMAND | LAST, dimse.encode_echo_rq(1)),
    "an unknown PDU type": pdu(0x55, b"\x00" * 8),
    "a PDU over the maximum length": dimse.PDU_HEAD.pack(dimse.ASSOCIATE_RQ, 0, 0x7FFFFFFF),
}
AFTER_ASSOCIATION = {  # bytes sent on an accepted association
    "a truncated PDV header": pdu(dimse.P_DATA_TF, b"\x00\x00\x00"),
    "a PDV longer than its PDU": pdu(dimse.P_DATA_TF, dimse.PDV_HEAD.pack(1000, MR_CX, COMMAND | LAST) + b"x" * 10),
    "a PDV of length 0": pdu(dimse.P_DATA_TF, struct.pack(">I", 0) + b"\x01\x03"),
    "a PDV on a context never proposed": pdv(99, COMMAND | LAST, dimse.encode_echo_rq(1)),
    "a command set of garbage": pdv(MR_CX, COMMAND | LAST, b"\x00\x00\x00\x01\xff\xff\xff\x7f" + b"x" * 20),
    "a command set element cut short": pdv(MR_CX, COMMAND | LAST, dimse.encode_echo_rq(1)[:-3]),
    "a data set fragment without a request": pdv(MR_CX, LAST, b"\x08\x00\x16\x00UI\x02\x001\x00"),
    "a C-FIND-RQ": pdv(MR_CX, COMMAND | LAST, dimse._command_set(
        dimse._element(0x0100, struct.pack("<H", 0x0020)) + dimse._element(0x0110, struct.pack("<H", 1))
        + dimse._element(0x0800, struct.pack("<H", 0x0000)))),
    "an A-ASSOCIATE-RQ again": associate_rq(DEFAULT_CONTEXTS),
    "a C-STORE-RQ with a UID of 30000 characters": pdv(MR_CX, COMMAND | LAST,
                                                       dimse.encode_store_rq(1, MRImageStorage, "1." * 15000)),
    "a C-STORE-RQ with a non-ASCII UID": pdv(MR_CX, COMMAND | LAST, dimse._command_set(
        dimse._element(0x0002, MRImageStorage.encode()) + dimse._element(0x0100, struct.pack("<H", 1))
        + dimse._element(0x0110, struct.pack("<H", 1)) + dimse._element(0x0800, struct.pack("<H", 0))
        + dimse._element(0x1000, "1.2.\u00e9\u00e9".encode("latin-1")))),
    "a store request of class and instance garbage": pdv(MR_CX, COMMAND | LAST, dimse._command_set(
        dimse._element(0x0002, b"\xff\xfe" * 40) + dimse._element(0x0100, struct.pack("<H", 1))
        + dimse._element(0x0800, b"\x00")  + dimse._element(0x1000, b"\xff" * 7))),
}


def test_malformed_input_is_a_clean_abort_never_a_traceback(start_listener):
    listener = start_listener()
    base = steady(listener)
    ended = {}
    for what, data in BEFORE_ASSOCIATION.items():
        with closing(Raw(listener.port)) as peer:
            peer.send(data)
            ended[what] = peer.ended_by_listener()
    for what, data in AFTER_ASSOCIATION.items():
        with closing(Raw(listener.port)) as peer:
            peer.associate()
            peer.send(data)
            ended[what] = peer.ended_by_listener()
    expected = {what: "abort" for what in (*BEFORE_ASSOCIATION, *AFTER_ASSOCIATION)}
    assert ended == expected
    aborted = wait_log(listener, "aborted: ", at_least=len(expected))
    assert any("malformed A-ASSOCIATE-RQ" in line for line in aborted), aborted
    assert any("truncated PDV" in line for line in aborted), aborted
    assert len(index_rows(listener)) == 1
    assert_recovered(listener, base)  # no "Traceback" in the log


# -- 6. a soak of mixed hostile associations ----------------------------------------------------

def _hostile(port: int, kind: int, rng: random.Random) -> None:
    request = associate_rq(DEFAULT_CONTEXTS)
    with closing(Raw(port, timeout=15)) as peer:
        if kind == 0:  # a port check
            return
        if kind == 1:  # half a request, then gone
            peer.send(request[:rng.randrange(1, len(request))])
            return
        if kind == 2:
            peer.send(_rq_with_oversized_item())
            peer.ended_by_listener()
            return
        if kind == 3:  # garbage
            peer.send(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))))
            peer.ended_by_listener()
            return
        peer.associate()
        if kind == 4:  # stacked store requests
            for i in range(20):
                if not peer.send(pdv(MR_CX, COMMAND | LAST, dimse.encode_store_rq(i + 1, MRImageStorage,
                                                                                     generate_uid()))):
                    break
            peer.ended_by_listener()
        elif kind == 5:  # a data set cut off by the connection's end
            sop, data = instance(pixels=rng.randrange(1, 200_000))
            peer.send(pdv(MR_CX, COMMAND | LAST, dimse.encode_store_rq(1, MRImageStorage, sop)))
            peer.send(pdv(MR_CX, 0, data[:rng.randrange(1, len(data))]))
        elif kind == 6:  # a truncated PDV in a data set
            sop, data = instance()
            peer.send(pdv(MR_CX, COMMAND | LAST, dimse.encode_store_rq(1, MRImageStorage, sop)))
            peer.send(pdv(MR_CX, 0, data[:100]) + pdu(dimse.P_DATA_TF, b"\x00\x00"))
            peer.ended_by_listener()
        elif kind == 7:  # an oversized command set
            for _ in range(3):
                if not peer.send(pdv(MR_CX, COMMAND, b"\x00" * 40_000)):
                    break
            peer.ended_by_listener()
        else:  # an A-ABORT in the middle of a data set
            sop, data = instance()
            peer.send(pdv(MR_CX, COMMAND | LAST, dimse.encode_store_rq(1, MRImageStorage, sop)))
            peer.send(pdv(MR_CX, 0, data[:500]) + dimse.USER_ABORT_PDU)


def test_soak_of_mixed_hostile_associations(start_listener):
    listener = start_listener(max_connections_per_host="64", association_setup_timeout="5")
    base = steady(listener)
    errors: list[BaseException] = []
    per_thread, threads = 375, 8  # 3000 associations

    def run(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for i in range(per_thread):
                _hostile(listener.port, (seed + i) % 9, rng)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    started = time.monotonic()
    workers = [threading.Thread(target=run, args=(seed,)) for seed in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    took = time.monotonic() - started
    assert not errors, errors[:3]
    assert not any(worker.is_alive() for worker in workers)
    assert took < 60, f"{per_thread * threads} hostile associations took {took:.0f} s"
    assert listener.proc.poll() is None
    assert len(index_rows(listener)) == 1  # the warm-up's: nothing hostile was stored
    assert_recovered(listener, base)


# -- 7. the accept loop: out of descriptors, out of threads, and failures it cannot survive ------

def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_out_of_descriptors_the_accept_loop_backs_off_and_recovers(start_listener):
    import resource

    listener = start_listener()
    base = steady(listener)
    soft, hard = resource.prlimit(listener.proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(listener.proc.pid, resource.RLIMIT_NOFILE, (base.fds + 12, hard))
    held: list[Raw] = []
    try:
        for _ in range(40):  # the connections past the limit wait in the listen backlog
            held.append(Raw(listener.port, timeout=5))
        wait_log(listener, "accept failed: Too many open files")
        cpu = _cpu_seconds(listener.proc.pid)
        started = time.monotonic()
        wait_for(lambda: time.monotonic() - started > 2, 5, "2 s of starvation", interval=0.5)
        used = _cpu_seconds(listener.proc.pid) - cpu
        assert used < 0.5, f"the listener used {used:.2f} s of CPU in 2 s while starved: it spins"
        assert len(wait_log(listener, "accept failed")) == 1, "a log line per failed accept"
    finally:
        for peer in held:
            peer.close()
    resource.prlimit(listener.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
    wait_log(listener, "accepting connections again after")
    assert_recovered(listener, base)


def test_thread_start_failure_closes_the_connection_and_the_loop_goes_on(tmp_path, monkeypatch, caplog):
    """In process: a DicomServer whose association threads cannot start, three times."""
    from listener import server as server_module
    from listener.policy import AcceptPolicy

    failures = [3]
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name.startswith("assoc-") and failures[0] > 0:
            failures[0] -= 1
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    (tmp_path / "incoming").mkdir()
    server = server_module.DicomServer("127.0.0.1", 0, AcceptPolicy(AE_TITLE), lambda *args: SUCCESS,
                                       tmp_path / "incoming")
    caplog.set_level("INFO", logger="raddeploy.listener")
    server.start()
    try:
        port = server._sock.getsockname()[1]
        for _ in range(3):
            with closing(Raw(port)) as peer:
                assert peer.ended_by_listener(timeout=5) == "closed"
        with closing(Raw(port)) as peer:  # threads again: served
            peer.associate()
            assert peer.echo() == SUCCESS
            peer.release()
        assert server.failed is None and server.open_connections <= 1
        assert any("cannot start a thread" in r.getMessage() for r in caplog.records)
    finally:
        server.stop(grace=1)


def test_a_store_handler_that_raises_is_answered_and_the_association_goes_on(tmp_path, caplog):
    """In process: whatever escapes the store handler (RecursionError from a deep data set, a bug)
    is a failure status for that instance, its file removed, and the association goes on."""
    from listener import server as server_module
    from listener.policy import AcceptPolicy

    seen: list[Path] = []

    def store(path: Path, sender, head: bytes, request) -> int:
        seen.append(path)
        if len(seen) == 1:
            raise RecursionError("maximum recursion depth exceeded")
        if len(seen) == 2:
            raise KeyError("a bug")
        path.unlink()
        return SUCCESS

    (tmp_path / "incoming").mkdir()
    server = server_module.DicomServer("127.0.0.1", 0, AcceptPolicy(AE_TITLE), store, tmp_path / "incoming")
    caplog.set_level("INFO", logger="raddeploy.listener")
    server.start()
    try:
        with closing(Raw(server._sock.getsockname()[1])) as peer:
            peer.associate()
            statuses = [peer.store(MR_CX, MRImageStorage, *instance(), message_id=i) for i in range(1, 4)]
            assert peer.echo(message_id=4) == SUCCESS
            peer.release()
        assert statuses == [0xC000, 0xC000, SUCCESS]
        assert not any(path.exists() for path in seen)
        errors = [r.getMessage() for r in caplog.records if "unexpected error storing" in r.getMessage()]
        assert len(errors) == 2 and "RecursionError" in errors[0], errors
    finally:
        server.stop(grace=1)


SCRIPT_ACCEPT_LOOP_FAILS = """
import sys
from listener import server, service

def broken(self):
    raise RuntimeError("simulated bug in the accept loop")

server.DicomServer._accept_until_stopped = broken
sys.exit(service.main())
"""


def test_an_accept_loop_that_fails_makes_the_process_exit_non_zero(start_listener, tmp_path):
    listener = start_listener(wait=False)  # for its environment only
    listener.stop()
    done = subprocess.run([os.sys.executable, "-c", SCRIPT_ACCEPT_LOOP_FAILS], env=listener.env,
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "the DICOM accept loop failed (RuntimeError: simulated bug in the accept loop)" in done.stderr
