"""Example model: write a thresholded copy of every input CT image as a new derived series.

Contract (the same for every model a flow runs): DICOM files in ``/input`` (read-only),
results written to ``/output``. Environment: ``THRESHOLD_HU`` (default 0) and
``RADDEPLOY_RUN_ID``. Works with pydicom 2.3 (Debian) and 3.x.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

INPUT = Path(os.environ.get("MODEL_INPUT", "/input"))
OUTPUT = Path(os.environ.get("MODEL_OUTPUT", "/output"))


def main() -> int:
    threshold = float(os.environ.get("THRESHOLD_HU", "0"))
    files = sorted(p for p in INPUT.rglob("*") if p.is_file())
    if not files:
        print(f"no input files in {INPUT}", file=sys.stderr)
        return 2
    new_series = generate_uid()
    written = 0
    for path in files:
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            continue
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        source = pydicom.Dataset()
        source.ReferencedSOPClassUID = ds.SOPClassUID
        source.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        ds.SourceImageSequence = [source]
        hu = ds.pixel_array * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
        mask = (hu > threshold).astype(ds.pixel_array.dtype)
        ds.PixelData = mask.tobytes()
        ds.SeriesInstanceUID = new_series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.SeriesDescription = f"Threshold > {threshold:g} HU"
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.SeriesNumber = int(getattr(ds, "SeriesNumber", 0) or 0) + 1000
        ds.save_as(OUTPUT / f"{ds.SOPInstanceUID}.dcm")
        written += 1
    print(f"wrote {written} instances of series {new_series}")
    return 0 if written else 3


if __name__ == "__main__":
    sys.exit(main())
