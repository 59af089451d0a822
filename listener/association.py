"""One DICOM association, served on a blocking socket in its own thread: the protocol.

The association's negotiation is pynetdicom's (its PDU codecs and presentation-context
negotiation, through ``raddeploy_provider.dicom.dimse``); who may associate is the accept
policy's (``listener.policy``). The data path is ours: P-DATA fragments of a dataset are
written straight to a temporary file as they arrive, with the File Meta Information in
front, and nothing is decoded but the small command set. When the last fragment is in,
``store`` decides the status (the study store writes, indexes and answers), and the
response goes back at once.

What one association may hold is bounded, whatever the peer sends: one PDU in memory (at
most ``MAX_PDU_LENGTH``), one command set (``MAX_COMMAND_BYTES``), one instance in progress
(one temporary file, one descriptor; a second request before the first's data set is done
is a protocol error). Time is bounded too: the A-ASSOCIATE-RQ must be complete by the set-up
deadline (a total, not per read), and the association may stay silent for ``idle_timeout``
at most. Anything the peer breaks is answered with an A-ABORT and one log line; whatever
the exit, the temporary file is closed and removed.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from raddeploy_provider.dicom import dimse
from raddeploy_provider.dicom.dimse import (
    ABORT, ABORT_PDU, ASSOCIATE_RQ, P_DATA_TF, PDU_HEAD, PDV_COMMAND, PDV_HEAD, PDV_LAST, RELEASE_RP_PDU,
    RELEASE_RQ, VERIFICATION, Status)
from raddeploy_provider.store.index import peer_host

from .policy import DATA_DIR_HINT, AcceptPolicy

log = logging.getLogger("raddeploy.listener")

HEAD_BYTES = 64 * 1024  # enough for the header of nearly every image
#: The largest PDU we accept, and the P-DATA size we ask senders for. Bounded, so a PDU in
#: memory stays small whatever the instance's size (a sender told "no limit" may send a whole
#: instance as one PDU); 1 MiB PDVs already cost nothing per byte.
MAX_PDU_LENGTH = 1 << 20
#: The largest command set we assemble: a C-STORE-RQ is a few hundred bytes.
MAX_COMMAND_BYTES = 64 * 1024
#: While an instance is written, the free disk is checked again every this many bytes.
DISK_CHECK_BYTES = 16 << 20


@dataclass(frozen=True)
class Sender:
    """Who sent an instance: AE title, ``ip:port``, and an id unique to the association."""

    calling_ae: str
    peer: str
    association: str

    @property
    def host(self) -> str:
        return peer_host(self.peer)


#: The C-STORE request of a received file: its Affected SOP Class and Instance UIDs, which the
#: data set must repeat.
StoreRequest = dimse.Command


class StoreHandler(Protocol):
    """Stores a received file (and consumes it); returns the DIMSE status to answer with. The
    data set must be the instance ``request`` names (else 0xA900, and nothing is kept)."""

    def __call__(self, path: Path, sender: Sender, head: bytes, request: StoreRequest) -> int: ...


class ProtocolError(Exception):
    """The peer broke the upper-layer protocol, or a limit: the association is aborted."""


class SetupTimeout(TimeoutError):
    """The A-ASSOCIATE-RQ was not complete by the set-up deadline."""


@dataclass
class _Refusal:
    """An instance refused before it is stored: the status, and why (logged)."""

    status: int
    why: str


class Association:
    """Serves one connection until release, abort or a timeout.

    ``setup_deadline``: the ``time.monotonic()`` by which the A-ASSOCIATE-RQ must be in
    (None: no deadline); ``idle_timeout``: seconds of silence after which the association is
    dropped (None: none).
    """

    def __init__(self, sock: socket.socket, peer: tuple[str, int], policy: AcceptPolicy,
                 store: StoreHandler, new_file: Callable[[], tuple[int, str]],
                 on_ended: Callable[["Association"], None] | None = None,
                 setup_deadline: float | None = None, idle_timeout: float | None = 60.0) -> None:
        self.sock = sock
        self.peer = f"{peer[0]}:{peer[1]}"
        self.peer_host = peer[0]
        self.policy = policy
        self.store = store
        self.new_file = new_file  # (descriptor, path) of an empty temporary file in the store's incoming/
        self.on_ended = on_ended
        self.setup_deadline = setup_deadline
        self.idle_timeout = idle_timeout
        self.calling_ae = ""
        self.id = f"{os.getpid()}-{next(_association_ids)}"
        self.contexts: dict[int, PresentationContext] = {}
        self.peer_max_pdu = 0
        self.established = False
        self.handed_to_store = 0  # instances given to ``store``: only then may the store know this association
        self.stored = 0
        self.refused = 0
        self.called_ae = ""
        self.started_at = time.time()
        self.studies: set[str] = set()  # the studies it stored instances of (the store handler adds them)
        #: How it ended, for the audit trail: released, refused, aborted, aborted by the peer, timed out, lost.
        self.result = "lost"
        self.why = ""
        self._disk_logged = False
        # Receive state of the message being assembled.
        self._command = bytearray()
        self._request: dimse.Command | None = None  # the C-STORE whose data set is coming
        self._context_id = 0
        self._buf = bytearray(64 * 1024)
        self._head = bytearray()  # the file's first HEAD_BYTES, kept so the header is parsed from memory
        self._fd: int | None = None  # the temporary file being written, unbuffered: no copy on the way
        self._file_path: Path | None = None
        self._refusal: _Refusal | None = None  # the instance will be refused: its data is read and dropped
        self._written = 0
        self._next_disk_check = DISK_CHECK_BYTES

    @property
    def sender(self) -> Sender:
        return Sender(self.calling_ae, self.peer, self.id)

    # -- socket helpers ------------------------------------------------------------------
    def _recv_exact(self, size: int) -> memoryview:
        """``size`` bytes from the socket, in a buffer reused for each PDU (valid until the next read)."""
        if len(self._buf) < size:
            self._buf = bytearray(size)
        view = memoryview(self._buf)[:size]
        got = 0
        deadline = self.setup_deadline
        while got < size:
            if deadline is not None:  # set-up: what is left of the total, not a fresh timeout per read
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SetupTimeout("A-ASSOCIATE-RQ not complete by the set-up deadline")
                self.sock.settimeout(left)
            try:
                n = self.sock.recv_into(view[got:], size - got)
            except socket.timeout:
                if deadline is not None:
                    raise SetupTimeout("A-ASSOCIATE-RQ not complete by the set-up deadline") from None
                raise
            if n == 0:
                raise ConnectionError("peer closed the connection")
            got += n
        return view

    def _read_pdu(self) -> tuple[int, memoryview]:
        pdu_type, _, length = PDU_HEAD.unpack(self._recv_exact(PDU_HEAD.size))
        if length > MAX_PDU_LENGTH:
            raise ProtocolError(f"PDU of {length} bytes, over the {MAX_PDU_LENGTH} negotiated")
        return pdu_type, self._recv_exact(length) if length else memoryview(b"")

    # -- the association -----------------------------------------------------------------
    def serve(self) -> None:
        try:
            pdu_type, body = self._read_pdu()
            if pdu_type != ASSOCIATE_RQ:
                raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
            self.setup_deadline = None
            self.sock.settimeout(self.idle_timeout)
            if not self._negotiate(body):
                return
            while True:
                pdu_type, body = self._read_pdu()
                if pdu_type == P_DATA_TF:
                    self._p_data(body)
                elif pdu_type == RELEASE_RQ:
                    self.result = "released"
                    self.sock.sendall(RELEASE_RP_PDU)
                    log.info("association from %s@%s released after %d instances%s",
                             self.calling_ae, self.peer_host, self.stored,
                             f" ({self.refused} refused)" if self.refused else "")
                    return
                elif pdu_type == ABORT:
                    self.result = "aborted by the peer"
                    log.warning("association from %s@%s aborted by the peer", self.calling_ae, self.peer_host)
                    return
                else:
                    raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
        except (ProtocolError, ValueError, struct.error) as exc:  # a malformed PDU, PDV or command set
            log.warning("association from %s@%s aborted: %s", self.calling_ae or "?", self.peer_host, exc)
            self.result, self.why = "aborted", str(exc)[:200]
            self._send_quietly(ABORT_PDU)
        except SetupTimeout as exc:  # the ARTIM timer of PS3.8 9.1.5: the transport is closed, no A-ABORT
            log.warning("connection from %s closed: %s (RADDEPLOY_ASSOCIATION_SETUP_TIMEOUT)", self.peer_host, exc)
        except (ConnectionError, socket.timeout, OSError) as exc:
            if not self.calling_ae:  # closed before asking for an association: a port check
                log.debug("connection from %s closed before an association: %s", self.peer_host, exc)
            elif isinstance(exc, socket.timeout):
                self.result, self.why = "timed out", f"silent for {self.idle_timeout:g} s"
                log.warning("association from %s@%s dropped: silent for %g s (RADDEPLOY_ASSOCIATION_IDLE_TIMEOUT)",
                            self.calling_ae, self.peer_host, self.idle_timeout)
                self._send_quietly(ABORT_PDU)
            else:
                self.why = str(exc)[:200]
                log.warning("association from %s@%s lost: %s", self.calling_ae, self.peer_host, exc)
        except Exception as exc:  # noqa: BLE001 - a bug of ours: say so, but the association still ends cleanly
            log.error("association from %s@%s aborted: unexpected %s: %s", self.calling_ae or "?", self.peer_host,
                      type(exc).__name__, exc, exc_info=not isinstance(exc, RecursionError))
            self.result, self.why = "aborted", f"unexpected {type(exc).__name__}"
            self._send_quietly(ABORT_PDU)
        finally:
            self._discard_partial()
            self._command = bytearray()
            self._buf = bytearray()
            try:
                self.sock.close()
            except OSError:
                pass
            finally:
                if self.on_ended:
                    self.on_ended(self)

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.sock.settimeout(1.0)  # an abort is a courtesy: never wait long on a peer that does not read
            self.sock.sendall(data)
        except OSError:
            pass

    def _negotiate(self, body: memoryview) -> bool:
        request = dimse.decode_associate_rq(body)  # raises ValueError (MalformedPDU) on anything malformed
        try:
            called = request.called_ae_title.strip()
            calling = request.calling_ae_title.strip()
            application_context = str(request.application_context_name)
            contexts = request.presentation_context_definition_list
            max_pdu = request.maximum_length_received or 0
        except Exception as exc:  # noqa: BLE001 - pynetdicom's reading of the peer's items
            raise ProtocolError(f"malformed A-ASSOCIATE-RQ ({type(exc).__name__}: {exc})") from None
        self.calling_ae = "".join(c if c.isprintable() else "?" for c in calling)  # it goes into log lines
        self.called_ae = "".join(c if c.isprintable() else "?" for c in called)
        refusal = self.policy.refusal(called, self.calling_ae, self.peer_host, application_context)
        if refusal is not None:
            self.result, self.why = "refused", refusal.why
            self.sock.sendall(dimse.associate_rj(refusal.result, refusal.source, refusal.diagnostic))
            log.warning("association from %s@%s rejected: %s", self.calling_ae, self.peer_host, refusal.why)
            return False
        self.peer_max_pdu = max_pdu
        try:
            results, _ = negotiate_as_acceptor(contexts, self.policy.contexts)
            self.contexts = {cx.context_id: cx for cx in results if cx.result == dimse.ACCEPTANCE}
            accept = dimse.associate_ac(request.called_ae_title, request.calling_ae_title, results, MAX_PDU_LENGTH)
        except Exception as exc:  # noqa: BLE001 - contexts pynetdicom cannot negotiate or encode back
            raise ProtocolError(f"malformed presentation contexts ({type(exc).__name__}: {exc})") from None
        self.established = True
        self.sock.sendall(accept)
        log.info("association accepted from %s@%s (%d contexts)", self.calling_ae, self.peer_host,
                 len(self.contexts))
        return True

    # -- data ----------------------------------------------------------------------------
    def _p_data(self, body: memoryview) -> None:
        pos, end = 0, len(body)
        while pos < end:
            if end - pos < PDV_HEAD.size:
                raise ProtocolError(f"truncated PDV: {end - pos} bytes left in the PDU")
            length, context_id, header = PDV_HEAD.unpack_from(body, pos)
            if length < 2 or pos + 4 + length > end:
                raise ProtocolError(f"PDV item length {length} does not fit its PDU")
            data = body[pos + 6:pos + 4 + length]
            pos += 4 + length
            if context_id not in self.contexts:
                raise ProtocolError(f"data on presentation context {context_id}, which was not accepted")
            if header & PDV_COMMAND:
                if self._request is not None:
                    raise ProtocolError("a command while an instance's data set is still being received")
                if len(self._command) + len(data) > MAX_COMMAND_BYTES:
                    raise ProtocolError(f"command set over {MAX_COMMAND_BYTES} bytes")
                self._command += data
                if header & PDV_LAST:
                    self._command_complete(context_id)
            else:  # dataset fragment
                if self._request is None:
                    raise ProtocolError("dataset fragment without a C-STORE request")
                if context_id != self._context_id:
                    raise ProtocolError(f"data set fragment on context {context_id}, its request on "
                                        f"{self._context_id}")
                if self._fd is not None:  # None when refused or after a write error: the rest is read and dropped
                    self._write(data)
                    if len(self._head) < HEAD_BYTES:
                        self._head += data[:HEAD_BYTES - len(self._head)]
                if header & PDV_LAST:
                    self._dataset_complete()

    def _command_complete(self, context_id: int) -> None:
        request = dimse.parse_command(bytes(self._command))
        self._command.clear()
        self._context_id = context_id
        cx = self.contexts[context_id]
        if request.command_field == dimse.C_ECHO_RQ:
            if request.has_dataset:
                raise ProtocolError("C-ECHO-RQ announcing a data set")
            self._respond(request, Status.SUCCESS)
            return
        if request.command_field != dimse.C_STORE_RQ or not request.has_dataset:
            raise ProtocolError(f"unsupported DIMSE command 0x{request.command_field:04X}")
        self._request = request
        self._refusal = None
        self._written = 0
        self._next_disk_check = DISK_CHECK_BYTES
        if cx.abstract_syntax != request.sop_class_uid:
            # The Verification context, or another class's: 0x0122, the data set is read and dropped
            # (DCMTK 3.6.7's storescp stores it; pynetdicom's SCP picks the class from the command).
            what = "the Verification context" if cx.abstract_syntax == VERIFICATION else \
                f"a context for {cx.abstract_syntax}"
            self._refusal = _Refusal(Status.SOP_CLASS_NOT_SUPPORTED,
                                     f"a C-STORE of {request.sop_class_uid[:64]} on {what}")
            return
        why = self.policy.disk_refusal()
        if why:
            self._refusal = _Refusal(Status.OUT_OF_RESOURCES, why)
            return
        try:
            fd, name = self.new_file()
        except OSError as exc:
            self._refusal = _Refusal(Status.OUT_OF_RESOURCES, f"{exc} ({DATA_DIR_HINT})")
            return
        self._file_path = Path(name)
        self._fd = fd
        meta = dimse.file_meta(request.sop_class_uid, request.sop_instance_uid, cx.transfer_syntax[0])
        self._write(meta)
        self._head = bytearray(meta)

    def _write(self, data: bytes | memoryview) -> None:
        """Append to the file being received; on a write error (disk full) or the free disk going
        below the watermark, drop the file and answer out of resources."""
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self._refusal = _Refusal(Status.OUT_OF_RESOURCES, f"{exc} ({DATA_DIR_HINT})")
            self._discard_partial()
            return
        self._written += len(data)
        if self._written >= self._next_disk_check:
            self._next_disk_check = self._written + DISK_CHECK_BYTES
            why = self.policy.disk_refusal()
            if why:
                self._refusal = _Refusal(Status.OUT_OF_RESOURCES, why)
                self._discard_partial()

    def _dataset_complete(self) -> None:
        request, path, refusal, fd = self._request, self._file_path, self._refusal, self._fd
        assert request is not None
        self._fd = self._file_path = self._request = self._refusal = None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:  # the last write did not make it (EIO, a full network file system)
                refusal = refusal or _Refusal(Status.OUT_OF_RESOURCES, f"{exc} ({DATA_DIR_HINT})")
        if refusal is not None or path is None:
            if path is not None:
                path.unlink(missing_ok=True)
            refusal = refusal or _Refusal(Status.OUT_OF_RESOURCES, "no file")
            self._log_refusal(request, refusal)
            self.refused += 1
            self._respond(request, refusal.status)
            return
        self.handed_to_store += 1
        try:
            status = self.store(path, self.sender, bytes(self._head), request)
        except Exception as exc:  # noqa: BLE001 - the handler should answer every case; never let it end us
            path.unlink(missing_ok=True)
            log.error("unexpected error storing an instance from %s@%s: %s: %s", self.calling_ae, self.peer_host,
                      type(exc).__name__, exc, exc_info=not isinstance(exc, RecursionError))
            status = Status.CANNOT_UNDERSTAND
        if dimse.store_accepted(status):
            self.stored += 1
        else:
            self.refused += 1
        self._respond(request, status)

    def _log_refusal(self, request: dimse.Command, refusal: _Refusal) -> None:
        if refusal.status == Status.OUT_OF_RESOURCES:
            # One line per association: a sender pushing a study into a full disk would flood the log.
            level = logging.DEBUG if self._disk_logged else logging.ERROR
            self._disk_logged = True
            log.log(level, "cannot receive an instance from %s@%s: %s", self.calling_ae, self.peer_host, refusal.why)
        else:
            log.warning("instance %s from %s@%s refused (0x%04X): %s", request.sop_instance_uid[:64],
                        self.calling_ae, self.peer_host, refusal.status, refusal.why)

    def _respond(self, request: dimse.Command, status: int) -> None:
        self.sock.sendall(dimse.p_data_pdu(self._context_id, dimse.encode_response(request, status)))

    def _discard_partial(self) -> None:
        """A dataset cut off by an abort or a lost connection was never acknowledged: drop it."""
        fd, path = self._fd, self._file_path
        self._fd = self._file_path = None
        try:
            if fd is not None:
                os.close(fd)
        except OSError:
            pass
        finally:
            if path is not None:
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    log.error("cannot remove the partial file %s: %s", path, exc)


_association_ids = itertools.count(1)
