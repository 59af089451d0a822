"""Review previews (raddeploy_provider.previews) and the RT reader under them (raddeploy_provider.dicom.rt).

Pure tests, on the CT phantom (``raddeploy.phantom``, 12 slices of 200 x 256 pixels: a field of
view that is not square) and RT results made from its analytic truth (tests/rt_factory.py):
the PNGs open with Pillow, have the true aspect ratio, every pixel drawn in BODY's colour lies
on the phantom's body ellipse (within two picture pixels of it, mapped through
``previews.json``), the lungs' colours on the lungs, on their own side; the SEG's colours are
its CIELab values; ROI volumes match the analytic ones.

With the real Docker engine (``raddeploy/body-contour:latest``, as tests/test_body_contour.py
runs it): the same checks on the example model's own RT Structure Set and highdicom SEG.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from raddeploy import phantom as ph
from raddeploy_provider import previews
from raddeploy_provider.dicom import rt
from rt_factory import ROIS, SEG_LAB, ellipse_scale, lab16, phantom_rtstruct, phantom_seg

SLICES = 12
COLOURS = {name: colour for name, _, colour, _ in ROIS}
ELLIPSES = {"BODY": ph.BODY, "LUNG_L": ph.LUNG_L, "LUNG_R": ph.LUNG_R}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> ph.Phantom:
    return write(tmp_path_factory.mktemp("phantom") / "ct")


def write(folder: Path) -> ph.Phantom:
    return ph.write_phantom(folder, slices=SLICES, rows=200, columns=256)


@pytest.fixture(scope="module")
def rtstruct(made: ph.Phantom, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return phantom_rtstruct(made, tmp_path_factory.mktemp("rs") / "rs.dcm")


@pytest.fixture(scope="module")
def seg(made: ph.Phantom, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return phantom_seg(made, tmp_path_factory.mktemp("seg") / "seg.dcm")


def index_of(folder: Path) -> dict[str, dict]:
    return {entry["name"]: entry for entry in json.loads((folder / previews.INDEX).read_text())}


def coloured(picture: Image.Image, entry: dict, colour: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Patient coordinates (mm) of the centres of the image part's pixels drawn in ``colour``."""
    width, height = entry["image_size"]
    pixels = np.asarray(picture.convert("RGB"))[:height, :width]
    v, u = np.nonzero(np.all(pixels == colour, axis=-1))
    h, w = entry["horizontal"], entry["vertical"]
    along = h["from_mm"] + (u + 0.5) / width * (h["to_mm"] - h["from_mm"])
    down = w["from_mm"] + (v + 0.5) / height * (w["to_mm"] - w["from_mm"])
    return along, down


def ellipse_distance_mm(x: np.ndarray, y: np.ndarray, ellipse: tuple[float, float, float, float],
                        scale: float = 1.0) -> np.ndarray:
    """Distance (mm, first order: |f| / |grad f|) of points from an ellipse's outline."""
    cx, cy, a, b = ellipse
    a, b = a * scale, b * scale
    dx, dy = x - cx, y - cy
    f = (dx / a) ** 2 + (dy / b) ** 2 - 1.0
    grad = np.hypot(2 * dx / a ** 2, 2 * dy / b ** 2)
    return np.abs(f) / np.maximum(grad, 1e-9)


def mm_per_px(entry: dict) -> float:
    h = entry["horizontal"]
    return abs(h["to_mm"] - h["from_mm"]) / entry["image_size"][0]


def slice_index(made: ph.Phantom, z: float) -> int:
    return int(np.argmin(np.abs(np.array(made.slice_z) - z)))


# --- the RT reader -----------------------------------------------------------------------------

def test_rois_of_a_structure_set(made: ph.Phantom, rtstruct: Path) -> None:
    rois = rt.read_rois(rtstruct)
    assert [(r.number, r.name, r.colour, r.interpreted_type) for r in rois] == [
        (1, "BODY", (0, 255, 0), "EXTERNAL"), (2, "LUNG_L", (0, 128, 255), "ORGAN"), (3, "LUNG_R", (255, 160, 0), "ORGAN")]
    body = rois[0]
    assert sorted(body.contours) == sorted(made.slice_z)
    (polygon,) = body.contours[made.middle_z]
    assert polygon.shape[1] == 3 and np.allclose(polygon[:, 2], made.middle_z)
    assert rt.contour_area_mm2(polygon) == pytest.approx(made.true_areas["BODY"][made.middle_z], rel=0.002)


def test_volumes_match_the_phantom(made: ph.Phantom, rtstruct: Path) -> None:
    volumes = rt.roi_volumes_cm3(rtstruct, made.files)
    for name in ("BODY", "LUNG_L", "LUNG_R"):
        truth = sum(made.true_areas[name].values()) * made.thickness / 1000.0
        assert volumes[name] == pytest.approx(truth, rel=0.01), name


def test_holes_are_subtracted_and_uneven_spacing_is_measured() -> None:
    square = lambda side, z: np.array([[0, 0, z], [side, 0, z], [side, side, z], [0, side, z]], float)  # noqa: E731
    assert rt.slice_area_mm2([square(10, 0)]) == pytest.approx(100)
    inner = square(4, 0) + [3, 3, 0]
    assert rt.slice_area_mm2([square(10, 0), inner]) == pytest.approx(84)          # a hole
    assert rt.slice_area_mm2([square(10, 0), square(2, 0) + [20, 20, 0]]) == pytest.approx(104)  # two islands
    grid = rt.Grid(sop_uids=("a", "b", "c"), positions=np.array([[0, 0, 0], [0, 0, 2], [0, 0, 6]], float),
                   row_direction=np.array([1.0, 0, 0]), column_direction=np.array([0, 1.0, 0]), row_spacing=1,
                   column_spacing=1, rows=10, columns=10, modality="CT", frame_of_reference_uid="1")
    assert grid.slice_thickness().tolist() == [2.0, 3.0, 4.0]
    assert grid.slice_of(square(1, 2.0)) == 1 and grid.slice_of(square(1, 4.0)) is None


def test_cielab_colours() -> None:
    assert rt.cielab_to_rgb((100, 0, 0)) == (255, 255, 255)
    assert rt.cielab_to_rgb((0, 0, 0)) == (0, 0, 0)
    # sRGB's primaries in CIELab (D50, Bradford): what a planning system's red, green, blue are
    for lab, rgb in (((54.29, 80.80, 69.89), (255, 0, 0)), ((87.82, -79.27, 80.99), (0, 255, 0)),
                     ((29.57, 68.30, -112.03), (0, 0, 255))):
        assert np.abs(np.subtract(rt.cielab_to_rgb(lab), rgb)).max() <= 2, lab
    assert rt.dicom_cielab_to_rgb([65535, 32896, 32896]) == (255, 255, 255)  # L 100, a = b = 0


def test_segments_on_the_image_grid(made: ph.Phantom, seg: Path) -> None:
    segments = rt.read_segments(seg, rt.read_grid(made.files))
    assert [s.name for s in segments] == ["BODY", "LUNG_L", "LUNG_R"]
    assert [s.colour for s in segments] == [rt.dicom_cielab_to_rgb(lab16(SEG_LAB[s.name])) for s in segments]
    k = SLICES // 2
    for s in segments:
        assert s.mask.shape == (SLICES, made.rows, made.columns)
        assert s.mask[k].sum() * made.spacing ** 2 == pytest.approx(made.pixel_areas[s.name][made.slice_z[k]])
    # a frame offset by whole pixels lands shifted: a SEG cropped to its segment's box (other writers)
    ds = pydicom.dcmread(seg)
    count = int(ds.NumberOfFrames)
    frames = np.unpackbits(np.frombuffer(ds.PixelData, np.uint8), bitorder="little")[:count * made.rows * made.columns]
    frames = frames.reshape(count, made.rows, made.columns)
    cropped = frames[:, 10:, 20:]
    ds.Rows, ds.Columns = cropped.shape[1:]
    from pydicom.pixels import pack_bits
    ds.PixelData = pack_bits(cropped)
    for item in ds.PerFrameFunctionalGroupsSequence:
        position = item.PlanePositionSequence[0]
        x, y, z = (float(v) for v in position.ImagePositionPatient)
        position.ImagePositionPatient = [x + 20 * made.spacing, y + 10 * made.spacing, z]
    shifted = rt.read_segments(ds, rt.read_grid(made.files))
    for a, b in zip(segments, shifted):
        assert np.array_equal(a.mask[:, 10:, 20:], b.mask[:, 10:, 20:]) and not b.mask[:, :10, :].any()
    # a SEG on a coarser grid (every other pixel, twice the spacing): each image pixel takes the nearest SEG pixel
    ds = pydicom.dcmread(seg)
    coarse = frames[:, ::2, ::2]
    ds.Rows, ds.Columns = coarse.shape[1:]
    ds.PixelData = pack_bits(coarse)
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [2 * made.spacing, 2 * made.spacing]
    resampled = rt.read_segments(ds, rt.read_grid(made.files))
    for a, b in zip(segments, resampled):
        assert b.mask.sum() == pytest.approx(a.mask.sum(), rel=0.03), a.name
        assert np.mean(a.mask != b.mask) < 0.01, a.name


# --- the pictures ------------------------------------------------------------------------------

def check_pictures(out: Path, made: ph.Phantom, colours: dict[str, tuple[int, int, int]], *, tolerance_px: float,
                   names: tuple[str, ...] = ("BODY", "LUNG_L", "LUNG_R")) -> dict[str, dict]:
    """The checks every set of previews of the phantom passes; returns previews.json by name."""
    index = index_of(out)
    assert sorted(index) == sorted(["axial_1.png", "axial_2.png", "axial_3.png", "axial_4.png", "axial_5.png",
                                    "coronal.png", "sagittal.png"])
    axial = [index[f"axial_{n}.png"] for n in range(1, 6)]
    zs = [entry["at"]["mm"] for entry in axial]
    assert zs == sorted(zs, reverse=True) and len(set(zs)) == 5, "five slices, most superior first"
    assert min(zs) > made.slice_z[0] and max(zs) < made.slice_z[-1], "spread inside the contoured range"
    fov_x, fov_y, fov_z = made.columns * made.spacing, made.rows * made.spacing, SLICES * made.thickness
    for name, entry in index.items():
        picture = Image.open(out / name)
        assert picture.format == "PNG" and picture.mode == "RGB"
        width, height = entry["image_size"]
        along, down = {"axial": (fov_x, fov_y), "coronal": (fov_x, fov_z), "sagittal": (fov_y, fov_z)}[entry["plane"]]
        # true aspect ratio, the longer side SIZE; the legend strip below the image part
        assert max(width, height) == previews.SIZE and picture.width == width
        assert height == pytest.approx(width * down / along, abs=1), name
        assert picture.height > height + 20
        legend = np.asarray(picture)[height:]
        for roi in entry["rois"]:
            assert tuple(roi["colour"]) == tuple(colours[roi["name"]]), (name, roi)
            assert np.all(legend == roi["colour"], axis=-1).sum() >= 100, f"{name}: a swatch of {roi['name']}"
        assert np.asarray(picture)[height:height + 2].max() == 0, "the legend starts below the image part"
    for entry in axial:
        picture = Image.open(out / entry["name"])
        k = slice_index(made, entry["at"]["mm"])
        assert [roi["name"] for roi in entry["rois"]] == list(names)
        for name in names:
            x, y = coloured(picture, entry, colours[name])
            scale = ellipse_scale(name, k, SLICES)
            cx, cy, a, b = ELLIPSES[name]
            perimeter_px = math.pi * (a + b) * scale / mm_per_px(entry)
            assert len(x) > 0.8 * perimeter_px, f"{name} on {entry['name']}: outline drawn ({len(x)} px)"
            distance_px = ellipse_distance_mm(x, y, ELLIPSES[name], scale) / mm_per_px(entry)
            assert distance_px.max() <= tolerance_px, (name, entry["name"], float(distance_px.max()))
            if name == "LUNG_L":
                assert x.min() > 0, "patient left (+x) on the picture's right: radiological display"
            if name == "LUNG_R":
                assert x.max() < 0
    coronal = index["coronal.png"]
    assert coronal["horizontal"]["axis"] == "x" and coronal["vertical"]["axis"] == "z"
    assert abs(coronal["at"]["mm"]) <= made.spacing and abs(index["sagittal.png"]["at"]["mm"]) <= made.spacing
    # BODY on the coronal: its sides (|x| = 150 mm) and the first and last slice's edges
    x, z = coloured(Image.open(out / "coronal.png"), coronal, colours["BODY"])
    tolerance_mm = tolerance_px * mm_per_px(coronal)
    top, bottom = coronal["vertical"]["from_mm"], coronal["vertical"]["to_mm"]
    on_side = np.abs(np.abs(x) - ph.BODY[2]) <= tolerance_mm
    on_end = (np.minimum(np.abs(z - top), np.abs(z - bottom)) <= tolerance_mm) & (np.abs(x) <= ph.BODY[2] + tolerance_mm)
    assert len(x) and np.all(on_side | on_end) and on_side.sum() > 2 * SLICES * made.thickness / mm_per_px(coronal)
    lung_x, _ = coloured(Image.open(out / "coronal.png"), coronal, colours["LUNG_L"])
    assert len(lung_x) and lung_x.min() > 0
    return index


def test_previews_of_a_structure_set(made: ph.Phantom, rtstruct: Path, tmp_path: Path) -> None:
    written = previews.render_previews(rtstruct, made.files, tmp_path / "previews")
    assert [p.name for p in written] == [f"axial_{n}.png" for n in range(1, 6)] + ["coronal.png", "sagittal.png"]
    # a 2 px line on the ellipse polygon: within its width and half a pixel of rounding
    index = check_pictures(tmp_path / "previews", made, COLOURS, tolerance_px=previews.LINE + 0.5)
    assert {entry["window"] for entry in index.values()} == {"W1500/L-600"}, "lungs shown: the lung window"
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == sorted([p.name for p in written] + [previews.INDEX])
    for path in written:  # no patient name or ID in the files (nothing but pixels is written)
        data = path.read_bytes()
        assert made.patient_id.encode() not in data and b"PHANTOM" not in data


def test_previews_of_a_segmentation(made: ph.Phantom, seg: Path, tmp_path: Path) -> None:
    previews.render_previews(seg, made.files, tmp_path)
    colours = {name: rt.dicom_cielab_to_rgb(lab16(SEG_LAB[name])) for name in SEG_LAB}
    # mask edges: the 2 px inner edge of the pixels whose centres are inside (half an image pixel off, at most)
    check_pictures(tmp_path, made, colours, tolerance_px=previews.LINE + 0.5 + previews.SIZE / made.columns / 2)


def test_soft_tissue_window_without_an_air_filled_roi(made: ph.Phantom, tmp_path: Path) -> None:
    ds = pydicom.dcmread(phantom_rtstruct(made, tmp_path / "rs.dcm"))
    ds.StructureSetROISequence = ds.StructureSetROISequence[:1]  # BODY alone
    ds.ROIContourSequence, ds.RTROIObservationsSequence = ds.ROIContourSequence[:1], ds.RTROIObservationsSequence[:1]
    ds.save_as(tmp_path / "body.dcm", enforce_file_format=True)
    previews.render_previews(tmp_path / "body.dcm", made.files, tmp_path / "out", axial=3)
    index = index_of(tmp_path / "out")
    assert sorted(index) == ["axial_1.png", "axial_2.png", "axial_3.png", "coronal.png", "sagittal.png"]
    assert {entry["window"] for entry in index.values()} == {"W400/L40"}


def test_rendering_again_replaces_the_pictures(made: ph.Phantom, rtstruct: Path, tmp_path: Path) -> None:
    previews.render_previews(rtstruct, made.files, tmp_path)
    (tmp_path / "notes.txt").write_text("kept")
    previews.render_previews(rtstruct, made.files, tmp_path, axial=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "axial_1.png", "axial_2.png", "coronal.png", "notes.txt", previews.INDEX, "sagittal.png"]


def test_feet_first_images_are_shown_the_same_way(tmp_path: Path) -> None:
    """Columns running along -x and slices stored from head to feet: the same picture (the
    display frame is the patient's, not the file order)."""
    made = ph.write_phantom(tmp_path / "ct", slices=6, rows=200, columns=256)
    rs = phantom_rtstruct(made, tmp_path / "rs.dcm")
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    for path in made.files:
        ds = pydicom.dcmread(path)
        x0, y0, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-x0, y0, z]
        ds.PixelData = ds.pixel_array[:, ::-1].copy().tobytes()
        ds.save_as(flipped / path.name, enforce_file_format=True)
    previews.render_previews(rs, made.files, tmp_path / "a", axial=3)
    previews.render_previews(rs, sorted(flipped.iterdir(), reverse=True), tmp_path / "b", axial=3)
    for name in ("axial_1.png", "axial_2.png", "coronal.png", "sagittal.png"):
        a, b = (np.asarray(Image.open(tmp_path / side / name), dtype=int) for side in "ab")
        assert a.shape == b.shape
        assert np.mean(np.abs(a - b) > 8) < 0.01, name  # bilinear scaling of mirrored pixels differs at edges


def test_what_cannot_be_pictured(made: ph.Phantom, tmp_path: Path) -> None:
    (tmp_path / "x.dcm").write_bytes(b"not DICOM")
    with pytest.raises(previews.PreviewError, match="not readable as DICOM"):
        previews.render_previews(tmp_path / "x.dcm", made.files, tmp_path / "out")
    with pytest.raises(previews.PreviewError, match="neither an RT Structure Set nor a Segmentation"):
        previews.render_previews(made.files[0], made.files, tmp_path / "out")
    sagittal = tmp_path / "sag"
    sagittal.mkdir()
    ds = pydicom.dcmread(made.files[0])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(sagittal / "1.dcm", enforce_file_format=True)
    with pytest.raises(previews.PreviewError, match="not axial"):
        previews.render_previews(phantom_rtstruct(made, tmp_path / "rs.dcm"), [sagittal / "1.dcm"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the example model's own output (Docker) ---------------------------------------------------

@pytest.fixture(scope="module")
def model_output(tmp_path_factory: pytest.TempPathFactory, docker_ready: None) -> tuple[ph.Phantom, Path, Path]:
    """The body-contour image run on a phantom with BODY_CONTOUR_SEG=1: (phantom, RTSTRUCT, SEG)."""
    from test_body_contour import IMAGE, _run_model

    probe = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(f"the image {IMAGE} is missing: run `make images`; docker said: {probe.stderr.strip()}")
    root = tmp_path_factory.mktemp("model")
    made = write(root / "ct")
    done = _run_model(made.folder, root / "out", BODY_CONTOUR_SEG="1")
    assert done.returncode == 0, done.stdout + done.stderr
    (rs,), (seg,) = sorted((root / "out").glob("RS_*.dcm")), sorted((root / "out").glob("SEG_*.dcm"))
    return made, rs, seg


@pytest.mark.integration
def test_previews_of_the_example_models_structure_set(model_output, tmp_path: Path) -> None:
    made, rs, _ = model_output
    previews.render_previews(rs, made.files, tmp_path)
    # the model's outline runs between its inside and outside pixel centres (half an image pixel
    # from the ellipse at most), drawn 2 px wide
    check_pictures(tmp_path, made, COLOURS, tolerance_px=previews.LINE + 0.5 + previews.SIZE / made.columns / 2)
    volumes = rt.roi_volumes_cm3(rs, made.files)
    for name in ("BODY", "LUNG_L", "LUNG_R"):
        truth = sum(made.true_areas[name].values()) * made.thickness / 1000.0
        assert volumes[name] == pytest.approx(truth, rel=0.01), name


@pytest.mark.integration
def test_previews_of_the_example_models_segmentation(model_output, tmp_path: Path) -> None:
    made, _, seg = model_output
    segments = rt.read_segments(seg, rt.read_grid(made.files))
    assert [s.name for s in segments] == ["BODY", "LUNG_L", "LUNG_R"]
    k = SLICES // 2
    for s in segments:
        assert s.mask[k].sum() * made.spacing ** 2 == pytest.approx(made.pixel_areas[s.name][made.slice_z[k]], rel=0.01)
    previews.render_previews(seg, made.files, tmp_path)
    colours = {s.name: s.colour or previews.PALETTE[n] for n, s in enumerate(segments)}
    check_pictures(tmp_path, made, colours, tolerance_px=previews.LINE + 0.5 + previews.SIZE / made.columns / 2)
