"""The lean header walker reads what pydicom reads, on every sample file pydicom ships.

Which samples it reads and which it declines (and why) is written down in ``DECLINED``: a
change in what the walker covers fails here, and is then a decision, not an accident.
"""

from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path
from unittest import mock

import pydicom
import pytest

from raddeploy_provider.store import StoreError, header, header_walk
from raddeploy_provider.store.header_walk import NeedMore, Unsupported, walk

SAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files", "**", "*.dcm"),
                           recursive=True))

BIG_ENDIAN = (Unsupported, "transfer syntax 1.2.840.10008.1.2.2")
NO_PREFIX = (Unsupported, "no DICM prefix")
CUT_OR_MISREAD = (NeedMore, "")  # walked to the end of the bytes with an element still unfinished

#: Every sample file the walker declines (read_header reads it with pydicom instead), with the
#: exception its last walk raised: (type, message). Every other sample it must read, and its
#: tags must be pydicom's.
DECLINED: dict[str, tuple[type[Exception], str]] = {
    # Explicit VR Big Endian: the walker reads little endian only.
    "ExplVR_BigEnd.dcm": BIG_ENDIAN,
    "MR_small_bigendian.dcm": BIG_ENDIAN,
    "MR_small_expb.dcm": BIG_ENDIAN,
    "SC_rgb_small_odd_big_endian.dcm": BIG_ENDIAN,
    "liver_expb_1frame.dcm": BIG_ENDIAN,
    "rtdose_expb.dcm": BIG_ENDIAN,
    "rtdose_expb_1frame.dcm": BIG_ENDIAN,
    # Deflated Explicit VR Little Endian: the dataset is compressed.
    "image_dfl.dcm": (Unsupported, "transfer syntax 1.2.840.10008.1.2.1.99"),
    # A character set other than the default, Latin-1 or UTF-8 (ISO 2022 Japanese).
    "J2K_pixelrep_mismatch.dcm": (Unsupported, r"character set 'ISO 2022 IR 13\\ISO 2022 IR 87'"),
    # Not a Part 10 file: a bare dataset without preamble and "DICM" (pydicom refuses them too) ...
    "ExplVR_BigEndNoMeta.dcm": NO_PREFIX,
    "ExplVR_LitEndNoMeta.dcm": NO_PREFIX,
    "no_meta.dcm": NO_PREFIX,
    "rtstruct.dcm": NO_PREFIX,
    # ... or a File Meta group without its group length.
    "no_meta_group_length.dcm": (Unsupported, "no File Meta group length"),
    # The dataset is implicit VR although the meta says an explicit JPEG syntax, or says no
    # syntax at all (taken as explicit): read as explicit, an element runs past the file's end.
    "SC_rgb_jpeg.dcm": CUT_OR_MISREAD,
    "meta_missing_tsyntax.dcm": CUT_OR_MISREAD,
    # Cut short inside an element (the store then refuses it as cut: test_store_header.py).
    "rtplan_truncated.dcm": CUT_OR_MISREAD,
}
WALKED = [p for p in SAMPLES if os.path.basename(p) not in DECLINED]


def readable_by_pydicom(path: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pydicom.dcmread(path, stop_before_pixels=True)
        return True
    except Exception:
        return False


def walk_file(path: str) -> header_walk.Walked | tuple[type[Exception], str]:
    """What read_header's walker step makes of the file: the Walked, or (type, message) of the
    exception of the last walk, the one it gave the file up to pydicom on."""
    raised: list[Exception] = []

    def recording(*args, **kwargs):
        try:
            return walk(*args, **kwargs)
        except Exception as exc:
            raised.append(exc)
            raise

    with mock.patch.object(header_walk, "walk", recording), open(path, "rb") as fh:
        walked = header._walk(fh, os.path.getsize(path))
    if walked is not None:
        return walked
    assert raised, "declined without an exception from the walker"
    return type(raised[-1]), str(raised[-1])


def walkable(path: str) -> bool:
    """Files the walker reads itself; the others (character sets, big endian, deflate) go to pydicom."""
    return isinstance(walk_file(path), header_walk.Walked)


def test_the_walker_reads_every_sample_but_the_declined_ones() -> None:
    def outcome(path: str):
        result = walk_file(path)
        return "walked" if isinstance(result, header_walk.Walked) else result

    names = [os.path.basename(p) for p in SAMPLES]
    assert len(set(names)) == len(names), "two samples of one name: key DECLINED by relative path"
    assert set(DECLINED) <= set(names), f"declined files pydicom no longer ships: {set(DECLINED) - set(names)}"
    assert {os.path.basename(p): outcome(p) for p in SAMPLES} == {
        name: DECLINED.get(name, "walked") for name in names}


@pytest.mark.parametrize("path", WALKED, ids=os.path.basename)
def test_walker_agrees_with_pydicom(path: str) -> None:
    walked = walk_file(path)
    assert isinstance(walked, header_walk.Walked), f"declined: {walked}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = header._pydicom_tags(pydicom.dcmread(path, stop_before_pixels=True))
    assert walked.tags == expected


def test_most_samples_take_the_fast_path() -> None:
    fast = sum(walkable(p) for p in SAMPLES)
    assert fast >= len(SAMPLES) * 0.6, f"only {fast} of {len(SAMPLES)} sample files walked"


@pytest.mark.parametrize("path", [p for p in SAMPLES if os.path.basename(p) in DECLINED and readable_by_pydicom(p)],
                         ids=os.path.basename)
def test_files_the_walker_declines_are_read_by_pydicom(path: str) -> None:
    assert walk_file(path) == DECLINED[os.path.basename(path)]
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
