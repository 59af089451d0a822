"""Send throughput: our C-STORE SCU (dicom/scu.py send_files) against DCMTK storescu, to storescp.

Two data sets, made once and cached (the same cache and keys as bench/ingest.py): a 300-slice
512x512 16-bit CT (one series, ~158 MB) and 3000 small 64x64 instances. For each, in the same
run and interleaved, each sender pushes every instance N times, each time to a freshly started
DCMTK storescp (``+B -pdu 131072``: bit-preserving, its largest PDU) writing into a fresh empty
folder (wiped after), and the median wall time is reported:

- storescu:    DCMTK storescu, one association, ``TCP_NODELAY=1`` (Debian's DCMTK leaves Nagle on)
- send_files:  ``send_files(Node(...), files)`` in this process, one association (the default)
- socket:      the raw limit of the sending side: each file read and written to one TCP
               connection whose peer discards it (no DICOM, no responses, nothing written)
- cp:          ``cp -r`` of the same files into a fresh folder (the raw cost of writing them)

Every push must end with every instance in storescp's folder, or the benchmark fails. With
``--ignore`` storescp receives but stores nothing (its ``--ignore``): what is left is the senders'
own cost and the protocol (storescu's exit status and our report must still say all went through).

    .venv/bin/python bench/send.py [--repeats 5] [--ct-slices 300] [--small 3000] [--pdu 131072]
                                   [--ignore] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from dicom_factory import make_series  # noqa: E402
from peers import DCMTK_ENV, free_port, require_tool, storescu, wait_port  # noqa: E402

from raddeploy_provider.dicom.scu import Node, send_files  # noqa: E402

SCP_AE = "STORESCP"
TARGET = 0.8  # send_files / storescu, on both data sets


# -- data sets (as bench/ingest.py makes them, same cache keys) ---------------------------------
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


def _cached(cache: Path, key: str, build: Callable[[Path], None]) -> Path:
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


def make_set(cache: Path, name: str, key: str, slices: int, size: int, unit: str) -> DataSet:
    folder = _cached(cache, key, lambda f: make_series(f, slices=slices, size=size))
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return DataSet(name, folder, files, sum(p.stat().st_size for p in files), unit)


# -- the receiver -------------------------------------------------------------------------------
class Failed(Exception):
    """A push did not deliver every instance: no timing from it counts."""


def _files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


class StoreSCP:
    """A fresh DCMTK storescp writing into ``work/out``."""

    ignore = False  # --ignore: storescp stores nothing

    def __init__(self, work: Path, pdu: int) -> None:
        self.out = work / "out"
        self.out.mkdir()
        self.port = free_port()
        self._log = open(work / "storescp.log", "wb")
        self.proc = subprocess.Popen([require_tool("storescp"), "-aet", SCP_AE, "-od", str(self.out), "+B",
                                      "-pdu", str(pdu), "-dhl", *(["--ignore"] if self.ignore else []),
                                      str(self.port)],
                                     env=DCMTK_ENV, stdout=self._log, stderr=subprocess.STDOUT)
        wait_port(self.port)

    def stop(self, data: DataSet) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        got = _files(self.out)
        if got != (0 if self.ignore else data.count):
            raise Failed(f"storescp wrote {got} of {data.count} files")


# -- senders ------------------------------------------------------------------------------------
def send_storescu(data: DataSet, work: Path, pdu: int) -> float:
    scp = StoreSCP(work, pdu)
    try:
        t0 = time.monotonic()
        done = storescu(scp.port, data.folder, ae_title=SCP_AE, extra=("-q",))
        seconds = time.monotonic() - t0
        if done.returncode != 0:
            raise Failed(f"storescu exit {done.returncode}: {(done.stderr or done.stdout).strip()[-2000:]}")
    finally:
        scp.stop(data)
    return seconds


def send_ours(data: DataSet, work: Path, pdu: int) -> float:
    scp = StoreSCP(work, pdu)
    try:
        t0 = time.monotonic()
        report = send_files(Node("127.0.0.1", scp.port, SCP_AE), data.files)
        seconds = time.monotonic() - t0
        if not report.ok:
            raise Failed(f"send_files: {report.unreachable or list(report.failed.items())[:3]}")
    finally:
        scp.stop(data)
    return seconds


def send_socket(data: DataSet, work: Path, pdu: int) -> float:
    """Each file read and sent whole on one connection to a reader that discards it."""
    server = socket.create_server(("127.0.0.1", 0))
    received = [0]

    def sink() -> None:
        conn, _ = server.accept()
        buf = bytearray(1 << 20)
        with conn:
            while n := conn.recv_into(buf):
                received[0] += n

    reader = threading.Thread(target=sink)
    reader.start()
    t0 = time.monotonic()
    with socket.create_connection(server.getsockname()) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for path in data.files:
            with open(path, "rb", buffering=0) as fh:
                sock.sendall(fh.read())
    reader.join()
    seconds = time.monotonic() - t0
    server.close()
    if received[0] != data.nbytes:
        raise Failed(f"the sink got {received[0]} of {data.nbytes} bytes")
    return seconds


def send_cp(data: DataSet, work: Path, pdu: int) -> float:
    dest = work / "out"
    t0 = time.monotonic()
    subprocess.run(["cp", "-r", str(data.folder), str(dest)], check=True)
    seconds = time.monotonic() - t0
    if _files(dest) != data.count:
        raise Failed(f"cp wrote {_files(dest)} of {data.count} files")
    return seconds


SENDERS = {"storescu": send_storescu, "send_files": send_ours, "socket (no DICOM)": send_socket, "cp": send_cp}


# -- the benchmark ------------------------------------------------------------------------------
def measure(data: DataSet, repeats: int, scratch: Path, pdu: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in SENDERS}
    for path in data.files:  # source files into the page cache before the first push
        path.read_bytes()
    for rep in range(repeats):
        for name, send in SENDERS.items():
            work = scratch / f"{name.split()[0]}-{rep}"
            work.mkdir(parents=True)
            os.sync()  # earlier runs' dirty pages are not written back during this one
            try:
                seconds = send(data, work, pdu)
            except Failed as exc:
                raise SystemExit(f"\nFAILED: {name} on {data.name}, repeat {rep + 1}: {exc}\n(work dir kept: {work})")
            times[name].append(seconds)
            print(f"  {data.name:>12} {rep + 1}/{repeats} {name:<18} {seconds:7.2f} s", flush=True)
            shutil.rmtree(work)
    return times


def table(data: DataSet, times: dict[str, list[float]]) -> dict[str, float]:
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\n{data.name}: {data.count} instances, {data.nbytes / 1e6:.0f} MB, median of "
          f"{len(next(iter(times.values())))}")
    print(f"| sender | seconds | {data.unit} | ratio to storescu | runs (s) |")
    print("|---|---|---|---|---|")
    for name, seconds in med.items():
        rate = data.nbytes / 1e6 / seconds if data.unit == "MB/s" else data.count / seconds
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"| {name} | {seconds:.2f} | {rate:.0f} | {med['storescu'] / seconds:.2f} | {runs} |")
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="pushes per sender and data set (median)")
    parser.add_argument("--ct-slices", type=int, default=300)
    parser.add_argument("--small", type=int, default=3000, help="number of small 64x64 instances")
    parser.add_argument("--pdu", type=int, default=131072, help="storescp's maximum PDU (4096..131072)")
    parser.add_argument("--ignore", action="store_true", help="storescp receives but stores nothing")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "raddeploy-bench-cache")
    args = parser.parse_args()
    StoreSCP.ignore = args.ignore
    t_start = time.monotonic()
    load_start = os.getloadavg()[0]

    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: run `make bench-send` (it installs dcmtk)")
    args.cache.mkdir(parents=True, exist_ok=True)
    sets = [make_set(args.cache, f"CT {args.ct_slices}x512\u00b2", f"ct-{args.ct_slices}x512", args.ct_slices, 512,
                     "MB/s"),
            make_set(args.cache, f"{args.small} x 64\u00b2", f"small-{args.small}x64", args.small, 64, "inst/s")]

    scratch = Path(tempfile.mkdtemp(prefix="raddeploy-bench-send-"))
    results = []
    try:
        for data in sets:
            print(f"\n{data.name}: {args.repeats} x {len(SENDERS)} senders", flush=True)
            results.append((data, measure(data, args.repeats, scratch / data.name.split()[0], args.pdu)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    load_end = os.getloadavg()[0]
    print("\n" + "=" * 78)
    print(f"Send throughput to DCMTK storescp (+B, -pdu {args.pdu}{', --ignore' if args.ignore else ''}, "
          "TCP_NODELAY=1), loopback, "
          f"{os.cpu_count()} cores")
    print(f"load average (1 min) at start {load_start:.2f}, at end {load_end:.2f}"
          + ("  <- other work on this machine: timings are noisy" if load_start > 0.5 else ""))
    verdicts = []
    for data, times in results:
        med = table(data, times)
        ratio = med["storescu"] / med["send_files"]
        verdicts.append(f"{data.name}: send_files {ratio:.2f}x storescu (target {TARGET}x): "
                        f"{'met' if ratio >= TARGET else 'NOT met'}")
    print()
    for line in verdicts:
        print(f"- {line}")
    print(f"\n(benchmark took {time.monotonic() - t_start:.0f} s; data sets cached in {args.cache})")


if __name__ == "__main__":
    main()
