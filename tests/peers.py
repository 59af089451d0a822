"""Test helpers: free ports and real DCMTK peers (storescp, storescu)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread

REPO = Path(__file__).resolve().parents[1]
# Debian's DCMTK leaves Nagle on: 20x slower on loopback without this (README, "The two commands").
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def require_tool(name: str) -> str:
    """The path of a tool `make test` installs; a missing one is an error, not a skip."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make test` (it installs dcmtk and docker.io)")
    return path


ONLY_CT = """
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[OnlyCT]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = CTImageStorage\\Uncompressed

[[Profiles]]
[OnlyCT]
PresentationContexts = OnlyCT
"""


def only_ct(folder: Path) -> tuple[str, ...]:
    """StoreSCP ``extra_args`` for a node that takes CT Image Storage only (and C-ECHO), uncompressed."""
    config = folder / "only_ct.cfg"
    config.write_text(ONLY_CT)
    return ("-xf", str(config), "OnlyCT")


class StoreSCP:
    """A DCMTK storescp writing every received instance into ``folder``.

    ``extra_args`` go before the port: e.g. ``("--fork",)`` for one process per association,
    ``("-xf", config, profile)`` to accept only some SOP classes, ``("+tls", key, cert, "+cf",
    ca)`` for TLS (with ``-vc``: a client certificate is optional).
    """

    def __init__(self, folder: Path, ae_title: str = "STORESCP", extra_args: tuple[str, ...] = (),
                 port: int | None = None) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = port or free_port()
        self._studies: dict[Path, str] = {}
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [require_tool("storescp"), "-aet", ae_title, "-od", str(folder), "+B", *extra_args, str(self.port)],
            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        wait_port(self.port)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def received(self, before: set[Path], study_uid: str | None = None) -> list[Path]:
        """The files received since ``before`` (a set of :meth:`files`); with ``study_uid``, only
        that study's (a destination shared by tests may get another test's late results)."""
        new = sorted(set(self.files()) - before)
        return new if study_uid is None else [p for p in new if self._study(p) == study_uid]

    def _study(self, path: Path) -> str | None:
        if path not in self._studies:
            try:
                self._studies[path] = str(dcmread(path, stop_before_pixels=True,
                                                  specific_tags=["StudyInstanceUID"]).StudyInstanceUID)
            except Exception:  # still being written: read it again next time
                return None
        return self._studies[path]

    def new_files(self, before: set[Path], count: int, what: str, timeout: float = 300,
                  study_uid: str | None = None) -> list[Path]:
        """:meth:`received`, once there are ``count``."""
        return wait_for(lambda: (lambda new: new if len(new) >= count else None)(self.received(before, study_uid)),
                        timeout, what, interval=1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    folder.mkdir()
    (folder / "ext.cnf").write_text("[server]\nsubjectAltName = DNS:localhost, IP:127.0.0.1\n"
                                    "extendedKeyUsage = serverAuth\n[client]\nextendedKeyUsage = clientAuth\n")

    def run(*args: str) -> None:
        done = subprocess.run([openssl, *args], cwd=folder, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=RadDeploy test CA")
    for name, cn in (("server", "localhost"), ("client", "STORESCU")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={cn}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", "ext.cnf", "-extensions", name)
    return {name: folder / name for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def storescu(port: int, files: list[Path] | Path, ae_title: str = "RADDEPLOY", calling: str = "STORESCU",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Push files (or a folder) with DCMTK storescu; returns the finished process."""
    args = [require_tool("storescu"), "-aec", ae_title, "-aet", calling, *extra, "127.0.0.1", str(port)]
    if isinstance(files, Path):
        args += ["+sd", str(files)]
    else:
        args += [str(f) for f in files]
    return subprocess.run(args, env=DCMTK_ENV, capture_output=True, text=True, timeout=300)


def partial_files(incoming: Path) -> list[Path]:
    """Half-received files in a store's ``incoming/`` folder.

    The listener keeps a few empty temporary files ready there (made ahead of need), so an
    empty file is not a left-over; any byte in one is.
    """
    return sorted(p for p in incoming.iterdir() if p.stat().st_size > 0)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll ``predicate`` until it returns something truthy (returned), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextmanager
def tmpfs(folder: Path, size: str):
    """A tmpfs of ``size`` (``4m``) mounted at ``folder``; skips where mounting is not allowed
    (needs root, or CAP_SYS_ADMIN)."""
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
