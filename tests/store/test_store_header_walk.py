"""The lean header walker reads what pydicom reads, on every sample file pydicom ships."""

from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path

import pydicom
import pytest

from raddeploy_provider.store import StoreError, header
from raddeploy_provider.store.header_walk import NeedMore, Unsupported, walk

SAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files", "**", "*.dcm"),
                           recursive=True))


def readable_by_pydicom(path: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pydicom.dcmread(path, stop_before_pixels=True)
        return True
    except Exception:
        return False


def walkable(path: str) -> bool:
    """Files the walker reads itself; the others (character sets, big endian, deflate) go to pydicom."""
    with open(path, "rb") as fh:
        return header._walk(fh, os.path.getsize(path)) is not None


@pytest.mark.parametrize("path", [p for p in SAMPLES if readable_by_pydicom(p) and walkable(p)],
                         ids=os.path.basename)
def test_walker_agrees_with_pydicom(path: str) -> None:
    with open(path, "rb") as fh:
        walked = header._walk(fh, os.path.getsize(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = header._pydicom_tags(pydicom.dcmread(path, stop_before_pixels=True))
    assert walked.tags == expected


def test_most_samples_take_the_fast_path() -> None:
    fast = sum(walkable(p) for p in SAMPLES)
    assert fast >= len(SAMPLES) * 0.6, f"only {fast} of {len(SAMPLES)} sample files walked"


@pytest.mark.parametrize("path", [p for p in SAMPLES if readable_by_pydicom(p) and not walkable(p)],
                         ids=os.path.basename)
def test_files_the_walker_declines_are_read_by_pydicom(path: str) -> None:
    try:
        result = header.read_header(Path(path))
    except Exception as exc:  # pydicom's own verdict on a sample (e.g. no UIDs): a store error, not a crash
        assert isinstance(exc, (StoreError, ValueError)), repr(exc)
    else:
        assert result.tags.get("SOPInstanceUID") == result.sop_uid


def test_short_buffer_asks_for_more_and_garbage_is_unsupported() -> None:
    raw = open(pydicom.data.get_testdata_file("CT_small.dcm"), "rb").read()
    with pytest.raises(NeedMore):
        walk(raw[:400])
    with pytest.raises(Unsupported):
        walk(b"\x00" * 200)
