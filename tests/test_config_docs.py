"""The settings table in raddeploy_provider/config.py is the one truth: it drives load_settings,
the committed docs/configuration.md is generated from it, every Settings field has its entry,
and the code reads no RADDEPLOY_ variable the table does not know. And the new settings
(retention, the retention schedule, patient names) read as documented.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections import Counter
from pathlib import Path

import pytest

from raddeploy_provider import config
from raddeploy_provider.config import SETTINGS, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "configuration.md"
#: Where the code that reads settings lives.
SOURCES = ("raddeploy_provider", "listener", "raddeploy", "dags")
DAY = 86400.0

#: ``RADDEPLOY_*`` names in the code that are no settings of ours, each with why.
NOT_SETTINGS = {
    # Set for model containers (operators/model.py; README "What a model container gets"), never
    # read by our processes. (RADDEPLOY_GPU_FALLBACK=1, also given to containers, is the setting's
    # own name: in the table.)
    "RADDEPLOY_RUN_ID": "a model container's environment",
    "RADDEPLOY_FLOW": "a model container's environment",
    "RADDEPLOY_FLOW_VERSION": "a model container's environment",
    "RADDEPLOY_FLOW_EXTRA": "a model container's environment",
    # No environment variable: the calling AE title of the CLI's C-ECHO (raddeploy/cli.py).
    "RADDEPLOY_STATUS": "an AE title",
}


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [n for n in os.environ if n.startswith(config.PREFIX)]:
        monkeypatch.delenv(name)


def _names_in_code() -> dict[str, set[str]]:
    """Every string constant that is a whole ``RADDEPLOY_*`` name, and the files it is in.

    Any such literal counts, not only ``os.environ`` reads: an environment is also read through
    a mapping given as an argument (``gpu.host_gpu_ids(env)``) or a name held in a constant
    (``gpu.FALLBACK_ENV``), and a literal that is no variable is said so in NOT_SETTINGS.
    """
    found: dict[str, set[str]] = {}
    for top in SOURCES:
        for path in sorted((REPO / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                        and re.fullmatch(r"RADDEPLOY_[A-Z_]+", node.value)):
                    found.setdefault(node.value, set()).add(str(path.relative_to(REPO)))
    return found


# -- the docs are the table ----------------------------------------------------------------------

def test_docs_are_generated_from_the_table() -> None:
    committed = DOCS.read_text(encoding="utf-8")
    assert committed == config.render_docs(), (
        f"docs/configuration.md is out of date: regenerate with `{config.DOCS_COMMAND}`")
    assert config.DOCS_COMMAND in committed  # the page says how it is made


def test_docs_name_every_setting() -> None:
    text = config.render_docs()
    for setting in SETTINGS:
        assert f"| `{setting.variable}` |" in text, f"{setting.variable} is not in docs/configuration.md"
        assert setting.doc.strip(), f"{setting.variable} has no doc"


def test_table_names_each_variable_once_and_sections_are_contiguous() -> None:
    names = Counter(s.name for s in SETTINGS)
    assert [n for n, count in names.items() if count > 1] == []
    assert all(re.fullmatch(r"[A-Z][A-Z_]*", s.name) for s in SETTINGS)
    order = [s.section for s in SETTINGS]
    runs = [section for i, section in enumerate(order) if i == 0 or order[i - 1] != section]
    assert len(runs) == len(set(runs)), f"a section's settings are split in the table: {runs}"


def test_computed_defaults_are_said_in_words() -> None:
    assert [s.variable for s in SETTINGS if callable(s.default) and not s.shown] == []


def test_references_in_the_docs_exist() -> None:
    text = config.render_docs()
    for target in re.findall(r"\]\(([^)#]+)[^)]*\)", text):
        assert (DOCS.parent / target).is_file(), f"docs/configuration.md links to a missing {target}"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#+ (.+)$", readme, re.MULTILINE))
    for heading in re.findall(r'README, "([^"]+)"', text):
        assert heading in headings, f"docs/configuration.md names README section {heading!r}, which it lacks"


# -- the table is the code -----------------------------------------------------------------------

def test_every_field_is_read_by_exactly_one_setting() -> None:
    read = Counter(s.field for s in SETTINGS if s.field is not None)
    fields = [f.name for f in dataclasses.fields(Settings)]
    assert sorted(f for f in fields if read[f] != 1) == [], "each Settings field needs exactly one table entry"
    assert sorted(set(read) - set(fields)) == [], "a table entry names no Settings field"
    assert all(s.parse is not None for s in SETTINGS if s.field is not None)


def test_every_variable_in_the_code_is_a_setting_or_said_not_to_be() -> None:
    found = _names_in_code()
    table = {s.variable for s in SETTINGS}
    unknown = {name: sorted(paths) for name, paths in found.items() if name not in table and name not in NOT_SETTINGS}
    assert unknown == {}, ("RADDEPLOY_ names in the code that config.SETTINGS lacks: add each to the table "
                           f"(and regenerate the docs) or, if it is no setting, to NOT_SETTINGS here: {unknown}")
    assert sorted(table & set(NOT_SETTINGS)) == []
    assert sorted(set(NOT_SETTINGS) - set(found)) == [], "NOT_SETTINGS names what the code no longer has"


def test_settings_read_elsewhere_are_read_somewhere() -> None:
    """A table entry without a field (RADDEPLOY_GPUS) is read by some other module."""
    found = _names_in_code()
    for setting in SETTINGS:
        if setting.field is None:
            assert setting.variable in found, f"{setting.variable} is in the table but nothing reads it"


def test_dataclass_defaults_are_the_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fields with a default in Settings (for code that builds one by hand) default as the table does."""
    _clean_env(monkeypatch)
    loaded = load_settings()
    for f in dataclasses.fields(Settings):
        if f.default is not dataclasses.MISSING:
            assert getattr(loaded, f.name) == f.default, f.name


def test_the_intro_names_what_raddeploy_run_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from raddeploy.embedded import EmbeddedStack

    _clean_env(monkeypatch)
    env = EmbeddedStack(home=tmp_path / "home", flows_dir=tmp_path / "flows").environment()
    sets = sorted(name for name in env if name.startswith(config.PREFIX))
    assert sets and [name for name in sets if f"`{name}`" not in config.DOCS_INTRO] == []


def test_the_schedule_presets_are_airflows() -> None:
    dates = pytest.importorskip("airflow.utils.dates")
    assert set(config.CRON_PRESETS) == set(dates.cron_presets)


# -- the new settings ----------------------------------------------------------------------------

def test_retention_and_display_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_env(monkeypatch)
    settings = load_settings()
    assert settings.retain_delivered == 30 * DAY
    assert settings.retain_failed == 90 * DAY
    assert settings.retain_unmatched == 7 * DAY
    assert settings.disk_low_water == 10 * 2**30
    assert settings.retention_schedule == "@hourly"
    assert settings.show_patient_names is False


@pytest.mark.parametrize("name, text, field, value", [
    ("RETAIN_DELIVERED", "2d", "retain_delivered", 2 * DAY),
    ("RETAIN_DELIVERED", "12h", "retain_delivered", 12 * 3600.0),
    ("RETAIN_FAILED", "180d", "retain_failed", 180 * DAY),
    ("RETAIN_UNMATCHED", "3600", "retain_unmatched", 3600.0),
    ("RETAIN_UNMATCHED", " 1.5d ", "retain_unmatched", 1.5 * DAY),
    ("DISK_LOW_WATER", "0", "disk_low_water", 0),
    ("DISK_LOW_WATER", "500m", "disk_low_water", 500 * 2**20),
    ("DISK_LOW_WATER", "2g", "disk_low_water", 2 * 2**30),
    ("RETENTION_SCHEDULE", "off", "retention_schedule", None),
    ("RETENTION_SCHEDULE", "OFF", "retention_schedule", None),
    ("RETENTION_SCHEDULE", "", "retention_schedule", "@hourly"),
    ("RETENTION_SCHEDULE", "@daily", "retention_schedule", "@daily"),
    ("RETENTION_SCHEDULE", "@Weekly", "retention_schedule", "@weekly"),
    ("RETENTION_SCHEDULE", "30 2 * * *", "retention_schedule", "30 2 * * *"),
    ("RETENTION_SCHEDULE", "  */15   2-5 * * MON-FRI ", "retention_schedule", "*/15 2-5 * * MON-FRI"),
    ("SHOW_PATIENT_NAMES", "true", "show_patient_names", True),
    ("SHOW_PATIENT_NAMES", "False", "show_patient_names", False),
])
def test_new_settings_parse(monkeypatch: pytest.MonkeyPatch, name: str, text: str, field: str, value: object) -> None:
    monkeypatch.setenv(f"RADDEPLOY_{name}", text)
    assert getattr(load_settings(), field) == value


@pytest.mark.parametrize("name, text, message", [
    ("RETAIN_DELIVERED", "forever",
     "RADDEPLOY_RETAIN_DELIVERED='forever': write seconds or a number with s, m, h or d (30d, 12h)"),
    ("RETAIN_FAILED", "-1d", "RADDEPLOY_RETAIN_FAILED='-1d': write seconds or a number with s, m, h or d (30d, 12h)"),
    ("RETAIN_UNMATCHED", "1w",
     "RADDEPLOY_RETAIN_UNMATCHED='1w': write seconds or a number with s, m, h or d (30d, 12h)"),
    ("DISK_LOW_WATER", "lots", "RADDEPLOY_DISK_LOW_WATER='lots': write bytes or a number with k, m or g (2g)"),
    ("RETENTION_SCHEDULE", "x",
     "RADDEPLOY_RETENTION_SCHEDULE='x': write a cron expression (0 * * * *), @hourly, @daily or off"),
    ("RETENTION_SCHEDULE", "@once",
     "RADDEPLOY_RETENTION_SCHEDULE='@once': write a cron expression (0 * * * *), @hourly, @daily or off"),
    ("SHOW_PATIENT_NAMES", "yes", "RADDEPLOY_SHOW_PATIENT_NAMES='yes': use one of true, false"),
])
def test_new_settings_refuse_bad_values(monkeypatch: pytest.MonkeyPatch, name: str, text: str, message: str) -> None:
    monkeypatch.setenv(f"RADDEPLOY_{name}", text)
    with pytest.raises(ValueError) as err:
        load_settings()
    assert str(err.value) == message


ACCEPTED_CRON = ["0 * * * *", "30 2 * * *", "*/15 2-5 * * MON-FRI", "0 0 1 jan,jul *", "0 3 * * 7",
                 "5,35 */2 1-15/2 * 0-6"]
REFUSED_CRON = ["61 * * * *", "* * *", "0 0 * * 8", "0 0 0 * *", "*/0 * * * *", "0 24 * * *", "0 0 * foo *",
                "@continuous", "@every 5m", "hourly"]


@pytest.mark.parametrize("expression", ACCEPTED_CRON)
def test_accepted_schedules_are_valid_for_airflow(monkeypatch: pytest.MonkeyPatch, expression: str) -> None:
    """The retention DAG gives the schedule to Airflow's CronTriggerTimetable: what we accept, it takes."""
    trigger = pytest.importorskip("airflow.timetables.trigger")
    monkeypatch.setenv("RADDEPLOY_RETENTION_SCHEDULE", expression)
    schedule = load_settings().retention_schedule
    trigger.CronTriggerTimetable(schedule, timezone="UTC").validate()


@pytest.mark.parametrize("expression", REFUSED_CRON)
def test_refused_schedules(monkeypatch: pytest.MonkeyPatch, expression: str) -> None:
    monkeypatch.setenv("RADDEPLOY_RETENTION_SCHEDULE", expression)
    with pytest.raises(ValueError, match=r"^RADDEPLOY_RETENTION_SCHEDULE=.*: write a cron expression"):
        load_settings()


# -- the old settings read as before -------------------------------------------------------------

@pytest.mark.parametrize("name, text, message", [
    ("FSYNC", "Sometimes", "RADDEPLOY_FSYNC='sometimes': use one of always, never"),
    ("CHECK_CALLED_AE", "no", "RADDEPLOY_CHECK_CALLED_AE='no': use one of true, false"),
    ("GPU_MODE", "cuda", "RADDEPLOY_GPU_MODE='cuda': use one of device_request, env"),
    ("MIN_FREE_DISK", "lots", "RADDEPLOY_MIN_FREE_DISK='lots': write bytes or a number with k, m or g (2g)"),
    ("OUTBOX_GIVE_UP", "soon", "RADDEPLOY_OUTBOX_GIVE_UP='soon': write seconds or a number with s, m or h (30s, 6h)"),
    ("NOTIFY_ON", "failure,party", "RADDEPLOY_NOTIFY_ON='failure,party': 'party' is no event; use some of "
     "failure, rejection, deadline, delivery (comma-separated), or nothing for no notifications"),
    ("INDEX_URL", "mysql://u:secret@h/db", "RADDEPLOY_INDEX_URL must be postgresql://user:password@host:port/database, "
     "or empty for the SQLite index in the data dir"),
])
def test_old_settings_keep_their_messages(monkeypatch: pytest.MonkeyPatch, name: str, text: str, message: str) -> None:
    monkeypatch.setenv(f"RADDEPLOY_{name}", text)
    with pytest.raises(ValueError) as err:
        load_settings()
    assert str(err.value) == message


def test_old_settings_read_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.data_dir == tmp_path / ".raddeploy" / "data" and settings.flows_dir == tmp_path / "flows"
    assert (settings.ui_url, settings.notify_smtp, settings.static_dir, settings.index_url) == (
        "http://127.0.0.1:8080", "smtp_default", None, None)
    assert settings.notify_on == ("failure", "rejection", "deadline") and settings.fsync is False
    monkeypatch.setenv("RADDEPLOY_AIRFLOW_URL", "http://airflow:8080/")
    monkeypatch.setenv("RADDEPLOY_UI_URL", "  ")  # blank: the Airflow URL
    monkeypatch.setenv("RADDEPLOY_NOTIFY_SMTP", "")
    monkeypatch.setenv("RADDEPLOY_ALLOWED_NETWORKS", " 10.0.0.0/24, ,127.0.0.1")
    monkeypatch.setenv("RADDEPLOY_MODEL_MEM_LIMIT", "2g")
    monkeypatch.setenv("RADDEPLOY_STATIC", "assets")
    settings = load_settings()
    assert settings.airflow_url == settings.ui_url == "http://airflow:8080"
    assert settings.notify_smtp == "smtp_default"
    assert settings.allowed_networks == ("10.0.0.0/24", "127.0.0.1")
    assert settings.model_mem_limit == 2 * 2**30 and settings.static_dir == tmp_path / "assets"
    assert "secret" not in repr(dataclasses.replace(settings, index_url="postgresql://u:secret@h/db"))
