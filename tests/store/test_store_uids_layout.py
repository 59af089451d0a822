"""UIDs become folder and file names: only real DICOM UIDs pass, and no path leaves the data dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from raddeploy_provider.store import DataDir, InvalidUID, RunDir, StoreError
from raddeploy_provider.store.uids import checked_uid

GOOD = [
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.826.0.1.3680043.8.498.90248167263844208697367921867233830025",
    "0",
    "0.0",
    "2.25.100",
    "1." + "2" * 62,  # exactly 64 characters
]

BAD = [
    "../../x",
    "..",
    "1.2/../../3",
    "1.2.3/4",
    "/1.2.3",
    "1.2.3\n",  # "$" would let a trailing newline through
    "1.2.3\n4",
    "",
    "   ",
    "1." + "2" * 63,  # 65 characters
    "1.02.3",  # leading zero in a component
    "01.2",
    "1.2.03",
    "1..2",
    ".1.2",
    "1.2.",
    "1.2.a",
    "1.2.3 4",
    "-1.2",
    "\uff11.2",  # a full-width digit is not an ASCII digit
]


@pytest.mark.parametrize("uid", GOOD)
def test_accepts_dicom_uids(uid: str) -> None:
    assert checked_uid(uid, "SOPInstanceUID") == uid


def test_strips_dicom_padding() -> None:
    assert checked_uid("1.2.3\x00", "X") == "1.2.3"
    assert checked_uid("1.2.3 ", "X") == "1.2.3"


@pytest.mark.parametrize("uid", BAD)
def test_rejects_what_is_not_a_uid(uid: str) -> None:
    with pytest.raises(InvalidUID) as info:
        checked_uid(uid, "StudyInstanceUID")
    assert "StudyInstanceUID" in str(info.value)
    assert isinstance(info.value, StoreError)


@pytest.mark.parametrize("value", [None, "", "\x00"])
def test_missing_uid(value: object) -> None:
    with pytest.raises(InvalidUID, match="^SeriesInstanceUID is missing$"):
        checked_uid(value, "SeriesInstanceUID")


def test_instance_path(tmp_path: Path) -> None:
    data = DataDir(tmp_path)
    assert data.instance_path("1.2", "1.2.3", "1.2.3.4") == tmp_path / "studies" / "1.2" / "1.2.3" / "1.2.3.4.dcm"


@pytest.mark.parametrize("uid", BAD)
def test_instance_path_refuses_bad_uids_in_every_position(tmp_path: Path, uid: str) -> None:
    data = DataDir(tmp_path)
    for args in ((uid, "1.2", "1.3"), ("1.2", uid, "1.3"), ("1.2", "1.3", uid)):
        with pytest.raises(InvalidUID):
            data.instance_path(*args)


@pytest.mark.parametrize("dag_id, run_id", [
    ("hn_ct_oars", "1.2.3.1"),
    ("flow-1.v2", "manual__2024-05-01T10:00:00.123456+00:00"),
    ("x", "scheduled__2024-05-01T10:00:00~1"),
])
def test_run_dir(tmp_path: Path, dag_id: str, run_id: str) -> None:
    data = DataDir(tmp_path)
    run = data.run(dag_id, run_id)
    assert run.root == tmp_path / "runs" / dag_id / run_id
    assert run.root.resolve().is_relative_to((tmp_path / "runs").resolve())
    assert (run.dag_id, run.run_id) == (dag_id, run_id)
    run.root.mkdir(parents=True)
    assert data.find_runs(run_id) == [run] == data.find_runs(run_id, dag_id)
    assert data.find_runs(run_id, "other_flow") == []


@pytest.mark.parametrize("part", ["..", ".", "", "a/b", "../etc", "a\\b", "a b", "a\nb", "a\n", "/abs"])
def test_run_dir_refuses_names_that_are_not_one_plain_folder(tmp_path: Path, part: str) -> None:
    data = DataDir(tmp_path)
    with pytest.raises(StoreError):
        data.run(part, "1.2.1")
    with pytest.raises(StoreError):
        data.run("flow", part)


def test_run_folder_entries(tmp_path: Path) -> None:
    run = DataDir(tmp_path).run("flow", "1.2.1")
    assert run.mount("src") == run.input == run.root / "input"
    assert run.mount("seg") == run.root / "seg"
    assert run.config_file("segment") == run.root / "config" / "segment" / "config.yaml"
    assert run.sent_ledger("send_0_tps") == run.root / "sent" / "send_0_tps.json"
    assert (run.manifest, run.manifest_parts) == (run.root / "manifest.json", run.root / "manifest.d")
    # Every name the run folder uses itself is reserved, so no mount can land on it.
    used = {p.relative_to(run.root).parts[0] for p in (
        run.input, run.config_file("t"), run.sent_ledger("t"), run.manifest, run.manifest_parts, run.manifest_lock,
        run.previews, run.notified)}
    assert used | {".", ".."} == RunDir.RESERVED
    for name in RunDir.RESERVED:
        with pytest.raises(StoreError, match="reserved"):
            run.mount(name)


def test_static_and_flow_id_cache(tmp_path: Path) -> None:
    assert DataDir(tmp_path).static == tmp_path / "static"
    assert DataDir(tmp_path, static_override=tmp_path / "assets").static == tmp_path / "assets"
    assert DataDir(tmp_path).flow_ids == tmp_path / "flow-ids.json"


def test_create_makes_the_folders(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    data.create()
    data.create()  # again: no error
    assert all(p.is_dir() for p in (data.studies, data.runs, data.incoming))
    assert data.index == tmp_path / "data" / "index.sqlite3"
