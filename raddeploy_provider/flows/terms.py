"""The values some trigger keywords can take, to catch patterns that match more than was meant.

A RadDeploy flow file's patterns search anywhere in a value, so ``Modality: CT`` there also
matches ``RTSTRUCT``, ``OCT`` and ``CTPROTOCOL``. ``raddeploy validate`` warns of such a
pattern (:func:`overlaps`) and says how to anchor it (:func:`anchored`).
"""

from __future__ import annotations

import re

from .model import Pattern

#: Keyword -> its DICOM Defined Terms. Modality: PS3.3 C.7.3.1.1.1 (2024), retired ones included
#: where scanners still send them.
DEFINED_TERMS: dict[str, tuple[str, ...]] = {
    "Modality": (
        "ANN", "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CFM", "CR", "CT", "CTPROTOCOL", "DG", "DMS", "DOC",
        "DX", "ECG", "EEG", "EMG", "EOG", "EPS", "ES", "FID", "GM", "HC", "HD", "IO", "IOL", "IVOCT", "IVUS",
        "KER", "KO", "LEN", "LS", "M3D", "MG", "MR", "NM", "OAM", "OCT", "OP", "OPM", "OPT", "OPTBSV",
        "OPTENF", "OPV", "OSS", "OT", "PA", "PLAN", "POS", "PR", "PT", "PX", "REG", "RESP", "RF", "RG",
        "RTDOSE", "RTIMAGE", "RTINTENT", "RTPLAN", "RTRAD", "RTRECORD", "RTSEGANN", "RTSTRUCT", "RWV", "SEG",
        "SM", "SMR", "SR", "SRF", "STAIN", "TEXTUREMAP", "TG", "US", "VA", "XA", "XAPROTOCOL", "XC",
    ),
}

_FLAGS = re.compile(r"^(\(\?[aiLmsux]+\))*")
_WORD = re.compile(r"^\w+$")


def overlaps(keyword: str, pattern: Pattern) -> list[str]:
    """The defined terms of ``keyword`` that ``pattern`` matches, when that is more than one."""
    found = [term for term in DEFINED_TERMS.get(keyword, ()) if pattern.hits(term)]
    return found if len(found) > 1 else []


def anchored(source: str) -> str:
    """``source`` made to match a whole value under search semantics: ``CT`` -> ``^CT$``,
    ``(?i)ct|mr`` -> ``(?i)^(?:ct|mr)$`` (inline flags stay in front, where Python needs them)."""
    flags = _FLAGS.match(source).group(0)
    body = source[len(flags):]
    return f"{flags}^{body}$" if _WORD.match(body) else f"{flags}^(?:{body})$"
