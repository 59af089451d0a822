"""RT results of the CT phantom (``raddeploy.phantom``) made from its analytic truth, with no model:
an RT Structure Set of ellipse polygons and a binary SEG of the pixels inside the ellipses.

For tests and bench/previews.py that need an RT result quickly (the real model's output needs
Docker: ``raddeploy/body-contour:latest``, tests/test_body_contour.py). The ROIs are the
example model's: ``BODY``, ``LUNG_L`` and ``LUNG_R`` with its colours.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pack_bits
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RTStructureSetStorage, SegmentationStorage, generate_uid

from raddeploy import phantom as ph

#: name, ellipse, RGB colour, RT ROI Interpreted Type (the example model's ROIs).
ROIS = (
    ("BODY", ph.BODY, (0, 255, 0), "EXTERNAL"),
    ("LUNG_L", ph.LUNG_L, (0, 128, 255), "ORGAN"),
    ("LUNG_R", ph.LUNG_R, (255, 160, 0), "ORGAN"),
)
#: Recommended Display CIELab Values (PS3.3 C.10.7.1.1) for the SEG's segments: L* a* b* as 16 bits.
SEG_LAB = {"BODY": (87.8, -79.3, 81.0), "LUNG_L": (55.0, 10.0, -60.0), "LUNG_R": (75.0, 20.0, 75.0)}


def lung_scale(index: int, slices: int) -> float:
    return ph._lung_scale(index, slices)


def ellipse_scale(name: str, index: int, slices: int) -> float:
    return 1.0 if name == "BODY" else lung_scale(index, slices)


def ellipse_polygon(ellipse: tuple[float, float, float, float], scale: float, z: float,
                    step_mm: float) -> np.ndarray:
    """The ellipse as a closed polygon (N x 3, mm) with points about ``step_mm`` apart."""
    cx, cy, a, b = ellipse
    a, b = a * scale, b * scale
    perimeter = math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))  # Ramanujan
    n = max(int(perimeter / step_mm), 8)
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + a * np.cos(t), cy + b * np.sin(t), np.full(n, z)], axis=1)


def _reference(sop_class: str, sop: str) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sop_class, sop
    return ref


def _common(made: ph.Phantom, sop_class: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName, ds.PatientID = made.patient_name, made.patient_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID = made.study_uid, generate_uid()
    ds.FrameOfReferenceUID = made.frame_of_reference_uid
    return ds


def phantom_rtstruct(made: ph.Phantom, path: Path, step_mm: float | None = None) -> Path:
    """An RT Structure Set of the phantom's ellipses on every slice (points ``step_mm`` apart,
    default one pixel), written to ``path``."""
    step = step_mm or made.spacing
    ds = _common(made, RTStructureSetStorage, "RTSTRUCT")
    ds.StructureSetLabel = "PHANTOM-TRUTH"
    series = Dataset()
    series.SeriesInstanceUID = made.series_uid
    series.ContourImageSequence = [_reference(CTImageStorage, uid) for uid in made.sop_uids]
    study = _reference("1.2.840.10008.3.1.2.3.1", made.study_uid)
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = made.frame_of_reference_uid
    frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    slices = len(made.slice_z)
    for number, (name, ellipse, colour, kind) in enumerate(ROIS, 1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, made.frame_of_reference_uid
        roi.ROIGenerationAlgorithm = "MANUAL"
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber, item.ROIDisplayColor = number, list(colour)
        item.ContourSequence = []
        for k, (z, sop) in enumerate(zip(made.slice_z, made.sop_uids)):
            points = ellipse_polygon(ellipse, ellipse_scale(name, k, slices), z, step)
            contour = Dataset()
            contour.ContourImageSequence = [_reference(CTImageStorage, sop)]
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [f"{v:.2f}" for v in points.ravel()]
            item.ContourSequence.append(contour)
        ds.ROIContourSequence.append(item)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType, observation.ROIInterpreter = kind, ""
        ds.RTROIObservationsSequence.append(observation)
    ds.save_as(path, enforce_file_format=True)
    return path


def phantom_masks(made: ph.Phantom) -> dict[str, np.ndarray]:
    """Each ROI's pixels [slice, row, column] (pixel centres inside its ellipse)."""
    x = -(made.columns - 1) / 2 * made.spacing + np.arange(made.columns) * made.spacing
    y = -(made.rows - 1) / 2 * made.spacing + np.arange(made.rows) * made.spacing
    xx, yy = np.meshgrid(x, y)
    slices = len(made.slice_z)
    return {name: np.stack([ph._inside(xx, yy, ellipse, ellipse_scale(name, k, slices)) for k in range(slices)])
            for name, ellipse, _, _ in ROIS}


def lab16(lab: tuple[float, float, float]) -> list[int]:
    """CIELab (L* 0-100, a*, b* -128-127) as DICOM's three 16-bit values."""
    lightness, a, b = lab
    return [round(lightness * 65535 / 100), round((a + 128) * 65535 / 255), round((b + 128) * 65535 / 255)]


def phantom_seg(made: ph.Phantom, path: Path, *, colours: bool = True) -> Path:
    """A binary SEG of :func:`phantom_masks` (empty frames left out, as highdicom does), written to ``path``."""
    masks = phantom_masks(made)
    ds = _common(made, SegmentationStorage, "SEG")
    ds.SegmentationType = "BINARY"
    ds.Rows, ds.Columns = made.rows, made.columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.SegmentSequence = []
    for number, (name, *_rest) in enumerate(ROIS, 1):
        segment = Dataset()
        segment.SegmentNumber, segment.SegmentLabel, segment.SegmentAlgorithmType = number, name, "MANUAL"
        if colours:
            segment.RecommendedDisplayCIELabValue = lab16(SEG_LAB[name])
        ds.SegmentSequence.append(segment)
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures = Dataset()
    measures.PixelSpacing = [made.spacing, made.spacing]
    measures.SliceThickness = made.thickness
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [orientation], [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    x0, y0 = -(made.columns - 1) / 2 * made.spacing, -(made.rows - 1) / 2 * made.spacing
    frames, per_frame = [], []
    for number, (name, *_rest) in enumerate(ROIS, 1):
        for k, (z, sop) in enumerate(zip(made.slice_z, made.sop_uids)):
            if not masks[name][k].any():
                continue
            frames.append(masks[name][k])
            item = Dataset()
            identification = Dataset()
            identification.ReferencedSegmentNumber = number
            position = Dataset()
            position.ImagePositionPatient = [x0, y0, z]
            derivation = Dataset()
            derivation.SourceImageSequence = [_reference(CTImageStorage, sop)]
            item.SegmentIdentificationSequence, item.PlanePositionSequence = [identification], [position]
            item.DerivationImageSequence = [derivation]
            per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.NumberOfFrames = len(frames)
    ds.PixelData = pack_bits(np.stack(frames).astype(np.uint8))
    ds.save_as(path, enforce_file_format=True)
    return path
