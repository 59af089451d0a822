"""What bench/ingest.py and bench/send.py share: the cached data sets, the interleaved measure
loop (a fresh work dir per push) and the markdown table of medians.

The data sets live in one cache (``--cache``, default ``$TMPDIR/raddeploy-bench-cache``), keyed
by their parameters (``ct-300x512``, ``small-3000x64``, ...): both scripts reuse each other's.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from dicom_factory import make_series  # noqa: E402
from peers import storescu  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "raddeploy-bench-cache"  # --cache's default, shared


# -- data sets --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSet:
    name: str
    folder: Path
    files: list[Path]
    nbytes: int
    unit: str  # "MB/s" or "inst/s": what the table's rate column shows

    @property
    def count(self) -> int:
        return len(self.files)


def cached(cache: Path, key: str, build: Callable[[Path], None]) -> Path:
    """``cache/key``, built by ``build`` once; a marker file says the build completed."""
    folder, done = cache / key, cache / f"{key}.done"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.monotonic()
        print(f"making {key} (once; cached in {cache}) ...", flush=True)
        build(folder)
        done.write_text(f"{len(list(folder.iterdir()))}\n")
        print(f"  done in {time.monotonic() - t0:.0f} s", flush=True)
    return folder


def dataset(name: str, folder: Path, unit: str) -> DataSet:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return DataSet(name, folder, files, sum(p.stat().st_size for p in files), unit)


def make_ct(cache: Path, slices: int, size: int) -> DataSet:
    """One CT series of ``slices`` slices of ``size``x``size``, 16-bit (cache key ``ct-SxN``)."""
    folder = cached(cache, f"ct-{slices}x{size}", lambda f: make_series(f, slices=slices, size=size))
    return dataset(f"CT {slices}x{size}\u00b2", folder, "MB/s")


def make_small(cache: Path, count: int, size: int) -> DataSet:
    """``count`` small instances in one study (cache key ``small-CxN``)."""
    folder = cached(cache, f"small-{count}x{size}", lambda f: make_series(f, slices=count, size=size))
    return dataset(f"{count} x {size}\u00b2", folder, "inst/s")


def require(tools: tuple[str, ...], make_target: str, installs: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: run `make {make_target}` (it installs {installs})")


# -- pushes -----------------------------------------------------------------------------------
class Failed(Exception):
    """A push did not deliver every instance: no timing from it counts."""


def count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def push_storescu(port: int, data: DataSet, ae_title: str, extra: tuple[str, ...] = ()) -> float:
    """Seconds for DCMTK storescu to push ``data.folder`` in one association; Failed if it fails."""
    t0 = time.monotonic()
    done = storescu(port, data.folder, ae_title=ae_title, extra=extra)
    seconds = time.monotonic() - t0
    if done.returncode != 0:
        raise Failed(f"storescu exit {done.returncode}: {(done.stderr or done.stdout).strip()[-2000:]}")
    return seconds


def copy_files(data: DataSet, work: Path) -> float:
    """Seconds for ``cp -r`` of the data set into ``work/out``."""
    dest = work / "out"
    t0 = time.monotonic()
    subprocess.run(["cp", "-r", str(data.folder), str(dest)], check=True)
    seconds = time.monotonic() - t0
    got = count_files(dest)
    if got != data.count:
        raise Failed(f"cp wrote {got} of {data.count} files")
    return seconds


# -- the benchmark ----------------------------------------------------------------------------
Run = Callable[[DataSet, Path], tuple[float, str]]  # (seconds, a note or "")


def measure(data: DataSet, runs: dict[str, Run], repeats: int, scratch: Path, width: int) -> dict[str, list[float]]:
    """Every run ``repeats`` times, interleaved, each in a fresh ``scratch`` work dir (kept on
    failure, removed after); a line a push (names padded to ``width``), then the notes."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    notes: dict[str, set[str]] = {name: set() for name in runs}
    for path in data.files:  # source files into the page cache before the first push
        path.read_bytes()
    for rep in range(repeats):
        for name, run in runs.items():
            work = scratch / f"{name.split()[0]}-{rep}"
            work.mkdir(parents=True)
            os.sync()  # earlier runs' dirty pages are not written back during this one
            try:
                seconds, note = run(data, work)
            except Failed as exc:
                raise SystemExit(f"\nFAILED: {name} on {data.name}, repeat {rep + 1}: {exc}\n(work dir kept: {work})")
            times[name].append(seconds)
            if note:
                notes[name].add(note)
            print(f"  {data.name:>12} {rep + 1}/{repeats} {name:<{width}} {seconds:7.2f} s", flush=True)
            shutil.rmtree(work)
    for name, texts in notes.items():
        for text in sorted(texts):
            print(f"  note: {name}: {text}")
    return times


def table(data: DataSet, times: dict[str, list[float]], who: str, ratios_to: tuple[str, ...]) -> dict[str, float]:
    """The markdown table of medians: seconds, rate, a "ratio to X" column per name in
    ``ratios_to`` (X's median / this one's), every run; returns the medians."""
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\n{data.name}: {data.count} instances, {data.nbytes / 1e6:.0f} MB, "
          f"median of {len(next(iter(times.values())))}")
    columns = [who, "seconds", data.unit, *(f"ratio to {ref}" for ref in ratios_to), "runs (s)"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name, seconds in med.items():
        rate = data.nbytes / 1e6 / seconds if data.unit == "MB/s" else data.count / seconds
        cells = [name, f"{seconds:.2f}", f"{rate:.0f}", *(f"{med[ref] / seconds:.2f}" for ref in ratios_to),
                 ", ".join(f"{t:.2f}" for t in times[name])]
        print("| " + " | ".join(cells) + " |")
    return med


def print_load(start: float) -> None:
    """The 1-minute load average at the start and now, flagged when the start was busy."""
    print(f"load average (1 min) at start {start:.2f}, at end {os.getloadavg()[0]:.2f}"
          + ("  <- other work on this machine: timings are noisy" if start > 0.5 else ""))


def print_end(verdicts: list[str], t_start: float, cache: Path) -> None:
    """The verdicts, a line each, and how long the benchmark took."""
    print()
    for line in verdicts:
        print(f"- {line}")
    print(f"\n(benchmark took {time.monotonic() - t_start:.0f} s; data sets cached in {cache})")


# -- CPU accounting ---------------------------------------------------------------------------
#: Process titles -> the component they count as (first match wins); Airflow retitles its processes.
COMPONENTS = (("scheduler", "scheduler"), ("api-server", "api-server"), ("api_server", "api-server"),
              ("dag-processor", "dag-processor"), ("dag_processor", "dag-processor"), ("triggerer", "triggerer"),
              ("LocalExecutor", "tasks (executor workers)"), ("-m listener", "listener"),
              ("airflow standalone", "standalone"))


def cpu_seconds_by_component(root: int | None = None) -> dict[str, float]:
    """CPU seconds (user + system, with reaped children's) of every live process under ``root``
    (default: this process), by component. Task processes are the executor workers' children:
    their time is in the workers' once reaped. Containers (the models) are not under ``root``."""
    root = root or os.getpid()
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        ppid, cpu = int(fields[1]), sum(int(x) for x in fields[11:15]) / tick
        procs[int(entry.name)] = (ppid, cmd, cpu)
    totals: dict[str, float] = {}
    for pid, (ppid, cmd, cpu) in procs.items():
        up, seen = ppid, 0
        while up not in (root, 0, 1) and up in procs and seen < 50:
            up, seen = procs[up][0], seen + 1
        if up != root or pid == root:
            continue
        name = next((component for marker, component in COMPONENTS if marker in cmd), "other")
        totals[name] = totals.get(name, 0.0) + cpu
    return totals


def add_env_option(parser) -> None:
    """``--env NAME=VALUE`` (repeatable): a setting for the benchmark's stack, to compare one
    against the defaults; :func:`stack_env` reads them back."""
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the stack, to compare one against the defaults (repeatable)")


def stack_env(args) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in args.env)
