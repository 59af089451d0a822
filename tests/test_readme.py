"""README.md documents every RADDEPLOY_ setting the code reads, and the two commands."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_setting_is_in_the_readme() -> None:
    code = "\n".join(p.read_text() for top in ("raddeploy_provider", "listener", "raddeploy")
                     for p in (REPO / top).rglob("*.py"))
    read = set(re.findall(r'_(?:env|choice|list|size|path)\(\s*"([A-Z_]+)"', code))
    read |= set(re.findall(r'"RADDEPLOY_([A-Z_]+)"', code))
    readme = (REPO / "README.md").read_text()
    missing = sorted(name for name in read if f"RADDEPLOY_{name}" not in readme)
    assert read and missing == [], f"settings missing from README.md: {missing}"


def test_readme_names_the_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (REPO / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
