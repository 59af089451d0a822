"""Run input folders: hard links to the stored instances, named and laid out by the flow format."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dicom_factory import make_series
from raddeploy_provider.store import StoredInstance, StudyStore, snapshot

STUDY = "1.2.826.0.1.3680043.99.1"


@pytest.fixture
def store(tmp_path: Path, index_url: str | None) -> StudyStore:
    """A store holding one study: a CT series of 3 and an MR series of 2, ingested for real
    (its index on the test's backend, conftest's ``index_backend``: both)."""
    store = StudyStore(tmp_path / "data", fsync=False, index_url=index_url)
    for modality, slices in (("CT", 3), ("MR", 2)):
        series = make_series(tmp_path / "src" / modality, modality=modality, slices=slices, size=8,
                             study_uid=STUDY, description=f"{modality} planning")
        for f in series.files:
            temp = store.layout.incoming / f"{modality}_{f.name}"
            shutil.copyfile(f, temp)
            store.ingest(temp, lambda header: {})
    yield store
    store.index.close()


def test_hard_links_named_by_modality_series_and_sop(store: StudyStore, tmp_path: Path) -> None:
    instances = store.index.instances(STUDY)
    dest = tmp_path / "run" / "input"

    made = snapshot(instances, store.layout.root, dest)

    assert len(made) == 5
    assert sorted(made) == sorted(p for p in dest.rglob("*") if p.is_file())
    for inst, path in zip(instances, made):
        modality = inst.tags["Modality"]
        assert path == dest / f"{modality}_{inst.series_uid}_{inst.sop_uid}.dcm"
        source = store.path_of(inst)
        assert path.stat().st_ino == source.stat().st_ino  # a link, not a copy
        assert os.path.samefile(path, source)
        assert source.stat().st_nlink == 2
    assert {p.name.split("_")[0] for p in made} == {"CT", "MR"}


def test_layout_by_keywords(store: StudyStore, tmp_path: Path) -> None:
    instances = store.index.instances(STUDY)
    dest = tmp_path / "input"

    made = snapshot(instances, store.layout.root, dest, layout=["Modality", "SeriesInstanceUID"])

    for inst, path in zip(instances, made):
        assert path.parent == dest / inst.tags["Modality"] / inst.series_uid
        assert path.name == f"{inst.tags['Modality']}_{inst.series_uid}_{inst.sop_uid}.dcm"
    assert sorted(p.name for p in dest.iterdir()) == ["CT", "MR"]

    made = snapshot(instances, store.layout.root, tmp_path / "by_type", layout=["ImageType", "PatientWeight"])
    # a multi-valued tag joins its values; a missing one is "unknown"
    assert {p.parent.relative_to(tmp_path / "by_type") for p in made} == {Path("ORIGINAL_PRIMARY_AXIAL/unknown")}


def test_snapshot_twice_is_idempotent(store: StudyStore, tmp_path: Path) -> None:
    instances = store.index.instances(STUDY)
    dest = tmp_path / "input"
    first = snapshot(instances, store.layout.root, dest, layout=["Modality"])
    inodes = {p: p.stat().st_ino for p in first}

    second = snapshot(instances, store.layout.root, dest, layout=["Modality"])

    assert second == first
    assert {p: p.stat().st_ino for p in second} == inodes
    assert len([p for p in dest.rglob("*") if p.is_file()]) == 5
    assert all(store.path_of(i).stat().st_nlink == 2 for i in instances)


def test_a_stale_file_in_the_way_is_replaced_by_the_link(store: StudyStore, tmp_path: Path) -> None:
    instances = store.index.instances(STUDY)
    dest = tmp_path / "input"
    made = snapshot(instances[:1], store.layout.root, dest)
    made[0].unlink()
    made[0].write_bytes(b"left over from a crashed attempt")

    again = snapshot(instances[:1], store.layout.root, dest)

    assert again == made
    assert os.path.samefile(again[0], store.path_of(instances[0]))


def test_hostile_tag_values_stay_inside_dest(store: StudyStore, tmp_path: Path) -> None:
    real = store.index.instances(STUDY)[0]
    forged = StoredInstance(**{**real.__dict__, "tags": {
        **real.tags, "Modality": "../../CT", "SeriesDescription": "..", "BodyPartExamined": "/etc/passwd",
        "StudyDescription": "a\\b/..\x00c",
    }})
    dest = tmp_path / "input"

    [path] = snapshot([forged], store.layout.root, dest,
                      layout=["SeriesDescription", "BodyPartExamined", "StudyDescription"])

    assert path.resolve().is_relative_to(dest.resolve())
    assert path.relative_to(dest).parts == ("unknown", "etc_passwd", "a_b_.._c", f"CT_{real.series_uid}_{real.sop_uid}.dcm")  # no dot-leading name
    assert os.path.samefile(path, store.path_of(real))


def test_empty_selection_makes_an_empty_folder(tmp_path: Path, store: StudyStore) -> None:
    assert snapshot([], store.layout.root, tmp_path / "input") == []
    assert (tmp_path / "input").is_dir()


def test_input_path_is_where_snapshot_puts_an_instance(store: StudyStore, tmp_path: Path) -> None:
    from raddeploy_provider.store import read_header
    from raddeploy_provider.store.snapshot import input_path

    instances = store.index.instances(STUDY)
    made = snapshot(instances, store.layout.root, tmp_path / "input", layout=["Modality"])
    assert [tmp_path / "input" / input_path(inst, ["Modality"]) for inst in instances] == made
    # a header read from a file names alike: `raddeploy match` shows the same paths
    assert [input_path(read_header(store.path_of(inst)), ["Modality"]) for inst in instances] == \
        [path.relative_to(tmp_path / "input") for path in made]
