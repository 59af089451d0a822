"""Check an RT Structure Set against the images it was drawn on, strictly, with pydicom.

``check_rtstruct`` lists what is wrong (an empty list: nothing found): the SOP class, the
patient and study, the frame of reference, every reference (study, series, contour image)
resolving to one of the images, an observation with an interpreted type and a display colour
for every ROI, and every contour CLOSED_PLANAR with 3+ points lying on a slice of the
images. ``roi_areas`` gives each ROI's contour area per slice and ``roi_volumes_cm3`` its
volume, to compare with a known truth (``raddeploy.phantom``): both live in the core's RT
reader (``raddeploy_provider.dicom.rt``) and are imported here. ``dciodvfy`` runs dicom3tools'
independent validator when it is installed (``scripts/ensure-system.sh`` installs it). No
Airflow imports.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterable

import numpy as np
import pydicom
from pydicom.uid import RTStructureSetStorage

# What the contours measure has one home, the core's RT reader; named here for rtcheck's users.
from raddeploy_provider.dicom.rt import contour_area_mm2, roi_areas, roi_volumes_cm3  # noqa: F401

# How far (mm) a contour point may lie from the plane of the slice it belongs to.
PLANE_TOLERANCE_MM = 0.01


class _Slice:
    """The geometry and identity of one referenced image."""

    def __init__(self, ds: pydicom.Dataset) -> None:
        self.sop_class = str(ds.get("SOPClassUID", ""))
        self.sop = str(ds.get("SOPInstanceUID", ""))
        self.series = str(ds.get("SeriesInstanceUID", ""))
        self.study = str(ds.get("StudyInstanceUID", ""))
        self.frame = str(ds.get("FrameOfReferenceUID", ""))
        self.normal: np.ndarray | None = None
        self.offset = 0.0
        orientation, position = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
        if orientation is not None and position is not None and len(orientation) == 6 and len(position) == 3:
            row, column = np.array(orientation[:3], float), np.array(orientation[3:], float)
            normal = np.cross(row, column)
            if np.linalg.norm(normal) > 0:
                self.normal = normal / np.linalg.norm(normal)
                self.offset = float(self.normal @ np.array(position, float))

    def holds(self, points: np.ndarray) -> bool:
        """Whether every point (N x 3, mm) lies in this slice's plane."""
        if self.normal is None:
            return False
        return bool(np.all(np.abs(points @ self.normal - self.offset) <= PLANE_TOLERANCE_MM))


def check_rtstruct(rtstruct: Path, images: Iterable[Path]) -> list[str]:
    """What is wrong with ``rtstruct`` as a structure set drawn on ``images``; empty when nothing is."""
    try:
        ds = pydicom.dcmread(rtstruct)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a finding
        return [f"{rtstruct}: not readable as DICOM ({type(exc).__name__}: {exc})"]
    slices: dict[str, _Slice] = {}
    patient_ids: set[str] = set()
    for path in images:
        image = pydicom.dcmread(path, stop_before_pixels=True)
        slices[str(image.SOPInstanceUID)] = _Slice(image)
        patient_ids.add(str(image.get("PatientID", "")))
    problems: list[str] = []
    if not slices:
        return ["no images given to check the references against"]
    studies = {s.study for s in slices.values()}
    series = {s.series for s in slices.values()}
    frames = {s.frame for s in slices.values()}

    if ds.get("SOPClassUID") != RTStructureSetStorage:
        problems.append(f"SOP Class UID is {ds.get('SOPClassUID')}, not RT Structure Set Storage ({RTStructureSetStorage})")
    if ds.get("Modality") != "RTSTRUCT":
        problems.append(f"Modality is {ds.get('Modality')!r}, not 'RTSTRUCT'")
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("MediaStorageSOPInstanceUID") != ds.get("SOPInstanceUID"):
        problems.append("the file meta's Media Storage SOP Instance UID differs from the SOP Instance UID")
    if str(ds.get("PatientID", "")) not in patient_ids:
        problems.append("Patient ID differs from the images'")
    if str(ds.get("StudyInstanceUID", "")) not in studies:
        problems.append("Study Instance UID is not the images' study")

    # Referenced Frame of Reference > RT Referenced Study > RT Referenced Series > Contour Image
    referenced_images: set[str] = set()
    frame_items = ds.get("ReferencedFrameOfReferenceSequence", [])
    if not frame_items:
        problems.append("no Referenced Frame of Reference Sequence")
    if frame_items and not any(str(f.get("FrameOfReferenceUID", "")) in frames for f in frame_items):
        problems.append("no Referenced Frame of Reference UID equals the images' Frame of Reference UID")
    for f, frame in enumerate(frame_items, 1):
        if str(frame.get("FrameOfReferenceUID", "")) not in frames:
            problems.append(f"Referenced Frame of Reference {f}: Frame of Reference UID is not the images'")
        studies_items = frame.get("RTReferencedStudySequence", [])
        if not studies_items:
            problems.append(f"Referenced Frame of Reference {f}: no RT Referenced Study Sequence")
        for s, study in enumerate(studies_items, 1):
            where = f"RT Referenced Study {f}.{s}"
            if str(study.get("ReferencedSOPInstanceUID", "")) not in studies:
                problems.append(f"{where}: Referenced SOP Instance UID is not the images' study")
            series_items = study.get("RTReferencedSeriesSequence", [])
            if not series_items:
                problems.append(f"{where}: no RT Referenced Series Sequence")
            for r, item in enumerate(series_items, 1):
                if str(item.get("SeriesInstanceUID", "")) not in series:
                    problems.append(f"RT Referenced Series {f}.{s}.{r}: Series Instance UID is not one of the images' series")
                contour_images = item.get("ContourImageSequence", [])
                if not contour_images:
                    problems.append(f"RT Referenced Series {f}.{s}.{r}: no Contour Image Sequence")
                for c, ref in enumerate(contour_images, 1):
                    problems += _image_reference(ref, slices, f"Contour Image {f}.{s}.{r}.{c}")
                    referenced_images.add(str(ref.get("ReferencedSOPInstanceUID", "")))

    rois: dict[int, str] = {}
    for n, roi in enumerate(ds.get("StructureSetROISequence", []), 1):
        number = roi.get("ROINumber")
        name = str(roi.get("ROIName", "") or f"#{number}")
        if number is None:
            problems.append(f"Structure Set ROI {n}: no ROI Number")
            continue
        if int(number) in rois:
            problems.append(f"ROI {name}: ROI Number {number} used twice")
        rois[int(number)] = name
        if not roi.get("ROIName"):
            problems.append(f"ROI {number}: no ROI Name")
        if str(roi.get("ReferencedFrameOfReferenceUID", "")) not in frames:
            problems.append(f"ROI {name}: Referenced Frame of Reference UID is not the images'")
    if not rois:
        problems.append("no Structure Set ROI Sequence items")

    observed = {int(o.ReferencedROINumber): o for o in ds.get("RTROIObservationsSequence", [])
                if o.get("ReferencedROINumber") is not None}
    contoured = {int(c.ReferencedROINumber): c for c in ds.get("ROIContourSequence", [])
                 if c.get("ReferencedROINumber") is not None}
    for number, name in rois.items():
        observation = observed.get(number)
        if observation is None:
            problems.append(f"ROI {name}: no RT ROI Observations item")
        elif not observation.get("RTROIInterpretedType"):
            problems.append(f"ROI {name}: no RT ROI Interpreted Type")
        item = contoured.get(number)
        if item is None:
            problems.append(f"ROI {name}: no ROI Contour Sequence item")
            continue
        colour = item.get("ROIDisplayColor")
        if colour is None or len(colour) != 3 or not all(0 <= int(v) <= 255 for v in colour):
            problems.append(f"ROI {name}: no ROI Display Color of three values 0-255")
        for k, contour in enumerate(item.get("ContourSequence", []), 1):
            problems += _contour(contour, slices, referenced_images, f"ROI {name} contour {k}")
    for number in set(observed) - set(rois):
        problems.append(f"RT ROI Observations refer to ROI Number {number}, which the structure set lacks")
    for number in set(contoured) - set(rois):
        problems.append(f"ROI Contour Sequence refers to ROI Number {number}, which the structure set lacks")
    return problems


def _image_reference(ref: pydicom.Dataset, slices: dict[str, _Slice], where: str) -> list[str]:
    uid = str(ref.get("ReferencedSOPInstanceUID", ""))
    target = slices.get(uid)
    if target is None:
        return [f"{where}: Referenced SOP Instance UID {uid} is not one of the images"]
    if str(ref.get("ReferencedSOPClassUID", "")) != target.sop_class:
        return [f"{where}: Referenced SOP Class UID is not the image's SOP class"]
    return []


def _contour(contour: pydicom.Dataset, slices: dict[str, _Slice], referenced: set[str], where: str) -> list[str]:
    problems = []
    kind = contour.get("ContourGeometricType")
    if kind != "CLOSED_PLANAR":
        problems.append(f"{where}: Contour Geometric Type is {kind!r}, not CLOSED_PLANAR")
    data = contour.get("ContourData")
    if data is None or len(data) % 3:
        return problems + [f"{where}: Contour Data is missing or not a list of x, y, z triples"]
    points = np.asarray(data, dtype=float).reshape(-1, 3)
    if len(points) < 3:
        problems.append(f"{where}: {len(points)} points, fewer than 3")
    if contour.get("NumberOfContourPoints") is None or int(contour.NumberOfContourPoints) != len(points):
        problems.append(f"{where}: Number of Contour Points is {contour.get('NumberOfContourPoints')}, "
                        f"Contour Data holds {len(points)}")
    on = [uid for uid, s in slices.items() if uid in referenced and s.holds(points)]
    if not on:
        problems.append(f"{where}: its points (z {points[:, 2].min():g} to {points[:, 2].max():g}) lie on no "
                        "referenced slice")
    for c, ref in enumerate(contour.get("ContourImageSequence", []), 1):
        found = _image_reference(ref, slices, f"{where} image {c}")
        problems += found
        uid = str(ref.get("ReferencedSOPInstanceUID", ""))
        if not found and not slices[uid].holds(points):
            problems.append(f"{where} image {c}: the referenced slice is not the one the contour lies on")
    return problems


def dciodvfy_messages(path: Path) -> dict[str, list[str]] | None:
    """dicom3tools' ``dciodvfy`` on ``path``: its ``Error`` and ``Warning`` lines, or None when
    it is not installed."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        return None
    done = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    messages: dict[str, list[str]] = {"Error": [], "Warning": []}
    for line in (done.stdout + done.stderr).splitlines():
        match = re.match(r"^(Error|Warning)\b", line.strip())
        if match:
            messages[match.group(1)].append(line.strip())
    return messages


def dciodvfy(path: Path) -> list[str] | None:
    """The ``Error`` lines ``dciodvfy`` reports for ``path`` (warnings left out), or None when
    dicom3tools is not installed."""
    messages = dciodvfy_messages(path)
    return None if messages is None else messages["Error"]
