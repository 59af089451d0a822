"""What a model wrote, checked before any of it leaves: the output guard.

A result reaches a planning system and is filed under the Patient ID and Study Instance UID it
carries. So before a send, every file of the sent outputs must be a regular file inside its
output folder (a symbolic link would make the worker read and send whatever host file it
names), a DICOM Part 10 file the listener itself would accept, and carry the input's Patient
ID and (unless the flow allows a new study) its Study Instance UID. One problem anywhere
and nothing is sent: a result set that is partly another patient's is not a result.

The check is a value (:class:`OutputCheck`) that explains itself; problems name the file
(relative to the run folder), the SOP Instance UID and the DICOM keyword, never a value:
Patient IDs stay out of logs.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .header import InstanceHeader, read_header


@dataclass(frozen=True)
class Problem:
    """Why one output file is not sent."""

    file: str  # relative to the run folder
    field: str  # the DICOM keyword at fault, or "file"
    why: str
    sop_instance_uid: str = ""

    def __str__(self) -> str:
        uid = f" (SOP Instance UID {self.sop_instance_uid})" if self.sop_instance_uid else ""
        return f"{self.file}{uid}: {self.field}: {self.why}"


@dataclass(frozen=True)
class Identity:
    """What every result must carry: the input's Patient ID and Study Instance UID (None: not checked)."""

    patient_id: str | None
    study_uid: str | None


@dataclass(frozen=True)
class Output:
    """One output file that passed: its path and header."""

    path: Path
    header: InstanceHeader


@dataclass
class OutputCheck:
    """The verdict on a run's sent outputs: the files, and every problem found."""

    outputs: list[Output] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def explain(self, limit: int = 10) -> str:
        shown = "; ".join(map(str, self.problems[:limit]))
        more = f"; and {len(self.problems) - limit} more" if len(self.problems) > limit else ""
        return (f"nothing is sent: {len(self.problems)} of {len(self.outputs) + len(self.problems)} output "
                f"files refused by the output guard: {shown}{more}")


def walk(folder: Path, run_root: Path) -> tuple[list[Path], list[Problem]]:
    """Every regular file under ``folder`` (sorted), never following a link; links and special
    files are problems. A missing folder holds nothing."""
    files: list[Path] = []
    problems: list[Problem] = []

    def visit(directory: Path) -> None:
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                path = Path(entry.path)
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    problems.append(Problem(_rel(path, run_root), "file", "a symbolic link: a model may only send "
                                            "files it wrote, not links (to " + repr(os.readlink(path)) + ")"))
                elif stat.S_ISDIR(mode):
                    visit(path)
                elif stat.S_ISREG(mode):
                    files.append(path)
                else:
                    problems.append(Problem(_rel(path, run_root), "file", "not a regular file"))

    if folder.is_symlink():
        problems.append(Problem(_rel(folder, run_root), "file", "the output folder is a symbolic link"))
    elif folder.is_dir():
        visit(folder)
    return files, problems


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return path.name


def input_identity(input_folder: Path, *, patient: bool = True, study: bool = True) -> Identity:
    """The Patient ID and Study Instance UID every input instance carries; raises ValueError
    (naming the keyword, not the values) when the input disagrees or has none."""
    files, problems = walk(input_folder, input_folder.parent)
    if problems:
        raise ValueError(f"the input holds what the study store never writes: {problems[0]}")
    patient_ids: set[str] = set()
    study_uids: set[str] = set()
    for path in files:
        header = read_header(path)
        patient_ids.add(str(header.tags.get("PatientID", "")))
        study_uids.add(header.study_uid)
    if not files:
        raise ValueError("the run has no input instances to compare the results with")
    if patient and len(patient_ids) > 1:
        raise ValueError(f"the input instances carry {len(patient_ids)} different PatientID values: whose "
                         "results these are is unclear, so nothing is sent")
    if study and len(study_uids) > 1:
        raise ValueError(f"the input instances belong to {len(study_uids)} studies (StudyInstanceUID)")
    return Identity(patient_ids.pop() if patient else None, study_uids.pop() if study else None)


def check_outputs(folders: list[Path], run_root: Path, identity: Identity) -> OutputCheck:
    """The guard over the files of ``folders`` (the sent outputs of one run)."""
    check = OutputCheck()
    for folder in folders:
        files, problems = walk(folder, run_root)
        check.problems += problems
        for path in files:
            verdict = _check_file(path, run_root, identity)
            if isinstance(verdict, Problem):
                check.problems.append(verdict)
            else:
                check.outputs.append(verdict)
    return check


def _check_file(path: Path, run_root: Path, identity: Identity) -> Problem | Output:
    rel = _rel(path, run_root)
    try:
        header = read_header(path)
    except Exception as exc:  # any reason it is not a file the listener would take
        return Problem(rel, "file", f"not a valid DICOM Part 10 file ({exc})")
    if identity.patient_id is not None and str(header.tags.get("PatientID", "")) != identity.patient_id:
        return Problem(rel, "PatientID", "differs from the input's (a result of another patient)", header.sop_uid)
    if identity.study_uid is not None and header.study_uid != identity.study_uid:
        return Problem(rel, "StudyInstanceUID", "differs from the input's (say `new_study: allowed` in the flow "
                       "if the model means to file a new study)", header.sop_uid)
    return Output(path, header)
