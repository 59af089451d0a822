"""Send stored Part 10 files to a DICOM node, fast and without decoding them.

The files are streamed as they are on disk (pynetdicom's chunked send), so each needs an
accepted presentation context with its own transfer syntax: contexts are proposed per
(SOP class, transfer syntax) found in the files' meta headers. Two known traps are handled
here: Nagle's algorithm (TCP_NODELAY on the socket: 3x on a CT, ~10x on small files) and
pynetdicom 3.0.4's sender race, where a C-STORE response can be lost to the reactor thread
when a new request starts before the reactor has paused again (pynetdicom #435, #842, #850).
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from .dimse import store_accepted

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # a requestor may propose at most 128 presentation contexts


@dataclass(frozen=True)
class Node:
    """A DICOM node to send to."""

    host: str
    port: int
    ae_title: str
    calling_ae_title: str = "RADDEPLOY"
    timeout: float = 30.0

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass
class SendReport:
    """Per-file outcome of a send; ``failed`` maps a path to what went wrong."""

    node: str
    accepted: list[str] = field(default_factory=list)  # paths
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> dict[str, object]:
        return {"node": self.node, "accepted": len(self.accepted), "failed": len(self.failed)}


class SendError(Exception):
    """Some or all files were not accepted; ``report`` holds every file's outcome."""

    def __init__(self, report: SendReport) -> None:
        self.report = report
        first = "; ".join(f"{Path(p).name}: {why}" for p, why in list(report.failed.items())[:5])
        super().__init__(f"{len(report.failed)} of {len(report.failed) + len(report.accepted)} files "
                         f"not accepted by {report.node}: {first}")


def _nodelay(event: evt.Event) -> None:
    sock = event.assoc.dul.socket.socket  # type: ignore[union-attr]
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _wait_reactor_paused(assoc, limit: float = 0.05) -> None:
    """Guard against pynetdicom 3.0.4's sender race: let the reactor pause before the next send."""
    deadline = time.monotonic() + limit
    while getattr(assoc, "_is_paused", False) and time.monotonic() < deadline:
        time.sleep(0.0005)


def _new_ae(node: Node) -> AE:
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.LOG_HANDLER_LEVEL = "none"
    ae = AE(ae_title=node.calling_ae_title)
    ae.maximum_pdu_size = 0
    ae.acse_timeout = node.timeout
    ae.dimse_timeout = node.timeout
    ae.network_timeout = node.timeout
    return ae


def echo(node: Node) -> int:
    """C-ECHO ``node``; returns the status (0 = success) or raises ConnectionError."""
    ae = _new_ae(node)
    ae.add_requested_context(Verification)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        raise ConnectionError(f"no association with {node}: check host, port and AE title, and that "
                              f"the node accepts calling AE {node.calling_ae_title!r}")
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else -1
    finally:
        assoc.release()


def send_files(node: Node, paths: Iterable[Path]) -> SendReport:
    """Send ``paths`` over as few associations as their contexts need; never raises for a file."""
    report = SendReport(node=str(node))
    groups: dict[tuple[str, str], list[Path]] = {}
    for path in paths:
        try:
            meta = read_file_meta_info(path)
            key = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        except Exception as exc:  # unreadable file: report it, send the rest
            report.failed[str(path)] = f"not a DICOM Part 10 file ({exc})"
            continue
        groups.setdefault(key, []).append(path)
    keys = list(groups)
    for start in range(0, len(keys), MAX_CONTEXTS):
        batch = keys[start:start + MAX_CONTEXTS]
        _send_batch(node, {k: groups[k] for k in batch}, report)
    return report


def _send_batch(node: Node, groups: dict[tuple[str, str], list[Path]], report: SendReport) -> None:
    ae = _new_ae(node)
    for sop_class, ts in groups:
        ae.add_requested_context(sop_class, [ts])
    files = [p for group in groups.values() for p in group]
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "no association (node unreachable?)"
        for path in files:
            report.failed[str(path)] = why
        return
    try:
        for path in files:
            if not assoc.is_established:
                report.failed[str(path)] = "association lost"
                continue
            try:
                status = assoc.send_c_store(path)
            except ValueError as exc:  # no accepted context for this file
                report.failed[str(path)] = f"not accepted by the node ({exc})"
                continue
            _wait_reactor_paused(assoc)
            code = int(status.Status) if status and "Status" in status else None
            if code is None:
                report.failed[str(path)] = "no response (timeout or abort)"
            elif store_accepted(code):
                report.accepted.append(str(path))
            else:
                report.failed[str(path)] = f"status 0x{code:04X}"
    finally:
        if assoc.is_established:
            assoc.release()


def dicom_files(folders: Sequence[Path]) -> list[Path]:
    """Every regular file under ``folders``, sorted (models may write sub-folders)."""
    return sorted(p for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file())
