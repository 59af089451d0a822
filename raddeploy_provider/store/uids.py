"""UID validation: a UID becomes a folder or file name, so it must be exactly a DICOM UID."""

from __future__ import annotations

import re

from .errors import InvalidUID

# PS3.5 9.1: components of digits, no leading zero unless the component is "0", <= 64 chars.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def checked_uid(value: object, what: str) -> str:
    """Return ``value`` as a UID string, or raise :class:`InvalidUID` naming ``what``."""
    text = str(value).rstrip("\x00 ") if value is not None else ""
    if not text:
        raise InvalidUID(f"{what} is missing")
    if len(text) > 64 or not _UID_RE.fullmatch(text):  # fullmatch: "$" lets a trailing "\n" through
        raise InvalidUID(f"{what} {text[:80]!r} is not a valid DICOM UID")
    return text
