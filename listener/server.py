"""The listener's TCP server: accepts connections and serves each association in a thread.

Several associations run at once (one thread each; the work is mostly system calls that
release the GIL). Presentation contexts: every storage SOP class pynetdicom knows, in every
transfer syntax it knows, plus Verification; the bytes are stored as received.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from pathlib import Path
from typing import Callable

from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext, build_context

from raddeploy_provider.dicom.dimse import VERIFICATION

from .association import Association, Sender, StoreHandler
from .policy import AcceptPolicy
from .tempfiles import TempFilePool

log = logging.getLogger("raddeploy.listener")


def storage_contexts() -> list[PresentationContext]:
    return [build_context(VERIFICATION)] + [
        build_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES) for cx in AllStoragePresentationContexts]


class DicomServer:
    """Listens on ``host:port``; ``store`` turns a received file into a DIMSE status."""

    def __init__(self, host: str, port: int, policy: AcceptPolicy, store: StoreHandler, incoming: Path,
                 network_timeout: float = 60.0, tls: ssl.SSLContext | None = None,
                 on_association_end: Callable[[Sender], None] | None = None) -> None:
        self.host = host
        self.port = port
        self.policy = policy
        self.store = store
        self.temp_files = TempFilePool(incoming)
        self.network_timeout = network_timeout
        self.tls = tls
        self.on_association_end = on_association_end
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._active: set[Association] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self) -> None:
        if not self.policy.contexts:
            self.policy.contexts = storage_contexts()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(64)
        self._sock = sock
        self.temp_files.start()
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-accept", daemon=True)
        self._thread.start()
        log.info("listening as %s on %s:%d", self.policy.ae_title, self.host, self.port)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, peer = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            conn.settimeout(self.network_timeout)
            threading.Thread(target=self._serve, args=(conn, peer), name=f"assoc-{peer[0]}:{peer[1]}",
                             daemon=True).start()

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        if self.tls is not None:
            try:  # the handshake runs here, in the association's thread, not in the accept loop
                conn = self.tls.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.warning("TLS handshake with %s failed: %s", peer[0], exc)
                conn.close()
                return
        assoc = Association(conn, peer, self.policy, self.store, self.temp_files.take, on_ended=self._ended)
        with self._lock:
            self._active.add(assoc)
        assoc.serve()

    def _ended(self, assoc: Association) -> None:
        with self._lock:
            self._active.discard(assoc)
        if self.on_association_end is not None:
            self.on_association_end(assoc.sender)

    @property
    def active_associations(self) -> int:
        with self._lock:
            return len(self._active)

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting; give running associations ``grace`` seconds, then cut them."""
        self._stopping.set()
        if self._sock is not None:
            self._sock.close()
        deadline = threading.Event()
        for _ in range(int(grace * 10)):
            if not self.active_associations:
                break
            deadline.wait(0.1)
        with self._lock:
            for assoc in list(self._active):
                try:
                    assoc.sock.shutdown(socket.SHUT_RDWR)
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
