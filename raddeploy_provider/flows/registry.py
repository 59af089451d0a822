"""The flows folder as a long-running process sees it: reloaded when a file changes.

The listener asks for the current flows on every instance; a stat of the folder at most
every ``interval`` seconds keeps that cheap and makes edits take effect within seconds,
like the dag-processor does on the Airflow side.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from .loader import LoadResult, flow_files, load_flows

log = logging.getLogger(__name__)


class FlowRegistry:
    def __init__(self, folder: Path, interval: float = 2.0) -> None:
        self.folder = folder
        self.interval = interval
        self._lock = threading.Lock()
        self._checked = float("-inf")  # the first call always loads
        self._signature: tuple = ()
        self._result = LoadResult()

    def _scan(self) -> tuple:
        sig = []
        for path in flow_files(self.folder) if self.folder.exists() else []:
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            sig.append((str(path), st.st_mtime_ns, st.st_size))
        return tuple(sig)

    def current(self) -> LoadResult:
        """The valid flows and the errors, reloaded if any flow file changed."""
        now = time.monotonic()
        if now - self._checked < self.interval:
            return self._result
        with self._lock:
            if now - self._checked < self.interval:
                return self._result
            signature = self._scan()
            if signature != self._signature:
                self._result = load_flows(self.folder)
                self._signature = signature
                log.info("flows loaded: %d valid (%s), %d invalid", len(self._result.flows),
                         ", ".join(f.dag_id for f in self._result.flows), len(self._result.errors))
                for error in self._result.errors:
                    log.error("flow not loaded: %s", error)
            self._checked = time.monotonic()
        return self._result
