"""One DICOM association, served on a blocking socket in its own thread: the protocol.

The association's negotiation is pynetdicom's (its PDU codecs and presentation-context
negotiation, through ``raddeploy_provider.dicom.dimse``); who may associate is the accept
policy's (``listener.policy``). The data path is ours: P-DATA fragments of a dataset are
written straight to a temporary file as they arrive, with the File Meta Information in
front, and nothing is decoded but the small command set. When the last fragment is in,
``store`` decides the status (the study store writes, indexes and answers), and the
response goes back at once.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from raddeploy_provider.dicom import dimse
from raddeploy_provider.dicom.dimse import (
    ABORT, ABORT_PDU, ASSOCIATE_RQ, P_DATA_TF, PDU_HEAD, PDV_COMMAND, PDV_HEAD, PDV_LAST, RELEASE_RP_PDU,
    RELEASE_RQ, Status)
from raddeploy_provider.store.index import peer_host

from .policy import DATA_DIR_HINT, AcceptPolicy

log = logging.getLogger("raddeploy.listener")

HEAD_BYTES = 64 * 1024  # enough for the header of nearly every image
#: The largest PDU we accept, and the P-DATA size we ask senders for. Bounded, so a PDU in
#: memory stays small whatever the instance's size (a sender told "no limit" may send a whole
#: instance as one PDU); 1 MiB PDVs already cost nothing per byte.
MAX_PDU_LENGTH = 1 << 20


@dataclass(frozen=True)
class Sender:
    """Who sent an instance: AE title, ``ip:port``, and an id unique to the association."""

    calling_ae: str
    peer: str
    association: str

    @property
    def host(self) -> str:
        return peer_host(self.peer)


class StoreHandler(Protocol):
    """Stores a received file (and consumes it); returns the DIMSE status to answer with."""

    def __call__(self, path: Path, sender: Sender, head: bytes) -> int: ...


class ProtocolError(Exception):
    """The peer broke the upper-layer protocol: the association is aborted."""


class Association:
    """Serves one connection until release, abort or a timeout."""

    def __init__(self, sock: socket.socket, peer: tuple[str, int], policy: AcceptPolicy,
                 store: StoreHandler, new_file: Callable[[], tuple[int, str]],
                 on_ended: Callable[["Association"], None] | None = None) -> None:
        self.sock = sock
        self.peer = f"{peer[0]}:{peer[1]}"
        self.peer_host = peer[0]
        self.policy = policy
        self.store = store
        self.new_file = new_file  # (descriptor, path) of an empty temporary file in the store's incoming/
        self.on_ended = on_ended
        self.calling_ae = ""
        self.id = f"{os.getpid()}-{next(_association_ids)}"
        self.contexts: dict[int, PresentationContext] = {}
        self.peer_max_pdu = 0
        self.stored = 0
        # Receive state of the message being assembled.
        self._command = bytearray()
        self._request: dimse.Command | None = None
        self._context_id = 0
        self._buf = bytearray(64 * 1024)
        self._head = bytearray()  # the file's first HEAD_BYTES, kept so the header is parsed from memory
        self._fd: int | None = None  # the temporary file being written, unbuffered: no copy on the way
        self._file_path: Path | None = None
        self._write_error: OSError | None = None  # writing the file failed: the answer is out of resources

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
        while got < size:
            n = self.sock.recv_into(view[got:], size - got)
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
            if not self._negotiate(body):
                return
            while True:
                pdu_type, body = self._read_pdu()
                if pdu_type == P_DATA_TF:
                    self._p_data(body)
                elif pdu_type == RELEASE_RQ:
                    self.sock.sendall(RELEASE_RP_PDU)
                    log.info("association from %s@%s released after %d instances",
                             self.calling_ae, self.peer_host, self.stored)
                    return
                elif pdu_type == ABORT:
                    log.warning("association from %s@%s aborted by the peer", self.calling_ae, self.peer_host)
                    return
                else:
                    raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
        except (ProtocolError, ValueError) as exc:
            log.warning("association from %s@%s aborted: %s", self.calling_ae or "?", self.peer_host, exc)
            self._send_quietly(ABORT_PDU)
        except (ConnectionError, socket.timeout, OSError) as exc:
            if not self.calling_ae:  # closed before asking for an association: a port check
                log.debug("connection from %s closed before an association: %s", self.peer_host, exc)
            else:
                log.warning("association from %s@%s lost: %s", self.calling_ae, self.peer_host, exc)
        finally:
            self._discard_partial()
            try:
                self.sock.close()
            finally:
                if self.on_ended:
                    self.on_ended(self)

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    def _negotiate(self, body: memoryview) -> bool:
        request = dimse.decode_associate_rq(body)
        called = request.called_ae_title.strip()
        self.calling_ae = request.calling_ae_title.strip()
        refusal = self.policy.refusal(called, self.calling_ae, self.peer_host, str(request.application_context_name))
        if refusal is not None:
            self.sock.sendall(dimse.associate_rj(refusal.result, refusal.source, refusal.diagnostic))
            log.warning("association from %s@%s rejected: %s", self.calling_ae, self.peer_host, refusal.why)
            return False
        self.peer_max_pdu = request.maximum_length_received or 0
        results, _ = negotiate_as_acceptor(request.presentation_context_definition_list, self.policy.contexts)
        self.contexts = {cx.context_id: cx for cx in results if cx.result == dimse.ACCEPTANCE}
        self.sock.sendall(dimse.associate_ac(request.called_ae_title, request.calling_ae_title, results,
                                             MAX_PDU_LENGTH))
        log.info("association accepted from %s@%s (%d contexts)", self.calling_ae, self.peer_host,
                 len(self.contexts))
        return True

    # -- data ----------------------------------------------------------------------------
    def _p_data(self, body: memoryview) -> None:
        pos, end = 0, len(body)
        while pos < end:
            length, context_id, header = PDV_HEAD.unpack_from(body, pos)
            data = body[pos + 6:pos + 4 + length]
            pos += 4 + length
            if context_id not in self.contexts:
                raise ProtocolError(f"data on presentation context {context_id}, which was not accepted")
            if header & PDV_COMMAND:
                self._command += data
                if header & PDV_LAST:
                    self._command_complete(context_id)
            else:  # dataset fragment
                if self._request is None:
                    raise ProtocolError("dataset fragment without a C-STORE request")
                if self._fd is not None:  # None after a write error: the rest is read and dropped
                    self._write(data)
                    if len(self._head) < HEAD_BYTES:
                        self._head += data[:HEAD_BYTES - len(self._head)]
                if header & PDV_LAST:
                    self._dataset_complete()

    def _command_complete(self, context_id: int) -> None:
        request = dimse.parse_command(bytes(self._command))
        self._command.clear()
        self._context_id = context_id
        if request.command_field == dimse.C_ECHO_RQ:
            self._respond(request, Status.SUCCESS)
            return
        if request.command_field != dimse.C_STORE_RQ or not request.has_dataset:
            raise ProtocolError(f"unsupported DIMSE command 0x{request.command_field:04X}")
        self._request = request
        self._write_error = None
        cx = self.contexts[context_id]
        try:
            fd, name = self.new_file()
        except OSError as exc:
            self._write_error = exc
            return
        self._file_path = Path(name)
        self._fd = fd
        meta = dimse.file_meta(request.sop_class_uid, request.sop_instance_uid, cx.transfer_syntax[0])
        self._write(meta)
        self._head = bytearray(meta)

    def _write(self, data: bytes | memoryview) -> None:
        """Append to the file being received; on a write error (disk full) drop the file, answer out of resources."""
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self._write_error = exc
            self._discard_partial()

    def _dataset_complete(self) -> None:
        assert self._request is not None
        if self._fd is not None:
            os.close(self._fd)
        path, request, error = self._file_path, self._request, self._write_error
        self._fd = self._file_path = self._request = self._write_error = None
        if error is not None or path is None:
            log.error("cannot receive an instance from %s@%s: %s (%s)", self.calling_ae, self.peer_host, error,
                      DATA_DIR_HINT)
            self._respond(request, Status.OUT_OF_RESOURCES)
            return
        status = self.store(path, self.sender, bytes(self._head))
        if status == Status.SUCCESS:
            self.stored += 1
        self._respond(request, status)

    def _respond(self, request: dimse.Command, status: int) -> None:
        self.sock.sendall(dimse.p_data_pdu(self._context_id, dimse.encode_response(request, status)))

    def _discard_partial(self) -> None:
        """A dataset cut off by an abort or a lost connection was never acknowledged: drop it."""
        if self._fd is not None:
            os.close(self._fd)
        if self._file_path is not None:
            self._file_path.unlink(missing_ok=True)
        self._fd = self._file_path = None


_association_ids = itertools.count(1)
