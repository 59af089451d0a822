"""README.md points to the settings reference and names the two commands.

Every RADDEPLOY_ setting the code reads is in docs/configuration.md, generated from the table in
raddeploy_provider/config.py: tests/test_config_docs.py checks the page and that the code reads
no variable the table lacks.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_points_to_the_settings_reference() -> None:
    readme = (REPO / "README.md").read_text()
    assert "## Settings" in readme and "](docs/configuration.md)" in readme
    assert (REPO / "docs" / "configuration.md").is_file()


def test_readme_names_the_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (REPO / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
