"""What a reviewer sees before a run's results are sent (``review: required``), and what they decided.

:func:`review_body` is the Markdown of the approval task: the flow and its version, the
input series (modality, description, instance count), each result to be sent (its object
type; for an RTSTRUCT or SEG its ROIs with their volumes in cm³) and the preview pictures.
It is built from the run folder alone, with UIDs, counts and descriptions: never a patient
name or ID. :class:`Decision` is the outcome, for the run note and the manifest.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from raddeploy_provider.flows.model import Flow
from raddeploy_provider.store import RunDir, read_header, outputs

#: SOP classes whose ROIs (and volumes) are listed.
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(frozen=True)
class Decision:
    """A review's outcome: ``approved``, who (an Airflow user name; ``"timeout"`` when nobody
    answered in time) and why (the reviewer's words, or the timeout rule)."""

    approved: bool
    by: str
    reason: str = ""

    def note(self) -> str:
        """The run note's sentence."""
        verb = "Approved" if self.approved else "Rejected, nothing sent"
        why = f": {self.reason}" if self.reason else ""
        return f"{verb} by {self.by}{why}" if self.by != "timeout" else f"{verb}: no review in time{why}"

    def record(self) -> dict:
        return {"decision": "approved" if self.approved else "rejected", **{k: v for k, v in asdict(self).items()
                                                                            if k != "approved"}}


def decision(chosen: Sequence[str], responded_by: dict | None, params: dict | None, on_timeout: str) -> Decision:
    """The :class:`Decision` from the approval task's answer (``Approve``/``Reject``, the user, the
    ``reason`` field); no user means the timeout's default was taken."""
    approved = bool(chosen) and chosen[0] == "Approve"
    reason = str((params or {}).get("reason") or "").strip()
    if not responded_by:
        return Decision(approved, "timeout", reason or f"review_timeout passed: on_review_timeout is {on_timeout}")
    return Decision(approved, str(responded_by.get("name") or responded_by.get("id") or "?"), reason)


def review_body(flow: Flow, run: RunDir, sent: Iterable[str], previews: Sequence[tuple[str, str]] = (),
                volumes: dict[str, dict[str, float]] | None = None) -> str:
    """The approval task's Markdown for ``run``: ``sent`` are the output mounts to be sent,
    ``previews`` (title, URL) the pictures, ``volumes`` file name -> ROI -> cm³."""
    lines = [f"### {flow.name} {flow.version}".rstrip(), "",
             f"Flow `{flow.dag_id}` from `{Path(flow.source).name}` (sha256 {flow.file_hash[:12]}).", ""]
    lines += ["**Input**", "", "| modality | series description | instances |", "|---|---|---|"]
    for (modality, description), count in sorted(_series(_files(run.input)).items()):
        lines.append(f"| {modality} | {_cell(description)} | {count} |")
    lines += ["", "**To be sent** (nothing leaves before a decision)", ""]
    for mount in sent:
        files = _files(run.mount(mount))
        kinds = Counter(_kind(path) for path in files)
        lines.append(f"- `{mount}`: " + ", ".join(f"{count} × {kind}" for kind, count in sorted(kinds.items())))
        for path in files:
            rois = (volumes or {}).get(path.name)
            if rois:
                shown = ", ".join(f"{name} {cm3:.1f} cm³" for name, cm3 in rois.items())
                lines.append(f"  - {path.name}: {shown}")
    if previews:
        lines += ["", "**Preview**", ""]
        lines += [f"![{title}]({url})" for title, url in previews]
    lines += ["", "Approve to send every result to the flow's destinations; Reject (say why in *reason*) "
              "and nothing is sent."]
    return "\n".join(lines)


def rt_results(run: RunDir, sent: Iterable[str]) -> list[Path]:
    """The RTSTRUCT and SEG files among the results to be sent (for volumes and previews)."""
    found = []
    for mount in sent:
        for path in _files(run.mount(mount)):
            try:
                if str(read_header(path).sop_class_uid) in (RTSTRUCT, SEG):
                    found.append(path)
            except Exception:  # not DICOM: the output guard says so at the send task
                continue
    return found


def _files(folder: Path) -> list[Path]:
    return outputs.walk(folder, folder)[0] if folder.is_dir() else []


def _series(files: list[Path]) -> Counter:
    counted: Counter = Counter()
    for path in files:
        try:
            tags = read_header(path).tags
        except Exception:
            continue
        counted[(str(tags.get("Modality", "?")), str(tags.get("SeriesDescription", "")))] += 1
    return counted


def _kind(path: Path) -> str:
    from pydicom.uid import UID  # its names of SOP classes; at review time, not at every DAG parse

    try:
        return UID(str(read_header(path).sop_class_uid)).name
    except Exception:
        return "not DICOM"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:80]
