"""A synthetic CT phantom: one CT series written with numpy and pydicom, no patient data.

An elliptic body of soft tissue (0-50 HU with a little noise) in air (-1000 HU), two lung
ellipses (-800 HU) on the patient's left and right, and a bone disc (+700 HU) for the spine.
Axial slices, head first supine: image columns run along patient +x (the patient's LEFT in
DICOM LPS), rows along +y (posterior); the image centre is x = y = 0 and the slices are
centred on z = 0. The lungs taper towards the first and last slice, so their areas differ
from slice to slice; the body and the spine do not.

Each instance is a complete CT Image IOD (every Type 1 and 2 attribute of its modules) in
Explicit VR Little Endian, so ``dciodvfy`` finds no error. ``Phantom`` says what a model
should find: the analytic area of each structure on each slice (pi*a*b) and the area of the
pixels whose centres lie inside it. Used by ``raddeploy demo`` and by the end-to-end tests.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

PATIENT_NAME = "PHANTOM^DEMO"
PATIENT_ID = "RDPHANTOM01"

# Structures as (centre x, centre y, semi-axis along x, semi-axis along y) in mm.
BODY = (0.0, 0.0, 150.0, 100.0)
LUNG_L = (60.0, -10.0, 40.0, 55.0)   # patient left: +x
LUNG_R = (-60.0, -10.0, 40.0, 55.0)
SPINE = (0.0, 65.0, 15.0, 15.0)      # posterior: +y
HU = {"air": -1000, "tissue": 25, "lung": -800, "bone": 700}
NOISE_HU = 8.0


@dataclass(frozen=True)
class Phantom:
    """What ``write_phantom`` wrote, and the truth to compare a model's output with.

    ``files``, ``sop_uids`` and ``slice_z`` (each slice's z, mm) are in slice order.
    ``true_areas[name][z]`` is the analytic area (mm²) of ``BODY``, ``LUNG_L`` or ``LUNG_R``
    on the slice at ``z`` (the body's outline, lungs and spine included); ``pixel_areas`` the
    same counted in pixels (pixel centres inside the ellipse, times the pixel area).
    ``centres_x`` is each structure's x (mm): the left lung's is positive. z keys are rounded
    to 0.01 mm.
    """

    folder: Path
    files: list[Path]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_uids: list[str]
    patient_name: str
    patient_id: str
    rows: int
    columns: int
    spacing: float
    thickness: float
    slice_z: list[float]
    true_areas: dict[str, dict[float, float]] = field(default_factory=dict)
    pixel_areas: dict[str, dict[float, float]] = field(default_factory=dict)
    centres_x: dict[str, float] = field(default_factory=dict)

    @property
    def middle_z(self) -> float:
        """The z of the middle slice (``slices // 2``)."""
        return self.slice_z[len(self.slice_z) // 2]

    @property
    def body_area_mm2(self) -> float:
        """The body's analytic area (mm²), the same on every slice."""
        return math.pi * BODY[2] * BODY[3]


def _lung_scale(index: int, slices: int) -> float:
    """How much the lungs shrink towards the ends of the series (1 in the middle, 0.6 at the ends)."""
    if slices == 1:
        return 1.0
    t = 2.0 * index / (slices - 1) - 1.0   # -1 .. 1
    return math.sqrt(1.0 - 0.64 * t * t)


def _inside(x: np.ndarray, y: np.ndarray, ellipse: tuple[float, float, float, float], scale: float = 1.0) -> np.ndarray:
    cx, cy, a, b = ellipse
    return ((x - cx) / (a * scale)) ** 2 + ((y - cy) / (b * scale)) ** 2 <= 1.0


def write_phantom(folder: Path, slices: int = 20, rows: int = 256, columns: int = 256, spacing: float = 1.5,
                  thickness: float = 3.0, *, patient_name: str = PATIENT_NAME, patient_id: str = PATIENT_ID,
                  study_uid: str | None = None, series_description: str = "Phantom CT",
                  seed: int = 0) -> Phantom:
    """Write one CT series of ``slices`` axial images of ``rows`` x ``columns`` pixels into ``folder``.

    ``spacing`` is the pixel size and ``thickness`` the slice thickness and spacing (mm). The
    field of view must hold the body (300 x 200 mm): 256 x 1.5 mm does. UIDs are new each call
    (``study_uid`` may be given, to add a series to a study); files are ``CT_<nnnn>.dcm``.
    """
    if columns * spacing <= 2 * BODY[2] or rows * spacing <= 2 * BODY[3]:
        raise ValueError(f"a field of view of {columns * spacing:g} x {rows * spacing:g} mm does not hold the "
                         f"phantom's body ({2 * BODY[2]:g} x {2 * BODY[3]:g} mm): more pixels or a larger spacing")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    # Pixel centres in patient coordinates: (x0, y0) is the centre of the first pixel.
    x0, y0 = -(columns - 1) / 2 * spacing, -(rows - 1) / 2 * spacing
    x = x0 + np.arange(columns) * spacing
    y = y0 + np.arange(rows) * spacing
    xx, yy = np.meshgrid(x, y)  # [row, column]
    pixel_area = spacing * spacing
    body = _inside(xx, yy, BODY)
    spine = _inside(xx, yy, SPINE)

    files, sops, zs = [], [], []
    true_areas: dict[str, dict[float, float]] = {"BODY": {}, "LUNG_L": {}, "LUNG_R": {}}
    pixel_areas: dict[str, dict[float, float]] = {"BODY": {}, "LUNG_L": {}, "LUNG_R": {}}
    for i in range(slices):
        z = (i - (slices - 1) / 2) * thickness
        key = round(z, 2)
        scale = _lung_scale(i, slices)
        lung_l, lung_r = _inside(xx, yy, LUNG_L, scale), _inside(xx, yy, LUNG_R, scale)

        hu = np.full((rows, columns), float(HU["air"]))
        hu[body] = HU["tissue"]
        hu[lung_l | lung_r] = HU["lung"]
        hu[spine] = HU["bone"]
        hu += rng.normal(0.0, NOISE_HU, hu.shape)
        stored = np.clip(np.rint(hu + 1024), 0, 4095).astype(np.uint16)

        true_areas["BODY"][key] = math.pi * BODY[2] * BODY[3]
        pixel_areas["BODY"][key] = float(body.sum()) * pixel_area
        for name, ellipse, mask in (("LUNG_L", LUNG_L, lung_l), ("LUNG_R", LUNG_R, lung_r)):
            true_areas[name][key] = math.pi * ellipse[2] * ellipse[3] * scale * scale
            pixel_areas[name][key] = float(mask.sum()) * pixel_area

        sop = generate_uid()
        ds = _ct_dataset(sop, study_uid, series_uid, frame_uid, patient_name, patient_id, date, time,
                         series_description)
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z)]
        ds.SliceLocation = _ds(z)
        ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
        ds.SliceThickness = _ds(thickness)
        ds.Rows, ds.Columns = rows, columns
        ds.PixelData = stored.tobytes()
        path = folder / f"CT_{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        sops.append(sop)
        zs.append(key)
    return Phantom(folder=folder, files=files, study_uid=study_uid, series_uid=series_uid,
                   frame_of_reference_uid=frame_uid, sop_uids=sops, patient_name=patient_name,
                   patient_id=patient_id, rows=rows, columns=columns, spacing=spacing, thickness=thickness,
                   slice_z=zs, true_areas=true_areas, pixel_areas=pixel_areas,
                   centres_x={"BODY": BODY[0], "LUNG_L": LUNG_L[0], "LUNG_R": LUNG_R[0], "SPINE": SPINE[0]})


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _ct_dataset(sop: str, study_uid: str, series_uid: str, frame_uid: str, patient_name: str, patient_id: str,
                date: str, time: str, series_description: str) -> Dataset:
    """The attributes all slices share, module by module (CT Image IOD, PS3.3 A.3)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic phantom (raddeploy.phantom)"
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate, ds.StudyTime = date, time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "PHANTOM"
    ds.AccessionNumber = ""
    ds.StudyDescription = "Synthetic CT phantom"
    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    # Frame of Reference
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = "raddeploy phantom"
    ds.ManufacturerModelName = "raddeploy.phantom"
    ds.SoftwareVersions = "1"
    # General Image and General Acquisition
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDate, ds.AcquisitionTime = date, time
    ds.AcquisitionNumber = 1
    ds.BurnedInAnnotation = "NO"
    # Image Plane
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    # Image Pixel and CT Image
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.KVP = 120
    ds.ConvolutionKernel = "STANDARD"
    # VOI LUT: a soft-tissue window
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    return ds
