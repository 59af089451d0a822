"""Where things live in the data dir; the one place that turns UIDs and ids into paths."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError
from .uids import checked_uid

_RUN_PART_RE = re.compile(r"^[A-Za-z0-9_.~:+-]+$")


@dataclass(frozen=True)
class DataDir:
    """The data dir shared by the listener and the workers (same path everywhere)."""

    root: Path

    @property
    def studies(self) -> Path:
        return self.root / "studies"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def incoming(self) -> Path:
        """Temporary files being received; same file system as ``studies`` so rename is atomic."""
        return self.root / "incoming"

    @property
    def index(self) -> Path:
        return self.root / "index.sqlite3"

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return (self.studies / checked_uid(study_uid, "StudyInstanceUID")
                / checked_uid(series_uid, "SeriesInstanceUID")
                / f"{checked_uid(sop_uid, 'SOPInstanceUID')}.dcm")

    def run_dir(self, dag_id: str, run_id: str) -> Path:
        for part in (dag_id, run_id):
            if not _RUN_PART_RE.fullmatch(part) or part in (".", ".."):
                raise StoreError(f"{part!r} cannot name a run folder")
        return self.runs / dag_id / run_id

    def create(self) -> None:
        for folder in (self.studies, self.runs, self.incoming):
            folder.mkdir(parents=True, exist_ok=True)
