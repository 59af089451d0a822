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
from typing import Any, ClassVar

from .errors import StoreError
from .uids import checked_uid

_RUN_PART_RE = re.compile(r"^[A-Za-z0-9_.~:+-]+$")

#: The mount name of the instances the triggers matched (the flow format's ``src``); its
#: folder in the run is ``input/``.
SOURCE_MOUNT = "src"


class Entry:
    """One file or folder a layout holds at ``<root>/<name>``: declared once, read as a Path.

    ``studies = Entry("studies")`` in a layout class makes ``layout.studies`` the path
    ``layout.root / "studies"``; the class itself lists its entries (:func:`entry_names`).
    """

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.__doc__ = doc

    def __get__(self, layout: object, owner: type | None = None) -> Any:
        return self if layout is None else layout.root / self.name  # type: ignore[attr-defined]


def entry_names(layout: type) -> frozenset[str]:
    """The names of every :class:`Entry` a layout class declares."""
    return frozenset(value.name for value in vars(layout).values() if isinstance(value, Entry))


#: ``<SOP>.v<N>.dcm``: version N (2, 3, ...) of an instance re-sent with other content; version 1 is ``<SOP>.dcm``.
_VERSION_RE = re.compile(r"\.v([0-9]+)\.dcm$")


def version_of(path: str | Path) -> int:
    """Which version of its SOP instance the stored file at ``path`` is (1: ``<SOP>.dcm``)."""
    match = _VERSION_RE.search(Path(path).name)
    return int(match.group(1)) if match else 1


def versioned(final: Path, version: int) -> Path:
    """Where version ``version`` of the instance whose first version is ``final`` (``<SOP>.dcm``,
    :meth:`DataDir.instance_path`) goes."""
    return final if version == 1 else final.with_name(f"{final.name.removesuffix('.dcm')}.v{version}.dcm")


@dataclass(frozen=True)
class RunDir:
    """``runs/<dag_id>/<run_id>/``: everything one run reads and writes, and nothing else.

    Every name the run folder uses itself is an :class:`Entry` here, and :data:`RESERVED`
    (names no mount may take) is made from them: adding a file to the run folder is one
    line in this class.
    """

    root: Path
    #: Names a mount cannot take: a mount is the folder ``<run>/<name>``, and these are the run
    #: folder itself, its parent and every entry the run keeps besides its mounts.
    RESERVED: ClassVar[frozenset[str]]

    input = Entry("input", "The fingerprint sensor's snapshot (hard links): the ``src`` mount.")
    config = Entry("config", "``config/<task>/config.yaml``: a model's ``config``, mounted read-only.")
    sent = Entry("sent", "``sent/<task>.json``: what a send task's node accepted, so a retry sends the rest.")
    manifest = Entry("manifest.json", "The run manifest, rebuilt from its parts (:mod:`.manifest`).")
    manifest_parts = Entry("manifest.d", "``manifest.d/<part>.json``: one part per task and one for the run.")
    manifest_lock = Entry(".manifest.lock", "Held while manifest.json is rebuilt.")
    notified = Entry("notified", "``notified/<event>.<clear number>``: made by the one notification of that event "
                     "(:mod:`raddeploy_provider.notifications`), so a run's failure is told once.")
    previews = Entry("previews", "``previews/<name>.png``: pictures of the run's RT results for review "
                     "(:mod:`raddeploy_provider.previews`), served by the provider's plugin.")

    @property
    def dag_id(self) -> str:
        return self.root.parent.name

    @property
    def run_id(self) -> str:
        return self.root.name

    def mount(self, name: str) -> Path:
        """The host folder behind a named mount: ``src`` is ``input/``, any other its own name."""
        if name in self.RESERVED:
            raise StoreError(f"{name!r} is a reserved name of the run folder, not a mount")
        return self.input if name == SOURCE_MOUNT else self.root / name

    def config_file(self, task_id: str) -> Path:
        return self.config / task_id / "config.yaml"

    def sent_ledger(self, task_id: str) -> Path:
        return self.sent / f"{task_id}.json"


RunDir.RESERVED = frozenset({".", ".."}) | entry_names(RunDir)


@dataclass(frozen=True)
class DataDir:
    """The data dir shared by the listener and the workers (same path everywhere).

    ``static_override``: the static assets folder when it is not ``<root>/static``
    (``RADDEPLOY_STATIC``).
    """

    root: Path
    static_override: Path | None = None

    studies = Entry("studies", "``<Study>/<Series>/<SOP>.dcm``: every instance as received.")
    runs = Entry("runs", "``<dag_id>/<run_id>/``: the run folders (:class:`RunDir`).")
    incoming = Entry("incoming", "Files being received; same file system as ``studies``, so rename is atomic.")
    index = Entry("index.sqlite3", "The study index, run register and outbox (:mod:`.index`); "
                  "not used when RADDEPLOY_INDEX_URL puts them on PostgreSQL.")
    flow_ids = Entry("flow-ids.json", "The DAG-id cache of the flows folder (``flows.id_cache``).")
    audit = Entry("audit", "``audit-<YYYY-MM-DD>.jsonl``: the audit trail's daily export (:mod:`.audit`).")
    trash = Entry(".trash", "What retention is deleting (renamed here in its transaction, then removed; "
                  ":mod:`.retention`).")

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return (self.studies / checked_uid(study_uid, "StudyInstanceUID")
                / checked_uid(series_uid, "SeriesInstanceUID")
                / f"{checked_uid(sop_uid, 'SOPInstanceUID')}.dcm")

    @property
    def static(self) -> Path:
        """Read-only model assets (weights), one folder per name a flow's ``static_mounts`` gives."""
        return self.static_override or self.root / "static"

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
