"""Durations, sizes and slugs: how people write them in flow files and settings, and back.

One home for these readings, shared by the flow loader, the settings, the DAG factory and
the CLI, so ``30m`` and ``24g`` mean the same wherever they are written.
"""

from __future__ import annotations

import math
import re
from typing import Any

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_DURATION_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_duration(value: Any) -> float:
    """``90``, ``"90s"``, ``"30m"``, ``"2h"`` -> seconds; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(value)
        return float(value)
    match = _DURATION_RE.match(str(value))
    if not match:
        raise ValueError(value)
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def format_duration(seconds: float) -> str:
    """``90`` -> ``1m30s``, ``1800`` -> ``30m``, ``0.5`` -> ``0.5s``: as a flow file would write it."""
    if seconds < 60 and seconds != int(seconds):
        return f"{seconds:g}s"
    rest, parts = int(round(seconds)), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size or (unit == "s" and not parts):
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts)


def parse_size(value: Any) -> int:
    """``"512m"``, ``"24g"``, ``"1.5g"`` or a number of bytes -> bytes; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int) and value > 0:
        return value
    match = _SIZE_RE.match(str(value))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(value)
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def format_gb(size: int) -> str:
    """Bytes as people read a disk's free space: ``12.3 GB``."""
    return f"{size / 1e9:.1f} GB"


def slug(text: str) -> str:
    """A DAG id from a flow name: lower case, runs of other characters become ``_``."""
    return re.sub(r"[^a-z0-9_.-]+", "_", text.strip().lower()).strip("_") or "flow"
