"""Where things live in the data dir: the one place that turns UIDs and ids into paths.

:class:`DataDir` is the data dir shared by the listener and the workers; :class:`RunDir` is
one run's folder inside it. Every module that reads or writes a run folder goes through
``RunDir``, so what a run folder holds (and which names a flow's mounts may not take) is
known here and nowhere else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError
from .uids import checked_uid

_RUN_PART_RE = re.compile(r"^[A-Za-z0-9_.~:+-]+$")

#: The mount name of the instances the triggers matched (the flow format's ``src``); its
#: folder in the run is ``input/``.
SOURCE_MOUNT = "src"


@dataclass(frozen=True)
class RunDir:
    """``runs/<dag_id>/<run_id>/``: everything one run reads and writes.

    - ``input/``: the fingerprint sensor's snapshot (hard links), the ``src`` mount;
    - ``<mount>/``: one folder per other named mount (model outputs, read by later models);
    - ``config/<task>/config.yaml``: a model's ``config``, mounted read-only;
    - ``sent/<task>.json``: what a send task's node accepted (so a retry sends the rest);
    - ``manifest.d/<part>.json`` and ``manifest.json``: the run manifest
      (:mod:`.manifest`), with ``.manifest.lock`` guarding its rebuild.
    """

    path: Path

    INPUT = "input"
    CONFIG = "config"
    SENT = "sent"
    MANIFEST = "manifest.json"
    MANIFEST_PARTS = "manifest.d"
    MANIFEST_LOCK = ".manifest.lock"
    #: Names a mount cannot take: a mount is the folder ``<run>/<name>``, and these are the
    #: run folder itself, its parent and what the run keeps besides mounts.
    RESERVED = frozenset({".", "..", INPUT, CONFIG, SENT, MANIFEST, MANIFEST_PARTS, MANIFEST_LOCK})

    @property
    def dag_id(self) -> str:
        return self.path.parent.name

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def input(self) -> Path:
        return self.path / self.INPUT

    def mount(self, name: str) -> Path:
        """The host folder behind a named mount: ``src`` is ``input/``, any other its own name."""
        if name in self.RESERVED:
            raise StoreError(f"{name!r} is a reserved name of the run folder, not a mount")
        return self.input if name == SOURCE_MOUNT else self.path / name

    def config_file(self, task_id: str) -> Path:
        return self.path / self.CONFIG / task_id / "config.yaml"

    def sent_ledger(self, task_id: str) -> Path:
        return self.path / self.SENT / f"{task_id}.json"

    @property
    def manifest(self) -> Path:
        return self.path / self.MANIFEST

    @property
    def manifest_parts(self) -> Path:
        return self.path / self.MANIFEST_PARTS

    @property
    def manifest_lock(self) -> Path:
        return self.path / self.MANIFEST_LOCK


@dataclass(frozen=True)
class DataDir:
    """The data dir shared by the listener and the workers (same path everywhere).

    ``static_override``: the static assets folder when it is not ``<root>/static``
    (``RADDEPLOY_STATIC``).
    """

    root: Path
    static_override: Path | None = None

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

    @property
    def static(self) -> Path:
        """Read-only model assets (weights), one folder per name a flow's ``static_mounts`` gives."""
        return self.static_override or self.root / "static"

    @property
    def flow_ids(self) -> Path:
        """The DAG-id cache of the flows folder (:mod:`raddeploy_provider.flows.id_cache`)."""
        return self.root / "flow-ids.json"

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return (self.studies / checked_uid(study_uid, "StudyInstanceUID")
                / checked_uid(series_uid, "SeriesInstanceUID")
                / f"{checked_uid(sop_uid, 'SOPInstanceUID')}.dcm")

    def run(self, dag_id: str, run_id: str) -> RunDir:
        for part in (dag_id, run_id):
            if not _RUN_PART_RE.fullmatch(part) or part in (".", ".."):
                raise StoreError(f"{part!r} cannot name a run folder")
        return RunDir(self.runs / dag_id / run_id)

    def find_runs(self, run_id: str, dag_id: str | None = None) -> list[RunDir]:
        """Run folders named ``run_id`` (in ``dag_id``, or in any flow)."""
        pattern = f"{dag_id or '*'}/{run_id}"
        return [RunDir(p) for p in sorted(self.runs.glob(pattern)) if p.is_dir()]

    def create(self) -> None:
        for folder in (self.studies, self.runs, self.incoming):
            folder.mkdir(parents=True, exist_ok=True)
