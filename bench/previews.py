"""Review previews of a 300-slice 512x512 CT with three ROIs: the time of each stage.

Makes the CT phantom (``raddeploy.phantom``: body, two lungs, spine; 300 slices of 512², 0.8 mm
pixels, 1 mm apart) once into the bench cache, an RT Structure Set of its BODY, LUNG_L and
LUNG_R (ellipse polygons, a point per pixel of outline: tests/rt_factory.py) and a binary SEG
of the same, then renders the previews (``raddeploy_provider.previews.render_previews``)
``--repeats`` times and prints each stage's median (read the images, read the result, draw
the axial pictures, the reformats, write the PNGs) and the total. The goal: under 3 s.

    .venv/bin/python bench/previews.py [--repeats 5] [--slices 300] [--size 512] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, cached, print_load  # noqa: E402  (puts tests/ on sys.path)
from rt_factory import phantom_rtstruct, phantom_seg  # noqa: E402

from raddeploy.phantom import write_phantom  # noqa: E402
from raddeploy_provider.previews import render_previews  # noqa: E402

GOAL_S = 3.0
STAGES = ("images", "result", "axial", "reformats", "write")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args()
    t_start, load = time.monotonic(), os.getloadavg()[0]
    spacing = 0.8 if args.size >= 512 else 400.0 / args.size
    key = f"phantom-{args.slices}x{args.size}"
    made = None

    def build(folder: Path) -> None:
        nonlocal made
        made = write_phantom(folder, slices=args.slices, rows=args.size, columns=args.size, spacing=spacing, thickness=1.0)

    folder = cached(args.cache, key, build)
    if made is None:  # cached: the same phantom again, to know its truth (UIDs are read back from the files)
        made = _read_back(folder, args.slices, args.size, spacing)
    work = Path(tempfile.mkdtemp(prefix="raddeploy-bench-previews-"))
    try:
        t0 = time.perf_counter()
        rs = phantom_rtstruct(made, work / "rs.dcm")
        seg = phantom_seg(made, work / "seg.dcm")
        print(f"RT results made in {time.perf_counter() - t0:.1f} s (RTSTRUCT {rs.stat().st_size / 1e6:.1f} MB, "
              f"SEG {seg.stat().st_size / 1e6:.1f} MB); CT {len(made.files)} x {args.size}\u00b2, "
              f"{sum(p.stat().st_size for p in made.files) / 1e6:.0f} MB")
        for path in made.files:  # into the page cache, as a run's input just written is
            path.read_bytes()
        verdicts = []
        for name, result in (("RTSTRUCT", rs), ("SEG", seg)):
            runs: list[dict[str, float]] = []
            for rep in range(args.repeats):
                timings: dict[str, float] = {}
                t0 = time.perf_counter()
                written = render_previews(result, made.files, work / f"out-{name}-{rep}", timings=timings)
                timings["total"] = time.perf_counter() - t0
                runs.append(timings)
                print(f"  {name:<8} {rep + 1}/{args.repeats}  " + "  ".join(
                    f"{stage} {timings.get(stage, 0.0):.2f}" for stage in (*STAGES, "total")) + f"  ({len(written)} PNGs)",
                    flush=True)
            print(f"\n{name} on {args.slices} x {args.size}\u00b2 CT, 3 ROIs, median of {args.repeats}")
            print("| stage | seconds | runs (s) |")
            print("|---|---|---|")
            for stage in (*STAGES, "total"):
                values = [r.get(stage, 0.0) for r in runs]
                print(f"| {stage} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
            total = statistics.median(r["total"] for r in runs)
            verdicts.append(f"{name}: {total:.2f} s total (goal < {GOAL_S:g} s): "
                            + ("met" if total < GOAL_S else "NOT met"))
        print()
        print_load(load)
        for line in verdicts:
            print(f"- {line}")
        print(f"\n(benchmark took {time.monotonic() - t_start:.0f} s; phantom cached in {args.cache / key})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _read_back(folder: Path, slices: int, size: int, spacing: float):
    """The Phantom of a cached folder, read back from its files (the RT results need its UIDs and geometry only)."""
    import pydicom

    from raddeploy.phantom import Phantom
    files = sorted(folder.glob("CT_*.dcm"))
    heads = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    first = heads[0]
    return Phantom(folder=folder, files=files, study_uid=str(first.StudyInstanceUID),
                   series_uid=str(first.SeriesInstanceUID), frame_of_reference_uid=str(first.FrameOfReferenceUID),
                   sop_uids=[str(h.SOPInstanceUID) for h in heads], patient_name=str(first.PatientName),
                   patient_id=str(first.PatientID), rows=size, columns=size, spacing=spacing,
                   thickness=float(first.SliceThickness),
                   slice_z=[round(float(h.ImagePositionPatient[2]), 2) for h in heads])


if __name__ == "__main__":
    main()
