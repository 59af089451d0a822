"""The study rules of the store, on a real StudyStore: one patient per study, a corrected
re-send is a new version, header values become bounded safe names, sequences nest boundedly."""

from __future__ import annotations

import os
import re
import shutil
import struct
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from dicom_factory import Series, make_series
from postgres import query
from raddeploy_provider.store import NEVER, IndexUnavailable, RunRef, StoreError, StudyStore, snapshot
from raddeploy_provider.store.errors import OtherPatient
from raddeploy_provider.store.header_walk import MAX_DEPTH
from raddeploy_provider.store.index import patient_id
from raddeploy_provider.store.snapshot import MAX_COMPONENT, input_path, path_component
from raddeploy_provider.store.study_store import file_sha256

FLOWS = ("hn_oars", "hn_lymph")


def select(header) -> dict[str, float]:
    """CT instances are relevant to two flows."""
    return dict.fromkeys(FLOWS, NEVER) if header.modality == "CT" else {}


@pytest.fixture
def store(tmp_path: Path, index_url: str | None) -> StudyStore:
    """A store with its index on the test's backend (conftest's ``index_backend``: both)."""
    store = StudyStore(tmp_path / "data", fsync=False, index_url=index_url)
    yield store
    store.index.close()


@pytest.fixture
def ct(tmp_path: Path) -> Series:
    return make_series(tmp_path / "ct", modality="CT", slices=2, size=8, patient_id="PAT-A")


def incoming(store: StudyStore, source: Path) -> Path:
    temp = store.layout.incoming / f"tmp_{generate_uid()}"
    shutil.copyfile(source, temp)
    return temp


def ingest(store: StudyStore, source: Path, **kwargs):
    return store.ingest(incoming(store, source), select, **kwargs)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def changed(source: Path, dest: Path, **values) -> Path:
    """``source`` with some top-level elements set (same UIDs unless given)."""
    ds = pydicom.dcmread(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # over-long and invalid values are the point of some tests
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(dest, enforce_file_format=True)
    return dest


def db_rows(store: StudyStore, sql: str) -> list[tuple]:
    return query(store.index.target, sql)


def state(store: StudyStore) -> tuple:
    """Everything the index holds about instances, runs and triggers."""
    return (db_rows(store, "SELECT sop_uid, path, tags FROM instances ORDER BY sop_uid"),
            db_rows(store, "SELECT dag_id, run_id, generation, state FROM runs ORDER BY dag_id, run_id"),
            db_rows(store, "SELECT dag_id, run_id FROM outbox ORDER BY id"))


def close_runs(store: StudyStore, study_uid: str, generation: int) -> None:
    """What the fingerprint sensor does when it takes a run's input."""
    for dag_id in FLOWS:
        store.index.close_run(dag_id, f"{study_uid}.{generation}", study_uid)


# -- 1. one patient per study -----------------------------------------------------------------

def test_another_patients_instance_is_refused_and_changes_nothing(store: StudyStore, ct: Series,
                                                                  tmp_path: Path) -> None:
    first = ingest(store, ct.files[0])
    assert [r.generation for r in first.opened] == [1, 1]
    before, files = state(store), files_under(store.layout.studies)
    intruder = changed(ct.files[1], tmp_path / "other.dcm", PatientID="PAT-B", PatientName="Other^Person")
    sop = pydicom.dcmread(intruder).SOPInstanceUID

    with pytest.raises(OtherPatient) as raised:
        ingest(store, intruder)

    message = str(raised.value)
    assert ct.study_uid in message and sop in message
    assert "PAT-A" not in message and "PAT-B" not in message and "Other" not in message
    assert state(store) == before  # no row, no run, no trigger
    assert files_under(store.layout.studies) == files
    assert files_under(store.layout.incoming) == []
    # The study goes on with its own patient: the next instance joins the open run.
    assert ingest(store, ct.files[1]).opened == []
    assert len(store.index.instances(ct.study_uid)) == 2


@pytest.mark.parametrize("study_has, instance_has, joins", [
    ("PAT-A", None, False),  # no Patient ID is not the study's Patient ID
    ("PAT-A", "", False),
    (None, "PAT-A", False),  # nor the other way round
    (None, None, True),  # both empty: equal
    (None, "", True),
    ("PAT-A", "PAT-A ", True),  # DICOM's padding is not part of the value
    ("PAT-A", "pat-a", False),  # compared as strings: case counts
])
def test_patient_ids_compare_as_strings_including_empty(store: StudyStore, tmp_path: Path, study_has, instance_has,
                                                        joins: bool) -> None:
    series = make_series(tmp_path / "s", slices=2, size=8)
    first = changed(series.files[0], tmp_path / "first.dcm", PatientID=study_has)
    second = changed(series.files[1], tmp_path / "second.dcm", PatientID=instance_has)
    ingest(store, first)
    if joins:
        ingest(store, second)
        assert len(store.index.instances(series.study_uid)) == 2
    else:
        with pytest.raises(OtherPatient):
            ingest(store, second)
        assert len(store.index.instances(series.study_uid)) == 1


def test_patient_id_normal_form() -> None:
    assert patient_id({}) == patient_id({"PatientID": ""}) == patient_id({"PatientID": None}) == ""
    assert patient_id({"PatientID": " A1\x00"}) == "A1"
    assert patient_id({"PatientID": ["A", "B "]}) == "A\\B"


def test_another_study_of_another_patient_is_fine(store: StudyStore, ct: Series, tmp_path: Path) -> None:
    ingest(store, ct.files[0])
    other = make_series(tmp_path / "other", slices=1, size=8, patient_id="PAT-B")
    assert len(ingest(store, other.files[0]).opened) == 2


# -- 2. a corrected re-send is a new version --------------------------------------------------

def test_corrected_resend_is_indexed_and_opens_the_next_generation(store: StudyStore, ct: Series,
                                                                   tmp_path: Path) -> None:
    source = ct.files[0]
    ingest(store, source)
    [row] = store.index.instances(ct.study_uid)
    v1 = store.path_of(row)
    close_runs(store, ct.study_uid, 1)
    fixed = changed(source, tmp_path / "fixed.dcm", SeriesDescription="Planning CT (corrected)")

    result = ingest(store, fixed, calling_ae="PACS")

    assert result.duplicate is False and result.replaced == row
    assert result.opened == [RunRef(dag, f"{ct.study_uid}.2", ct.study_uid, 2) for dag in FLOWS]
    [now] = store.index.instances(ct.study_uid)
    v2 = v1.with_name(f"{row.sop_uid}.v2.dcm")
    assert store.path_of(now) == v2 and now.path == str(v2.relative_to(store.layout.root))
    assert now.tags["SeriesDescription"] == "Planning CT (corrected)" and now.calling_ae == "PACS"
    assert now.sha256 == file_sha256(fixed) and now.received_at > row.received_at
    assert v1.read_bytes() == source.read_bytes()  # the first version is kept as it was
    assert v2.read_bytes() == fixed.read_bytes()
    assert files_under(store.layout.studies) == [v1, v2]
    assert [t.run_id for t in store.index.pending_triggers()] == [f"{ct.study_uid}.1"] * 2 + [f"{ct.study_uid}.2"] * 2

    # The same bytes again, or the same data set in other File Meta: nothing changes, nothing opens.
    before = state(store)
    again = ingest(store, fixed)
    assert again.duplicate is True and again.opened == []
    assert ingest(store, other_file_meta(fixed, tmp_path / "meta.dcm")).duplicate is True
    assert state(store) == before
    assert files_under(store.layout.studies) == [v1, v2] and files_under(store.layout.incoming) == []

    # The generation-2 run takes the corrected version.
    close_runs(store, ct.study_uid, 2)
    [taken] = store.index.close_run(FLOWS[0], f"{ct.study_uid}.2", ct.study_uid)
    assert store.path_of(taken) == v2


def test_corrected_resend_while_the_run_is_open_joins_it(store: StudyStore, ct: Series, tmp_path: Path) -> None:
    ingest(store, ct.files[0])
    fixed = changed(ct.files[0], tmp_path / "fixed.dcm", ImageComments="corrected")
    result = ingest(store, fixed)
    assert result.replaced is not None and result.opened == []  # the open run of each flow takes it
    [taken] = store.index.close_run(FLOWS[0], f"{ct.study_uid}.1", ct.study_uid)
    assert taken.path.endswith(".v2.dcm") and taken.tags["ImageComments"] == "corrected"
    assert len(store.index.runs()) == 2


def test_versions_count_up_and_all_are_kept(store: StudyStore, ct: Series, tmp_path: Path) -> None:
    ingest(store, ct.files[0])
    for n in (2, 3):
        ingest(store, changed(ct.files[0], tmp_path / f"v{n}.dcm", ImageComments=f"version {n}"))
    [row] = store.index.instances(ct.study_uid)
    folder = store.path_of(row).parent
    assert row.path.endswith(".v3.dcm") and row.tags["ImageComments"] == "version 3"
    assert [p.name for p in files_under(folder)] == [f"{row.sop_uid}.dcm", f"{row.sop_uid}.v2.dcm",
                                                     f"{row.sop_uid}.v3.dcm"]


def test_corrected_resend_of_another_patient_is_refused(store: StudyStore, ct: Series, tmp_path: Path) -> None:
    ingest(store, ct.files[0])
    ingest(store, ct.files[1])
    before = state(store)
    with pytest.raises(OtherPatient):
        ingest(store, changed(ct.files[0], tmp_path / "fixed.dcm", PatientID="PAT-B"))
    assert state(store) == before
    assert len(files_under(store.layout.studies)) == 2


def test_a_failed_commit_of_a_new_version_leaves_the_first(store: StudyStore, ct: Series, tmp_path: Path,
                                                           monkeypatch) -> None:
    ingest(store, ct.files[0])
    close_runs(store, ct.study_uid, 1)
    before, files = state(store), files_under(store.layout.studies)
    fixed = changed(ct.files[0], tmp_path / "fixed.dcm", ImageComments="corrected")

    def full(*args, **kwargs):
        raise IndexUnavailable("the study index (test) cannot be used now: database or disk is full")

    with monkeypatch.context() as patch:  # the file is placed, then the transaction fails
        patch.setattr(store.index, "_open_run", full)
        with pytest.raises(IndexUnavailable):
            ingest(store, fixed)
    assert state(store) == before and files_under(store.layout.studies) == files  # no v2 file left
    assert files_under(store.layout.incoming) == []

    # A crash between placing and committing leaves a stray v2 file: the sender's retry takes its place.
    [row] = store.index.instances(ct.study_uid)
    stray = store.path_of(row).with_name(f"{row.sop_uid}.v2.dcm")
    stray.write_bytes(b"left by a crash")
    result = ingest(store, fixed)
    assert [r.generation for r in result.opened] == [2, 2]
    assert stray.read_bytes() == fixed.read_bytes()
    assert store.path_of(store.index.instances(ct.study_uid)[0]) == stray


def test_an_indexed_file_that_is_gone_is_replaced_by_the_resend(store: StudyStore, ct: Series) -> None:
    ingest(store, ct.files[0])
    [row] = store.index.instances(ct.study_uid)
    store.path_of(row).unlink()
    result = ingest(store, ct.files[0])
    assert result.duplicate is False and result.replaced == row
    [now] = store.index.instances(ct.study_uid)
    assert store.path_of(now).read_bytes() == ct.files[0].read_bytes()


def other_file_meta(source: Path, dest: Path) -> Path:
    """The data set of ``source`` byte for byte, under File Meta another implementation wrote."""
    raw = source.read_bytes()
    body = raw[144 + int.from_bytes(raw[140:144], "little"):]
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    meta.ImplementationClassUID = generate_uid()
    meta.ImplementationVersionName = "OTHER_1.0"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    dest.write_bytes(b"\x00" * 128 + b"DICM" + fp.getvalue() + body)
    assert dest.read_bytes() != raw
    return dest


# -- 3. header values that become names -------------------------------------------------------

@pytest.mark.parametrize("value, name", [
    ("CT", "CT"),
    ("../x", "x"),
    ("..", "unknown"),
    (".", "unknown"),
    ("", "unknown"),
    (None, "unknown"),
    (".hidden", "hidden"),
    ("/etc/passwd", "etc_passwd"),
    ("Kopf/Hals 2mm", "Kopf_Hals_2mm"),
    ("a\\b\x00c\n", "a_b_c"),
    (["ORIGINAL", "PRIMARY"], "ORIGINAL_PRIMARY"),
    ("Ødem", "dem"),
])
def test_path_component(value, name: str) -> None:
    assert path_component(value) == name


def test_long_values_are_cut_with_a_hash() -> None:
    long_a, long_b = "A" * 299 + "a", "A" * 299 + "b"
    cut = path_component(long_a)
    assert len(cut) == MAX_COMPONENT and re.fullmatch(r"A{55}-[0-9a-f]{8}", cut)
    assert path_component(long_b) != cut and len(path_component(long_b)) == MAX_COMPONENT
    assert path_component("." * 300) == "unknown" and path_component("B" * 64) == "B" * 64
    assert path_component("." * 10 + "B" * 300).startswith("B")


def check_names(dest: Path, made: list[Path]) -> None:
    for path in made:
        parts = path.relative_to(dest).parts
        assert all(part not in (".", "..") and not part.startswith(".") for part in parts), parts
        assert all(len(part) <= MAX_COMPONENT for part in parts[:-1]), parts
        assert len(parts[-1]) <= MAX_COMPONENT * 3 + len("__.dcm"), parts[-1]
        assert path.resolve().is_relative_to(dest.resolve())


def test_hostile_values_give_bounded_visible_names_and_a_working_input(store: StudyStore, tmp_path: Path) -> None:
    series = make_series(tmp_path / "s", slices=3, size=8)
    sources = [changed(series.files[0], tmp_path / "long.dcm", Modality="M" * 300, SeriesDescription="../x"),
               changed(series.files[1], tmp_path / "dots.dcm", Modality="../x", SeriesDescription="." * 300),
               changed(series.files[2], tmp_path / "empty.dcm", Modality="", SeriesDescription="")]
    for source in sources:
        ingest(store, source)
    instances = store.index.instances(series.study_uid)
    assert instances[0].tags["Modality"] == "M" * 300  # indexed as sent; bounded only as a name
    dest = tmp_path / "run" / "input"

    made = snapshot(instances, store.layout.root, dest, layout=["SeriesDescription", "Modality"])

    check_names(dest, made)
    assert [p.relative_to(dest) for p in made] == [dest.joinpath(input_path(i, ["SeriesDescription", "Modality"]))
                                                   .relative_to(dest) for i in instances]
    long_name = path_component("M" * 300)
    assert made[0].relative_to(dest).parts == ("x", long_name,
                                               f"{long_name}_{series.series_uid}_{instances[0].sop_uid}.dcm")
    assert made[1].relative_to(dest).parts == ("unknown", "x", f"x_{series.series_uid}_{instances[1].sop_uid}.dcm")
    assert made[2].relative_to(dest).parts == ("unknown", "unknown",
                                               f"OT_{series.series_uid}_{instances[2].sop_uid}.dcm")
    for path, inst in zip(made, instances):  # the run's input is there and reads as the instance
        assert os.path.samefile(path, store.path_of(inst))
        assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == inst.sop_uid
    flat = snapshot(instances, store.layout.root, tmp_path / "flat")  # the flat layout too
    check_names(tmp_path / "flat", flat)
    assert len({p.name for p in flat}) == 3


# -- 4. nested sequences ----------------------------------------------------------------------

CONTENT_SEQUENCE = 0x0040A730
_UNDEFINED = 0xFFFFFFFF


def nested_sequence(depth: int, defined: bool, explicit: bool = True) -> bytes:
    """ContentSequence nested ``depth`` deep (a sequence in the one item of the one above), in
    Little Endian; ``defined``: every length given, else undefined lengths and delimiters."""
    def sq_header(length: int) -> bytes:
        if explicit:
            return struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, length)
        return struct.pack("<HHI", 0x0040, 0xA730, length)

    def item(length: int) -> bytes:
        return struct.pack("<HHI", 0xFFFE, 0xE000, length)

    code = (struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 2) if explicit else struct.pack("<HHI", 0x0008, 0x0100, 2)) + b"X "
    if defined:
        content = code
        for _ in range(depth):
            inner = item(len(content)) + content
            content = sq_header(len(inner)) + inner
        return content
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (sq_header(_UNDEFINED) + item(_UNDEFINED)) * depth + code + closing * depth


def with_nested(source: Path, dest: Path, depth: int, defined: bool, explicit: bool = True,
                charset: str | None = None) -> Path:
    """``source`` as a Part 10 file with a ``depth``-deep ContentSequence among its elements
    (``charset``: a SpecificCharacterSet the walker leaves to pydicom)."""
    ds = pydicom.dcmread(source)
    if charset:
        ds.SpecificCharacterSet = charset
    before, after = Dataset(), Dataset()
    for elem in ds:
        (before if elem.tag < CONTENT_SEQUENCE else after).add(elem)

    def encode(part: Dataset) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, not explicit
        write_dataset(fp, part)
        return fp.getvalue()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    dest.write_bytes(b"\x00" * 128 + b"DICM" + fp.getvalue() + encode(before) + nested_sequence(depth, defined, explicit)
                     + encode(after))
    return dest


NESTINGS = {
    "undefined lengths": dict(defined=False),
    "defined lengths": dict(defined=True),
    "implicit VR": dict(defined=False, explicit=False),
    "read by pydicom (a character set the walker leaves to it)": dict(defined=False, charset="ISO_IR 144"),
    "read by pydicom, defined lengths": dict(defined=True, charset="ISO_IR 144"),
}


@pytest.mark.parametrize("case", NESTINGS, ids=list(NESTINGS))
def test_deeply_nested_sequences_are_refused(store: StudyStore, ct: Series, tmp_path: Path, case: str) -> None:
    for depth in (1500, MAX_DEPTH + 1):
        bad = with_nested(ct.files[0], tmp_path / f"nested{depth}.dcm", depth, **NESTINGS[case])
        with pytest.raises(StoreError, match=f"nested more than {MAX_DEPTH} deep"):
            ingest(store, bad)  # and never a RecursionError
        for head in (None, bad.read_bytes()[:65536]):  # as the listener calls it, with the first bytes
            with pytest.raises(StoreError, match="nested"):
                store.ingest(incoming(store, bad), select, head=head)
    assert files_under(store.layout.studies) == [] and files_under(store.layout.incoming) == []
    assert store.index.runs() == []
    # As deep as allowed: stored, and its tags read.
    ok = with_nested(ct.files[0], tmp_path / "ok.dcm", MAX_DEPTH, **NESTINGS[case])
    result = ingest(store, ok)
    assert len(result.opened) == 2 and result.header.tags["PatientID"] == "PAT-A"
