"""Make DICOM series for tests: real Part 10 files, synthetic pixels, fresh UIDs.

Pixel data and header values are invented (no patient data in the repo); the structure is a
real CT/MR image storage instance that DCMTK and pydicom accept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import random
from array import array
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}


@dataclass(frozen=True)
class Series:
    study_uid: str
    series_uid: str
    files: list[Path]


def make_series(folder: Path, *, modality: str = "CT", slices: int = 5, size: int = 64,
                study_uid: str | None = None, description: str = "Planning CT",
                patient_id: str = "TEST0001") -> Series:
    """Write ``slices`` instances of one series to ``folder`` and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    files = []
    rng = random.Random(slices * size)
    for i in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = SOP_CLASS[modality]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = "Test^Phantom"
        ds.PatientID = patient_id
        ds.Modality = modality
        ds.SeriesDescription = description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i) * 2.5]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 2.5
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.PixelData = array("h", (rng.randrange(0, 2000) for _ in range(size * size))).tobytes()
        path = folder / f"{modality}{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return Series(study_uid, series_uid, files)
