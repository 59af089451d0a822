"""Send stored Part 10 files to a DICOM node (C-STORE SCU), and C-ECHO it: lean and bounded.

The data path is ours, like the listener's receive loop: a blocking socket with TCP_NODELAY
(Nagle costs 3x on a CT, ~10x on small files), wrapped by ``ssl`` for TLS nodes. Per file the
File Meta group is walked for the SOP class, instance and transfer syntax
(``dimse.read_file_meta``: ~20 us a file, open and read included; pydicom's reader ~100 us), then the C-STORE-RQ command
and the data set bytes as they are on disk go out as P-DATA PDUs sized to the node's maximum,
gathered into one ``sendmsg`` per few MiB, and the response is awaited before the next file.
Nothing is decoded. Only the A-ASSOCIATE-RQ/AC are pynetdicom's PDU classes (``dimse``);
pynetdicom's own send path was 5x slower and raced with its reactor thread.

Presentation contexts are proposed per SOP class: one per transfer syntax its files have, and
one with the uncompressed syntaxes as a fallback; a file whose own syntax the node refuses is
converted (``transcode.uncompressed``) when the fallback was accepted. At most 128 contexts per
association (more: several associations in a row); ``Node.max_associations`` in parallel
(threads: the work is waiting on sockets), sharing one queue of files. Every wait is bounded.
A node that cannot be reached at all is one sentence (``SendReport.unreachable``), not one
failure per file.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pynetdicom.presentation import PresentationContext

from . import dimse
from .dimse import ABORT, P_DATA_ONE_PDV, P_DATA_TF, PDU_HEAD, PDV_COMMAND, PDV_LAST, WARNING

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # a requestor may propose at most 128 presentation contexts (IDs 1..255, odd)
#: The largest PDU we accept, set in our A-ASSOCIATE-RQ; a larger one from the node aborts.
MAX_PDU_RECEIVED = 1 << 20
UNLIMITED_FRAGMENT = 1 << 20  # data bytes per P-DATA PDU when the node sets no maximum (0)
READ_CHUNK = 4 << 20  # file bytes read, then sent with one sendmsg (or a few, IOV_MAX buffers each)
HEAD_BYTES = 4096  # first read of a file: the File Meta group nearly always fits
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
EXPLICIT_VR_LE, IMPLICIT_VR_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
UNCOMPRESSED = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)  # the fallback context's transfer syntaxes
# OpenSSL verify codes (x509_vfy.h): the hostname check; an issuer we do not trust; expiry
_X509_HOSTNAME_MISMATCH, _X509_IP_MISMATCH = 62, 64
_X509_UNTRUSTED = (2, 18, 19, 20, 21)  # unable to get issuer, self-signed (in chain), no local issuer, leaf
_X509_EXPIRED = 10


@dataclass(frozen=True)
class Tls:
    """TLS towards a node: whom to trust, and our own certificate when the node requires one."""

    ca_file: str | None = None  # PEM bundle of CAs that sign the node's certificate; None: the system's CAs
    cert_file: str | None = None  # our client certificate (PEM), for nodes that require one
    key_file: str | None = None  # its private key (PEM)
    verify_hostname: bool = True  # check that the node's certificate names `host`


@dataclass(frozen=True)
class Node:
    """A DICOM node to send to."""

    host: str
    port: int
    ae_title: str
    calling_ae_title: str = "RADDEPLOY"
    timeout: float = 30.0  # each wait for the peer once connected (a response, a PDU, release)
    connect_timeout: float = 10.0  # TCP connect + TLS handshake + the A-ASSOCIATE answer
    tls: Tls | None = None
    max_associations: int = 1  # associations in parallel for one send

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")


@dataclass(frozen=True)
class FileResult:
    """One file's outcome."""

    path: str
    sop_instance_uid: str  # "" when the file could not be read
    status: int | None  # the C-STORE-RSP status; None: not sent, or no response
    reason: str = ""  # why it was not accepted ("" when accepted); for a warning, what the status means
    converted: str | None = None  # the transfer syntax UID it was sent in, when converted for the node

    @property
    def accepted(self) -> bool:
        return self.status is not None and dimse.store_accepted(self.status)

    @property
    def warned(self) -> bool:
        return self.status is not None and self.status in WARNING


@dataclass
class SendReport:
    """Every file's outcome, in the order given; ``unreachable``: no association could be made."""

    node: str
    results: list[FileResult]
    unreachable: str | None = None

    @property
    def accepted(self) -> list[str]:
        """Paths the node stored (warnings included)."""
        return [r.path for r in self.results if r.accepted]

    @property
    def warned(self) -> list[FileResult]:
        return [r for r in self.results if r.warned]

    @property
    def refused(self) -> list[FileResult]:
        """Not accepted, for any reason (refused, not sent, no response, unreadable)."""
        return [r for r in self.results if not r.accepted]

    @property
    def failed(self) -> dict[str, str]:
        return {r.path: r.reason for r in self.results if not r.accepted}

    @property
    def ok(self) -> bool:
        return self.unreachable is None and all(r.accepted for r in self.results)

    def summary(self) -> dict[str, object]:
        """JSON-serialisable, without file paths (it goes to XCom and logs)."""
        refused, warned = self.refused, self.warned
        return {
            "node": self.node,
            "accepted": len(self.results) - len(refused),
            "warned": len(warned),
            "refused": len(refused),
            "unreachable": self.unreachable,
            "refused_instances": [{"sop_instance_uid": r.sop_instance_uid, "status": _hex(r.status),
                                   "reason": r.reason} for r in refused[:50]],
            "warned_instances": [{"sop_instance_uid": r.sop_instance_uid, "status": _hex(r.status)}
                                 for r in warned[:50]],
        }


def _hex(status: int | None) -> str | None:
    return None if status is None else f"0x{status:04X}"


class SendError(Exception):
    """Some or all files were not accepted; ``report`` holds every file's outcome."""

    def __init__(self, report: SendReport) -> None:
        self.report = report
        if report.unreachable:
            super().__init__(report.unreachable)
            return
        refused = report.refused
        first = "; ".join(f"{r.sop_instance_uid or '(unreadable file)'}: {r.reason}" for r in refused[:5])
        super().__init__(f"{len(refused)} of {len(report.results)} instances not accepted by {report.node}: {first}")


class NodeUnreachable(ConnectionError):
    """No association could be made with the node; the message says why and what to check."""


# -- internals -------------------------------------------------------------------------------

class _Unreachable(Exception):
    """No association: ``str()`` is one sentence, the cause and what to check."""


class _Lost(Exception):
    """The association broke; ``sent``: the current instance (or part of it) was on the wire."""

    def __init__(self, why: str, sent: bool = True) -> None:
        super().__init__(why)
        self.sent = sent


@dataclass(frozen=True)
class _Item:
    index: int
    path: str
    meta: dimse.FileMeta


def _read_meta(path: str) -> dimse.FileMeta:
    """The file's File Meta, from its first bytes; ValueError/OSError when it is not Part 10."""
    with open(path, "rb", buffering=0) as fh:
        head = fh.read(HEAD_BYTES)
        while True:
            try:
                return dimse.read_file_meta(head)
            except dimse.IncompleteMeta as short:
                if short.needed > MAX_PDU_RECEIVED:
                    raise ValueError("File Meta Information over 1 MiB") from None
                more = fh.read(short.needed - len(head))
                if not more:
                    raise ValueError("the file ends inside its File Meta Information") from None
                head += more


def _syntax_name(uid: str) -> str:
    from pydicom.uid import UID  # only for messages

    name = UID(uid).name
    return name if name != uid else uid


def _tls_context(tls: Tls) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.verify_hostname
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def _tls_failure(node: Node, exc: ssl.SSLError) -> str:
    """One sentence for a TLS failure: which check failed, and what to set."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in (_X509_HOSTNAME_MISMATCH, _X509_IP_MISMATCH):
            return (f"{node}: TLS refused, hostname mismatch: the node's certificate does not name "
                    f"{node.host!r} ({exc.verify_message}); connect by a name the certificate holds, or set "
                    "tls_verify_hostname off.")
        if exc.verify_code in _X509_UNTRUSTED:
            ca = f"tls_ca_file ({node.tls.ca_file})" if node.tls and node.tls.ca_file else "the system's CAs"
            hint = f"the node's certificate is not signed by {ca}: set tls_ca_file to the CA that signs it"
        elif exc.verify_code == _X509_EXPIRED:
            hint = "the node's certificate has expired: it needs a new one"
        else:
            hint = "check the node's certificate and tls_ca_file"
        return f"{node}: TLS refused, certificate verify failed: {exc.verify_message}; {hint}."
    reason = (exc.reason or str(exc)).upper()
    if "CERTIFICATE_REQUIRED" in reason:
        return (f"{node}: TLS refused by the node ({exc.reason}): it requires a client certificate; set "
                "tls_cert_file and tls_key_file.")
    if any(word in reason for word in ("BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN", "DECRYPT_ERROR")):
        return (f"{node}: TLS refused by the node ({exc.reason}): it does not trust our client certificate; "
                "have the node trust the CA that signs tls_cert_file.")
    if isinstance(exc, ssl.SSLEOFError) or "HANDSHAKE_FAILURE" in reason:
        # DCMTK just closes when it refuses a client certificate (or its absence)
        return f"{node}: the node ended the TLS connection ({exc.reason or 'EOF'}); {_client_certificate_hint(node)}."
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason or "PACKET_LENGTH" in reason:
        return f"{node}: TLS handshake failed ({exc.reason}): the port does not seem to speak TLS; check the port."
    return f"{node}: TLS handshake failed ({exc.reason or exc}); check the node's TLS settings and ours (tls_* fields)."


def _client_certificate_hint(node: Node) -> str:
    if node.tls and node.tls.cert_file:
        return ("it may not trust our client certificate: have it trust the CA that signs tls_cert_file, or check "
                "its TLS settings")
    return "it may require a client certificate: set tls_cert_file and tls_key_file, or check its TLS settings"


def _rejection_hint(node: Node, rejection: dimse.Rejection) -> str:
    if (rejection.source, rejection.diagnostic) == (dimse.SOURCE_SERVICE_USER, dimse.USER_CALLED_AE_NOT_RECOGNIZED):
        return f"check the node's AE title (we called {node.ae_title!r})"
    if (rejection.source, rejection.diagnostic) == (dimse.SOURCE_SERVICE_USER, dimse.USER_CALLING_AE_NOT_RECOGNIZED):
        return f"the node must know our AE title {node.calling_ae_title!r}: register it there, or set calling_ae_title"
    if rejection.source == dimse.SOURCE_PROVIDER_PRESENTATION:
        return "the node is busy: try again later, or lower max_associations"
    return (f"check the AE titles (we are {node.calling_ae_title!r}, calling {node.ae_title!r}) and that "
            "the node accepts this host")


class _Association:
    """One association on our own socket: open (negotiate), store/echo, release or abort."""

    def __init__(self, node: Node, contexts: list[tuple[str, tuple[str, ...]]],
                 tls: ssl.SSLContext | None) -> None:
        self.node = node
        self.proposed = contexts  # (abstract syntax, transfer syntaxes); context ID 2i+1
        self.tls = tls
        self.sock: socket.socket | None = None
        self.exact: dict[tuple[str, str], int] = {}  # (SOP class, transfer syntax) -> accepted context ID
        self.fallback: dict[str, tuple[int, str]] = {}  # SOP class -> (context ID, the syntax accepted)
        self.refusals: dict[str, int] = {}  # SOP class -> a context result (0x03: SOP class not supported)
        self.fragment = UNLIMITED_FRAGMENT
        self.message_id = 0
        self.stored = 0
        self._buf: bytearray | None = None  # file bytes on their way out (READ_CHUNK), made at the first store
        self._rbuf = bytearray(64 * 1024)
        self._rpos = self._rend = 0

    # -- opening -------------------------------------------------------------------------
    def open(self) -> None:
        node = self.node
        limit = node.connect_timeout
        deadline = time.monotonic() + limit
        try:
            sock = socket.create_connection((node.host, node.port), timeout=limit)
        except socket.gaierror as exc:
            raise _Unreachable(f"{node} cannot be reached: the host name {node.host!r} does not resolve "
                               f"({exc.strerror}); check the host.") from None
        except ConnectionRefusedError:
            raise _Unreachable(f"{node} cannot be reached: connection refused (nothing listens on port "
                               f"{node.port} of {node.host}); check the port and that the node is running.") from None
        except socket.timeout:
            raise _Unreachable(f"{node} cannot be reached: no TCP connection within {limit:g} s; check the host "
                               "and port, and any firewall in between.") from None
        except OSError as exc:
            raise _Unreachable(f"{node} cannot be reached: {exc.strerror or exc}; check the host, the port and "
                               "the network.") from None
        self.sock = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stage = "the association request"
        try:
            if self.tls is not None:
                stage = "the TLS handshake"
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                self.sock = self.tls.wrap_socket(sock, server_hostname=node.host)
                stage = "the association request"
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            self.sock.sendall(dimse.associate_rq(node.ae_title, node.calling_ae_title, self._contexts(),
                                                 MAX_PDU_RECEIVED))
            pdu_type, body = self._read_pdu()
        except ssl.SSLError as exc:
            self.close()
            raise _Unreachable(_tls_failure(node, exc)) from None
        except socket.timeout:
            self.close()
            raise _Unreachable(f"{node} did not answer {stage} within {limit:g} s; check that the port is the "
                               f"node's DICOM port{'' if self.tls else ' and whether the node expects TLS'}.") from None
        except (OSError, _Lost) as exc:
            self.close()
            if self.tls is None:
                hint = "check the port, and whether the node expects TLS (a TLS port closes plain connections)"
            elif stage == "the TLS handshake":
                hint = "check that the port speaks TLS (a plain DICOM port closes on a TLS handshake)"
            else:
                hint = _client_certificate_hint(node)
            why = "closed the connection" if isinstance(exc, (ConnectionError, _Lost)) else f"failed ({exc})"
            raise _Unreachable(f"{node} {why} during {stage}; {hint}.") from None
        if pdu_type == dimse.ASSOCIATE_AC:
            self.sock.settimeout(node.timeout)
            self._accepted(dimse.decode_associate_ac(body))
            return
        self.close()
        if pdu_type == dimse.ASSOCIATE_RJ:
            rejection = dimse.decode_associate_rj(body)
            raise _Unreachable(f"{node} rejected the association: {rejection}; {_rejection_hint(node, rejection)}.")
        if pdu_type == ABORT:
            raise _Unreachable(f"{node} aborted the association request {dimse.decode_abort(body)}; check the AE "
                               f"titles (we are {node.calling_ae_title!r}) and that the node accepts this host.")
        raise _Unreachable(f"{node} answered the association request with PDU type 0x{pdu_type:02X}; check that "
                           "the port is the node's DICOM port.")

    def _contexts(self) -> list[PresentationContext]:
        contexts = []
        for i, (abstract, syntaxes) in enumerate(self.proposed):
            cx = PresentationContext()
            cx.context_id = 2 * i + 1
            cx.abstract_syntax = abstract
            cx.transfer_syntax = list(syntaxes)
            contexts.append(cx)
        return contexts

    def _accepted(self, ac) -> None:
        peer_max = ac.maximum_length_received or 0
        self.fragment = max(peer_max - 6, 1) if peer_max else UNLIMITED_FRAGMENT
        for cx in ac.presentation_context_definition_results_list:
            index = (cx.context_id - 1) // 2
            if cx.context_id % 2 == 0 or not 0 <= index < len(self.proposed):
                continue
            abstract, syntaxes = self.proposed[index]
            if cx.result != dimse.ACCEPTANCE or not cx.transfer_syntax:
                self.refusals.setdefault(abstract, cx.result)
                if cx.result == 0x03:  # abstract syntax not supported: that says it all
                    self.refusals[abstract] = cx.result
                continue
            chosen = str(cx.transfer_syntax[0])
            if syntaxes == UNCOMPRESSED:
                self.fallback[abstract] = (cx.context_id, chosen)
            else:
                self.exact[(abstract, chosen)] = cx.context_id

    # -- reading -------------------------------------------------------------------------
    def _read_exact(self, size: int) -> memoryview:
        """``size`` bytes (valid until the next read); recv reads as much as is there."""
        if self._rend - self._rpos < size:
            if self._rpos:
                remaining = self._rend - self._rpos
                self._rbuf[:remaining] = self._rbuf[self._rpos:self._rend]
                self._rpos, self._rend = 0, remaining
            if len(self._rbuf) < size:
                self._rbuf.extend(bytes(size - len(self._rbuf)))
            view = memoryview(self._rbuf)
            while self._rend < size:
                n = self.sock.recv_into(view[self._rend:])  # type: ignore[union-attr]
                if n == 0:
                    raise ConnectionResetError("the node closed the connection")
                self._rend += n
        start = self._rpos
        self._rpos += size
        return memoryview(self._rbuf)[start:start + size]

    def _read_pdu(self) -> tuple[int, bytes]:
        pdu_type, _, length = PDU_HEAD.unpack(self._read_exact(PDU_HEAD.size))
        if length > MAX_PDU_RECEIVED:
            raise _Lost(f"the node sent a PDU of {length} bytes, over the {MAX_PDU_RECEIVED} we accept")
        return pdu_type, bytes(self._read_exact(length)) if length else b""

    def _read_response(self, message_id: int, sent: bool = True) -> dimse.Response:
        """The next response command set; raises _Lost on an abort, a timeout, a lost connection."""
        command = bytearray()
        try:
            while True:
                pdu_type, body = self._read_pdu()
                if pdu_type == P_DATA_TF:
                    pos, end = 0, len(body)
                    while pos + 6 <= end:
                        length, _, header = dimse.PDV_HEAD.unpack_from(body, pos)
                        if header & PDV_COMMAND:
                            command += body[pos + 6:pos + 4 + length]
                            if header & PDV_LAST:
                                response = dimse.parse_response(bytes(command))
                                if response.message_id != message_id:
                                    raise _Lost(f"the node answered message {response.message_id}, not "
                                                f"{message_id}")
                                return response
                        pos += 4 + length
                elif pdu_type == ABORT:
                    raise _Lost(f"the node aborted the association {dimse.decode_abort(body)}", sent)
                else:
                    raise _Lost(f"the node sent PDU type 0x{pdu_type:02X} instead of a response", sent)
        except socket.timeout:
            raise _Lost(f"no response from the node within {self.node.timeout:g} s", sent) from None
        except ValueError as exc:
            raise _Lost(f"unreadable response from the node ({exc})", sent) from None
        except OSError as exc:
            raise _Lost(f"the connection was lost ({exc})", sent) from None

    def _why_lost(self, exc: OSError) -> _Lost:
        """After a failed send: an A-ABORT the node left on the wire says more than EPIPE."""
        try:
            self.sock.settimeout(0.5)  # type: ignore[union-attr]
            pdu_type, body = self._read_pdu()
            if pdu_type == ABORT:
                return _Lost(f"the node aborted the association {dimse.decode_abort(body)}")
        except (OSError, _Lost):
            pass
        if isinstance(exc, socket.timeout):
            return _Lost(f"the node stopped reading for {self.node.timeout:g} s")
        return _Lost(f"the connection was lost ({exc})")

    # -- sending -------------------------------------------------------------------------
    def _sendmsg(self, buffers: list) -> None:
        if self.tls is not None:  # SSLSocket has no sendmsg: one buffer, one TLS write
            self.sock.sendall(b"".join(buffers))  # type: ignore[union-attr]
            return
        sock = self.sock
        start, count = 0, len(buffers)
        while start < count:
            batch = buffers[start:start + _IOV_MAX]
            sent = sock.sendmsg(batch)  # type: ignore[union-attr]
            for buf in batch:  # skip what went out whole; a part-sent buffer is resent from where it stopped
                size = len(buf)
                if sent < size:
                    break
                sent -= size
                start += 1
            if sent:
                buffers[start] = memoryview(buffers[start])[sent:]

    def _fragments(self, out: list, context_id: int, data: memoryview, last: bool) -> None:
        step, pack = self.fragment, P_DATA_ONE_PDV.pack
        pos, size = 0, len(data)
        if size == 0 and last:
            out.append(pack(P_DATA_TF, 0, 6, 2, context_id, PDV_LAST))
        while pos < size:
            end = min(pos + step, size)
            n = end - pos
            out.append(pack(P_DATA_TF, 0, n + 6, n + 2, context_id, PDV_LAST if last and end == size else 0))
            out.append(data[pos:end])
            pos = end

    def _next_message_id(self) -> int:
        self.message_id = self.message_id % 0xFFFF + 1
        return self.message_id

    def store(self, item: _Item) -> FileResult:
        """Send one file and wait for its response; raises _Lost when the association broke."""
        meta = item.meta
        context_id = self.exact.get((meta.sop_class_uid, meta.transfer_syntax))
        converted = None
        if context_id is None:
            context_id, syntax = self.fallback.get(meta.sop_class_uid, (None, ""))
            if context_id is None:
                return self._refused(item)
            if syntax != meta.transfer_syntax:
                try:
                    data = _convert(item.path, syntax)
                except Exception as exc:  # CannotConvert, or the converter failing on this file
                    return FileResult(item.path, meta.sop_instance_uid, None,
                                      f"not sent: the node does not accept {_syntax_name(meta.transfer_syntax)} "
                                      f"and converting to {_syntax_name(syntax)} failed: {exc}")
                converted = syntax
                return self._store_bytes(item, context_id, memoryview(data), converted)
        return self._store_file(item, context_id)

    def _refused(self, item: _Item) -> FileResult:
        sop_class = item.meta.sop_class_uid
        if self.refusals.get(sop_class) == 0x03:
            why = f"the node does not support SOP class {_syntax_name(sop_class)} ({sop_class})"
        else:
            why = (f"the node accepts neither {_syntax_name(item.meta.transfer_syntax)} nor an uncompressed "
                   f"transfer syntax for {_syntax_name(sop_class)}")
        return FileResult(item.path, item.meta.sop_instance_uid, None, f"not sent: {why}")

    def _command_pdu(self, context_id: int, meta: dimse.FileMeta) -> tuple[int, bytes]:
        message_id = self._next_message_id()
        return message_id, dimse.p_data_pdu(context_id, dimse.encode_store_rq(
            message_id, meta.sop_class_uid, meta.sop_instance_uid))

    def _store_file(self, item: _Item, context_id: int) -> FileResult:
        meta = item.meta
        try:
            fd = os.open(item.path, os.O_RDONLY)
        except OSError as exc:
            return FileResult(item.path, meta.sop_instance_uid, None, f"not sent: cannot read the file ({exc})")
        try:
            if self._buf is None:
                self._buf = bytearray(READ_CHUNK)
            buf = memoryview(self._buf)
            pos = meta.dataset_offset
            try:
                remaining = os.fstat(fd).st_size - pos
                got = os.preadv(fd, [buf[:min(remaining, len(buf))]], pos) if remaining > 0 else 0
            except OSError as exc:
                return FileResult(item.path, meta.sop_instance_uid, None, f"not sent: cannot read the file ({exc})")
            message_id, command = self._command_pdu(context_id, meta)
            out: list = [command]
            try:
                while True:
                    remaining -= got
                    pos += got
                    self._fragments(out, context_id, buf[:got], last=remaining <= 0)
                    self._sendmsg(out)
                    if remaining <= 0:
                        break
                    out = []
                    try:
                        got = os.preadv(fd, [buf[:min(remaining, len(buf))]], pos)
                    except OSError as exc:
                        raise _Lost(f"reading {Path(item.path).name} failed mid-send ({exc})") from None
                    if got == 0:
                        raise _Lost(f"{Path(item.path).name} shrank while it was sent")
            except OSError as exc:
                raise self._why_lost(exc) from None
        finally:
            os.close(fd)
        return self._result(item, self._read_response(message_id), None)

    def _store_bytes(self, item: _Item, context_id: int, data: memoryview, converted: str) -> FileResult:
        message_id, command = self._command_pdu(context_id, item.meta)
        out: list = [command]
        self._fragments(out, context_id, data, last=True)
        try:
            self._sendmsg(out)
        except OSError as exc:
            raise self._why_lost(exc) from None
        return self._result(item, self._read_response(message_id), converted)

    def _result(self, item: _Item, response: dimse.Response, converted: str | None) -> FileResult:
        status = response.status
        comment = f" ({response.error_comment})" if response.error_comment else ""
        if status == dimse.Status.SUCCESS:
            reason = ""
        elif status in WARNING:
            reason = dimse.status_meaning(status) + comment
        else:
            reason = f"status 0x{status:04X}: {dimse.status_meaning(status)}{comment}"
        if dimse.store_accepted(status):
            self.stored += 1
        return FileResult(item.path, item.meta.sop_instance_uid, status, reason, converted)

    def echo(self) -> int:
        context_id = next((cid for (abstract, _), cid in self.exact.items() if abstract == dimse.VERIFICATION), None)
        if context_id is None:
            context_id = self.fallback.get(dimse.VERIFICATION, (None, ""))[0]
        if context_id is None:
            raise _Unreachable(f"{self.node} accepted the association but not the Verification SOP class "
                               "(C-ECHO); check that it is a DICOM storage node.")
        message_id = self._next_message_id()
        try:
            self.sock.sendall(dimse.p_data_pdu(context_id, dimse.encode_echo_rq(message_id)))  # type: ignore
        except OSError as exc:
            raise self._why_lost(exc) from None
        return self._read_response(message_id).status

    # -- ending --------------------------------------------------------------------------
    def release(self) -> None:
        """A-RELEASE, bounded by the node's timeout; a node that doesn't answer is just closed."""
        try:
            self.sock.sendall(dimse.RELEASE_RQ_PDU)  # type: ignore[union-attr]
            self._read_pdu()  # A-RELEASE-RP (or anything: the association ends either way)
        except (OSError, _Lost):
            pass
        self.close()

    def abort(self) -> None:
        try:
            self.sock.settimeout(1.0)  # type: ignore[union-attr]
            self.sock.sendall(dimse.USER_ABORT_PDU)  # type: ignore[union-attr]
        except (OSError, AttributeError):
            pass
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


def _convert(path: str, transfer_syntax: str) -> bytes:
    """The file's data set in ``transfer_syntax`` (uncompressed); transcode is imported only here."""
    from . import transcode

    return transcode.uncompressed(Path(path), transfer_syntax)


def _contexts_of(meta: dimse.FileMeta) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return ((meta.sop_class_uid, (meta.transfer_syntax,)), (meta.sop_class_uid, UNCOMPRESSED))


def _batches(items: list[_Item]) -> list[tuple[list[tuple[str, tuple[str, ...]]], list[_Item]]]:
    """Items grouped so that each group's contexts fit in one association (128 at most)."""
    batches: list[tuple[list, list[_Item]]] = []
    contexts: dict[tuple[str, tuple[str, ...]], None] = {}
    members: list[_Item] = []
    for item in items:
        needed = [cx for cx in _contexts_of(item.meta) if cx not in contexts]
        if len(contexts) + len(needed) > MAX_CONTEXTS:
            batches.append((list(contexts), members))
            contexts, members = {}, []
            needed = list(_contexts_of(item.meta))
        contexts.update(dict.fromkeys(needed))
        members.append(item)
    if members:
        batches.append((list(contexts), members))
    return [(sorted(cxs, key=lambda cx: (cx[0], cx[1] == UNCOMPRESSED)), group) for cxs, group in batches]


def _send_batch(node: Node, contexts: list, items: list[_Item], results: list, tls: ssl.SSLContext | None
                ) -> tuple[bool, str | None]:
    """Send ``items`` over up to ``node.max_associations`` associations sharing one queue.

    Returns (whether any association was made, why the rest could not be sent or None)."""
    queue = deque(items)
    established: list[bool] = []
    unreachable: list[str] = []
    lost: list[str] = []

    def work() -> None:
        assoc = _Association(node, contexts, tls)
        try:
            assoc.open()
        except _Unreachable as exc:
            unreachable.append(str(exc))
            return
        established.append(True)
        item = None
        try:
            while True:
                try:
                    item = queue.popleft()
                except IndexError:
                    break
                results[item.index] = assoc.store(item)
            assoc.release()
        except _Lost as exc:
            assert item is not None
            after = f" after {assoc.stored} instance{'s' if assoc.stored > 1 else ''}" if assoc.stored else ""
            results[item.index] = FileResult(
                item.path, item.meta.sop_instance_uid, None,
                f"{exc}{after}: not known whether the node stored it" if exc.sent else f"not sent: {exc}")
            lost.append(f"{exc}{after}")
            assoc.abort()
        except Exception as exc:  # a bug here must not lose the report: this file fails, the rest go on
            log.exception("sending to %s failed", node)
            if item is not None:
                results[item.index] = FileResult(item.path, item.meta.sop_instance_uid, None,
                                                 f"not known whether stored: the sender failed ({exc!r})")
            lost.append(f"the sender failed ({exc!r})")
            assoc.abort()
        finally:
            assoc.close()

    workers = max(1, min(node.max_associations, len(items)))
    if workers == 1:
        work()
    else:
        threads = [threading.Thread(target=work, name=f"dicom-send-{i}", daemon=True) for i in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if not queue:
        return bool(established), None
    if not established:
        return False, unreachable[0] if unreachable else f"{node}: no association could be made."
    why = f"not sent: the association was lost ({lost[0]})" if lost else "not sent"
    for item in queue:
        results[item.index] = FileResult(item.path, item.meta.sop_instance_uid, None, why)
    return True, None


# -- the API -----------------------------------------------------------------------------------

def echo(node: Node) -> int:
    """C-ECHO ``node``; returns the status (0 = success) or raises NodeUnreachable."""
    try:
        tls = _tls_context(node.tls) if node.tls else None
    except (OSError, ssl.SSLError) as exc:
        raise NodeUnreachable(_tls_setup_failure(node, exc)) from None
    assoc = _Association(node, [(dimse.VERIFICATION, (IMPLICIT_VR_LE,))], tls)
    try:
        assoc.open()
        status = assoc.echo()
    except _Unreachable as exc:
        assoc.abort()
        raise NodeUnreachable(str(exc)) from None
    except _Lost as exc:
        assoc.abort()
        raise NodeUnreachable(f"{node}: the C-ECHO failed: {exc}.") from None
    assoc.release()
    return status


def _tls_setup_failure(node: Node, exc: Exception) -> str:
    return (f"{node}: cannot set up TLS ({exc}); check tls_ca_file, cert_file and key_file (readable PEM files, "
            "the key matching the certificate).")


def send_files(node: Node, paths: Iterable[Path]) -> SendReport:
    """Send ``paths`` over as few associations as their contexts need; never raises for a file
    or an unreachable node: every file's outcome is in the report, in the order given."""
    paths = [str(p) for p in paths]
    results: list[FileResult | None] = [None] * len(paths)
    items: list[_Item] = []
    for index, path in enumerate(paths):
        try:
            items.append(_Item(index, path, _read_meta(path)))
        except (OSError, ValueError) as exc:
            results[index] = FileResult(path, "", None, f"not a DICOM Part 10 file ({exc})")
    report = SendReport(node=str(node), results=[])
    started = time.monotonic()
    tls = None
    if node.tls and items:
        try:
            tls = _tls_context(node.tls)
        except (OSError, ssl.SSLError) as exc:
            report.unreachable = _tls_setup_failure(node, exc)
    if report.unreachable is None:
        any_association = False
        for contexts, group in _batches(items):
            made, why = _send_batch(node, contexts, group, results, tls)
            any_association = any_association or made
            if why is None:
                continue
            if not any_association:
                report.unreachable = why
                break
            for item in group:
                if results[item.index] is None:
                    results[item.index] = FileResult(item.path, item.meta.sop_instance_uid, None, f"not sent: {why}")
    if report.unreachable is not None:
        for item in items:
            results[item.index] = FileResult(item.path, item.meta.sop_instance_uid, None, "not sent")
    report.results = [r for r in results if r is not None]
    assert len(report.results) == len(paths)
    # One line at INFO: the caller (the send task, the CLI) says what is wrong and what happens next.
    if report.unreachable:
        log.info("%d files not sent: %s", len(paths), report.unreachable)
    else:
        refused = len(report.refused)
        log.info("sent %d files to %s in %.1f s: %d accepted, %d warned, %d not accepted", len(paths), node,
                 time.monotonic() - started, len(paths) - refused, len(report.warned), refused)
    return report

