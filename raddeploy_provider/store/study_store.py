"""The study store: received files on disk plus their index, kept consistent.

:meth:`StudyStore.ingest` is the whole life of a received instance: header parsed, bytes
flushed, file renamed into place, index row and any new runs committed. The listener
answers success only after it returns, so an acknowledged instance is on disk and indexed.

Two rules of a study hold here: its instances have one Patient ID (another patient's
instance is refused, :class:`OtherPatient`), and a SOP instance re-sent with other content
is a new version: it is indexed (under ``<SOP>.v<N>.dcm``, the earlier versions kept where
they are) and counts as a new instance for the runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

from .errors import IndexUnavailable
from .header import InstanceHeader, read_header
from .index import AddResult, RunRef, StoredInstance, StudyIndex
from .layout import DataDir, version_of, versioned

log = logging.getLogger(__name__)

#: Decides which flows an instance is relevant to (the listener passes trigger matching):
#: DAG id -> seconds after which an unclosed run counts as abandoned (``abandon_after`` of
#: :meth:`StudyIndex.add`).
FlowSelector = Callable[[InstanceHeader], Mapping[str, float]]


@dataclass(frozen=True)
class IngestResult:
    header: InstanceHeader
    duplicate: bool  # the same content was indexed already: nothing changed
    opened: list[RunRef]
    replaced: StoredInstance | None = None  # the earlier version this one superseded (its file is kept)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_sha256(path: Path) -> str | None:
    """sha256 of a Part 10 file's data set (what the sender sent, without the File Meta the
    listener writes); None if the file has no File Meta group length to find it by."""
    with open(path, "rb") as fh:
        head = fh.read(144)
        if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
            return None
        fh.seek(144 + int.from_bytes(head[140:144], "little"))
        digest = hashlib.sha256()
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class StudyStore:
    """Files under ``root/studies`` and their index: ``root/index.sqlite3``, or the PostgreSQL
    database of ``index_url`` (``RADDEPLOY_INDEX_URL``; for several hosts, see :mod:`.index`).

    ``fsync``: when True, each file and each index commit reaches the disk before
    :meth:`ingest` returns (the sender's success then survives a power cut, at a few ms
    per instance); when False they reach the operating system (they survive a crash or
    kill of the listener, not of the machine). README's "Durability" section has numbers.
    """

    def __init__(self, root: Path, fsync: bool = False, index_url: str | None = None) -> None:
        self.layout = DataDir(Path(root))
        self.layout.create()
        self.index = StudyIndex(index_url or self.layout.index, durable=fsync)
        self.fsync = fsync
        self._made_dirs: set[Path] = set()
        # One lock per SOP Instance UID stripe: two associations sending the same instance
        # must not both decide it is new.
        self._sop_locks = [threading.Lock() for _ in range(64)]

    def ingest(self, temp_path: Path, select: FlowSelector, calling_ae: str = "", peer: str = "",
               sha256: str | None = None, association: str = "", head: bytes | None = None) -> IngestResult:
        """Move a received Part 10 file into the store and index it.

        ``temp_path`` must be on the data dir's file system (``layout.incoming``). On any
        error the temporary file is removed and nothing is indexed; the caller answers a
        failure status, so the sender still holds the instance and can send it again.
        ``sha256``: the file's digest if the caller has it; else the index records it later
        (:meth:`fill_missing_hashes`), off the path the sender waits on. ``head``: the file's
        first bytes if the caller holds them (saves reading them back).
        """
        try:
            header = read_header(temp_path, head)
            final = self.layout.instance_path(header.study_uid, header.series_uid, header.sop_uid)
            with self._sop_locks[hash(header.sop_uid) % len(self._sop_locks)]:
                return self._ingest_checked(temp_path, header, final, sha256 or "", select, calling_ae, peer,
                                            association)
        finally:
            temp_path.unlink(missing_ok=True)

    def _ingest_checked(self, temp_path: Path, header: InstanceHeader, final: Path, sha: str,
                        select: FlowSelector, calling_ae: str, peer: str, association: str) -> IngestResult:
        """Index the instance as new; or, if its SOP Instance UID is indexed already, do nothing
        (same content) or index it as the next version (other content)."""
        record = StoredInstance(
            sop_uid=header.sop_uid, study_uid=header.study_uid, series_uid=header.series_uid,
            sop_class_uid=header.sop_class_uid, transfer_syntax=header.transfer_syntax,
            path=self._relative(final), size=os.stat(temp_path).st_size, sha256=sha,
            received_at=time.time(), tags=header.tags, calling_ae=calling_ae, peer=peer,
        )
        flows = select(header)
        target, replaces = final, None
        for _ in range(3):  # a second try only if the row changed between our look and our write
            added = self._add(record, flows, association, temp_path, target, replaces)
            if added.existing is None:
                if added.replaced is not None:
                    log.warning("instance %s of study %s re-sent with other content: indexed as version %d "
                                "(%s), the earlier version kept (%s)", header.sop_uid, header.study_uid,
                                version_of(target), target.name, Path(added.replaced.path).name)
                return IngestResult(header, duplicate=False, opened=added.opened, replaced=added.replaced)
            known = added.existing
            sha = sha or file_sha256(temp_path)
            if self._same_content(known, temp_path, sha):
                return IngestResult(header, duplicate=True, opened=[])
            # Same SOP Instance UID, other content (a corrected re-send): the next version, in a
            # file of its own, so the indexed file is never touched before the row moves on.
            target = versioned(final, version_of(known.path) + 1)
            record = replace(record, path=self._relative(target), sha256=sha)
            replaces = known.path
        # Only another process writing the index gets here (this one holds the SOP instance's lock):
        # the index is busy, so the sender tries again later.
        raise IndexUnavailable(f"instance {header.sop_uid} kept changing while it was indexed")

    def _add(self, record: StoredInstance, flows: Mapping[str, float], association: str, temp_path: Path,
             target: Path, replaces: str | None) -> AddResult:
        """``index.add`` with the file placed at ``target`` inside its transaction."""
        try:
            return self.index.add(record, flows, association, place=lambda: self._place(temp_path, target),
                                  replaces=replaces)
        except BaseException:
            if not temp_path.exists():  # placed, then not indexed (disk full, say): no file either
                target.unlink(missing_ok=True)  # never the indexed file: ``target`` is a new path or a new version
            raise

    def _same_content(self, known: StoredInstance, temp_path: Path, sha: str) -> bool:
        """Whether the received file holds what the indexed one does: the same bytes, or the same
        data set under other File Meta (another listener version wrote it). An indexed file that
        is gone is never the same: the received one replaces it."""
        stored = self.path_of(known)
        try:
            if (known.sha256 if known.sha256 not in ("", "missing") else file_sha256(stored)) == sha:
                return True
            theirs = dataset_sha256(stored)
        except FileNotFoundError:
            log.error("indexed instance %s has no file at %s; the one received now replaces it",
                      known.sop_uid, known.path)
            return False
        return theirs is not None and theirs == dataset_sha256(temp_path)

    def _relative(self, path: Path) -> str:
        return str(path.relative_to(self.layout.root))

    def _place(self, temp_path: Path, final: Path) -> None:
        folder = final.parent
        if folder not in self._made_dirs:
            folder.mkdir(parents=True, exist_ok=True)
            if len(self._made_dirs) > 10000:
                self._made_dirs.clear()
            self._made_dirs.add(folder)
        if self.fsync:
            fd = os.open(temp_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        try:
            os.replace(temp_path, final)
        except FileNotFoundError:  # the series folder was removed since we made it
            self._made_dirs.discard(folder)
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(temp_path, final)
        if self.fsync:  # the rename itself is durable only once its folder is
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def fill_missing_hashes(self, limit: int = 200) -> int:
        """Record the sha256 of up to ``limit`` indexed instances that have none yet; returns how many."""
        missing = self.index.missing_hashes(limit)
        done = []
        for sop_uid, path in missing:
            try:
                done.append((sop_uid, file_sha256(self.layout.root / path)))
            except FileNotFoundError:
                log.error("indexed instance %s has no file at %s", sop_uid, path)
                done.append((sop_uid, "missing"))
        self.index.set_hashes(done)
        return len(done)

    def path_of(self, inst: StoredInstance) -> Path:
        return self.layout.root / inst.path
