"""A real Orthanc (Debian's package, 1.10 on Debian 12) as a DICOM peer for tests.

Own JSON configuration, storage and index in the given folder, DICOM and HTTP ports from
:func:`peers.free_port`, no plugins, HTTP without authentication (Orthanc then refuses every
client but loopback: ``RemoteAccessAllowed`` false), any calling AE may store and echo.

What was found on Orthanc 1.10.1 (the same knowledge as bench/ingest.py's receiver):
- It starts in ~0.1 s with a fresh index; a graceful stop (SIGTERM) takes 2.5-3.5 s, its HTTP
  and DICOM servers each finishing a ~1 s poll, so :meth:`Orthanc.stop` kills it by default.
- It has no option to bind to an address: both ports listen on 0.0.0.0. Remote HTTP clients
  are refused; DICOM is open to any host (``DicomAlwaysAllowStore``), harmless on a test host.
- ``AcceptedTransferSyntaxes`` (new in 1.9.0) does restrict the C-STORE SCP: a context for a
  syntax outside the list is rejected (DCMTK's storescu then fails a JPEG 2000 file: "unable to
  convert dataset from 'JPEG 2000' transfer syntax to 'Little Endian Explicit'").
- It checks the called AE title here (``DicomCheckCalledAet``), as a real PACS would: an
  association to another called AE is rejected ("Called AE Title Not Recognized").
- It stores what it receives (no ``IngestTranscoding``) but rewrites the File Meta group,
  and DCMTK drops retired group length elements on the way: a clean data set (as
  dicom_factory makes) comes back byte for byte, a file with group lengths does not.
- Debian's DCMTK inside leaves Nagle on: it runs with ``TCP_NODELAY=1`` (peers.DCMTK_ENV).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from peers import DCMTK_ENV, free_port, wait_port


def orthanc_binary() -> str:
    """Debian installs it as /usr/sbin/Orthanc, which is not on a normal user's PATH."""
    path = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        pytest.fail("Orthanc is not installed: run `make test` (scripts/ensure-system.sh installs orthanc)")
    return path


class Orthanc:
    """Orthanc on loopback ports, storing into ``folder``; ``stop()`` when done."""

    def __init__(self, folder: Path, ae_title: str = "ORTHANC",
                 accepted_transfer_syntaxes: list[str] | None = None) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "raddeploy-test", "DicomAet": ae_title, "DicomPort": self.port, "HttpPort": self.http_port,
            "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
            "Plugins": [], "LuaScripts": [], "DicomModalities": {}, "OrthancPeers": {},
            "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": False, "WebDavEnabled": False, "HttpCompressionEnabled": False,
            "SaveJobs": False, "ConcurrentJobs": 1, "DicomThreadsCount": 2,
        }
        if accepted_transfer_syntaxes is not None:
            config["AcceptedTransferSyntaxes"] = list(accepted_transfer_syntaxes)
        self.config_path = folder / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = folder / "orthanc.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([orthanc_binary(), str(self.config_path)], cwd=folder, env=DCMTK_ENV,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_started(timeout=30)
        except BaseException:
            self.stop()
            raise

    def _wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode} at start:\n{self.log_tail()}")
            try:
                wait_port(self.port, timeout=0.2)
                wait_port(self.http_port, timeout=0.2)
                if self._get("/system")["DicomAet"] == self.ae_title:
                    return
            except (TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc not answering after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def _request(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as rsp:
            return rsp.read()

    def _get(self, path: str):
        return json.loads(self._request(path))

    def instances(self) -> list[str]:
        """Orthanc's identifiers of every stored instance (REST /instances)."""
        return self._get("/instances")

    def file(self, instance_id: str) -> bytes:
        """The stored Part 10 file (Orthanc's File Meta group, the data set as received)."""
        return self._request(f"/instances/{instance_id}/file")

    def dataset(self, instance_id: str):
        """The stored instance, read by pydicom."""
        import io

        import pydicom

        return pydicom.dcmread(io.BytesIO(self.file(instance_id)))

    def tags(self, instance_id: str) -> dict:
        """The instance's tags by keyword, values as strings (REST /instances/{id}/simplified-tags)."""
        return self._get(f"/instances/{instance_id}/simplified-tags")

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, graceful: bool = False) -> None:
        """Kill it (instant; what it acknowledged is on disk already), or SIGTERM and wait (~3.5 s)."""
        if self.proc.poll() is None:
            if graceful:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
