"""Pictures of a run's RT result on its images, for a person to review before anything is sent.

:func:`render_previews` draws an RT Structure Set (outlines) or a Segmentation (mask edges)
on the CT or MR series it was drawn on and writes PNGs: a few axial slices spread over the
contoured range (``axial_1.png`` the most superior, ...), one coronal and one sagittal
reformat through the centre of the contours (``coronal.png``, ``sagittal.png``), and
``previews.json`` (:data:`INDEX`: what each picture shows, for captions). numpy and Pillow
only: no matplotlib, no Airflow.

What a picture shows, and how it maps to the patient:

- The image part is the whole field of view, scaled by one factor in both directions (true
  aspect ratio: pixel spacing in-plane, slice positions on the reformats) so that its longer
  side is :data:`SIZE` pixels; a legend strip below it names the plane, its position, the
  window and each ROI drawn, with its colour. Nothing else is written on it: no patient name,
  ID, date or UID.
- Radiological display: patient right on the left of an axial or coronal picture (patient x,
  LPS, grows to the right), anterior at the top of an axial one and on the left of a sagittal
  one; superior at the top of the reformats. A picture pixel ``(u, v)`` of an axial picture
  covers ``x = x_edge + (u .. u+1) / sx``, ``y = y_edge + (v .. v+1) / sy`` where ``x_edge``,
  ``y_edge`` are the outer edges of the first column and row and ``sx = width / (columns *
  column spacing)``; the reformats the same with ``z`` from the top edge of the most
  superior slice downwards (each picture row shows the slice nearest to it).
- CT is windowed soft tissue (W400/L40), or lung (W1500/L-600) when an ROI shown is mostly
  air (more than half of what it encloses on the axial pictures below -400 HU: a lung); MR and other
  modalities from the 1st to the 99.5th percentile of the pictured slices.
- RT Structure Set contours are drawn as their polygons (outline 2 px) on the axial slices;
  on the reformats, as the edges of the ROI's pixels there (the polygons filled by the
  even-odd rule along that row or column of each slice). SEG segments as the edges of their
  masks everywhere. ROIs without a display colour get one of :data:`PALETTE`.

Only axial image series (rows along patient x, columns along y, either sign) are supported;
others raise :class:`PreviewError`. PNGs are written atomically (a temporary name, then
renamed); axial pictures left from an earlier call with more of them are removed.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont

from raddeploy_provider.dicom.rt import (RTReadError, Volume, native_pixels, pydicom_image, read_rois, read_segments,
                                         read_volume)
from raddeploy_provider.store import header_walk
from raddeploy_provider.store.errors import StoreError

#: The longer side of a picture's image part (px).
SIZE = 512
#: How many axial pictures at most.
AXIAL_COUNT = 5
#: (width, level) of the CT windows.
SOFT_TISSUE_WINDOW = (400.0, 40.0)
LUNG_WINDOW = (1500.0, -600.0)
#: Below this (HU) a voxel counts as air for the choice of the lung window.
AIR_HU = -400.0
MR_PERCENTILES = (1.0, 99.5)
#: Outline width (px) on the pictures.
LINE = 2
#: Colours for ROIs or segments that bring none.
PALETTE = ((255, 0, 0), (0, 200, 255), (255, 220, 0), (255, 0, 255), (0, 255, 128), (255, 128, 0),
           (128, 128, 255), (255, 128, 192), (160, 255, 0), (0, 128, 255))
_AXIAL_RE = re.compile(r"^axial_[1-9][0-9]*\.png$")
#: What the pictures show, one entry each, for the review text (captions) and for checks:
#: name, plane, its position (``at``: axis and mm), window, the ROIs drawn (name, colour), and
#: how the image part maps to the patient: ``image_size`` [width, height] px above the legend,
#: ``horizontal``/``vertical`` the patient axis and the mm at the part's left/top and right/bottom edge.
INDEX = "previews.json"

_RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
_SEG = "1.2.840.10008.5.1.4.1.1.66.4"


class PreviewError(Exception):
    """The result or its images cannot be pictured; the message says why."""


@dataclass
class _Layer:
    """One ROI or segment in the display frame: slices k by ascending z, rows by ascending y
    (posterior down), columns by ascending x (patient left to the right)."""

    name: str
    colour: tuple[int, int, int]
    external: bool
    polygons: dict[int, list[np.ndarray]] = field(default_factory=dict)  # RTSTRUCT: k -> (row, column) points
    mask: np.ndarray | None = None  # SEG: [k, row, column]

    def slices(self) -> set[int]:
        if self.mask is not None:
            return set(np.flatnonzero(self.mask.any(axis=(1, 2))).tolist())
        return set(self.polygons)

    def bounds(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(min, max) of (row, column) over all slices, or None when empty."""
        if self.mask is not None:
            footprint = self.mask.any(axis=0)
            if not footprint.any():
                return None
            r, c = np.nonzero(footprint)
            return np.array([r.min(), c.min()], float), np.array([r.max(), c.max()], float)
        points = [p for polygons in self.polygons.values() for p in polygons]
        if not points:
            return None
        stacked = np.concatenate(points)
        return stacked.min(axis=0), stacked.max(axis=0)

    def axial_fill(self, k: int, shape: tuple[int, int]) -> np.ndarray:
        """The ROI's pixels on slice k (polygons filled, even-odd)."""
        if self.mask is not None:
            return self.mask[k]
        filled = np.zeros(shape, dtype=bool)
        for polygon in self.polygons.get(k, []):
            canvas = Image.new("1", (shape[1], shape[0]), 0)
            ImageDraw.Draw(canvas).polygon([(float(c), float(r)) for r, c in polygon], fill=1)
            filled ^= np.asarray(canvas, dtype=bool)
        return filled

    def coronal(self, row: int, slices: int, columns: int) -> np.ndarray:
        """[k, column]: the ROI's pixels along ``row`` of each slice."""
        if self.mask is not None:
            return self.mask[:, row, :]
        return self._scan(row, 0, 1, slices, columns)

    def sagittal(self, column: int, slices: int, rows: int) -> np.ndarray:
        """[k, row]: the ROI's pixels along ``column`` of each slice."""
        if self.mask is not None:
            return self.mask[:, :, column]
        return self._scan(column, 1, 0, slices, rows)

    def _scan(self, line: float, across: int, along: int, slices: int, length: int) -> np.ndarray:
        """Fill the polygons of every slice along one scan line (``across`` coordinate = ``line``),
        by the even-odd rule over all of the slice's edges: pixel centres between two crossings."""
        out = np.zeros((slices, length), dtype=bool)
        for k, polygons in self.polygons.items():
            crossings = []
            for polygon in polygons:
                a, b = polygon, np.roll(polygon, -1, axis=0)
                hit = (a[:, across] <= line) != (b[:, across] <= line)
                if hit.any():
                    a, b = a[hit], b[hit]
                    t = (line - a[:, across]) / (b[:, across] - a[:, across])
                    crossings.append(a[:, along] + t * (b[:, along] - a[:, along]))
            if not crossings:
                continue
            xs = np.sort(np.concatenate(crossings))
            diff = np.zeros(length + 1, dtype=int)
            starts = np.clip(np.ceil(xs[0::2]), 0, length).astype(int)
            stops = np.clip(np.ceil(xs[1::2]), 0, length).astype(int)
            np.add.at(diff, starts[:len(stops)], 1)
            np.add.at(diff, stops, -1)
            out[k] = np.cumsum(diff[:-1]) > 0
        return out


@dataclass(frozen=True)
class _Frame:
    """The images in the display frame (see :class:`_Layer`), with their patient coordinates."""

    volume: Volume
    flip_k: bool
    flip_r: bool
    flip_c: bool
    xs: np.ndarray  # column centres (mm, ascending)
    ys: np.ndarray  # row centres
    zs: np.ndarray  # slice centres

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.zs), len(self.ys), len(self.xs)

    def native(self, k: int) -> int:
        return self.shape[0] - 1 - k if self.flip_k else k

    def plane(self, axis: str, index: int) -> np.ndarray:
        """Modality values of one plane: ``axial`` [row, column], ``coronal`` [k, column],
        ``sagittal`` [k, row]; ``index`` in the display frame."""
        s, r, c = self.shape
        if axis == "axial":
            data = self.volume.values(self.native(index))
            return data[::-1 if self.flip_r else 1, ::-1 if self.flip_c else 1]
        if axis == "coronal":
            data = self.volume.values(slice(None), r - 1 - index if self.flip_r else index, slice(None))
            return data[::-1 if self.flip_k else 1, ::-1 if self.flip_c else 1]
        data = self.volume.values(slice(None), slice(None), c - 1 - index if self.flip_c else index)
        return data[::-1 if self.flip_k else 1, ::-1 if self.flip_r else 1]

    def to_pixel(self, points: np.ndarray) -> np.ndarray:
        """Patient (x, y) of points (N x 2+) as display (row, column), pixel centres at integers."""
        dy, dx = _step(self.ys), _step(self.xs)
        return np.stack([(points[:, 1] - self.ys[0]) / dy, (points[:, 0] - self.xs[0]) / dx], axis=1)

    def slice_edges(self) -> np.ndarray:
        """The z of each slice's lower and upper edge (halfway to the neighbours), S+1 values."""
        zs = self.zs
        if len(zs) == 1:
            return np.array([zs[0] - 0.5, zs[0] + 0.5])
        mid = (zs[1:] + zs[:-1]) / 2.0
        return np.concatenate([[zs[0] - (zs[1] - zs[0]) / 2.0], mid, [zs[-1] + (zs[-1] - zs[-2]) / 2.0]])


def _image(path: Path) -> tuple[object, np.ndarray]:
    """One image: the study store's lean header walker and the pixel bytes as they lie in the
    file (a tenth of pydicom's time per file: a 300-slice CT in ~0.1 s instead of ~1 s), or
    pydicom for anything the walker leaves to it (compressed pixel data, other character sets)."""
    data = path.read_bytes()
    try:
        walked = header_walk.walk(data, whole_file=True)
        syntax = walked.meta.get("TransferSyntaxUID", "")
        if walked.pixel_data_at is not None and syntax in (header_walk.EXPLICIT_LE, header_walk.IMPLICIT_LE):
            _, length, value_at = header_walk.element_header(data, walked.pixel_data_at,
                                                             syntax == header_walk.EXPLICIT_LE)
            if length != 0xFFFFFFFF:
                values = native_pixels(memoryview(data)[:value_at + length], walked.tags, value_at)
                if values is not None:
                    return walked.tags, values
    except (header_walk.Unsupported, header_walk.NeedMore, StoreError):
        pass
    return pydicom_image(path)


def _frame(volume: Volume) -> _Frame:
    grid = volume.grid
    row, column, normal = grid.row_direction, grid.column_direction, grid.normal
    if abs(row[0]) < 0.99 or abs(column[1]) < 0.99:
        raise PreviewError("the images are not axial (rows along patient x, columns along y): "
                           f"Image Orientation {np.round(np.concatenate([row, column]), 3).tolist()}")
    flip_c, flip_r, flip_k = row[0] < 0, column[1] < 0, normal[2] < 0
    origin = grid.positions[0]
    xs = origin[0] + np.arange(grid.columns) * grid.column_spacing * row[0]
    ys = origin[1] + np.arange(grid.rows) * grid.row_spacing * column[1]
    zs = grid.positions[:, 2]
    return _Frame(volume=volume, flip_k=bool(flip_k), flip_r=bool(flip_r), flip_c=bool(flip_c),
                  xs=np.sort(xs), ys=np.sort(ys), zs=zs[::-1] if flip_k else zs)


def _layers(result: Path, frame: _Frame) -> list[_Layer]:
    try:
        ds = pydicom.dcmread(result)
    except Exception as exc:  # noqa: BLE001 - unreadable: say so
        raise PreviewError(f"{result.name}: not readable as DICOM ({type(exc).__name__})") from None
    sop_class, modality = str(ds.get("SOPClassUID", "")), str(ds.get("Modality", ""))
    layers: list[_Layer] = []
    try:
        if sop_class == _RTSTRUCT or modality == "RTSTRUCT":
            grid = frame.volume.grid
            for n, roi in enumerate(read_rois(ds)):
                layer = _Layer(roi.name, roi.colour or PALETTE[n % len(PALETTE)], roi.interpreted_type == "EXTERNAL")
                for polygons in roi.contours.values():
                    k = grid.slice_of(polygons[0])
                    if k is None:
                        continue
                    k = frame.native(k)  # the same flip both ways
                    layer.polygons.setdefault(k, []).extend(frame.to_pixel(p) for p in polygons)
                layers.append(layer)
        elif sop_class == _SEG or modality == "SEG":
            for n, segment in enumerate(read_segments(ds, frame.volume.grid)):
                mask = segment.mask[::-1 if frame.flip_k else 1, ::-1 if frame.flip_r else 1,
                                    ::-1 if frame.flip_c else 1]
                layers.append(_Layer(segment.name, segment.colour or PALETTE[n % len(PALETTE)], False, mask=mask))
        else:
            raise PreviewError(f"{result.name}: neither an RT Structure Set nor a Segmentation (Modality {modality!r})")
    except RTReadError as exc:
        raise PreviewError(f"{result.name}: {exc}") from None
    return layers


def _window(frame: _Frame, layers: list[_Layer], axial: list[int]) -> tuple[float, float, str]:
    """(low, high, label) of the grey scale."""
    planes = {k: frame.plane("axial", k) for k in axial}
    if frame.volume.grid.modality == "CT":
        def mostly_air(layer: _Layer) -> bool:
            inside = [planes[k][layer.axial_fill(k, planes[k].shape)] for k in axial]
            values = np.concatenate(inside) if inside else np.zeros(0)
            return bool(values.size) and float(np.mean(values < AIR_HU)) > 0.5
        width, level = LUNG_WINDOW if any(mostly_air(layer) for layer in layers) else SOFT_TISSUE_WINDOW
        return level - width / 2, level + width / 2, f"W{width:g}/L{level:g}"
    values = np.concatenate([p.ravel() for p in planes.values()])
    low, high = np.percentile(values, MR_PERCENTILES)
    return float(low), float(max(high, low + 1e-6)), f"{MR_PERCENTILES[0]:g}-{MR_PERCENTILES[1]:g}th percentile"


def _grey(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return (np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _edges(mask: np.ndarray, width: int = LINE) -> np.ndarray:
    """The inner boundary (``width`` px) of a mask: its pixels less the mask eroded ``width`` times (4-neighbours)."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        shrunk[[0, -1], :] = False
        shrunk[:, [0, -1]] = False
        inner = shrunk
    return mask & ~inner


def _font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _with_legend(picture: Image.Image, caption: str, shown: list[_Layer]) -> Image.Image:
    """The picture with a strip below: the caption, then a swatch and the name of each ROI shown."""
    font = _font()
    pad, swatch, gap = 6, 11, 14
    line = int(font.getbbox("Ag")[3]) + 6
    width = picture.width
    entries = [(layer.name, layer.colour) for layer in shown] or [("no contour on this plane", None)]
    # Flow the entries into lines.
    lines: list[list[tuple[str, tuple[int, int, int] | None, int]]] = [[]]
    x = pad
    for name, colour in entries:
        w = (swatch + 4 if colour else 0) + int(font.getlength(name))
        if lines[-1] and x + w > width - pad:
            lines.append([])
            x = pad
        lines[-1].append((name, colour, x))
        x += w + gap
    height = pad + line * (1 + len(lines)) + pad // 2
    out = Image.new("RGB", (width, picture.height + height), (0, 0, 0))
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    top = picture.height + pad
    draw.text((pad, top), caption, fill=(230, 230, 230), font=font)
    for n, entries_of_line in enumerate(lines, 1):
        y = top + n * line
        for name, colour, x in entries_of_line:
            if colour:
                draw.rectangle((x, y + 2, x + swatch, y + 2 + swatch), fill=colour)
                x += swatch + 4
            draw.text((x, y), name, fill=(230, 230, 230), font=font)
    return out


def _save(write: Callable[[Path], object], path: Path) -> None:
    """``write(tmp)``, then rename ``tmp`` to ``path``: a reader sees the old file or the new one, whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _described(plane: str, at: tuple[str, float], window: str, shown: list[_Layer], size: tuple[int, int],
               horizontal: tuple[str, float, float], vertical: tuple[str, float, float]) -> dict:
    """One picture's entry of :data:`INDEX`."""
    return {"plane": plane, "at": {"axis": at[0], "mm": round(at[1], 3)}, "window": window,
            "rois": [{"name": layer.name, "colour": list(layer.colour)} for layer in shown],
            "image_size": list(size),
            "horizontal": {"axis": horizontal[0], "from_mm": round(horizontal[1], 3), "to_mm": round(horizontal[2], 3)},
            "vertical": {"axis": vertical[0], "from_mm": round(vertical[1], 3), "to_mm": round(vertical[2], 3)}}


def _axial_slices(frame: _Frame, layers: list[_Layer], count: int) -> list[int]:
    """Up to ``count`` slices spread over the contoured range (10 % to 90 % of it), most superior first."""
    contoured = sorted(set().union(*(layer.slices() for layer in layers))) if layers else []
    candidates = contoured or list(range(frame.shape[0]))
    if len(candidates) <= count:
        picked = candidates
    else:
        picked = [candidates[int(round(q * (len(candidates) - 1)))] for q in np.linspace(0.1, 0.9, count)]
    return sorted(set(picked), reverse=True)


def _centre(frame: _Frame, layers: list[_Layer]) -> tuple[int, int]:
    """(row, column) through the centre of the contours' bounding box (the image centre if none)."""
    bounds = [b for b in (layer.bounds() for layer in layers) if b is not None]
    _, rows, columns = frame.shape
    if not bounds:
        return rows // 2, columns // 2
    low = np.min([b[0] for b in bounds], axis=0)
    high = np.max([b[1] for b in bounds], axis=0)
    r, c = np.clip(np.rint((low + high) / 2.0), 0, [rows - 1, columns - 1]).astype(int)
    return int(r), int(c)


def render_previews(result: Path, images: list[Path], out_dir: Path, *, axial: int = AXIAL_COUNT,
                    timings: dict[str, float] | None = None) -> list[Path]:
    """Draw ``result`` (an RT Structure Set or a SEG) on ``images`` (its CT or MR series) and write
    ``axial_<n>.png`` (n = 1 most superior, up to ``axial`` of them), ``coronal.png`` and
    ``sagittal.png`` into ``out_dir`` (made if missing). Returns the paths written, in that order.

    ``timings``, if given, gets the seconds each stage took (``images``, ``result``,
    ``axial``, ``reformats``, ``write``). Raises :class:`PreviewError` when the result or the
    images cannot be pictured.
    """
    clock = _Clock(timings)
    images = [Path(p) for p in images]
    if not images:
        raise PreviewError("no images to draw the result on")
    try:
        volume = read_volume(images, reader=_image)
    except RTReadError as exc:
        raise PreviewError(f"the images: {exc}") from None
    frame = _frame(volume)
    clock("images")
    layers = _layers(Path(result), frame)
    clock("result")

    pictures: list[tuple[str, Image.Image, dict]] = []
    axial_slices = _axial_slices(frame, layers, max(1, axial))
    low, high, window = _window(frame, layers, axial_slices)
    drawn_first = sorted(layers, key=lambda layer: not layer.external)  # the body under the organs
    s, rows, columns = frame.shape
    dx, dy = _step(frame.xs), _step(frame.ys)
    fov_x, fov_y = columns * dx, rows * dy
    width, height = _size(fov_x, fov_y)
    x_span = (float(frame.xs[0] - dx / 2), float(frame.xs[-1] + dx / 2))
    y_span = (float(frame.ys[0] - dy / 2), float(frame.ys[-1] + dy / 2))
    for n, k in enumerate(axial_slices, 1):
        grey = Image.fromarray(_grey(frame.plane("axial", k), low, high)).resize((width, height), Image.BILINEAR)
        picture = grey.convert("RGB")
        draw = ImageDraw.Draw(picture)
        sx, sy = width / fov_x * dx, height / fov_y * dy  # picture px per image pixel
        shown = []
        for layer in drawn_first:
            if layer.mask is not None:
                if not layer.mask[k].any():
                    continue
                big = np.asarray(Image.fromarray(layer.mask[k]).resize((width, height), Image.NEAREST), dtype=bool)
                _paint(picture, _edges(big), layer.colour)
            else:
                polygons = layer.polygons.get(k)
                if not polygons:
                    continue
                for polygon in polygons:
                    # pixel centre (r, c) covers picture [c*sx, (c+1)*sx): its centre is (c + 0.5) * sx,
                    # which Pillow (pixel centres at integers) draws at (c + 0.5) * sx - 0.5.
                    points = [((c + 0.5) * sx - 0.5, (r + 0.5) * sy - 0.5) for r, c in polygon]
                    draw.line(points + points[:1], fill=layer.colour, width=LINE, joint="curve")
            shown.append(layer)
        pictures.append((f"axial_{n}.png", _with_legend(picture, f"axial  z = {frame.zs[k]:.1f} mm  {window}", shown),
                         _described("axial", ("z", float(frame.zs[k])), window, shown, (width, height),
                                    ("x", *x_span), ("y", *y_span))))
    clock("axial")

    row, column = _centre(frame, layers)
    edges = frame.slice_edges()
    fov_z = float(edges[-1] - edges[0])
    for name, along, fov_along, index, masks, at, horizontal in (
            ("coronal", "coronal", fov_x, row, lambda layer: layer.coronal(row, s, columns),
             ("y", float(frame.ys[row])), ("x", *x_span)),
            ("sagittal", "sagittal", fov_y, column, lambda layer: layer.sagittal(column, s, rows),
             ("x", float(frame.xs[column])), ("y", *y_span))):
        width, height = _size(fov_along, fov_z)
        # Each picture row shows the slice nearest to it, top = most superior.
        z_rows = edges[-1] - (np.arange(height) + 0.5) * fov_z / height
        nearest = np.clip(np.searchsorted(edges, z_rows, side="right") - 1, 0, s - 1)
        plane = frame.plane(along, index)[nearest]
        picture = Image.fromarray(_grey(plane, low, high)).resize((width, height), Image.BILINEAR).convert("RGB")
        shown = []
        for layer in drawn_first:
            mask = masks(layer)
            if not mask.any():
                continue
            big = np.asarray(Image.fromarray(mask[nearest]).resize((width, height), Image.NEAREST), dtype=bool)
            _paint(picture, _edges(big), layer.colour)
            shown.append(layer)
        pictures.append((f"{name}.png", _with_legend(picture, f"{name}  {at[0]} = {at[1]:.1f} mm  {window}", shown),
                         _described(name, at, window, shown, (width, height), horizontal,
                                    ("z", float(edges[-1]), float(edges[0])))))
    clock("reformats")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, picture, _ in pictures:
        _save(lambda tmp: picture.save(tmp, format="PNG", compress_level=3), out_dir / file_name)
        written.append(out_dir / file_name)
    names = {p.name for p in written}
    for stale in out_dir.iterdir():
        if _AXIAL_RE.match(stale.name) and stale.name not in names:
            stale.unlink(missing_ok=True)
    text = json.dumps([{"name": file_name, **described} for file_name, _, described in pictures], indent=1)
    _save(lambda tmp: tmp.write_text(text + "\n"), out_dir / INDEX)
    clock("write")
    return written


def _step(centres: np.ndarray) -> float:
    return float(centres[1] - centres[0]) if len(centres) > 1 else 1.0


def _size(width_mm: float, height_mm: float) -> tuple[int, int]:
    """A picture's image part (px): the longer side :data:`SIZE`, the other in proportion (true aspect ratio)."""
    scale = SIZE / max(width_mm, height_mm)
    return max(1, int(round(width_mm * scale))), max(1, int(round(height_mm * scale)))


def _paint(picture: Image.Image, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    pixels = np.asarray(picture).copy()
    pixels[mask] = colour
    picture.paste(Image.fromarray(pixels))


class _Clock:
    """Adds the seconds since the last call to ``timings[stage]``."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
        self.last = now
