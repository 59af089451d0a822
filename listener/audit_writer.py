"""The listener's audit records, written by one thread in batches.

An association's record is made as it ends, in its own thread; writing it there would open a
database connection per association and, in a flood, have hundreds of threads queue at
SQLite's one write lock (measured: 3000 hostile associations left the listener writing for
over 20 s after the last one). Instead each record goes on a queue, and this writer commits
what has gathered in one transaction, every :data:`INTERVAL` s at most. The records of runs
opened and of deletions are not here: they commit with the change they record.

Bounded: past :data:`MAX_QUEUED` waiting records (the index unreachable for long), newer ones
are counted and dropped, and one error line says how many. A stop writes what is queued.
"""

from __future__ import annotations

import logging
import queue
import threading

from raddeploy_provider.store import IndexUnavailable, StudyIndex
from raddeploy_provider.store.audit import AuditRecord

log = logging.getLogger(__name__)

INTERVAL = 0.5
MAX_QUEUED = 100_000
BATCH = 2000


class AuditWriter:
    def __init__(self, index: StudyIndex) -> None:
        self.index = index
        self._queue: queue.Queue[AuditRecord] = queue.Queue(maxsize=MAX_QUEUED)
        self._stopping = threading.Event()
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="audit", daemon=True)

    def put(self, record: AuditRecord) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._dropped += 1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        self._flush()

    def _run(self) -> None:
        while not self._stopping.wait(INTERVAL):
            self._flush()

    def _flush(self) -> None:
        while True:
            batch: list[AuditRecord] = []
            while len(batch) < BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if not batch:
                break
            try:
                self.index.record_audit(*batch)
            except IndexUnavailable as exc:
                log.error("%d audit record(s) not written yet (%s): trying again", len(batch), exc)
                for record in batch:
                    self.put(record)
                break
        if self._dropped:
            log.error("%d audit record(s) dropped: more than %d waited for the index", self._dropped, MAX_QUEUED)
            self._dropped = 0
