"""Bad (and unusual) input sent over the wire to a real listener process.

Each test checks the exact DIMSE status the sender gets (storescu's ``-v`` lines, or a
pynetdicom SCU for the status code and for data storescu will not send), that nothing
half-written stays behind (no file under studies/ for a refused instance, incoming/ empty)
and that the listener still answers C-ECHO afterwards.

pynetdicom sends raw bytes with ``_config.STORE_SEND_CHUNKED_DATASET``: the data set after a
file's File Meta group goes on the wire as it is in the file, however broken.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import ssl
import struct
import subprocess
import time
import warnings
from pathlib import Path
from typing import Callable

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import MaximumLengthNotification

from dicom_factory import make_series
from peers import DCMTK_ENV, make_certificates, partial_files, require_tool, storescu, tmpfs
from postgres import query

pytestmark = pytest.mark.integration

SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
AE_TITLE = "RADDEPLOY"
MiB = 1 << 20


# -- helpers -------------------------------------------------------------------------------

def dataset_bytes(path: Path) -> bytes:
    """The bytes after the File Meta group: what went over the wire."""
    raw = path.read_bytes()
    return raw[_dataset_offset(raw[:144]):]


def _dataset_offset(head: bytes) -> int:
    assert head[128:132] == b"DICM"
    return 144 + int.from_bytes(head[140:144], "little")  # (0002,0000) UL value


def dataset_sha256(path: Path) -> str:
    """sha256 of the data set part of a (large) Part 10 file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(_dataset_offset(fh.read(144)))
        while chunk := fh.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def encode(ds: Dataset) -> bytes:
    """A data set's elements in Explicit VR Little Endian, no File Meta."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid UIDs are the point of some tests
        write_dataset(fp, ds)
    return fp.getvalue()


def part10(path: Path, body: bytes, sop_uid: str, sop_class: str = CTImageStorage) -> Path:
    """A Part 10 file: valid File Meta (what the C-STORE request will carry), then ``body`` as is."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_file_meta_info(fp, meta, enforce_standard=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + fp.getvalue() + body)
    return path


def element_header(tag: int, vr: bytes, length: int) -> bytes:
    """Explicit VR Little Endian header of a long-form element (OB, UT, ...)."""
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, length)


def _status(result: Dataset) -> int | None:
    return int(result.Status) if "Status" in result else None  # empty: no response (aborted)


class Scu:
    """A pynetdicom SCU on one association; ``store`` answers the C-STORE status (None: no answer)."""

    def __init__(self, port: int, sop_classes=(CTImageStorage,), calling: str = "PYSCU", called: str = AE_TITLE,
                 tls_args: tuple[ssl.SSLContext, str] | None = None) -> None:
        self.ae = AE(ae_title=calling)
        for sop_class in sop_classes:
            self.ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
        self.ae.add_requested_context("1.2.840.10008.1.1")
        # PDUs as the DUL thread receives them: pynetdicom's own is_rejected is racy when the peer
        # closes right after its A-ASSOCIATE-RJ (it may see the closed socket first and "abort").
        self.received: list = []
        handlers = [(evt.EVT_PDU_RECV, lambda event: self.received.append(event.pdu))]
        self.assoc = self.ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=handlers,
                                       tls_args=tls_args)

    def store(self, source: Path | Dataset) -> int | None:
        return _status(self.assoc.send_c_store(source))

    def echo(self) -> int | None:
        return _status(self.assoc.send_c_echo())

    @property
    def rejection(self) -> tuple[int, int, int] | None:
        """(result, source, diagnostic) of the A-ASSOCIATE-RJ, if that is what came back."""
        for pdu in self.received:
            if isinstance(pdu, A_ASSOCIATE_RJ):
                return pdu.result, pdu.source, pdu.reason_diagnostic
        return None

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()
        self.ae.shutdown()


@pytest.fixture
def chunked(monkeypatch):
    """send_c_store(path) sends the file's data set bytes untouched (no decode, no re-encode)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def wait_for_hashes(listener, timeout: float = 10.0) -> None:
    """The listener records each file's sha256 once no association is sending."""
    deadline = time.monotonic() + timeout
    while index_rows(listener, "sop_uid") and index_rows(listener, "sop_uid", "sha256 = ''"):
        assert time.monotonic() < deadline, "file hashes not recorded"
        time.sleep(0.1)


def study_files(listener) -> list[Path]:
    return sorted(p for p in (listener.data / "studies").rglob("*") if p.is_file())


def index_rows(listener, columns: str = "sop_uid", where: str = "TRUE") -> list[tuple]:
    return query(listener.index, f"SELECT {columns} FROM instances WHERE {where} ORDER BY received_at")


def assert_clean_and_alive(listener) -> None:
    """Nothing half-received left behind; the process is up and answers C-ECHO."""
    assert partial_files(listener.data / "incoming") == [], "partial files left in incoming/"
    assert listener.proc.poll() is None, f"the listener died:\n{listener.log_text()[-3000:]}"
    echo = listener.echo()
    assert echo.returncode == 0, f"no C-ECHO answer after the test: {echo.stdout}{echo.stderr}"


def log_lines(listener, text: str, at_least: int = 1, timeout: float = 5.0) -> list[str]:
    """The log lines containing ``text``, once there are ``at_least`` of them (the listener logs an
    association's end after answering it, so the sender may be done a moment before the line is)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in listener.log_text().splitlines() if text in line]
        if len(lines) >= at_least or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def storescu_status_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if "Received Store Response" in line]


def tree(root: Path, ignore: Callable[[Path], bool] = lambda path: False) -> set[str]:
    """Every path under ``root`` (files and folders), relative, but those ``ignore`` says."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if not ignore(p)}


# -- 1. transfer syntaxes --------------------------------------------------------------------

# pydicom's test file, the storescu option that proposes its transfer syntax (-R: only the SOP
# classes the files need). No conversion: storescu -v says "Converting transfer syntax: X -> X".
SYNTAX_FILES = [
    ("SC_rgb_jpeg_dcmtk.dcm", "-xy"),  # JPEG Baseline
    ("JPEG-lossy.dcm", "-xx"),  # JPEG Extended (12 bit)
    ("MR_small_jpeg_ls_lossless.dcm", "-xt"),  # JPEG-LS lossless
    ("JPEG2000.dcm", "-xw"),  # JPEG 2000
    ("MR_small_RLE.dcm", "-xr"),  # RLE lossless
    ("image_dfl.dcm", "-xd"),  # Deflated Explicit VR Little Endian
    ("MR_small_bigendian.dcm", "-xb"),  # Explicit VR Big Endian
    ("MR_small_implicit.dcm", "-xi"),  # Implicit VR Little Endian
]


def test_compressed_and_other_syntaxes_are_stored_bit_exact(listener, tmp_path):
    dcmodify = require_tool("dcmodify")
    src = tmp_path / "syntaxes"
    src.mkdir()
    for name, option in SYNTAX_FILES:
        source = get_testdata_file(name)
        assert source is not None, f"pydicom's test file {name} is missing"
        copy = src / name
        shutil.copyfile(source, copy)
        # The MR_small_* files share one SOP Instance UID: give each its own. dcmodify also writes
        # the file the way DCMTK encodes a data set (explicit-length sequences), which is what
        # storescu then puts on the wire, so the file is byte for byte what the listener receives.
        done = subprocess.run([dcmodify, "-nb", "-m", f"(0008,0018)={generate_uid()}", str(copy)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    for name, option in SYNTAX_FILES:
        copy = src / name
        ds = pydicom.dcmread(copy, stop_before_pixels=True)
        syntax = str(ds.file_meta.TransferSyntaxUID)
        pushed = storescu(listener.port, [copy], extra=("-v", "-R", option))
        out = pushed.stdout + pushed.stderr
        assert pushed.returncode == 0 and storescu_status_lines(pushed) == ["I: Received Store Response (Success)"], \
            f"{name}: {out}"
        (conversion,) = [line for line in out.splitlines() if "Converting transfer syntax: " in line]
        read_as, sent_as = conversion.split("Converting transfer syntax: ")[1].split(" -> ")
        assert read_as == sent_as, f"{name}: storescu converted the data set: {conversion}"

        stored = (listener.data / "studies" / ds.StudyInstanceUID / ds.SeriesInstanceUID
                  / f"{ds.SOPInstanceUID}.dcm")
        assert stored.is_file(), f"{name} not stored where expected"
        expected = dataset_bytes(copy)
        if ds.file_meta.TransferSyntaxUID.is_deflated and len(expected) % 2:
            expected += b"\x00"  # PS3.5 A.5: on the wire the deflated stream is padded to even length
        assert dataset_bytes(stored) == expected, f"{name}: stored data set differs from the source"
        assert str(pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
        rows = [r for r in index_rows(listener, "sop_uid, transfer_syntax, path")
                if r[0] == ds.SOPInstanceUID]
        assert rows == [(ds.SOPInstanceUID, syntax, str(stored.relative_to(listener.data)))], name

    assert len(index_rows(listener)) == len(SYNTAX_FILES)
    assert_clean_and_alive(listener)


# -- 2. malformed data sets ------------------------------------------------------------------

def test_malformed_data_sets_are_refused_cannot_understand(listener, tmp_path, chunked):
    good = make_series(tmp_path / "ct", slices=2).files
    body = dataset_bytes(good[0])
    sop = pydicom.dcmread(good[0], stop_before_pixels=True).SOPInstanceUID
    position = body.find(b"\x20\x00\x32\x00DS")  # (0020,0032) ImagePositionPatient, after the UIDs
    pixels = body.find(b"\xe0\x7f\x10\x00OW")  # (7FE0,0010) PixelData, 8192 bytes declared
    assert 0 < position < pixels
    bad = tmp_path / "bad"
    bad.mkdir()
    cases = {
        "text instead of a data set": b"NOT DICOM AT ALL" * 64,
        "binary garbage": bytes(range(256)) * 16,
        "empty data set": b"",
        "cut in the middle of an element": body[:position + 8 + 5],
        "cut inside an element's header": body[:position + 5],
        "pixel data shorter than declared": body[:pixels + 12 + 100],
        "a value length past the end": body[:position] + b"\x20\x00\x32\x00DS\xff\x7f" + body[position + 8:],
    }
    scu = Scu(listener.port)
    try:
        assert scu.assoc.is_established
        statuses = {what: scu.store(part10(bad / f"{i}.dcm", raw, sop)) for i, (what, raw) in enumerate(cases.items())}
        # The association outlives the refusals: a good instance on it is stored.
        after = scu.store(good[1])
    finally:
        scu.close()
    assert statuses == {what: CANNOT_UNDERSTAND for what in cases}
    assert after == SUCCESS
    good_ds = pydicom.dcmread(good[1], stop_before_pixels=True)
    assert [p.name for p in study_files(listener)] == [f"{good_ds.SOPInstanceUID}.dcm"]
    assert index_rows(listener) == [(good_ds.SOPInstanceUID,)]
    assert listener.log_text().count("refused:") >= len(cases)
    assert_clean_and_alive(listener)


# -- 3. missing and invalid UIDs -------------------------------------------------------------

LONG_UID = "1." + "2" * 64  # 66 characters
BAD_UIDS = {
    "no SOPInstanceUID (the request carries one)": {"SOPInstanceUID": None},
    "no SOPClassUID (the request carries one)": {"SOPClassUID": None},
    "no StudyInstanceUID": {"StudyInstanceUID": None},
    "no SeriesInstanceUID": {"SeriesInstanceUID": None},
    "StudyInstanceUID ../../x": {"StudyInstanceUID": "../../x"},
    "SeriesInstanceUID ../../x": {"SeriesInstanceUID": "../../x"},
    "SOPInstanceUID ../../x": {"SOPInstanceUID": "../../x"},
    "StudyInstanceUID /tmp/x": {"StudyInstanceUID": "/tmp/x.1"},
    "StudyInstanceUID 1.2.abc": {"StudyInstanceUID": "1.2.abc"},
    "SeriesInstanceUID with a leading zero": {"SeriesInstanceUID": "1.2.03"},
    "StudyInstanceUID of 66 chars": {"StudyInstanceUID": LONG_UID},
    "SOPInstanceUID of 66 chars": {"SOPInstanceUID": LONG_UID},
}


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")  # pydicom, on purpose
def test_missing_and_invalid_uids_are_refused_and_never_a_path(listener, tmp_path, chunked):
    source = make_series(tmp_path / "ct", slices=1).files[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    files = {}
    for i, (what, changes) in enumerate(BAD_UIDS.items()):
        ds = pydicom.dcmread(source)
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        # The C-STORE request names a valid instance; only the data set is wrong.
        files[what] = part10(bad / f"{i}.dcm", encode(ds), generate_uid())
    # The request's own UID is the bad one too (the listener writes it into the File Meta).
    ds = pydicom.dcmread(source)
    del ds.SOPInstanceUID
    files["no SOPInstanceUID, request's is ../../x"] = part10(bad / "request.dcm", encode(ds), "../../x")

    def ignore(path: Path) -> bool:  # what the listener writes anyway (and its empty ready-made temp files)
        return (path == listener.log or path.name.startswith("index.sqlite3")
                or (path.parent.name == "incoming" and path.stat().st_size == 0))

    before = tree(tmp_path, ignore)
    scu = Scu(listener.port)
    try:
        statuses = {what: scu.store(path) for what, path in files.items()}
    finally:
        scu.close()
    assert statuses == {what: CANNOT_UNDERSTAND for what in files}

    # A real file without StudyInstanceUID, from storescu: pydicom's JPEGLSNearLossless_16.dcm.
    no_study = get_testdata_file("JPEGLSNearLossless_16.dcm")
    assert "StudyInstanceUID" not in pydicom.dcmread(no_study, stop_before_pixels=True)
    pushed = storescu(listener.port, [Path(no_study)], extra=("-v", "-R", "-xu"))
    assert storescu_status_lines(pushed) == ["I: Received Store Response (Error: CannotUnderstand)"], \
        pushed.stdout + pushed.stderr
    assert pushed.returncode != 0

    # Nothing was made anywhere: not in the store, not next to it, not named after a bad UID.
    assert sorted((listener.data / "studies").iterdir()) == []
    assert index_rows(listener) == []
    assert tree(tmp_path, ignore) == before  # in the data dir and around it (../../x from a series is data/x)
    assert not Path("/tmp/x.1").exists()  # studies / "/tmp/x.1" would have been that
    made = [p for p in tmp_path.rglob("*")
            if p.name.split(".")[0] == "x" or p.name.startswith(("1.2.abc", "1.2.03", LONG_UID))]
    assert made == []
    log = listener.log_text()
    for name in ("StudyInstanceUID is missing", "SOPInstanceUID is missing", "SOPClassUID is missing",
                 "'../../x' is not a valid DICOM UID", "'1.2.abc' is not a valid DICOM UID"):
        assert name in log, f"the log does not say {name!r}"
    assert_clean_and_alive(listener)


# -- 4. duplicates ---------------------------------------------------------------------------

def test_duplicate_instances(listener, tmp_path):
    source = make_series(tmp_path / "ct", slices=1).files[0]
    ds = pydicom.dcmread(source)
    sop = ds.SOPInstanceUID

    for _ in range(2):  # the same file twice: success both times, stored and indexed once
        pushed = storescu(listener.port, [source], extra=("-v",))
        assert storescu_status_lines(pushed) == ["I: Received Store Response (Success)"], pushed.stderr
    first = listener.data / "studies" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{sop}.dcm"
    assert study_files(listener) == [first]
    first_sha = hashlib.sha256(first.read_bytes()).hexdigest()
    wait_for_hashes(listener)
    assert index_rows(listener, "sop_uid, path, sha256") == [(sop, str(first.relative_to(listener.data)), first_sha)]

    # The same SOP Instance UID with other bytes: success, both kept, the index takes the newer.
    ds.PatientName = "Other^Content"
    other = tmp_path / "other.dcm"
    ds.save_as(other)
    pushed = storescu(listener.port, [other], extra=("-v",))
    assert storescu_status_lines(pushed) == ["I: Received Store Response (Success)"], pushed.stderr
    files = study_files(listener)
    assert len(files) == 2 and first in files
    (second,) = [f for f in files if f != first]
    second_sha = hashlib.sha256(second.read_bytes()).hexdigest()
    assert second.name == f"{sop}.v2.dcm"
    assert dataset_bytes(second) == dataset_bytes(other)
    assert dataset_bytes(first) == dataset_bytes(source)
    wait_for_hashes(listener)
    assert index_rows(listener, "sop_uid, path, sha256") == [(sop, str(second.relative_to(listener.data)), second_sha)]
    warning = [line for line in listener.log_text().splitlines() if "WARNING" in line and sop in line]
    assert warning and "re-sent with other content" in warning[0], listener.log_text()[-2000:]
    assert_clean_and_alive(listener)


# -- 5. huge elements ------------------------------------------------------------------------

def write_with_huge_element(path: Path, tag: int, vr: bytes, size: int, fill: bytes) -> Dataset:
    """A Part 10 file with a ``size``-byte element at ``tag``, written in chunks (never in memory)."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientName = "Huge^Element"
    ds.PatientID = "HUGE1"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.add_new(0x00090010, "LO", "RADDEPLOY TEST")  # private creator of block (0009,10xx)
    before = Dataset()
    after = Dataset()
    for elem in ds:
        (before if elem.tag < tag else after).add(elem)
    part10(path, encode(before) + element_header(tag, vr, size), ds.SOPInstanceUID, SecondaryCaptureImageStorage)
    chunk = fill * (MiB // len(fill))
    with open(path, "ab") as fh:
        left = size
        while left:
            fh.write(chunk[:min(left, len(chunk))])
            left -= min(left, len(chunk))
        fh.write(encode(after))
    return ds


def test_huge_elements_stream_to_disk(listener, tmp_path, chunked):
    big_ob = tmp_path / "ob.dcm"  # 200 MB private OB, before the patient and study elements
    ob = write_with_huge_element(big_ob, 0x00091000, b"OB", 200 * 1000 * 1000, bytes(range(256)))
    big_ut = tmp_path / "ut.dcm"  # 60 MB of text: (0040,A160) TextValue, UT
    ut = write_with_huge_element(big_ut, 0x0040A160, b"UT", 60 * 1000 * 1000, b"lorem ipsum ")

    rss_before = listener.vm_kb("VmRSS")
    pushed = storescu(listener.port, [big_ob], extra=("-v",))
    assert storescu_status_lines(pushed) == ["I: Received Store Response (Success)"], pushed.stderr
    scu = Scu(listener.port, sop_classes=(SecondaryCaptureImageStorage,))
    try:
        assert scu.store(big_ut) == SUCCESS
    finally:
        scu.close()
    peak = listener.vm_kb("VmHWM")  # the high-water mark: the peak while receiving and storing
    grew = (peak - rss_before) / 1024
    assert grew < 100, f"the listener's RSS grew by {grew:.0f} MB receiving 260 MB: it buffers in memory"

    for source, ds in ((big_ob, ob), (big_ut, ut)):
        stored = listener.data / "studies" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert stored.stat().st_size - _dataset_offset(stored.read_bytes()[:144]) == \
            source.stat().st_size - _dataset_offset(source.read_bytes()[:144])
        assert dataset_sha256(stored) == dataset_sha256(source)
    tags = {sop: json.loads(text) for sop, text in index_rows(listener, "sop_uid, tags")}
    assert {sop: t["PatientID"] for sop, t in tags.items()} == {ob.SOPInstanceUID: "HUGE1", ut.SOPInstanceUID: "HUGE1"}
    assert not any("TextValue" in t for t in tags.values())  # far too long to index
    assert_clean_and_alive(listener)


def test_pdu_larger_than_negotiated_aborts_the_association(listener, tmp_path, chunked):
    big = tmp_path / "big.dcm"
    write_with_huge_element(big, 0x00091000, b"OB", 3 * MiB, b"\x01")
    scu = Scu(listener.port, sop_classes=(SecondaryCaptureImageStorage,))
    try:
        offered = scu.assoc.acceptor.maximum_length
        assert offered and offered <= 16 * MiB, f"the listener asks for PDUs of {offered} bytes (0: no limit)"
        for item in scu.assoc.acceptor.user_information:  # now ignore it: the whole instance in one PDU
            if isinstance(item, MaximumLengthNotification):
                item.maximum_length_received = 0
        assert scu.store(big) is None  # no response: the listener aborted the association
    finally:
        scu.close()
    assert study_files(listener) == [] and index_rows(listener) == []
    assert log_lines(listener, "aborted: PDU of"), listener.log_text()
    assert_clean_and_alive(listener)


# -- 6. the store cannot be written ----------------------------------------------------------

def test_unwritable_study_folder_answers_out_of_resources(listener, tmp_path):
    series = make_series(tmp_path / "ct", slices=1)
    blocker = listener.data / "studies" / series.study_uid
    blocker.write_text("a file where the study folder should be")  # mkdir fails, even for root
    pushed = storescu(listener.port, series.files, extra=("-v",))
    assert storescu_status_lines(pushed) == ["I: Received Store Response (Refused: OutOfResources)"], \
        pushed.stdout + pushed.stderr
    assert blocker.read_text() == "a file where the study folder should be"
    assert study_files(listener) == [blocker]
    assert index_rows(listener) == []
    assert "cannot store an instance" in listener.log_text()
    assert_clean_and_alive(listener)
    blocker.unlink()  # fixed: the sender's retry is stored
    pushed = storescu(listener.port, series.files, extra=("-v",))
    assert storescu_status_lines(pushed) == ["I: Received Store Response (Success)"]
    assert len(index_rows(listener)) == 1


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs (skips where mounting is not allowed)."""
    with tmpfs(tmp_path / "tiny", "4m") as mount:
        yield mount


def test_full_disk_answers_out_of_resources(tiny_disk, start_listener, tmp_path, chunked):
    listener = start_listener("full", data=tiny_disk / "data", min_free_disk="0")  # log off the tmpfs
    try:
        big = tmp_path / "big.dcm"  # 6 MB on a 4 MiB disk: the disk fills while it is received
        write_with_huge_element(big, 0x00091000, b"OB", 6 * MiB, b"\x02")
        mr = make_series(tmp_path / "mr", modality="MR", slices=2).files  # MR: no flow run, no outbox rows
        scu = Scu(listener.port, sop_classes=(SecondaryCaptureImageStorage, MRImageStorage))
        try:
            assert scu.store(big) == OUT_OF_RESOURCES
            assert scu.store(mr[0]) == SUCCESS  # the partial file is gone: room again, same association
        finally:
            scu.close()
        pushed = storescu(listener.port, [big], extra=("-v",))
        assert storescu_status_lines(pushed) == ["I: Received Store Response (Refused: OutOfResources)"], \
            pushed.stdout + pushed.stderr
        assert log_lines(listener, "cannot receive an instance", at_least=2)
        assert "No space left on device" in listener.log_text()
        (stored,) = study_files(listener)
        assert len(index_rows(listener)) == 1
        if isinstance(listener.index, Path):  # SQLite: its file is on this disk too (PostgreSQL's is not)
            no_room_for_the_index_row(listener, tiny_disk, stored, mr[1])
        assert_clean_and_alive(listener)
    finally:
        listener.stop()  # before the tmpfs goes


def no_room_for_the_index_row(listener, disk: Path, stored: Path, instance: Path) -> None:
    """Room for the file but not for its index row: out of resources too, and no file without a row."""
    need = _dataset_offset(stored.read_bytes()[:144]) + len(dataset_bytes(instance)) + 64
    filler = disk / "filler"
    with open(filler, "wb") as fh:  # written, not truncated: tmpfs counts only written pages
        fh.write(bytes(shutil.disk_usage(disk).free - -(-need // 4096) * 4096))
    pushed = storescu(listener.port, [instance], extra=("-v",))
    assert storescu_status_lines(pushed) == ["I: Received Store Response (Refused: OutOfResources)"], \
        pushed.stdout + pushed.stderr
    assert log_lines(listener, "database or disk is full"), listener.log_text()[-3000:]
    assert study_files(listener) == [stored] and len(index_rows(listener)) == 1
    assert partial_files(listener.data / "incoming") == []
    filler.unlink()  # space again: the sender's retry is stored
    pushed = storescu(listener.port, [instance], extra=("-v",))
    assert storescu_status_lines(pushed) == ["I: Received Store Response (Success)"]
    assert len(study_files(listener)) == 2 and len(index_rows(listener)) == 2



@pytest.mark.parametrize("index_backend", ["postgresql"])
def test_an_index_server_that_drops_its_connections_answers_out_of_resources(start_listener, postgres, tmp_path):
    """PostgreSQL's counterpart of a full disk for the index: the server cuts the listener's
    connections (a restart, a failover). The next instances are answered out of resources (the
    sender keeps them) until the pool has reconnected, none is stored without its row, and the
    listener, its outbox included, goes on."""
    listener = start_listener()
    series = make_series(tmp_path / "ct", slices=3)
    scu = Scu(listener.port)
    try:
        assert scu.store(series.files[0]) == SUCCESS
        postgres.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'")
        statuses = [scu.store(series.files[1])]
        while statuses[-1] != SUCCESS and len(statuses) < 10:  # the sender's retries
            statuses.append(scu.store(series.files[1]))
        assert statuses[0] == OUT_OF_RESOURCES and statuses[-1] == SUCCESS, statuses
        assert scu.store(series.files[2]) == SUCCESS
    finally:
        scu.close()
    [line, *_] = log_lines(listener, "cannot store an instance")
    assert "PostgreSQL database" in line and "index-test-secret" not in listener.log_text()
    assert len(index_rows(listener)) == 3 and len(study_files(listener)) == 3
    assert query(listener.index, "SELECT COUNT(*) FROM runs") == [(1,)]
    assert_clean_and_alive(listener)

# -- 7. free-disk watermark ------------------------------------------------------------------

def test_free_disk_watermark_rejects_associations(start_listener, tmp_path):
    listener = start_listener(min_free_disk="100000g")
    series = make_series(tmp_path / "ct", slices=1)
    pushed = storescu(listener.port, series.files, extra=("-v",))
    assert pushed.returncode != 0
    assert "Association Rejected" in pushed.stdout + pushed.stderr
    assert "Transient" in pushed.stdout + pushed.stderr
    scu = Scu(listener.port)
    try:
        assert not scu.assoc.is_established
        # transient, service provider (presentation), local limit exceeded: the sender retries later
        assert scu.rejection == (0x02, 0x03, 0x02)
    finally:
        scu.close()
    assert study_files(listener) == [] and index_rows(listener) == []
    rejected = log_lines(listener, "rejected: only", at_least=2)
    assert len(rejected) == 2 and all("RADDEPLOY_MIN_FREE_DISK" in line for line in rejected), listener.log_text()
    assert listener.proc.poll() is None


# -- 8. who may send -------------------------------------------------------------------------

# (settings, called AE, calling AE, expected A-ASSOCIATE-RJ (result, source, diagnostic) or None: accepted)
WHO = {
    "wrong called AE, checked (default)": ({}, "NOTRADDEPLOY", "STORESCU", (0x01, 0x01, 0x07)),
    "wrong called AE, not checked": ({"check_called_ae": "false"}, "NOTRADDEPLOY", "STORESCU", None),
    "calling AE not allowed": ({"allowed_calling_aets": "GOODAE"}, AE_TITLE, "BADAE", (0x01, 0x01, 0x03)),
    "calling AE allowed": ({"allowed_calling_aets": "GOODAE, OTHERAE"}, AE_TITLE, "GOODAE", None),
    "address not in the allowed networks": ({"allowed_networks": "10.0.0.0/8"}, AE_TITLE, "STORESCU",
                                            (0x01, 0x01, 0x01)),
    "address in the allowed networks": ({"allowed_networks": "10.0.0.0/8,127.0.0.0/8"}, AE_TITLE, "STORESCU", None),
}


@pytest.mark.parametrize("case", WHO, ids=list(WHO))
def test_who_may_send(start_listener, tmp_path, case):
    settings, called, calling, refusal = WHO[case]
    listener = start_listener(**settings)
    series = make_series(tmp_path / "ct", slices=1)
    pushed = storescu(listener.port, series.files, ae_title=called, calling=calling, extra=("-v",))
    scu = Scu(listener.port, calling=calling, called=called)
    try:
        if refusal is None:
            assert pushed.returncode == 0 and storescu_status_lines(pushed) == ["I: Received Store Response (Success)"]
            assert scu.assoc.is_established and scu.echo() == SUCCESS
            assert len(index_rows(listener)) == 1
            assert "rejected" not in listener.log_text()
        else:
            assert pushed.returncode != 0 and "Association Rejected" in pushed.stdout + pushed.stderr
            assert not scu.assoc.is_established and scu.rejection == refusal
            assert study_files(listener) == [] and index_rows(listener) == []
            rejected = log_lines(listener, "rejected: ", at_least=2)
            assert len(rejected) == 2 and all(calling in line for line in rejected), listener.log_text()
    finally:
        scu.close()
    assert listener.proc.poll() is None


# -- 9. DICOM TLS ----------------------------------------------------------------------------

def test_dicom_tls(start_listener, tmp_path):
    certs = make_certificates(tmp_path / "certs")
    listener = start_listener(tls_cert=certs["server.crt"], tls_key=certs["server.key"], tls_ca=certs["ca.crt"])
    series = make_series(tmp_path / "ct", slices=3)
    tls_options = ("+tls", str(certs["client.key"]), str(certs["client.crt"]), "+cf", str(certs["ca.crt"]))

    # DCMTK over TLS, with a client certificate the CA signed: stored.
    pushed = storescu(listener.port, [series.files[0]], extra=("-v", *tls_options))
    assert storescu_status_lines(pushed) == ["I: Received Store Response (Success)"], pushed.stdout + pushed.stderr

    # pynetdicom over TLS, the same.
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=certs["ca.crt"])
    client.load_cert_chain(certs["client.crt"], certs["client.key"])
    scu = Scu(listener.port, tls_args=(client, "localhost"))
    try:
        assert scu.assoc.is_established
        assert scu.store(series.files[1]) == SUCCESS
    finally:
        scu.close()
    assert len(index_rows(listener)) == 2

    # Plain TCP: refused (the TLS handshake fails), by DCMTK and by pynetdicom.
    plain = storescu(listener.port, [series.files[2]], extra=("-v",))
    assert plain.returncode != 0 and not storescu_status_lines(plain)
    scu = Scu(listener.port)
    assert not scu.assoc.is_established
    scu.close()
    # TLS without a client certificate: refused.
    anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=certs["ca.crt"])
    scu = Scu(listener.port, tls_args=(anonymous, "localhost"))
    try:
        if scu.assoc.is_established:  # TLS 1.3: the client may learn of the refusal only on its first read
            assert scu.store(series.files[2]) is None
    finally:
        scu.close()
    dcmtk_anonymous = storescu(listener.port, [series.files[2]], extra=("-v", "+tla", "+cf", str(certs["ca.crt"])))
    assert dcmtk_anonymous.returncode != 0 and not storescu_status_lines(dcmtk_anonymous)

    assert len(index_rows(listener)) == 2 and len(study_files(listener)) == 2
    failed = [line for line in log_lines(listener, "TLS handshake with 127.0.0.1 failed", at_least=5)
              if "UNEXPECTED_EOF" not in line]  # that one is the fixture's probe of the port
    assert len(failed) == 4, listener.log_text()  # 2 plain TCP, 2 without a certificate
    assert sum("PEER_DID_NOT_RETURN_A_CERTIFICATE" in line for line in failed) == 2, failed
    assert partial_files(listener.data / "incoming") == []
    echo = subprocess.run([require_tool("echoscu"), "-aec", AE_TITLE, *tls_options, "127.0.0.1",
                           str(listener.port)], env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stdout + echo.stderr


# -- 10. several associations at once --------------------------------------------------------

def test_parallel_associations(listener, tmp_path):
    studies = [make_series(tmp_path / f"s{i}", slices=50, size=32) for i in range(4)]
    procs = [subprocess.Popen([require_tool("storescu"), "-aec", AE_TITLE, "-aet", f"SENDER{i}", "127.0.0.1",
                               str(listener.port), "+sd", str(tmp_path / f"s{i}")],
                              env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(4)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, outputs
    rows = index_rows(listener, "study_uid, calling_ae")
    assert len(rows) == 200
    assert sorted(set(rows)) == sorted((s.study_uid, f"SENDER{i}") for i, s in enumerate(studies))
    for s in studies:
        assert len(list((listener.data / "studies" / s.study_uid).rglob("*.dcm"))) == 50
    assert len(log_lines(listener, "released after 50 instances", at_least=4)) == 4
    assert_clean_and_alive(listener)
