"""Errors a flow file can have, each pointing at the place a person must edit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class FlowError(Exception):
    """A flow file that cannot be used as written.

    ``str()`` gives ``file:line: field: message (hint)``, the shape editors and CI logs link.
    """

    file: Path | str
    line: int | None
    field: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else f"{self.file}"
        text = f"{where}: {self.field or '(file)'}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text


@dataclass
class FlowWarning:
    """Something legal but risky in a flow file (a mutable image tag, network access).

    Same shape as :class:`FlowError`; the flow still loads.
    """

    file: Path | str
    line: int | None
    field: str
    message: str
    hint: str = ""

    __str__ = FlowError.__str__
