"""Example model: the body outline and the lungs of a CT as an RT Structure Set (and a SEG).

Contract (the same for every model a flow runs): DICOM files in ``/input`` (read-only; every
file under it, recursively), results written to ``/output``. Not for clinical use: a
threshold example showing what real RT output looks like.

Input: one CT series (CT Image Storage). Files that are not DICOM, not CT, localizers
(ImageType LOCALIZER) or without pixel data are left out; of several CT series, the one with
the most slices of one geometry (orientation, size, pixel spacing) is used.

What it finds, slice by slice, with numpy and scipy.ndimage:
  - ``BODY``: voxels above -400 HU, the largest (4-connected) component on each slice, its
    holes filled;
  - ``LUNG_L`` / ``LUNG_R``: air (below -400 HU) inside the body, in 3D components of at
    least 30 cm³ (smaller ones, e.g. bowel gas, are dropped; the air outside the body is not
    inside its filled outline), then each lung's largest component on each slice, holes
    (vessels) filled. Left and right by patient x (patient LEFT is +x in DICOM LPS): a
    component lies on the side of the body's midline (its mean x) where most of it is; one
    with a fifth or more of it on each side (lungs joined by the trachea) is cut at the midline.

Output:
  - ``RS_<SOPInstanceUID>.dcm``: RT Structure Set, one CLOSED_PLANAR contour per slice per ROI
    (the outline of that slice's mask), in patient coordinates (mm) from ImagePositionPatient,
    ImageOrientationPatient and PixelSpacing, each contour referencing its slice. Contour
    vertices are the marching-squares points at pixel centres: the midpoints between each
    inside pixel centre and its outside 4-neighbour's (the boundary traced along pixel edges,
    each edge replaced by its midpoint, collinear points dropped). The polygon's area is the
    mask's area minus half a pixel, exactly. Patient and study as the input's, a new series.
    Written Explicit VR Little Endian, or Implicit VR Little Endian when a contour's Contour
    Data would exceed the 64 KiB an explicit DS value may hold.
  - ``SEG_<SOPInstanceUID>.dcm`` with ``BODY_CONTOUR_SEG=1`` (default off): the same masks as
    a binary DICOM Segmentation written with highdicom, when it imports (the image installs
    it; without it the RT Structure Set is still written and stderr says why no SEG).
  - stdout: one line per ROI (slices, volume in cm³), then the files written; no patient data.

Exit codes: 0 done; 2 no usable CT input (stderr says what was found); 1 unexpected error.
Works with pydicom 2.3 (Debian bookworm) and 3.x.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from scipy import ndimage

INPUT = Path(os.environ.get("MODEL_INPUT", "/input"))
OUTPUT = Path(os.environ.get("MODEL_OUTPUT", "/output"))

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"
# What RT Referenced Study items conventionally name as their SOP class (PS3.3 C.8.8.5).
STUDY_COMPONENT = "1.2.840.10008.3.1.2.3.1"
BODY_HU = -400.0
MIN_LUNG_CM3 = 30.0
SPLIT_FRACTION = 0.2
NAME = "raddeploy body-contour example"
VERSION = "1.0"
# name, colour, RT ROI Interpreted Type, SNOMED CT code and meaning (for the SEG)
ROIS = (
    ("BODY", (0, 255, 0), "EXTERNAL", "38266002", "Entire body"),
    ("LUNG_L", (0, 128, 255), "ORGAN", "44029006", "Left lung"),
    ("LUNG_R", (255, 160, 0), "ORGAN", "3341006", "Right lung"),
)
PYDICOM_3 = int(pydicom.__version__.split(".")[0]) >= 3
MAX_SHORT_VALUE = 0xFFFE  # an explicit VR DS element's length is 16 bits


class NoUsableInput(Exception):
    """No CT series to work on; the message says what was found instead."""


class Series:
    """The CT slices the model works on, sorted along the slice normal, and their geometry."""

    def __init__(self, slices: list[Dataset]) -> None:
        first = slices[0]
        orientation = np.array(first.ImageOrientationPatient, dtype=float)
        self.row_dir, self.col_dir = orientation[:3], orientation[3:]  # along a row (columns grow), down a column
        self.normal = np.cross(self.row_dir, self.col_dir)
        by_position: dict[float, Dataset] = {}
        for ds in sorted(slices, key=lambda d: int(d.get("InstanceNumber", 0) or 0)):
            by_position.setdefault(round(float(np.dot(self.normal, np.array(ds.ImagePositionPatient, float))), 3), ds)
        self.slices = [by_position[k] for k in sorted(by_position)]
        self.row_spacing, self.col_spacing = (float(v) for v in first.PixelSpacing)
        self.rows, self.columns = int(first.Rows), int(first.Columns)
        positions = sorted(by_position)
        steps = np.diff(positions)
        thickness = float(first.get("SliceThickness", 0) or 0)
        self.slice_spacing = float(np.median(steps)) if len(steps) else (thickness or 1.0)
        self.hu = np.stack([hounsfield(ds) for ds in self.slices])
        # patient x of each pixel centre (the same on every slice of one geometry)
        r, c = np.mgrid[0:self.rows, 0:self.columns]
        origin = np.array(first.ImagePositionPatient, dtype=float)
        self.x = origin[0] + self.row_dir[0] * c * self.col_spacing + self.col_dir[0] * r * self.row_spacing

    def to_patient(self, k: int, points_rc: np.ndarray) -> np.ndarray:
        """Patient coordinates (mm, N x 3) of (row, column) pixel coordinates on slice ``k``."""
        origin = np.array(self.slices[k].ImagePositionPatient, dtype=float)
        return (origin + np.outer(points_rc[:, 1] * self.col_spacing, self.row_dir)
                + np.outer(points_rc[:, 0] * self.row_spacing, self.col_dir))

    @property
    def voxel_cm3(self) -> float:
        return self.row_spacing * self.col_spacing * self.slice_spacing / 1000.0


def hounsfield(ds: Dataset) -> np.ndarray:
    return (ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1)
            + float(ds.get("RescaleIntercept", 0) or 0))


def read_dicom(path: Path) -> Dataset | None:
    """The dataset in ``path``, or None if it is not DICOM (a file without the Part 10 preamble
    is read too, if what it holds has a SOP Class UID)."""
    try:
        return pydicom.dcmread(path)
    except Exception:  # noqa: BLE001 - not Part 10, or unreadable
        pass
    try:
        ds = pydicom.dcmread(path, force=True)
        return ds if "SOPClassUID" in ds and "SOPInstanceUID" in ds else None
    except Exception:  # noqa: BLE001
        return None


def read_input(folder: Path) -> Series:
    """The CT series to work on; NoUsableInput says what was there instead."""
    found: Counter[str] = Counter()
    groups: dict[tuple, list[Dataset]] = defaultdict(list)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        ds = read_dicom(path)
        if ds is None:
            found["files that are not DICOM"] += 1
            continue
        modality, sop_class = ds.get("Modality", "?"), str(ds.get("SOPClassUID", ""))
        if modality != "CT" or sop_class != CT_IMAGE:
            found[f"{modality} instances" if sop_class != CT_IMAGE else "CT images of another modality"] += 1
            continue
        if "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]:
            found["CT localizers"] += 1
            continue
        if "PixelData" not in ds or not all(k in ds for k in ("ImagePositionPatient", "ImageOrientationPatient",
                                                              "PixelSpacing")):
            found["CT images without pixel data or geometry"] += 1
            continue
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        try:
            if syntax is not None and syntax.is_compressed:
                ds.decompress()
            ds.pixel_array
        except Exception:  # noqa: BLE001 - no decoder for it here
            found[f"CT images whose pixel data this image cannot decode (transfer syntax {syntax})"] += 1
            continue
        key = (str(ds.SeriesInstanceUID), tuple(round(float(v), 4) for v in ds.ImageOrientationPatient),
               int(ds.Rows), int(ds.Columns), tuple(round(float(v), 4) for v in ds.PixelSpacing))
        groups[key].append(ds)
    if not groups:
        what = ", ".join(f"{n} {kind}" for kind, n in sorted(found.items())) or "no files"
        raise NoUsableInput(f"no usable CT input in {folder}: found {what}")
    return Series(max(groups.values(), key=len))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a 2D mask, its holes filled (empty if none)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == int(sizes.argmax()))


def segment(series: Series) -> dict[str, np.ndarray]:
    """The masks [slice, row, column] of BODY, LUNG_L and LUNG_R."""
    body = np.stack([largest_component(s > BODY_HU) for s in series.hu])
    air = (series.hu < BODY_HU) & body
    labels, count = ndimage.label(air)  # 6-connected in 3D
    left = np.zeros_like(body)
    right = np.zeros_like(body)
    if count and body.any():
        midline = float(series.x[body.any(axis=0)].mean())  # mean x of what the body covers on any slice
        on_left = np.broadcast_to(series.x > midline, body.shape)
        sizes = np.bincount(labels.ravel())
        for label in np.flatnonzero(sizes * series.voxel_cm3 >= MIN_LUNG_CM3):
            if label == 0:
                continue
            component = labels == label
            share_left = float((component & on_left).sum()) / float(sizes[label])
            if min(share_left, 1.0 - share_left) >= SPLIT_FRACTION:
                left |= component & on_left
                right |= component & ~on_left
            elif share_left > 0.5:
                left |= component
            else:
                right |= component
    return {
        "BODY": body,
        "LUNG_L": np.stack([largest_component(s) for s in left]),
        "LUNG_R": np.stack([largest_component(s) for s in right]),
    }


def outline(mask: np.ndarray) -> np.ndarray:
    """The outline of one 4-connected, hole-free 2D mask as (row, column) points (N x 2).

    The boundary is traced along pixel edges (inside on the right, going round clockwise on
    the screen); each edge becomes its midpoint, i.e. the point halfway between the inside
    pixel centre and the outside one: marching squares at level 0.5 on the pixel centres.
    Collinear points are dropped. The polygon's area is the pixel count minus 0.5.
    """
    m = np.pad(mask.astype(bool), 1)
    width = m.shape[1] + 1  # corners per row of the corner lattice
    up, down, left, right = (np.zeros_like(m) for _ in range(4))
    up[1:], down[:-1] = m[:-1], m[1:]
    left[:, 1:], right[:, :-1] = m[:, :-1], m[:, 1:]
    starts, ends = [], []
    # Corner (i, j) is the top-left corner of pixel (i, j). Edges of the boundary, clockwise:
    for edge, (a, b) in (
        (m & ~up, ((0, 0), (0, 1))),       # top: left to right
        (m & ~right, ((0, 1), (1, 1))),    # right: top to bottom
        (m & ~down, ((1, 1), (1, 0))),     # bottom: right to left
        (m & ~left, ((1, 0), (0, 0))),     # left: bottom to top
    ):
        r, c = np.nonzero(edge)
        starts.append((r + a[0]) * width + c + a[1])
        ends.append((r + b[0]) * width + c + b[1])
    start, end = np.concatenate(starts), np.concatenate(ends)
    if len(start) == 0:
        return np.zeros((0, 2))
    following = dict(zip(start.tolist(), end.tolist()))
    if len(following) != len(start):
        raise ValueError("the mask's boundary touches itself (not one 4-connected, hole-free component)")
    loop = [int(start[0])]
    while True:
        corner = following[loop[-1]]
        if corner == loop[0]:
            break
        loop.append(corner)
    if len(loop) != len(start):
        raise ValueError("the mask has more than one boundary (not one 4-connected, hole-free component)")
    corners = np.array(loop)
    twice = np.stack([corners // width, corners % width], axis=1) * 2  # doubled: midpoints stay integers
    mid = (twice + np.roll(twice, -1, axis=0)) // 2
    before, after = mid - np.roll(mid, 1, axis=0), np.roll(mid, -1, axis=0) - mid
    keep = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0] != 0
    # back to pixel coordinates of the unpadded mask: corner (i, j) is at pixel (i - 0.5, j - 0.5), minus the pad
    return mid[keep] / 2.0 - 1.5


def _ds(value: float) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _reference(ds: Dataset) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return ref


def _copy_patient_and_study(source: Dataset, ds: Dataset) -> None:
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                    "ReferringPhysicianName"):
        setattr(ds, keyword, source.get(keyword, "") or "")
    if "StudyDescription" in source:
        ds.StudyDescription = source.StudyDescription


def rtstruct(series: Series, masks: dict[str, np.ndarray]) -> Dataset:
    first = series.slices[0]
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = RT_STRUCTURE_SET
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    _copy_patient_and_study(first, ds)
    # RT Series and General Equipment
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(first.get("SeriesNumber", 0) or 0) + 2000
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = "Body contour example (not for clinical use)"
    ds.OperatorsName = ""
    ds.Manufacturer = NAME
    ds.ManufacturerModelName = "body-contour"
    ds.SoftwareVersions = VERSION
    # Frame of Reference
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "") or ""
    # Structure Set
    ds.StructureSetLabel = "BODY-CONTOUR"
    ds.StructureSetName = "body-contour"
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.InstanceNumber = 1
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = first.SeriesInstanceUID
    referenced_series.ContourImageSequence = [_reference(s) for s in series.slices]
    study = Dataset()
    study.ReferencedSOPClassUID = STUDY_COMPONENT
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = [referenced_series]
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]

    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    for number, (name, colour, kind, _code, _meaning) in enumerate(ROIS, 1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{NAME} {VERSION}: threshold {BODY_HU:g} HU"
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ROIDisplayColor = list(colour)
        contours = []
        for k, plane in enumerate(masks[name]):
            if not plane.any():
                continue
            points = series.to_patient(k, outline(plane))
            contour = Dataset()
            contour.ContourImageSequence = [_reference(series.slices[k])]
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourNumber = len(contours) + 1
            contour.ContourData = [_ds(v) for v in points.ravel()]
            contours.append(contour)
        if contours:
            item.ContourSequence = contours
        ds.ROIContourSequence.append(item)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = kind
        observation.ROIInterpreter = ""
        ds.RTROIObservationsSequence.append(observation)
    return ds


def _needs_implicit(ds: Dataset) -> bool:
    """Whether some Contour Data is too long for an explicit VR DS element."""
    for item in ds.ROIContourSequence:
        for contour in item.get("ContourSequence", []):
            if sum(len(str(v)) + 1 for v in contour.ContourData) - 1 > MAX_SHORT_VALUE:
                return True
    return False


def save(ds: Dataset, path: Path) -> None:
    """Write a Part 10 file, with pydicom 2.3 or 3.x."""
    implicit = ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    if PYDICOM_3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.is_little_endian, ds.is_implicit_VR = True, implicit
        ds.save_as(path, write_like_original=False)


def write_seg(series: Series, masks: dict[str, np.ndarray]) -> Path | None:
    """The masks as a binary DICOM SEG (highdicom), or None (stderr says why)."""
    try:
        import highdicom as hd
    except Exception as exc:  # noqa: BLE001 - any import failure means no SEG
        print(f"BODY_CONTOUR_SEG=1 but highdicom does not import ({type(exc).__name__}: {exc}): no SEG written",
              file=sys.stderr)
        return None
    present = [roi for roi in ROIS if masks[roi[0]].any()]
    descriptions = []
    algorithm = hd.AlgorithmIdentificationSequence(
        name="body-contour", version=VERSION,
        family=hd.sr.CodedConcept("123105", "DCM", "Histogram Analysis"))  # CID 7162: a threshold
    for number, (name, colour, _kind, code, meaning) in enumerate(present, 1):
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name,
            segmented_property_category=hd.sr.CodedConcept("123037004", "SCT", "Anatomical Structure"),
            segmented_property_type=hd.sr.CodedConcept(code, "SCT", meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    pixels = np.stack([masks[roi[0]] for roi in present], axis=-1).astype(np.uint8)
    first = series.slices[0]
    seg = hd.seg.Segmentation(
        source_images=series.slices, pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=int(first.get("SeriesNumber", 0) or 0) + 2001,
        sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=NAME, manufacturer_model_name="body-contour", software_versions=VERSION,
        device_serial_number="0", series_description="Body contour example (not for clinical use)")
    path = OUTPUT / f"SEG_{seg.SOPInstanceUID}.dcm"
    seg.save_as(path)
    return path


def main() -> int:
    try:
        series = read_input(INPUT)
    except NoUsableInput as exc:
        print(exc, file=sys.stderr)
        return 2
    masks = segment(series)
    if not masks["BODY"].any():
        print(f"no usable CT input: no body (nothing above {BODY_HU:g} HU) on any of the {len(series.slices)} "
              "slices", file=sys.stderr)
        return 2
    ds = rtstruct(series, masks)
    if _needs_implicit(ds):
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    written = [OUTPUT / f"RS_{ds.SOPInstanceUID}.dcm"]
    save(ds, written[0])
    for name, *_ in ROIS:
        mask = masks[name]
        slices = int(mask.any(axis=(1, 2)).sum())
        print(f"{name}: {slices} slices, {mask.sum() * series.voxel_cm3:.1f} cm3")
    if os.environ.get("BODY_CONTOUR_SEG", "0").strip().lower() in ("1", "true", "yes", "on"):
        seg = write_seg(series, masks)
        if seg is not None:
            written.append(seg)
    print(f"wrote {', '.join(p.name for p in written)} from {len(series.slices)} CT slices")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001 - exit 1 with the traceback on stderr
        traceback.print_exc()
        sys.exit(1)
