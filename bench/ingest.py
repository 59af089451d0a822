"""Receive throughput: DCMTK storescu pushing to copy / storescp / Orthanc / the listener.

Two data sets, made once and cached (keyed by their parameters): a 300-slice 512x512 16-bit
CT (one series, ~158 MB) and 3000 small 64x64 instances (one study). For each, in the same
run and interleaved, each receiver gets every instance N times, on a fresh empty output
folder and a freshly started process, and the median wall time of the push is reported:

- copy:      `cp -r` of the same files into a fresh folder (the raw cost of writing the bytes)
- storescp:  DCMTK storescp +B -od DIR
- orthanc:   Orthanc (Debian package) with loopback ports and its storage in a temp dir
- listener:  `python -m listener`, RADDEPLOY_FSYNC=never (the default), then =always, with one
             flow whose trigger matches the CT and Airflow down (the outbox keeps the trigger)
- listener (PostgreSQL): the same, its index on PostgreSQL (RADDEPLOY_INDEX_URL, a fresh schema
             a push) instead of SQLite in the data dir: a local server started for the run
             (tests/postgres.py) at its durable defaults (fsync, synchronous_commit and
             full_page_writes on), reached over TCP loopback with a password; the listener's
             own session turns synchronous_commit off with RADDEPLOY_FSYNC=never, as it does
             SQLite's synchronous=FULL

The push is one DCMTK storescu association (`+sd FOLDER`); DCMTK and Orthanc run with
TCP_NODELAY=1 (Debian's DCMTK leaves Nagle on). Every receiver must end up with every instance
(files, Orthanc's /statistics, the listener's `instances` rows), or the benchmark fails.
Then the listener's RSS is sampled every 50 ms while it receives a ~1 GB study.

    .venv/bin/python bench/ingest.py [--repeats 3] [--rss-slices 2000] [--cache DIR] [--no-postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from common import (CACHE, DataSet, Failed, cached, copy_files, count_files, dataset, make_ct,  # noqa: E402
                    make_small, measure, print_end, print_load, push_storescu, require, stop_process, table)
from dicom_factory import make_series  # noqa: E402
from peers import DCMTK_ENV, free_port, require_tool, wait_port  # noqa: E402
from postgres import PostgresServer, PostgresUnavailable, query  # noqa: E402

LISTENER_AE = "RADDEPLOY"
#: The listener with its index on PostgreSQL, RADDEPLOY_FSYNC=never and =always.
PG, PG_FSYNC = "listener (PostgreSQL)", "listener fsync=always (PostgreSQL)"
# Listener log lines that are expected here: Airflow is down on purpose, and wait_port's
# probes connect and close before sending anything (no calling AE title yet: "?").
EXPECTED_WARNINGS = ("Airflow unreachable", "association from ?@127.0.0.1 lost: peer closed the connection")


# -- data sets (bench/common.py: the CT and the small ones) --------------------------------
def make_big(cache: Path, slices: int, size: int) -> DataSet:
    """A one-series study of ``slices`` slices: 50 made by make_series, cloned with fresh UIDs
    (make_series draws every pixel in Python: 2000 slices would take minutes)."""

    def build(folder: Path) -> None:
        from pydicom import dcmread
        from pydicom.uid import generate_uid

        base = make_series(folder.with_name(folder.name + "-base"), slices=min(50, slices), size=size)
        folder.mkdir(parents=True)
        study, series, frame = generate_uid(), generate_uid(), generate_uid()
        templates = [dcmread(p) for p in base.files]
        for i in range(slices):
            ds = templates[i % len(templates)]
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.InstanceNumber = i + 1
            ds.ImagePositionPatient = [0.0, 0.0, i * 1.0]
            ds.save_as(folder / f"CT{i:05d}.dcm", enforce_file_format=True)
        shutil.rmtree(base.files[0].parent)

    folder = cached(cache, f"big-{slices}x{size}", build)
    return dataset(f"CT {slices}x{size}\u00b2", folder, "MB/s")


# -- receivers --------------------------------------------------------------------------------
def recv_copy(data: DataSet, work: Path) -> tuple[float, str]:
    return copy_files(data, work), ""


def recv_storescp(data: DataSet, work: Path) -> tuple[float, str]:
    dest = work / "out"
    dest.mkdir()
    port = free_port()
    log = open(work / "storescp.log", "wb")
    proc = subprocess.Popen([require_tool("storescp"), "-aet", "STORESCP", "-od", str(dest), "+B", str(port)],
                            env=DCMTK_ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port)
        seconds = push_storescu(port, data, "STORESCP")
    finally:
        stop_process(proc)
        log.close()
    got = count_files(dest)
    if got != data.count:
        raise Failed(f"storescp wrote {got} of {data.count} files")
    return seconds, ""


def recv_orthanc(data: DataSet, work: Path) -> tuple[float, str]:
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "bench", "DicomAet": "ORTHANC", "DicomPort": dicom_port, "HttpPort": http_port,
        "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
        "DicomCheckCalledAet": False, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "Plugins": [],
    }
    (work / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = open(work / "orthanc.log", "wb")
    proc = subprocess.Popen([require_tool("Orthanc"), str(work / "orthanc.json")], cwd=work,
                            env=DCMTK_ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(dicom_port, timeout=60)
        seconds = push_storescu(dicom_port, data, "ORTHANC")
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/statistics", timeout=30) as rsp:
            got = json.load(rsp)["CountInstances"]
    finally:
        stop_process(proc, timeout=60)
        log.close()
    if got != data.count:
        raise Failed(f"Orthanc indexed {got} of {data.count} instances")
    return seconds, ""


class Listener:
    """``python -m listener`` on a fresh data dir, loopback port, Airflow down; its index in the
    data dir, or at ``index_url`` (an empty PostgreSQL schema)."""

    def __init__(self, work: Path, flows: Path, fsync: str, index_url: str | None = None) -> None:
        self.data = work / "data"
        self.index = index_url or self.data / "index.sqlite3"
        self.port = free_port()
        self.log_path = work / "listener.log"
        env = {**os.environ, "RADDEPLOY_DATA": str(self.data), "RADDEPLOY_FLOWS": str(flows),
               "RADDEPLOY_LISTEN_HOST": "127.0.0.1", "RADDEPLOY_LISTEN_PORT": str(self.port),
               "RADDEPLOY_AE_TITLE": LISTENER_AE, "RADDEPLOY_FSYNC": fsync, "RADDEPLOY_INDEX_URL": index_url or "",
               "RADDEPLOY_AIRFLOW_URL": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "listener"], cwd=REPO, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                if self.proc.poll() is not None:
                    raise Failed(f"listener exited with {self.proc.returncode} at start:\n{self.log_tail()}")
                try:
                    wait_port(self.port, timeout=0.5)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise Failed(f"listener not listening after 60 s:\n{self.log_tail()}") from None
        except BaseException:
            self.stop()
            raise

    def log_tail(self, lines: int = 40) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join("    " + line for line in text[-lines:])

    def unexpected_lines(self) -> list[str]:
        """Warnings and errors, but for Airflow's absence and our readiness probes."""
        text = self.log_path.read_text(errors="replace").splitlines()
        return [line for line in text
                if any(w in line for w in ("WARNING", "ERROR", "CRITICAL", "Traceback", "Exception"))
                and not any(ok in line for ok in EXPECTED_WARNINGS)]

    def counts(self) -> tuple[int, int, int]:
        """(rows in instances, rows in runs, files under studies/)."""
        [(instances,)] = query(self.index, "SELECT COUNT(*) FROM instances")
        [(runs,)] = query(self.index, "SELECT COUNT(*) FROM runs")
        return instances, runs, count_files(self.data / "studies")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


def recv_listener(fsync: str, flows: Path, new_index_url: Callable[[], str] | None = None,
                  ) -> Callable[[DataSet, Path], tuple[float, str]]:
    """The listener's receive; ``new_index_url``: an empty PostgreSQL index for each push (else SQLite)."""
    def receive(data: DataSet, work: Path) -> tuple[float, str]:
        listener = Listener(work, flows, fsync, new_index_url() if new_index_url else None)
        try:
            try:
                seconds = push_storescu(listener.port, data, LISTENER_AE)
            except Failed as exc:
                raise Failed(f"{exc}\n  listener log:\n{listener.log_tail()}") from None
            if listener.proc.poll() is not None:
                raise Failed(f"listener died (exit {listener.proc.returncode}):\n{listener.log_tail()}")
            rows, runs, files = listener.counts()
        finally:
            listener.stop()
        odd = listener.unexpected_lines()
        if rows != data.count or files != data.count:
            raise Failed(f"listener indexed {rows} and stored {files} of {data.count} instances\n"
                         f"  listener log:\n{listener.log_tail()}")
        if runs < 1:
            raise Failed(f"no run opened: the flow's trigger did not match\n  listener log:\n{listener.log_tail()}")
        note = f"{runs} run opened" + (f"; {len(odd)} unexpected log lines, e.g. {odd[0]!r}" if odd else "")
        return seconds, note
    return receive


# -- the benchmark ----------------------------------------------------------------------------
def rss_kb(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def measure_rss(data: DataSet, flows: Path, scratch: Path) -> tuple[float, float, float, float]:
    """(RSS before the push, peak sampled RSS, VmHWM after, push seconds), MB."""
    work = scratch / "rss"
    work.mkdir()
    os.sync()
    listener = Listener(work, flows, "never")
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                samples.append(rss_kb(listener.proc.pid)["VmRSS"])
            except (OSError, KeyError):
                return
            stop.wait(0.05)

    try:
        time.sleep(0.5)  # settled after start
        before = rss_kb(listener.proc.pid)["VmRSS"]
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            seconds = push_storescu(listener.port, data, LISTENER_AE)
        except Failed as exc:
            raise SystemExit(f"FAILED: listener on {data.name}: {exc}\n  listener log:\n{listener.log_tail()}")
        finally:
            stop.set()
            sampler.join()
        hwm = rss_kb(listener.proc.pid)["VmHWM"]
        rows, _, files = listener.counts()
    finally:
        listener.stop()
    if rows != data.count or files != data.count:
        raise SystemExit(f"FAILED: listener indexed {rows} and stored {files} of {data.count} instances\n"
                         f"{listener.log_tail()}")
    odd = listener.unexpected_lines()
    if odd:
        print(f"  note: {len(odd)} unexpected listener log lines, e.g. {odd[0]!r}")
    shutil.rmtree(work)
    print(f"  {len(samples)} samples")
    return before / 1024, max(samples) / 1024, hwm / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="pushes per receiver and data set (median)")
    parser.add_argument("--ct-slices", type=int, default=300)
    parser.add_argument("--small", type=int, default=3000, help="number of small 64x64 instances")
    parser.add_argument("--rss-slices", type=int, default=2000, help="512x512 slices of the RSS study (0: skip)")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--no-postgres", action="store_true", help="skip the listener with its index on PostgreSQL")
    args = parser.parse_args()
    t_start = time.monotonic()
    load_start = os.getloadavg()[0]

    require(("storescu", "storescp", "Orthanc"), "bench-ingest", "dcmtk and orthanc")
    args.cache.mkdir(parents=True, exist_ok=True)
    sets = [make_ct(args.cache, args.ct_slices, 512), make_small(args.cache, args.small, 64)]
    big = make_big(args.cache, args.rss_slices, 512) if args.rss_slices else None

    scratch = Path(tempfile.mkdtemp(prefix="raddeploy-bench-ingest-"))
    flows = scratch / "flows"
    flows.mkdir()
    shutil.copy(REPO / "flows" / "ct_threshold.yaml", flows / "ct_threshold.yaml")
    receivers = {
        "copy": recv_copy,
        "storescp": recv_storescp,
        "orthanc": recv_orthanc,
        "listener": recv_listener("never", flows),
        "listener fsync=always": recv_listener("always", flows),
    }
    postgres = None
    if not args.no_postgres:
        try:
            postgres = PostgresServer.start(durable=True)
        except PostgresUnavailable as exc:
            raise SystemExit(f"FAILED: {exc}\n(or run with --no-postgres)") from None
        pg_version = postgres.version
        receivers[PG] = recv_listener("never", flows, postgres.new_index_url)
        receivers[PG_FSYNC] = recv_listener("always", flows, postgres.new_index_url)
    results = {}
    try:
        for data in sets:
            print(f"\n{data.name}: {args.repeats} x {len(receivers)} receivers", flush=True)
            results[data.name] = (data, measure(data, receivers, args.repeats, scratch / data.name.split()[0],
                                                width=34))
    finally:
        if postgres is not None:
            postgres.stop()
    rss = None
    if big is not None:
        print(f"\nlistener RSS while receiving {big.name} ({big.nbytes / 1e9:.2f} GB), one push", flush=True)
        rss = measure_rss(big, flows, scratch)
    shutil.rmtree(scratch, ignore_errors=True)

    print("\n" + "=" * 78)
    print("Receive throughput: DCMTK storescu (one association, TCP_NODELAY=1) -> receiver, loopback, "
          f"{os.cpu_count()} cores")
    print_load(load_start)
    if postgres is not None:
        print(f"{PG}: PostgreSQL {pg_version}, local, TCP loopback, its durable defaults (fsync, "
              "synchronous_commit, full_page_writes on); with RADDEPLOY_FSYNC=never the listener's session "
              "has synchronous_commit off")
    meds = {}
    for name, (data, times) in results.items():
        meds[name] = (data, table(data, times, "receiver", ("storescp", "copy")))
    if rss is not None:
        before, peak, hwm, seconds = rss
        print(f"\nlistener RSS, {big.name} study ({big.count} instances, {big.nbytes / 1e9:.2f} GB) in "
              f"{seconds:.1f} s ({big.nbytes / 1e6 / seconds:.0f} MB/s): before {before:.0f} MB, "
              f"peak {peak:.0f} MB (sampled every 50 ms; VmHWM {hwm:.0f} MB)")

    print("\nFor README.md (targets: CT >= 0.7x storescp, small >= 0.5x storescp, both above Orthanc; "
          "RSS <= 150 MB for a 1 GB study):\n")
    (ct, ct_med), (small, small_med) = meds.values()
    print("| receiver | CT: s | ratio to storescp | small: s | ratio to storescp |")
    print("|---|---|---|---|---|")
    for name in ct_med:
        print(f"| {name} | {ct_med[name]:.2f} | {ct_med['storescp'] / ct_med[name]:.2f}x | "
              f"{small_med[name]:.2f} | {small_med['storescp'] / small_med[name]:.2f}x |")
    verdicts = []
    for data, med, target in ((ct, ct_med, 0.7), (small, small_med, 0.5)):
        ratio = med["storescp"] / med["listener"]
        ok = ratio >= target and med["listener"] < med["orthanc"]
        verdicts.append(f"{data.name}: listener {ratio:.2f}x storescp (target {target}x), "
                        f"{med['orthanc'] / med['listener']:.2f}x Orthanc: {'met' if ok else 'NOT met'}")
    if postgres is not None:
        for data, med in ((ct, ct_med), (small, small_med)):
            verdicts.append(f"{data.name}, index on PostgreSQL: listener {med['storescp'] / med[PG]:.2f}x storescp "
                            f"(SQLite: {med['storescp'] / med['listener']:.2f}x); fsync=always "
                            f"{med['storescp'] / med[PG_FSYNC]:.2f}x (SQLite: "
                            f"{med['storescp'] / med['listener fsync=always']:.2f}x)")
    if rss is not None:
        peak = max(rss[1], rss[2])
        verdicts.append(f"RSS receiving {big.nbytes / 1e9:.2f} GB: peak {peak:.0f} MB "
                        f"(before {rss[0]:.0f} MB; target <= 150 MB): {'met' if peak <= 150 else 'NOT met'}")
    print_end(verdicts, t_start, args.cache)


if __name__ == "__main__":
    main()
