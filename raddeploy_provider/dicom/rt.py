"""Reading RT results: an RT Structure Set's ROIs and contours, a Segmentation's segments, and
the image series they were drawn on (pydicom and numpy only, no Airflow).

- :func:`read_rois`: each ROI of an RTSTRUCT (number, name, display colour, RT ROI Interpreted
  Type) with its contours as polygons in patient coordinates (mm), grouped by slice z.
- :func:`contour_area_mm2`, :func:`slice_area_mm2`, :func:`roi_areas`, :func:`roi_volumes_cm3`:
  what the contours measure (the one home of these sums; ``raddeploy.rtcheck`` imports them).
- :func:`read_grid`, :func:`read_volume`: an image series' pixel grid (slices sorted along their
  normal) and its pixel values in modality units (CT: HU).
- :func:`read_segments`: each segment of a binary (or fractional) SEG, from highdicom or any
  other writer, as a mask on an image grid, with its label and recommended display colour
  (:func:`cielab_to_rgb`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from functools import cached_property
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RTStructureSetStorage, SegmentationStorage

#: How z keys of contours are rounded (decimals of a mm): the slice a contour lies on.
Z_DECIMALS = 2

_NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class RTReadError(ValueError):
    """A file is not the RT object (or image series) it should be; the message says what is wrong."""


# -- RT Structure Set ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Roi:
    """One ROI of an RT Structure Set.

    ``colour`` is the ROI Display Color (RGB 0-255) or None; ``interpreted_type`` the RT ROI
    Interpreted Type ("" without an observation). ``contours[z]`` are the closed planar
    contours on the slice at ``z`` (mm, rounded to 0.01), each an N x 3 array of points in
    patient coordinates (mm).
    """

    number: int
    name: str
    colour: tuple[int, int, int] | None
    interpreted_type: str
    contours: dict[float, list[np.ndarray]]


def _dataset(source: Path | Dataset) -> Dataset:
    return source if isinstance(source, Dataset) else pydicom.dcmread(source)


def read_rois(rtstruct: Path | Dataset) -> list[Roi]:
    """The ROIs of an RT Structure Set, in the order of its Structure Set ROI Sequence.

    Only CLOSED_PLANAR contours of 3 or more points are kept (POINT and OPEN_* ones enclose no
    area). An ROI Contour item whose ROI the structure set does not declare becomes an ROI
    named ``#<number>``.
    """
    ds = _dataset(rtstruct)
    if ds.get("SOPClassUID") not in (RTStructureSetStorage, None) or ds.get("Modality", "RTSTRUCT") != "RTSTRUCT":
        raise RTReadError(f"not an RT Structure Set (SOP Class {ds.get('SOPClassUID')}, Modality {ds.get('Modality')})")
    declared = [(int(roi.ROINumber), str(roi.get("ROIName", "") or f"#{roi.ROINumber}"))
                for roi in ds.get("StructureSetROISequence", []) if roi.get("ROINumber") is not None]
    kinds = {int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", "") or "")
             for o in ds.get("RTROIObservationsSequence", []) if o.get("ReferencedROINumber") is not None}
    colours: dict[int, tuple[int, int, int] | None] = {}
    contours: dict[int, dict[float, list[np.ndarray]]] = {}
    for item in ds.get("ROIContourSequence", []):
        if item.get("ReferencedROINumber") is None:
            continue
        number = int(item.ReferencedROINumber)
        colour = item.get("ROIDisplayColor")
        colours[number] = (tuple(int(v) for v in colour)  # type: ignore[assignment]
                           if colour is not None and len(colour) == 3 else None)
        per_slice = contours.setdefault(number, {})
        for contour in item.get("ContourSequence", []):
            if contour.get("ContourGeometricType", "CLOSED_PLANAR") != "CLOSED_PLANAR":
                continue
            points = _contour_points(contour)
            if points is None:
                continue
            per_slice.setdefault(round(float(points[:, 2].mean()), Z_DECIMALS), []).append(points)
    numbers = [number for number, _ in declared]
    names = dict(declared)
    names.update({n: f"#{n}" for n in contours if n not in names})
    return [Roi(number=n, name=names[n], colour=colours.get(n), interpreted_type=kinds.get(n, ""),
                contours=contours.get(n, {}))
            for n in numbers + [n for n in contours if n not in numbers]]


_CONTOUR_DATA = 0x30060050


def _contour_points(contour: Dataset) -> np.ndarray | None:
    """A contour's Contour Data as N x 3 points (mm), or None when it holds fewer than 3 triples.

    Read from the element's raw bytes when the file was read from disk: a structure set of
    300 slices holds millions of decimal strings, which pydicom's DS values parse ~10x slower."""
    raw = contour.get_item(_CONTOUR_DATA) if _CONTOUR_DATA in contour else None
    if raw is None:
        return None
    value = raw.value
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).replace(b"\\", b" ").strip(b" \x00")
        data = np.array(text.split(), dtype=float) if text else np.zeros(0)
    else:
        data = np.asarray(contour.ContourData if value is not None else [], dtype=float).ravel()
    if len(data) % 3 or len(data) < 9:
        return None
    return data.reshape(-1, 3)


def contour_area_mm2(points: Sequence[float] | np.ndarray) -> float:
    """The area (mm²) of a closed planar polygon: ``ContourData`` (x1, y1, z1, x2, ...) or N x 3
    points. The shoelace formula in 3D (half the norm of the summed cross products), so it holds
    for a contour in any plane, not only an axial one."""
    p = np.asarray(points, dtype=float).reshape(-1, 3)
    if len(p) < 3:
        return 0.0
    return float(np.linalg.norm(np.cross(p, np.roll(p, -1, axis=0)).sum(axis=0)) / 2.0)


def _plane_axes(points: np.ndarray) -> tuple[int, int]:
    """The two patient axes of the plane a polygon lies in best (its normal's largest component dropped)."""
    normal = np.abs(np.cross(points, np.roll(points, -1, axis=0)).sum(axis=0))
    drop = int(normal.argmax()) if normal.any() else 2
    return tuple(a for a in range(3) if a != drop)  # type: ignore[return-value]


def point_in_polygon(point: np.ndarray, polygon: np.ndarray) -> bool:
    """Whether the 2D ``point`` lies inside the 2D ``polygon`` (N x 2), by the even-odd rule."""
    x, y = float(point[0]), float(point[1])
    px, py = polygon[:, 0], polygon[:, 1]
    qx, qy = np.roll(px, -1), np.roll(py, -1)
    crosses = (py > y) != (qy > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        at = px + (y - py) * (qx - px) / (qy - py)
    return bool(np.count_nonzero(crosses & (x < at)) % 2)


def slice_area_mm2(polygons: Sequence[np.ndarray]) -> float:
    """The area (mm²) one ROI covers on one slice: its contours there, a contour lying inside an
    odd number of the others counted as a hole (subtracted), as most planning systems draw
    holes (the even-odd rule)."""
    polygons = [np.asarray(p, dtype=float).reshape(-1, 3) for p in polygons]
    if len(polygons) == 1:
        return contour_area_mm2(polygons[0])
    total = 0.0
    for i, polygon in enumerate(polygons):
        axes = _plane_axes(polygon)
        depth = sum(point_in_polygon(polygon[0, axes], other[:, axes])
                    for j, other in enumerate(polygons) if j != i and len(other) >= 3)
        total += contour_area_mm2(polygon) * (-1.0 if depth % 2 else 1.0)
    return max(total, 0.0)


def roi_areas(rtstruct: Path | Dataset) -> dict[str, dict[float, float]]:
    """Each ROI's area (mm²) per slice: ``{ROIName: {z: area}}``, z the contours' mean z rounded
    to 0.01 mm; several contours of one ROI on one slice by :func:`slice_area_mm2` (holes
    subtracted). ROIs of one name are merged."""
    areas: dict[str, dict[float, float]] = {}
    for roi in read_rois(rtstruct):
        per_slice = areas.setdefault(roi.name, {})
        for z, polygons in roi.contours.items():
            per_slice[z] = per_slice.get(z, 0.0) + slice_area_mm2(polygons)
    return areas


def roi_volumes_cm3(rtstruct: Path | Dataset, images: Iterable[Path] | Grid) -> dict[str, float]:
    """Each ROI's volume (cm³): the sum over its slices of the area it covers there
    (:func:`slice_area_mm2`) times that slice's thickness on the referenced images' grid.

    A slice's thickness is the distance halfway to each neighbouring slice (the mean of the two
    gaps; at the first and last slice, the one gap): the slice spacing, so a series with
    uneven spacing is measured right too. A contour on no slice of the grid (more than half a
    gap away from every one) gets the series' median spacing. ROIs of one name are added up.
    """
    grid = images if isinstance(images, Grid) else read_grid(images)
    thickness = grid.slice_thickness()
    volumes: dict[str, float] = {}
    for roi in read_rois(rtstruct):
        total = 0.0
        for polygons in roi.contours.values():
            k = grid.slice_of(polygons[0])
            total += slice_area_mm2(polygons) * (float(thickness[k]) if k is not None else grid.median_spacing)
        volumes[roi.name] = volumes.get(roi.name, 0.0) + total / 1000.0
    return volumes


# -- image series -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """The pixel grid of one image series, its slices sorted along their normal.

    ``positions[k]`` is the ImagePositionPatient (centre of the first pixel) of slice ``k``;
    ``row_direction`` the patient direction along a row (increasing column index),
    ``column_direction`` down a column (increasing row index), ``normal`` their cross product;
    ``row_spacing`` is the distance between rows and ``column_spacing`` between columns (mm,
    PixelSpacing's two values). ``offsets[k]`` is slice ``k``'s position along the normal.
    """

    sop_uids: tuple[str, ...]
    positions: np.ndarray
    row_direction: np.ndarray
    column_direction: np.ndarray
    row_spacing: float
    column_spacing: float
    rows: int
    columns: int
    modality: str
    frame_of_reference_uid: str

    @cached_property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)

    @cached_property
    def offsets(self) -> np.ndarray:
        return self.positions @ self.normal

    @property
    def slices(self) -> int:
        return len(self.sop_uids)

    @cached_property
    def median_spacing(self) -> float:
        gaps = np.diff(self.offsets)
        return float(np.median(gaps)) if len(gaps) else 1.0

    def slice_thickness(self) -> np.ndarray:
        """Each slice's thickness (mm): half the gap to each neighbour, added (one gap at the ends)."""
        gaps = np.diff(self.offsets)
        if len(gaps) == 0:
            return np.array([1.0])
        before = np.concatenate([[gaps[0]], gaps])
        after = np.concatenate([gaps, [gaps[-1]]])
        return (before + after) / 2.0

    def slice_of(self, points: np.ndarray) -> int | None:
        """The slice the points (N x 3, mm) lie on: the nearest one along the normal, if it is
        less than half a gap away; None otherwise."""
        offset = float(np.mean(np.asarray(points, dtype=float).reshape(-1, 3) @ self.normal))
        offsets = self.offsets
        k = int(np.abs(offsets - offset).argmin())
        return k if abs(offsets[k] - offset) <= max(self.median_spacing, 1e-3) / 2.0 + 1e-3 else None

    def to_pixel(self, points: np.ndarray, k: int) -> np.ndarray:
        """Points (N x 3, mm) as continuous (row, column) pixel coordinates of slice ``k``
        (pixel centres at integers)."""
        d = np.asarray(points, dtype=float).reshape(-1, 3) - self.positions[k]
        return np.stack([d @ self.column_direction / self.row_spacing, d @ self.row_direction / self.column_spacing],
                        axis=1)


@dataclass(frozen=True)
class Volume:
    """An image series' pixels: ``frames[k]`` the stored values of slice ``k`` (rows x columns;
    views into the files' bytes where they could be), and ``values(...)`` in modality units
    (Rescale Slope and Intercept of each slice; CT: HU)."""

    grid: Grid
    frames: Sequence[np.ndarray]
    slope: np.ndarray
    intercept: np.ndarray

    def values(self, k: int | slice | np.ndarray = slice(None), rows: int | slice = slice(None),
               columns: int | slice = slice(None)) -> np.ndarray:
        """The stored values ``[k, rows, columns]`` rescaled (float32); the slice axis first
        unless ``k`` is one slice."""
        ks = np.arange(self.grid.slices)[k]
        if np.ndim(ks) == 0:
            return self.frames[int(ks)][rows, columns].astype(np.float32) * np.float32(self.slope[ks]) \
                + np.float32(self.intercept[ks])
        data = np.stack([self.frames[j][rows, columns] for j in ks]).astype(np.float32)
        shape = (-1,) + (1,) * (data.ndim - 1)
        slope, intercept = self.slope[ks].astype(np.float32), self.intercept[ks].astype(np.float32)
        return data * slope.reshape(shape) + intercept.reshape(shape)


#: What the image readers give for one file: its header (a pydicom Dataset, or any mapping from
#: keyword to value that has ``get``) and its stored pixel values (rows x columns).
ImageReader = Callable[[Path], tuple[Any, np.ndarray]]


def _numbers(value: Any, count: int) -> np.ndarray | None:
    if value is None or isinstance(value, (str, bytes)):
        value = [value] if value not in (None, "", b"") else []
    try:
        array = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return array if array.shape == (count,) else None


def _geometry(header: Any, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    orientation = _numbers(header.get("ImageOrientationPatient"), 6)
    position = _numbers(header.get("ImagePositionPatient"), 3)
    spacing = _numbers(header.get("PixelSpacing"), 2)
    if orientation is None or position is None or spacing is None or spacing.min() <= 0:
        raise RTReadError(f"{where}: no usable Image Position, Image Orientation or Pixel Spacing")
    row, column = orientation[:3], orientation[3:]
    if not np.linalg.norm(row) or not np.linalg.norm(column):
        raise RTReadError(f"{where}: malformed Image Orientation")
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    return position, row, column, float(spacing[0]), float(spacing[1])


def _int(header: Any, keyword: str, default: int = 0) -> int:
    value = header.get(keyword)
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _sorted_series(headers: list[tuple[Path, Any]]) -> tuple[Grid, list[int]]:
    """The grid of the images' headers, and the order of the headers along the normal."""
    if not headers:
        raise RTReadError("no images given")
    series = {str(header.get("SeriesInstanceUID", "")) for _, header in headers}
    if len(series) != 1:
        raise RTReadError(f"the images are {len(series)} series, not one")
    first_path, first = headers[0]
    _, row, column, row_spacing, column_spacing = _geometry(first, first_path.name)
    rows, columns = _int(first, "Rows"), _int(first, "Columns")
    normal = np.cross(row, column)
    placed = []
    for n, (path, header) in enumerate(headers):
        position, r, c, rs, cs = _geometry(header, path.name)
        if (_int(header, "Rows"), _int(header, "Columns")) != (rows, columns) \
                or not np.allclose((r, c), (row, column), atol=1e-4) \
                or not np.isclose(rs, row_spacing) or not np.isclose(cs, column_spacing):
            raise RTReadError(f"{path.name}: its size, orientation or pixel spacing differs from the series' "
                              "first image")
        placed.append((float(position @ normal), n, position))
    placed.sort(key=lambda item: (item[0], item[1]))
    grid = Grid(sop_uids=tuple(str(headers[n][1].get("SOPInstanceUID", "")) for _, n, _ in placed),
                positions=np.array([p for _, _, p in placed]), row_direction=row, column_direction=column,
                row_spacing=row_spacing, column_spacing=column_spacing, rows=rows, columns=columns,
                modality=str(first.get("Modality", "")),
                frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")))
    return grid, [n for _, n, _ in placed]


def read_grid(images: Iterable[Path]) -> Grid:
    """The pixel grid of one image series (headers only)."""
    paths = [Path(p) for p in images]
    return _sorted_series([(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in paths])[0]


def native_pixels(data: bytes | memoryview, header: Any, offset: int = 0) -> np.ndarray | None:
    """The stored values of an uncompressed little-endian single frame (``data`` from ``offset``),
    or None when the header says they are something else (several samples or frames, 1-bit, ...).
    Bits above Bits Stored are cleared (or, for signed pixels, the sign is extended from them)."""
    bits, stored = _int(header, "BitsAllocated"), _int(header, "BitsStored")
    rows, columns = _int(header, "Rows"), _int(header, "Columns")
    if _int(header, "SamplesPerPixel", 1) != 1 or _int(header, "NumberOfFrames", 1) != 1 \
            or bits not in (8, 16, 32) or not 0 < (stored or bits) <= bits or rows * columns == 0 \
            or len(data) - offset < rows * columns * bits // 8:
        return None
    signed = _int(header, "PixelRepresentation") == 1
    values = np.frombuffer(data, dtype=np.dtype(f"<{'i' if signed else 'u'}{bits // 8}"), count=rows * columns,
                           offset=offset).reshape(rows, columns)
    unused = bits - (stored or bits)
    if unused:  # only when a value uses them: a copy of the frame otherwise not needed
        if signed and (int(values.min()) < -(1 << (stored - 1)) or int(values.max()) >= 1 << (stored - 1)):
            values = (values << unused) >> unused
        elif not signed and int(values.max()) >= 1 << stored:
            values = values & ((1 << stored) - 1)
    return values


def pydicom_image(path: Path) -> tuple[Dataset, np.ndarray]:
    """One image read with pydicom: its dataset and stored values (any transfer syntax pydicom decodes)."""
    ds = pydicom.dcmread(path)
    meta = getattr(ds, "file_meta", None)
    if (meta.get("TransferSyntaxUID") if meta is not None else None) in _NATIVE_SYNTAXES and "PixelData" in ds:
        values = native_pixels(ds.PixelData, ds)
        if values is not None:
            return ds, values
    return ds, np.asarray(ds.pixel_array).reshape(_int(ds, "Rows"), _int(ds, "Columns"))


def read_volume(images: Iterable[Path], reader: ImageReader = pydicom_image) -> Volume:
    """An image series (single-frame, one sample per pixel: CT, MR, ...), slices sorted along
    their normal; ``reader`` reads each file (default :func:`pydicom_image`)."""
    paths = [Path(p) for p in images]
    read = [reader(p) for p in paths]
    grid, order = _sorted_series([(p, header) for p, (header, _) in zip(paths, read)])
    slope = np.array([float(read[n][0].get("RescaleSlope", 1) or 1) for n in order])
    intercept = np.array([float(read[n][0].get("RescaleIntercept", 0) or 0) for n in order])
    return Volume(grid=grid, frames=[read[n][1] for n in order], slope=slope, intercept=intercept)


# -- Segmentation ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """One segment of a SEG placed on an image grid: ``mask[k, row, column]`` (bool)."""

    number: int
    name: str
    colour: tuple[int, int, int] | None
    mask: np.ndarray


#: The CIE D50 white point: the Profile Connection Space of DICOM's CIELab values (PS3.3 C.10.7.1.1).
_D50 = np.array([0.96422, 1.0, 0.82521])
#: XYZ (D50) to linear sRGB, Bradford-adapted to sRGB's D65.
_XYZ_D50_TO_SRGB = np.array([[3.1338561, -1.6168667, -0.4906146],
                             [-0.9787684, 1.9161415, 0.0334540],
                             [0.0719453, -0.2289914, 1.4052427]])


def segment_volumes_cm3(seg: Path | Dataset, images: Iterable[Path] | Grid) -> dict[str, float]:
    """Each segment's volume: its voxels on the image grid times their size (pixel area times
    each slice's thickness, as :func:`roi_volumes_cm3` takes it)."""
    grid = images if isinstance(images, Grid) else read_grid(images)
    voxel_mm3 = grid.row_spacing * grid.column_spacing * grid.slice_thickness()
    return {segment.name: float((segment.mask.sum(axis=(1, 2)) * voxel_mm3).sum()) / 1000.0
            for segment in read_segments(seg, grid)}


def cielab_to_rgb(lab: Sequence[float]) -> tuple[int, int, int]:
    """A CIELab colour (L* 0-100, a* and b* -128-127, D50) as sRGB 0-255 (clipped to the gamut)."""
    lightness, a, b = (float(v) for v in lab)
    fy = (lightness + 16.0) / 116.0
    f = np.array([fy + a / 500.0, fy, fy - b / 200.0])
    delta = 6.0 / 29.0
    xyz = np.where(f > delta, f ** 3, 3 * delta * delta * (f - 4.0 / 29.0)) * _D50
    linear = np.clip(_XYZ_D50_TO_SRGB @ xyz, 0.0, 1.0)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return tuple(int(round(v)) for v in np.clip(srgb, 0, 1) * 255)  # type: ignore[return-value]


def dicom_cielab_to_rgb(values: Sequence[int]) -> tuple[int, int, int]:
    """A Recommended Display CIELab Value (three unsigned 16-bit values, PS3.3 C.10.7.1.1) as sRGB."""
    l16, a16, b16 = (int(v) for v in values)
    return cielab_to_rgb((l16 * 100.0 / 65535.0, a16 * 255.0 / 65535.0 - 128.0, b16 * 255.0 / 65535.0 - 128.0))


def _frame_item(ds: Dataset, per_frame: Dataset | None, keyword: str) -> Dataset | None:
    for groups in (per_frame, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        if groups is not None and keyword in groups and len(groups.get(keyword)):
            return groups.get(keyword)[0]
    return None


def read_segments(seg: Path | Dataset, grid: Grid) -> list[Segment]:
    """The segments of a DICOM Segmentation, each as a mask on ``grid`` (the images it was drawn on).

    A frame goes to the slice its Image Position lies on, else to the one whose SOP Instance
    UID its Derivation Image (Source Image) names. On the same pixel spacing and
    orientation as the grid it is placed by its offset in whole pixels (what highdicom and
    most writers do); on another in-plane grid of the same plane orientation, each image pixel
    takes the value of the nearest SEG pixel. FRACTIONAL segments are cut at half the maximum
    fractional value. Segments without a recommended colour get ``colour=None``.
    """
    ds = _dataset(seg)
    if ds.get("SOPClassUID") != SegmentationStorage and ds.get("Modality") != "SEG":
        raise RTReadError(f"not a Segmentation (SOP Class {ds.get('SOPClassUID')}, Modality {ds.get('Modality')})")
    kind = str(ds.get("SegmentationType", "BINARY")).upper()
    count, rows, columns = int(ds.get("NumberOfFrames", 1) or 1), int(ds.Rows), int(ds.Columns)
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if kind != "FRACTIONAL" and int(ds.get("BitsAllocated", 1)) == 1 and syntax in _NATIVE_SYNTAXES:
        # Bit-packed, first pixel in the lowest bit, frames back to back: unpacked in one go
        # (pydicom's decoder takes seconds for a few hundred 512² frames).
        bits = np.unpackbits(np.frombuffer(ds.PixelData, dtype=np.uint8), bitorder="little")
        frames = bits[:count * rows * columns].reshape(count, rows, columns).view(bool)
    else:
        frames = np.asarray(ds.pixel_array).reshape(count, rows, columns)
        if kind == "FRACTIONAL":
            frames = frames >= max(int(ds.get("MaximumFractionalValue", 255) or 255), 1) / 2.0
        else:
            frames = frames > 0
    segments = {int(s.SegmentNumber): s for s in ds.get("SegmentSequence", [])}
    masks = {n: np.zeros((grid.slices, grid.rows, grid.columns), dtype=bool) for n in segments}
    slice_by_uid = {uid: k for k, uid in enumerate(grid.sop_uids)}
    per_frame_items = list(ds.get("PerFrameFunctionalGroupsSequence", []))
    same_grid: dict[tuple, bool] = {}  # (orientation, spacing) -> whether it is the grid's
    for i in range(count):
        item = per_frame_items[i] if i < len(per_frame_items) else None
        identification = _frame_item(ds, item, "SegmentIdentificationSequence")
        position_item = _frame_item(ds, item, "PlanePositionSequence")
        if identification is None or position_item is None:
            raise RTReadError(f"SEG frame {i + 1}: no Segment Identification or Plane Position")
        number = int(identification.ReferencedSegmentNumber)
        if number not in masks:
            masks[number] = np.zeros((grid.slices, grid.rows, grid.columns), dtype=bool)
        position = np.array(position_item.ImagePositionPatient, dtype=float)
        k = _slice_of_frame(item, position, grid, slice_by_uid)
        if k is None:
            continue  # a frame beyond the images: nothing of it can be shown on them
        orientation_item = _frame_item(ds, item, "PlaneOrientationSequence")
        measures = _frame_item(ds, item, "PixelMeasuresSequence")
        orientation = (np.array(orientation_item.ImageOrientationPatient, dtype=float) if orientation_item is not None
                       else np.concatenate([grid.row_direction, grid.column_direction]))
        spacing = ([float(v) for v in measures.PixelSpacing] if measures is not None and "PixelSpacing" in measures
                   else [grid.row_spacing, grid.column_spacing])
        key = (tuple(orientation.round(6)), tuple(round(v, 6) for v in spacing))
        if key not in same_grid:
            row, column = (orientation[:3] / np.linalg.norm(orientation[:3]),
                           orientation[3:] / np.linalg.norm(orientation[3:]))
            same_grid[key] = (np.allclose(row, grid.row_direction, atol=1e-4)
                              and np.allclose(column, grid.column_direction, atol=1e-4)
                              and abs(spacing[0] - grid.row_spacing) < 1e-4
                              and abs(spacing[1] - grid.column_spacing) < 1e-4)
        _place(frames[i], masks[number][k], position, orientation, spacing, grid, k, same_grid[key])
    return [Segment(number=n, name=str(segments[n].get("SegmentLabel", "") or f"#{n}") if n in segments else f"#{n}",
                    colour=(dicom_cielab_to_rgb(segments[n].RecommendedDisplayCIELabValue)
                            if n in segments and "RecommendedDisplayCIELabValue" in segments[n] else None),
                    mask=mask)
            for n, mask in sorted(masks.items())]


def _slice_of_frame(item: Dataset | None, position: np.ndarray, grid: Grid, slice_by_uid: dict[str, int]) -> int | None:
    """The slice a frame lies on (its position), else the one its Source Image names."""
    k = grid.slice_of(position[None, :])
    if k is not None:
        return k
    for derivation in (item.get("DerivationImageSequence", []) if item is not None else []):
        for source in derivation.get("SourceImageSequence", []):
            k = slice_by_uid.get(str(source.get("ReferencedSOPInstanceUID", "")))
            if k is not None:
                return k
    return None


def _place(frame: np.ndarray, target: np.ndarray, position: np.ndarray, orientation: np.ndarray,
           spacing: list[float], grid: Grid, k: int, same: bool) -> None:
    """OR one SEG frame into ``target`` (slice ``k`` of the grid); ``same``: the frame has the
    grid's orientation and pixel spacing."""
    row, column = orientation[:3] / np.linalg.norm(orientation[:3]), orientation[3:] / np.linalg.norm(orientation[3:])
    d = position - grid.positions[k]
    dr, dc = float(d @ grid.column_direction) / grid.row_spacing, float(d @ grid.row_direction) / grid.column_spacing
    if same and abs(dr - round(dr)) < 0.01 and abs(dc - round(dc)) < 0.01:
        r0, c0 = int(round(dr)), int(round(dc))
        rs = slice(max(r0, 0), min(r0 + frame.shape[0], grid.rows))
        cs = slice(max(c0, 0), min(c0 + frame.shape[1], grid.columns))
        if rs.start < rs.stop and cs.start < cs.stop:
            target[rs, cs] |= frame[rs.start - r0:rs.stop - r0, cs.start - c0:cs.stop - c0]
        return
    # Nearest SEG pixel for each image pixel centre of the slice.
    r, c = np.mgrid[0:grid.rows, 0:grid.columns]
    points = (grid.positions[k] + c[..., None] * grid.column_spacing * grid.row_direction
              + r[..., None] * grid.row_spacing * grid.column_direction) - position
    u = np.rint(points @ row / spacing[1]).astype(int)     # SEG column
    v = np.rint(points @ column / spacing[0]).astype(int)  # SEG row
    inside = (u >= 0) & (u < frame.shape[1]) & (v >= 0) & (v < frame.shape[0])
    target[inside] |= frame[v[inside], u[inside]]
