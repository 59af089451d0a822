"""StudyStore.ingest and read_header on real Part 10 files (tests/dicom_factory.py)."""

from __future__ import annotations

import shutil
import threading
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.errors import InvalidDicomError

from dicom_factory import Series, make_series
from raddeploy_provider.store import NEVER, InvalidUID, RunRef, StoreError, StudyStore, read_header
from raddeploy_provider.store.study_store import file_sha256


@pytest.fixture
def store(tmp_path: Path, index_url: str | None) -> StudyStore:
    """A store with its index on the test's backend (conftest's ``index_backend``: both)."""
    store = StudyStore(tmp_path / "data", fsync=False, index_url=index_url)
    yield store
    store.index.close()


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Series:
    return make_series(tmp_path_factory.mktemp("src") / "ct", modality="CT", slices=3, size=16,
                       description="Head and Neck 2mm")


class Selector:
    """Records every header it is asked about; CT instances are relevant to two flows."""

    def __init__(self, dag_ids: tuple[str, ...] = ("hn_oars", "hn_lymph")) -> None:
        self.dag_ids = dag_ids
        self.seen: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, header) -> dict[str, float]:
        with self.lock:
            self.seen.append(header.sop_uid)
        return dict.fromkeys(self.dag_ids, NEVER) if header.modality == "CT" else {}


def incoming(store: StudyStore, source: Path, name: str | None = None) -> Path:
    """What the listener does: the received file is a temporary file in ``incoming/``."""
    temp = store.layout.incoming / (name or f"tmp_{source.name}")
    shutil.copyfile(source, temp)
    return temp


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_read_header(ct: Series) -> None:
    header = read_header(ct.files[0])
    ds = pydicom.dcmread(ct.files[0])
    assert header.study_uid == ct.study_uid
    assert header.series_uid == ct.series_uid
    assert header.sop_uid == ds.SOPInstanceUID
    assert header.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert header.transfer_syntax == "1.2.840.10008.1.2.1"
    assert header.modality == "CT"
    tags = header.tags
    assert tags["Modality"] == "CT"
    assert tags["SeriesDescription"] == "Head and Neck 2mm"
    assert tags["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]  # multi-valued: a list
    assert tags["PixelSpacing"] == ["1.0", "1.0"]
    assert tags["InstanceNumber"] == "1" and tags["Rows"] == "16"
    assert "PixelData" not in tags
    assert all(isinstance(v, str) or all(isinstance(x, str) for x in v) for v in tags.values())


def test_read_header_leaves_out_binary_private_and_long_values(tmp_path: Path, ct: Series) -> None:
    ds = pydicom.dcmread(ct.files[0])
    ds.add_new(0x00091001, "LO", "private")  # private: no keyword
    ds.ImageComments = "x" * 2000  # too long to be worth matching
    ds.add_new(0x00180050, "DS", None)  # SliceThickness, present but empty
    ds.add_new(0x00280034, "IS", None)  # PixelAspectRatio, present but empty
    ds.ReferencedImageSequence = [pydicom.Dataset()]
    path = tmp_path / "x.dcm"
    ds.save_as(path)
    tags = read_header(path).tags
    assert "ImageComments" not in tags and "ReferencedImageSequence" not in tags
    assert not any("1001" in k for k in tags) and "private" not in tags.values()
    # an empty element is an empty text, never the text "None"
    assert tags["SliceThickness"] == "" and tags["PixelAspectRatio"] == ""


def test_ingest_stores_the_file_as_received_and_indexes_it(store: StudyStore, ct: Series) -> None:
    source = ct.files[0]
    select = Selector()
    temp = incoming(store, source)

    result = store.ingest(temp, select, calling_ae="CT_SCANNER", peer="10.0.0.9:4000")

    sop = pydicom.dcmread(source).SOPInstanceUID
    final = store.layout.root / "studies" / ct.study_uid / ct.series_uid / f"{sop}.dcm"
    assert final.read_bytes() == source.read_bytes()
    assert not temp.exists()
    assert files_under(store.layout.incoming) == []
    assert files_under(store.layout.studies) == [final]

    assert result.duplicate is False
    assert result.header.sop_uid == sop
    assert result.opened == [RunRef("hn_oars", f"{ct.study_uid}.1", ct.study_uid, 1),
                             RunRef("hn_lymph", f"{ct.study_uid}.1", ct.study_uid, 1)]
    assert select.seen == [sop]

    [row] = store.index.instances(ct.study_uid)
    assert row.sop_uid == sop and row.series_uid == ct.series_uid and row.study_uid == ct.study_uid
    assert row.path == f"studies/{ct.study_uid}/{ct.series_uid}/{sop}.dcm"
    assert store.path_of(row) == final
    assert row.size == source.stat().st_size
    assert row.sha256 == ""  # recorded later, off the sender's path
    assert store.fill_missing_hashes() == 1 and store.fill_missing_hashes() == 0
    [row] = store.index.instances(ct.study_uid)
    assert row.sha256 == file_sha256(source)
    assert row.calling_ae == "CT_SCANNER" and row.peer == "10.0.0.9:4000"
    assert row.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert row.transfer_syntax == "1.2.840.10008.1.2.1"
    assert row.tags["Modality"] == "CT"
    assert row.tags["SeriesDescription"] == "Head and Neck 2mm"
    assert row.tags["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert "PixelData" not in row.tags
    assert store.index.last_received(ct.study_uid) == row.received_at


def test_ingest_with_fsync(tmp_path: Path, ct: Series, index_url: str | None) -> None:
    store = StudyStore(tmp_path / "data", fsync=True, index_url=index_url)  # as in production
    result = store.ingest(incoming(store, ct.files[1]), Selector())
    assert len(result.opened) == 2
    assert store.path_of(store.index.instances(ct.study_uid)[0]).read_bytes() == ct.files[1].read_bytes()
    store.index.close()


def test_the_rest_of_the_series_opens_nothing_new(store: StudyStore, ct: Series) -> None:
    results = [store.ingest(incoming(store, f), Selector()) for f in ct.files]
    assert [len(r.opened) for r in results] == [2, 0, 0]
    assert len(store.index.instances(ct.study_uid)) == 3
    assert len(files_under(store.layout.studies)) == 3


def test_irrelevant_instance_is_stored_but_opens_no_run(store: StudyStore, tmp_path: Path) -> None:
    mr = make_series(tmp_path / "mr", modality="MR", slices=1, size=8)
    result = store.ingest(incoming(store, mr.files[0]), Selector())
    assert result.opened == [] and result.duplicate is False
    assert len(store.index.instances(mr.study_uid)) == 1
    assert store.index.runs() == []


def test_second_identical_ingest_is_a_duplicate(store: StudyStore, ct: Series) -> None:
    first = store.ingest(incoming(store, ct.files[0]), Selector())
    select = Selector()
    again = incoming(store, ct.files[0], "again.dcm")
    second = store.ingest(again, select)

    assert len(first.opened) == 2
    assert second.duplicate is True and second.opened == []
    assert not again.exists()
    assert len(files_under(store.layout.studies)) == 1
    assert len(store.index.instances(ct.study_uid)) == 1
    assert len(store.index.runs()) == 2
    assert len(store.index.pending_triggers()) == 2


def test_same_sop_uid_with_other_bytes_keeps_both_and_indexes_the_newer(
        store: StudyStore, ct: Series, tmp_path: Path) -> None:
    source = ct.files[0]
    ds = pydicom.dcmread(source)
    ds.SeriesDescription = "Head and Neck 2mm (corrected)"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)

    store.ingest(incoming(store, source), Selector())
    result = store.ingest(incoming(store, changed), Selector())

    assert result.duplicate is False and result.opened == []  # the open runs take the new version
    sop = ds.SOPInstanceUID
    folder = store.layout.studies / ct.study_uid / ct.series_uid
    newer = folder / f"{sop}.v2.dcm"
    assert files_under(store.layout.studies) == sorted([folder / f"{sop}.dcm", newer])
    assert (folder / f"{sop}.dcm").read_bytes() == source.read_bytes()  # the first version is kept
    assert newer.read_bytes() == changed.read_bytes()
    [row] = store.index.instances(ct.study_uid)
    assert store.path_of(row) == newer and row.sha256 == file_sha256(changed)
    assert row.tags["SeriesDescription"] == "Head and Neck 2mm (corrected)"
    assert files_under(store.layout.incoming) == []


def truncated_in_header(source: Path, folder: Path) -> Path:
    path = folder / "header.dcm"
    path.write_bytes(source.read_bytes()[:300])
    return path


def truncated_in_pixels(source: Path, folder: Path) -> Path:
    path = folder / "pixels.dcm"
    path.write_bytes(source.read_bytes()[:-100])
    return path


def garbage(source: Path, folder: Path) -> Path:
    path = folder / "garbage.dcm"
    path.write_bytes(b"\x00\x01not dicom at all\xff" * 64)
    return path


def empty(source: Path, folder: Path) -> Path:
    path = folder / "empty.dcm"
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("make_bad", [garbage, empty, truncated_in_header, truncated_in_pixels])
def test_malformed_file_raises_and_leaves_nothing(store: StudyStore, ct: Series, tmp_path: Path, make_bad) -> None:
    bad = make_bad(ct.files[0], tmp_path)
    select = Selector()
    temp = incoming(store, bad)
    # the exceptions the listener maps to "cannot understand"
    with pytest.raises((InvalidDicomError, StoreError, ValueError, EOFError)):
        store.ingest(temp, select)
    assert files_under(store.layout.incoming) == []
    assert files_under(store.layout.studies) == []
    assert store.index.instances(ct.study_uid) == []
    assert store.index.runs() == [] and store.index.pending_triggers() == []
    assert select.seen == []


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom reading the bad UID back
@pytest.mark.parametrize("element, value", [
    ("StudyInstanceUID", "../../x"),
    ("SeriesInstanceUID", "1.2.03"),
    ("SOPInstanceUID", "1.2.3/../../4"),
    ("StudyInstanceUID", None),
])
def test_invalid_uid_in_the_dataset_stores_nothing(store: StudyStore, ct: Series, tmp_path: Path,
                                                   element: str, value: str | None) -> None:
    ds = pydicom.dcmread(ct.files[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UI value; that is the point
        if value is None:
            delattr(ds, element)
        else:
            setattr(ds, element, value)
            if element == "SOPInstanceUID":
                ds.file_meta.MediaStorageSOPInstanceUID = value
        bad = tmp_path / "bad.dcm"
        ds.save_as(bad)
    select = Selector()
    with pytest.raises(InvalidUID, match=element):
        store.ingest(incoming(store, bad), select)
    assert files_under(store.layout.incoming) == []
    assert files_under(store.layout.studies) == []
    assert list(store.layout.root.rglob("x")) == []
    assert store.index.runs() == [] and select.seen == []


def test_concurrent_ingest_of_one_study(store: StudyStore, tmp_path: Path) -> None:
    """Associations are served in threads: every instance is indexed, each flow opens one run."""
    series = [make_series(tmp_path / f"s{i}", slices=4, size=8, study_uid="1.2.3.4") for i in range(4)]
    errors: list[BaseException] = []

    def push(s: Series, n: int) -> None:
        try:
            for f in s.files:
                store.ingest(incoming(store, f, f"t{n}_{f.name}"), Selector())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=push, args=(s, n)) for n, s in enumerate(series)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert len(store.index.instances("1.2.3.4")) == 16
    assert len(files_under(store.layout.studies)) == 16
    assert sorted(r.dag_id for r in store.index.runs()) == ["hn_lymph", "hn_oars"]
    assert files_under(store.layout.incoming) == []
