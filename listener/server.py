"""The listener's TCP server: accepts connections and serves each association in a thread.

Several associations run at once (one thread each; the work is mostly system calls that
release the GIL). Presentation contexts: every storage SOP class pynetdicom knows, in every
transfer syntax it knows, plus Verification; the bytes are stored as received.

What the server holds is bounded: at most ``max_connections`` open connections, and at most
``max_connections_per_host`` from one peer address, counted from the accept (TLS handshake
and association set-up included); one over is refused at once (an A-ASSOCIATE-RJ, transient,
"local limit exceeded", on plain TCP; a closed connection with TLS), with a log line at most
every few seconds. A connection must have completed its A-ASSOCIATE-RQ (and its TLS handshake)
``setup_timeout`` seconds after the accept, and an association may stay silent
``idle_timeout`` seconds. When the process runs out of descriptors, memory or threads, the
accept loop backs off and tries again; anything else it did not expect is logged and stops
the service (``on_fatal``), so that its supervisor restarts it rather than leaving a port
that accepts and never answers.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Callable

from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext, build_context

from raddeploy_provider.dicom.dimse import (
    PROVIDER_LOCAL_LIMIT_EXCEEDED, REJECTED_TRANSIENT, SOURCE_PROVIDER_PRESENTATION, VERIFICATION, associate_rj)

from .association import Association, StoreHandler
from .policy import AcceptPolicy
from .tempfiles import TempFilePool

log = logging.getLogger("raddeploy.listener")

#: accept() failing for want of resources: wait for some to be released, then accept again.
_STARVED = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
#: accept() failing for one connection only (it went away before it was accepted, a firewall, ...).
_ONE_CONNECTION = frozenset((errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.EAGAIN,
                             errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN,
                             errno.EHOSTDOWN, errno.ENONET, errno.EOPNOTSUPP, errno.ECONNRESET))
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 1.0  # seconds; doubled per failure in a burst
_REFUSAL_LOG_EVERY = 10.0  # seconds between log lines about refused connections
_LIMIT_RJ = associate_rj(REJECTED_TRANSIENT, SOURCE_PROVIDER_PRESENTATION, PROVIDER_LOCAL_LIMIT_EXCEEDED)


def storage_contexts() -> list[PresentationContext]:
    return [build_context(VERIFICATION)] + [
        build_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES) for cx in AllStoragePresentationContexts]


class DicomServer:
    """Listens on ``host:port``; ``store`` turns a received file into a DIMSE status.

    Timeouts of 0 mean none. ``on_fatal(exc)``: the accept loop failed for good (also kept in
    ``failed``); the service stops and exits non-zero.
    """

    def __init__(self, host: str, port: int, policy: AcceptPolicy, store: StoreHandler, incoming: Path,
                 idle_timeout: float = 60.0, tls: ssl.SSLContext | None = None,
                 on_association_end: Callable[[Association], None] | None = None, *,
                 setup_timeout: float = 30.0, max_connections: int = 200, max_connections_per_host: int = 20,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 on_refused: Callable[[str, str, int], None] | None = None) -> None:
        self.host = host
        self.port = port
        self.policy = policy
        self.store = store
        self.temp_files = TempFilePool(incoming)
        self.idle_timeout = idle_timeout or None
        self.setup_timeout = setup_timeout or None
        self.max_connections = max_connections
        self.max_connections_per_host = max_connections_per_host
        self.tls = tls
        self.on_association_end = on_association_end
        self.on_fatal = on_fatal
        #: (host, why, connections refused) at each refusal log line: over a cap, counted, not one by one
        self.on_refused = on_refused
        self.failed: BaseException | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._active: set[Association] = set()
        self._connections: set[socket.socket] = set()  # every accepted connection still open, set-up included
        self._per_host: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._refusals: dict[str, tuple[float, int]] = {}  # cap -> (when last logged, refused since)

    def start(self) -> None:
        if not self.policy.contexts:
            self.policy.contexts = storage_contexts()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        self._sock = sock
        self.temp_files.start()
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-accept", daemon=True)
        self._thread.start()
        log.info("listening as %s on %s:%d (at most %d connections, %d per host)", self.policy.ae_title, self.host,
                 self.port, self.max_connections, self.max_connections_per_host)

    # -- accepting -----------------------------------------------------------------------
    def _accept_loop(self) -> None:
        try:
            self._accept_until_stopped()
        except BaseException as exc:  # noqa: BLE001 - whatever it is, the process must not stay deaf
            if self._stopping.is_set():
                return
            self.failed = exc
            log.critical("the DICOM accept loop failed (%s: %s); the listener stops so that it is restarted",
                         type(exc).__name__, exc, exc_info=exc)
            if self.on_fatal is not None:
                self.on_fatal(exc)

    def _accept_until_stopped(self) -> None:
        assert self._sock is not None
        failures = 0  # in the current burst of resource failures
        while not self._stopping.is_set():
            try:
                conn, peer = self._sock.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                if exc.errno in _ONE_CONNECTION:
                    continue
                if exc.errno not in _STARVED:
                    raise
                failures = self._back_off(failures, f"accept failed: {exc.strerror}")
                continue
            if failures:
                log.warning("accepting connections again after %d failed attempts", failures)
                failures = 0
            accepted_at = time.monotonic()
            if not self._admit(conn, peer):
                continue
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                threading.Thread(target=self._serve, args=(conn, peer, accepted_at),
                                 name=f"assoc-{peer[0]}:{peer[1]}", daemon=True).start()
            except OSError as exc:  # the peer is already gone (setsockopt on a reset connection)
                log.debug("connection from %s dropped at accept: %s", peer[0], exc)
                self._release(conn, peer[0])
            except RuntimeError as exc:  # "can't start new thread": out of threads or memory
                self._release(conn, peer[0])
                failures = self._back_off(failures, f"cannot start a thread for {peer[0]}: {exc}")

    def _back_off(self, failures: int, why: str) -> int:
        """Wait a little (more each time in a burst) for descriptors, memory or threads to be freed;
        the first failure of a burst is logged."""
        if not failures:
            with self._lock:
                open_now = len(self._connections)
            log.error("%s (%d connections open); backing off until resources are free", why, open_now)
        self._stopping.wait(min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** min(failures, 10)))
        return failures + 1

    def _admit(self, conn: socket.socket, peer: tuple[str, int]) -> bool:
        """Count the connection in, or refuse it at once when a cap is reached."""
        host = peer[0]
        with self._lock:
            total, from_host = len(self._connections), self._per_host.get(host, 0)
            if total >= self.max_connections:
                cap, why = "total", f"{total} connections open (RADDEPLOY_MAX_CONNECTIONS={self.max_connections})"
            elif from_host >= self.max_connections_per_host:
                cap, why = "host", (f"{from_host} connections open from {host} "
                                    f"(RADDEPLOY_MAX_CONNECTIONS_PER_HOST={self.max_connections_per_host})")
            else:
                self._connections.add(conn)
                self._per_host[host] = from_host + 1
                return True
        self._refuse(conn, host, cap, why)
        return False

    def _refuse(self, conn: socket.socket, host: str, cap: str, why: str) -> None:
        """Over a cap: on plain TCP an A-ASSOCIATE-RJ (transient, local limit exceeded: the
        sender retries later) without waiting for its request; then closed."""
        try:
            conn.setblocking(False)
            if self.tls is None:
                try:  # read what already came (the request, usually), so that closing sends no RST
                    conn.recv(65536)
                except OSError:
                    pass
                conn.send(_LIMIT_RJ)
                conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            conn.close()
        now = time.monotonic()  # one line per cap every _REFUSAL_LOG_EVERY seconds at most
        logged_at, since = self._refusals.get(cap, (float("-inf"), 0))
        if now - logged_at >= _REFUSAL_LOG_EVERY:
            log.warning("connection from %s refused: %s%s", host, why,
                        f"; {since} more refused since the last such line" if since else "")
            self._refusals[cap] = (now, 0)
            if self.on_refused is not None:
                try:
                    self.on_refused(host, why, since + 1)
                except Exception as exc:  # noqa: BLE001 - the index may be locked or full: the connection is refused anyway
                    log.error("recording a refused connection failed: %s", exc)
        else:
            self._refusals[cap] = (logged_at, since + 1)

    def _release(self, conn: socket.socket, host: str) -> None:
        try:
            conn.close()
        except OSError:
            pass
        with self._lock:
            if conn in self._connections:
                self._connections.discard(conn)
                left = self._per_host.get(host, 1) - 1
                if left > 0:
                    self._per_host[host] = left
                else:
                    self._per_host.pop(host, None)

    # -- one connection, in its own thread --------------------------------------------------
    def _serve(self, conn: socket.socket, peer: tuple[str, int], accepted_at: float) -> None:
        deadline = accepted_at + self.setup_timeout if self.setup_timeout else None
        sock: socket.socket = conn
        try:
            if self.tls is not None:
                # The handshake runs here, in the association's thread, not in the accept loop; its
                # timeout is what is left of the set-up deadline, for the whole handshake.
                conn.settimeout(max(0.001, deadline - time.monotonic()) if deadline else None)
                try:
                    sock = self.tls.wrap_socket(conn, server_side=True)
                except socket.timeout:
                    log.warning("TLS handshake with %s failed: not complete within %g s "
                                "(RADDEPLOY_ASSOCIATION_SETUP_TIMEOUT)", peer[0], self.setup_timeout)
                    return
                except (ssl.SSLError, OSError, ValueError) as exc:
                    log.warning("TLS handshake with %s failed: %s", peer[0], exc)
                    return
            assoc = Association(sock, peer, self.policy, self.store, self.temp_files.take, on_ended=self._ended,
                                setup_deadline=deadline, idle_timeout=self.idle_timeout)
            with self._lock:
                self._active.add(assoc)
            assoc.serve()
        except Exception as exc:  # noqa: BLE001 - never a thread's traceback on stderr; the connection is closed
            log.error("connection from %s ended by an unexpected %s: %s", peer[0], type(exc).__name__, exc,
                      exc_info=exc)
        finally:
            try:
                sock.close()
            except OSError:
                pass
            self._release(conn, peer[0])

    def _ended(self, assoc: Association) -> None:
        with self._lock:
            self._active.discard(assoc)
        # Every association asked for (a port check that sent no A-ASSOCIATE-RQ is none): the
        # listener records it in the audit trail, and, where the store saw an instance, its end.
        if self.on_association_end is not None and assoc.calling_ae:
            try:
                self.on_association_end(assoc)
            except Exception as exc:  # noqa: BLE001 - the index may be locked or full: the association is over anyway
                log.error("recording the end of association %s failed: %s", assoc.id, exc)

    @property
    def active_associations(self) -> int:
        with self._lock:
            return len(self._active)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting; give running associations ``grace`` seconds, then cut them."""
        self._stopping.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in the accept thread
            except OSError:
                pass
            self._sock.close()
        deadline = threading.Event()
        for _ in range(int(grace * 10)):
            if not self.active_associations:
                break
            deadline.wait(0.1)
        with self._lock:
            cut = [assoc.sock for assoc in self._active] + list(self._connections)
        for sock in cut:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.temp_files.stop()


def tls_context(cert: Path, key: Path, ca: Path | None) -> ssl.SSLContext:
    """DICOM TLS (PS3.15 B.1): our certificate; with ``ca``, peers must present one it signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if ca is not None:
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
