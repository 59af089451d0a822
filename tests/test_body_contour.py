"""The body-contour example model (images/body-contour), the CT phantom and the RT checks.

Pure tests: ``raddeploy.phantom`` writes a valid CT series (dciodvfy: no error) whose truth
is right; ``raddeploy.rtcheck`` accepts a correct hand-made RT Structure Set and reports each
wrong reference or malformed contour; the example flow file loads and triggers on CT only.

With the real Docker engine (``raddeploy/body-contour:latest``, built by ``make images``): the
container runs on a 12-slice phantom, without network, as the test's user, and its RT
Structure Set passes rtcheck and dicom3tools' ``dciodvfy`` (both required), has the input's
patient and study, a BODY whose area on the middle slice is within 5 % of the analytic
ellipse, and each lung on its own side; with ``BODY_CONTOUR_SEG=1`` it also writes a SEG of 3
segments; with no CT it exits 2 saying what it found.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, SegmentationStorage, generate_uid

from peers import REPO, require_tool
from raddeploy import rtcheck
from raddeploy.phantom import PATIENT_ID, PATIENT_NAME, Phantom, write_phantom
from raddeploy_provider.flows.loader import load_flow
from raddeploy_provider.flows.matching import trigger_matches

IMAGE = "raddeploy/body-contour:latest"
SLICES = 12


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Phantom:
    return write_phantom(tmp_path_factory.mktemp("phantom") / "ct", slices=SLICES)


def _validator_errors(path: Path) -> list[str]:
    """dicom3tools' dciodvfy Error lines for ``path``; the tool is required."""
    errors = rtcheck.dciodvfy(path)
    if errors is None:
        pytest.fail("dciodvfy is not installed: scripts/ensure-system.sh installs Debian's dicom3tools "
                    "(run `make test`, or `bash scripts/ensure-system.sh`)")
    return errors


# --- the phantom ------------------------------------------------------------------------------

def test_phantom_is_one_valid_ct_series_with_its_truth(phantom: Phantom) -> None:
    datasets = [pydicom.dcmread(p) for p in phantom.files]
    assert len(datasets) == SLICES
    assert {d.SeriesInstanceUID for d in datasets} == {phantom.series_uid}
    assert {d.StudyInstanceUID for d in datasets} == {phantom.study_uid}
    assert {d.FrameOfReferenceUID for d in datasets} == {phantom.frame_of_reference_uid}
    assert [d.SOPInstanceUID for d in datasets] == phantom.sop_uids
    assert len(set(phantom.sop_uids)) == SLICES
    assert {str(d.PatientName) for d in datasets} == {PATIENT_NAME} and {d.PatientID for d in datasets} == {PATIENT_ID}
    assert {d.file_meta.TransferSyntaxUID for d in datasets} == {ExplicitVRLittleEndian}
    assert [round(float(d.ImagePositionPatient[2]), 2) for d in datasets] == phantom.slice_z
    assert np.allclose(np.diff(phantom.slice_z), phantom.thickness)

    # What lies where on the middle slice (patient left is +x; rows run along +y).
    middle = datasets[SLICES // 2]
    hu = middle.pixel_array * float(middle.RescaleSlope) + float(middle.RescaleIntercept)
    x0, y0 = (float(v) for v in middle.ImagePositionPatient[:2])

    def at(x: float, y: float) -> float:
        return float(hu[int(round((y - y0) / phantom.spacing)), int(round((x - x0) / phantom.spacing))])

    assert at(phantom.centres_x["LUNG_L"], -10) == pytest.approx(-800, abs=40)
    assert at(phantom.centres_x["LUNG_R"], -10) == pytest.approx(-800, abs=40)
    assert phantom.centres_x["LUNG_L"] > 0 > phantom.centres_x["LUNG_R"]
    assert at(0, 65) == pytest.approx(700, abs=40)           # spine
    assert -20 <= at(0, -60) <= 70                           # soft tissue
    assert at(-180, -130) == pytest.approx(-1000, abs=40)    # air

    for name in ("BODY", "LUNG_L", "LUNG_R"):
        for z in phantom.slice_z:
            assert phantom.pixel_areas[name][z] == pytest.approx(phantom.true_areas[name][z], rel=0.01), (name, z)
    lungs = [phantom.true_areas["LUNG_L"][z] for z in phantom.slice_z]
    assert lungs[0] < lungs[SLICES // 2]  # the lungs taper towards the ends

    for path in (phantom.files[0], phantom.files[SLICES // 2]):
        assert _validator_errors(path) == [], f"dciodvfy on a phantom slice: {path.name}"


# --- rtcheck on a hand-made structure set -----------------------------------------------------

def _reference(sop_class: str, sop: str) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sop_class, sop
    return ref


def _tiny_rtstruct(phantom: Phantom) -> Dataset:
    """One ROI, a 20 x 10 mm rectangle on the middle slice: a structure set rtcheck must accept."""
    image = pydicom.dcmread(phantom.files[SLICES // 2], stop_before_pixels=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = RTStructureSetStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.PatientName, ds.PatientID = phantom.patient_name, phantom.patient_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID = phantom.study_uid, generate_uid()
    ds.StructureSetLabel = "TINY"
    series = Dataset()
    series.SeriesInstanceUID = phantom.series_uid
    series.ContourImageSequence = [_reference(image.SOPClassUID, uid) for uid in phantom.sop_uids]
    study = _reference("1.2.840.10008.3.1.2.3.1", phantom.study_uid)
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = phantom.frame_of_reference_uid
    frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]
    roi = Dataset()
    roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = 1, "BOX", phantom.frame_of_reference_uid
    roi.ROIGenerationAlgorithm = "MANUAL"
    ds.StructureSetROISequence = [roi]
    contour = Dataset()
    contour.ContourGeometricType = "CLOSED_PLANAR"
    z = phantom.middle_z
    contour.ContourData = [0, 0, z, 20, 0, z, 20, 10, z, 0, 10, z]
    contour.NumberOfContourPoints = 4
    contour.ContourImageSequence = [_reference(image.SOPClassUID, image.SOPInstanceUID)]
    item = Dataset()
    item.ReferencedROINumber, item.ROIDisplayColor, item.ContourSequence = 1, [255, 0, 0], [contour]
    ds.ROIContourSequence = [item]
    observation = Dataset()
    observation.ObservationNumber, observation.ReferencedROINumber = 1, 1
    observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
    ds.RTROIObservationsSequence = [observation]
    return ds


def _contour(ds: Dataset) -> Dataset:
    return ds.ROIContourSequence[0].ContourSequence[0]


def _series_item(ds: Dataset) -> Dataset:
    return ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]


def _set(attribute: str, value, of=lambda ds: ds):
    def change(ds: Dataset, phantom: Phantom) -> None:
        setattr(of(ds), attribute, value)
    return change


BREAKAGES = {
    "contour image": (_set("ReferencedSOPInstanceUID", "1.2.3.4", of=lambda ds: _contour(ds).ContourImageSequence[0]),
                      "is not one of the images"),
    "contour image on another slice": (
        lambda ds, ph: setattr(_contour(ds).ContourImageSequence[0], "ReferencedSOPInstanceUID", ph.sop_uids[0]),
        "not the one the contour lies on"),
    "referenced series": (_set("SeriesInstanceUID", "1.2.3.4", of=_series_item), "is not one of the images' series"),
    "series contour image": (_set("ReferencedSOPInstanceUID", "1.2.3.5", of=lambda ds: _series_item(ds).ContourImageSequence[0]),
                             "is not one of the images"),
    "referenced study": (_set("ReferencedSOPInstanceUID", "1.2.3.4",
                              of=lambda ds: ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]),
                         "is not the images' study"),
    "frame of reference": (_set("FrameOfReferenceUID", "1.2.3.4", of=lambda ds: ds.ReferencedFrameOfReferenceSequence[0]),
                           "Frame of Reference UID equals"),
    "patient": (_set("PatientID", "SOMEONE-ELSE"), "Patient ID differs"),
    "study": (_set("StudyInstanceUID", "1.2.3.4"), "Study Instance UID is not the images' study"),
    "open contour": (_set("ContourGeometricType", "OPEN_PLANAR", of=_contour), "not CLOSED_PLANAR"),
    "two points": (lambda ds, ph: (setattr(_contour(ds), "ContourData", _contour(ds).ContourData[:6]),
                               setattr(_contour(ds), "NumberOfContourPoints", 2)), "fewer than 3"),
    "off the slices": (lambda ds, ph: setattr(_contour(ds), "ContourData",
                                          [v + 0.5 if i % 3 == 2 else v for i, v in enumerate(_contour(ds).ContourData)]),
                       "lie on no referenced slice"),
    "point count": (_set("NumberOfContourPoints", 5, of=_contour), "Number of Contour Points is 5"),
    "no colour": (lambda ds, ph: delattr(ds.ROIContourSequence[0], "ROIDisplayColor"), "no ROI Display Color"),
    "no interpreted type": (_set("RTROIInterpretedType", "", of=lambda ds: ds.RTROIObservationsSequence[0]),
                            "no RT ROI Interpreted Type"),
    "no observation": (lambda ds, ph: setattr(ds, "RTROIObservationsSequence", []), "no RT ROI Observations item"),
    "sop class": (_set("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2"), "not RT Structure Set Storage"),
}


def test_rtcheck_accepts_a_correct_structure_set(phantom: Phantom, tmp_path: Path) -> None:
    path = tmp_path / "rs.dcm"
    _tiny_rtstruct(phantom).save_as(path, enforce_file_format=True)
    assert rtcheck.check_rtstruct(path, phantom.files) == []
    assert rtcheck.roi_areas(path) == {"BOX": {phantom.middle_z: pytest.approx(200.0)}}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_rtcheck_reports_what_is_wrong(phantom: Phantom, tmp_path: Path, breakage: str) -> None:
    ds = _tiny_rtstruct(phantom)
    change, expected = BREAKAGES[breakage]
    change(ds, phantom)
    path = tmp_path / "rs.dcm"
    ds.save_as(path, enforce_file_format=True)
    problems = rtcheck.check_rtstruct(path, phantom.files)
    assert any(expected in p for p in problems), problems


def test_contour_area_in_any_plane() -> None:
    square = [0, 0, 5, 10, 0, 5, 10, 10, 5, 0, 10, 5]
    assert rtcheck.contour_area_mm2(square) == pytest.approx(100.0)
    assert rtcheck.contour_area_mm2(square[::-1]) == pytest.approx(100.0)  # either orientation
    tilted = np.array([[0, 0, 0], [10, 0, 10], [10, 10, 10], [0, 10, 0]], float)  # 10 x 14.14 mm
    assert rtcheck.contour_area_mm2(tilted) == pytest.approx(100.0 * 2 ** 0.5)
    assert rtcheck.contour_area_mm2([0, 0, 0, 1, 1, 0]) == 0.0


def test_example_flow_triggers_on_ct_but_not_scouts() -> None:
    flow = load_flow(REPO / "flows" / "body_contour.yaml")
    assert [m.image for m in flow.models] == [IMAGE]
    (trigger,) = flow.triggers
    assert trigger_matches(trigger, {"Modality": "CT", "SeriesDescription": "Thorax 3mm"})
    for description in ("Topogram 0.6 T20s", "SCOUT", "localizer"):
        assert not trigger_matches(trigger, {"Modality": "CT", "SeriesDescription": description}), description
    assert not trigger_matches(trigger, {"Modality": "RTSTRUCT", "SeriesDescription": "Thorax"})


# --- the container ----------------------------------------------------------------------------

def _run_model(input_dir: Path, output_dir: Path, **environment: str) -> subprocess.CompletedProcess:
    output_dir.mkdir(parents=True, exist_ok=True)
    env_args = [a for k, v in environment.items() for a in ("-e", f"{k}={v}")]
    return subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--user", f"{os.getuid()}:{os.getgid()}",
         "-v", f"{input_dir}:/input:ro", "-v", f"{output_dir}:/output", *env_args, IMAGE],
        capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def contoured(phantom: Phantom, tmp_path_factory: pytest.TempPathFactory, docker_ready: None) -> SimpleNamespace:
    """The container's output on the phantom: by default, and with BODY_CONTOUR_SEG=1."""
    require_tool("docker")
    probe = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(f"the image {IMAGE} is missing: run `make images` (scripts/build-images.sh); "
                    f"docker said: {probe.stderr.strip()}")
    root = tmp_path_factory.mktemp("contoured")
    runs = {}
    for name, env in (("default", {}), ("seg", {"BODY_CONTOUR_SEG": "1"})):
        done = _run_model(phantom.folder, root / name, **env)
        assert done.returncode == 0, f"{name}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        runs[name] = SimpleNamespace(out=root / name, stdout=done.stdout, stderr=done.stderr,
                                     files=sorted(p.name for p in (root / name).iterdir()))
    return SimpleNamespace(**runs)


def _only(folder: Path, prefix: str) -> Path:
    found = sorted(folder.glob(f"{prefix}_*.dcm"))
    assert len(found) == 1, f"{prefix}: {[p.name for p in folder.iterdir()]}"
    return found[0]


@pytest.mark.integration
def test_structure_set_is_valid_and_references_the_ct(phantom: Phantom, contoured: SimpleNamespace) -> None:
    assert [f[:3] for f in contoured.default.files] == ["RS_"], contoured.default.files  # no SEG unless asked
    path = _only(contoured.default.out, "RS")
    assert rtcheck.check_rtstruct(path, phantom.files) == []
    assert _validator_errors(path) == [], "dciodvfy (dicom3tools) on the RT Structure Set"

    rs, ct = pydicom.dcmread(path), pydicom.dcmread(phantom.files[0], stop_before_pixels=True)
    assert path.name == f"RS_{rs.SOPInstanceUID}.dcm"
    assert rs.Modality == "RTSTRUCT" and rs.SOPClassUID == RTStructureSetStorage
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                    "StudyDate", "AccessionNumber", "ReferringPhysicianName"):
        assert rs.get(keyword) == ct.get(keyword), keyword
    assert rs.SeriesInstanceUID not in (ct.SeriesInstanceUID, "")
    assert "body-contour" in rs.Manufacturer and "Body contour" in rs.SeriesDescription

    names = {int(r.ROINumber): r.ROIName for r in rs.StructureSetROISequence}
    assert sorted(names.values()) == ["BODY", "LUNG_L", "LUNG_R"]
    kinds = {names[int(o.ReferencedROINumber)]: o.RTROIInterpretedType for o in rs.RTROIObservationsSequence}
    assert kinds == {"BODY": "EXTERNAL", "LUNG_L": "ORGAN", "LUNG_R": "ORGAN"}
    colours = {names[int(c.ReferencedROINumber)]: tuple(int(v) for v in c.ROIDisplayColor) for c in rs.ROIContourSequence}
    assert colours["BODY"] == (0, 255, 0) and len(set(colours.values())) == 3
    slice_of = dict(zip(phantom.sop_uids, phantom.slice_z))
    for item in rs.ROIContourSequence:
        contours = item.ContourSequence
        assert len(contours) == SLICES, names[int(item.ReferencedROINumber)]  # one per slice
        for contour in contours:
            (ref,) = contour.ContourImageSequence
            assert round(float(contour.ContourData[2]), 2) == slice_of[ref.ReferencedSOPInstanceUID]


@pytest.mark.integration
def test_body_and_lungs_match_the_phantom(phantom: Phantom, contoured: SimpleNamespace) -> None:
    path = _only(contoured.default.out, "RS")
    areas = rtcheck.roi_areas(path)
    z = phantom.middle_z
    for name in ("BODY", "LUNG_L", "LUNG_R"):
        measured, true = areas[name][z], phantom.true_areas[name][z]
        assert measured == pytest.approx(true, rel=0.05), f"{name} on z={z}: {measured:.0f} mm² vs {true:.0f}"
        # the outline is the mask's, half a pixel less: pixel-exact against the phantom's pixels
        assert measured == pytest.approx(phantom.pixel_areas[name][z], rel=0.01), name
    rs = pydicom.dcmread(path)
    names = {int(r.ROINumber): r.ROIName for r in rs.StructureSetROISequence}
    for item in rs.ROIContourSequence:
        name = names[int(item.ReferencedROINumber)]
        for contour in item.ContourSequence:
            x = np.asarray(contour.ContourData, float).reshape(-1, 3)[:, 0]
            if name == "LUNG_L":
                assert x.min() > 0, "the left lung lies at patient +x"
            elif name == "LUNG_R":
                assert x.max() < 0, "the right lung lies at patient -x"

    lines = dict(re.findall(r"^(BODY|LUNG_L|LUNG_R): (\d+ slices, [\d.]+ cm3)$", contoured.default.stdout, re.M))
    assert sorted(lines) == ["BODY", "LUNG_L", "LUNG_R"], contoured.default.stdout
    body_cm3 = float(lines["BODY"].split(", ")[1].split()[0])
    true_cm3 = sum(phantom.true_areas["BODY"].values()) * phantom.thickness / 1000
    assert body_cm3 == pytest.approx(true_cm3, rel=0.05)
    assert lines["BODY"].startswith(f"{SLICES} slices")
    for run in (contoured.default, contoured.seg):
        for secret in (PATIENT_NAME, PATIENT_ID, "PHANTOM^"):
            assert secret not in run.stdout + run.stderr


@pytest.mark.integration
def test_seg_on_request(phantom: Phantom, contoured: SimpleNamespace) -> None:
    assert "highdicom does not import" not in contoured.seg.stderr, contoured.seg.stderr
    path = _only(contoured.seg.out, "SEG")
    seg = pydicom.dcmread(path)
    assert seg.SOPClassUID == SegmentationStorage
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["BODY", "LUNG_L", "LUNG_R"]
    assert seg.PatientID == phantom.patient_id and seg.StudyInstanceUID == phantom.study_uid
    assert _validator_errors(path) == [], "dciodvfy (dicom3tools) on the SEG"
    assert rtcheck.check_rtstruct(_only(contoured.seg.out, "RS"), phantom.files) == []


@pytest.mark.integration
def test_no_ct_exits_2_saying_what_it_found(contoured: SimpleNamespace, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    (inputs / "deeper").mkdir(parents=True)
    (inputs / "notes.txt").write_text("not DICOM")
    rs = _only(contoured.default.out, "RS")
    (inputs / "deeper" / rs.name).write_bytes(rs.read_bytes())
    done = _run_model(inputs, tmp_path / "out")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no usable CT input" in done.stderr
    assert "1 RTSTRUCT instances" in done.stderr and "1 files that are not DICOM" in done.stderr
    assert list((tmp_path / "out").iterdir()) == []
