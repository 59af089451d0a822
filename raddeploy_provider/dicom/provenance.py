"""Provenance on every result: a Contributing Equipment item saying what produced it.

PS3.3 C.7.5.1 (General Equipment) and C.12.1 (SOP Common): the Contributing Equipment Sequence
(0018,A001) lists equipment that contributed to an instance, with the purpose coded from
CID 7005 (DCM 109102 "Processing Equipment"). We add one item: manufacturer
``raddeploy-provider`` and its version, the flow (id and version) as the model name, and the
model's image and digest in the contribution description, so a planning system's user can
trace a structure set back to the exact container that made it. Items the model wrote stay.

The item holds no time: a result a re-run regenerates identically stays byte-identical, so
the send ledger (keyed by content) does not send it twice. When it was made is in the run
manifest. Stamping rewrites the file in place (write, then rename), in its own transfer
syntax; compressed pixel data is copied, never decoded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from raddeploy_provider import __version__

MANUFACTURER = "raddeploy-provider"
PROCESSING_EQUIPMENT = ("109102", "DCM", "Processing Equipment")  # CID 7005


@dataclass(frozen=True)
class Provenance:
    """What produced a result: the flow and the model's image (with the digest that ran)."""

    flow_id: str
    flow_version: str
    model: str
    image: str
    image_digest: str  # a repo digest (name@sha256:...) or the local image id (sha256:...)

    def item(self) -> Dataset:
        """The Contributing Equipment Sequence item."""
        item = Dataset()
        item.Manufacturer = MANUFACTURER
        item.ManufacturerModelName = _lo(f"{self.flow_id} {self.flow_version}".strip())
        item.SoftwareVersions = _lo(__version__)
        item.ContributionDescription = (
            f"Produced by raddeploy-provider {__version__}: flow {self.flow_id}"
            + (f" version {self.flow_version}" if self.flow_version else "")
            + f", model {self.model}, image {self.image} ({self.image_digest or 'digest unknown'})")[:1024]
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = PROCESSING_EQUIPMENT
        item.PurposeOfReferenceCodeSequence = Sequence([code])
        return item


def _lo(text: str) -> str:
    """An LO value: 64 characters at most, no backslash."""
    return text.replace("\\", "/")[:64]


def stamp(path: Path, provenance: Provenance) -> bool:
    """Add the provenance item to the Part 10 file at ``path``; False when it carries it already."""
    ds = pydicom.dcmread(path)
    item = provenance.item()
    existing = list(ds.get("ContributingEquipmentSequence", []))
    if any(_same(old, item) for old in existing):
        return False
    ds.ContributingEquipmentSequence = Sequence([*existing, item])
    tmp = path.with_name(f".{path.name}.provenance.tmp")
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.chmod(tmp, os.stat(path).st_mode & 0o770)  # the model's bits, none for other users (README "Security")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _same(a: Dataset, b: Dataset) -> bool:
    keys = ("Manufacturer", "ManufacturerModelName", "SoftwareVersions", "ContributionDescription")
    return all(str(a.get(k, "")) == str(b.get(k, "")) for k in keys)
