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
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from common import (CACHE, DataSet, Failed, copy_files, count_files, make_ct, make_small, measure,  # noqa: E402
                    print_end, print_load, push_storescu, require, stop_process, table)
from peers import DCMTK_ENV, free_port, require_tool, wait_port  # noqa: E402

from raddeploy_provider.dicom.scu import Node, send_files  # noqa: E402

SCP_AE = "STORESCP"
TARGET = 0.8  # send_files / storescu, on both data sets


# -- the receiver -------------------------------------------------------------------------------
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
        stop_process(self.proc)
        self._log.close()
        got = count_files(self.out)
        if got != (0 if self.ignore else data.count):
            raise Failed(f"storescp wrote {got} of {data.count} files")


# -- senders ------------------------------------------------------------------------------------
def send_storescu(data: DataSet, work: Path, pdu: int) -> float:
    scp = StoreSCP(work, pdu)
    try:
        seconds = push_storescu(scp.port, data, SCP_AE, extra=("-q",))
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
    return copy_files(data, work)


SENDERS = {"storescu": send_storescu, "send_files": send_ours, "socket (no DICOM)": send_socket, "cp": send_cp}


# -- the benchmark ------------------------------------------------------------------------------
def measure_senders(data: DataSet, repeats: int, scratch: Path, pdu: int) -> dict[str, list[float]]:
    runs = {name: (lambda data, work, send=send: (send(data, work, pdu), "")) for name, send in SENDERS.items()}
    return measure(data, runs, repeats, scratch, width=18)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="pushes per sender and data set (median)")
    parser.add_argument("--ct-slices", type=int, default=300)
    parser.add_argument("--small", type=int, default=3000, help="number of small 64x64 instances")
    parser.add_argument("--pdu", type=int, default=131072, help="storescp's maximum PDU (4096..131072)")
    parser.add_argument("--ignore", action="store_true", help="storescp receives but stores nothing")
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args()
    StoreSCP.ignore = args.ignore
    t_start = time.monotonic()
    load_start = os.getloadavg()[0]

    require(("storescu", "storescp"), "bench-send", "dcmtk")
    args.cache.mkdir(parents=True, exist_ok=True)
    sets = [make_ct(args.cache, args.ct_slices, 512), make_small(args.cache, args.small, 64)]

    scratch = Path(tempfile.mkdtemp(prefix="raddeploy-bench-send-"))
    results = []
    try:
        for data in sets:
            print(f"\n{data.name}: {args.repeats} x {len(SENDERS)} senders", flush=True)
            results.append((data, measure_senders(data, args.repeats, scratch / data.name.split()[0], args.pdu)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print("\n" + "=" * 78)
    print(f"Send throughput to DCMTK storescp (+B, -pdu {args.pdu}{', --ignore' if args.ignore else ''}, "
          "TCP_NODELAY=1), loopback, "
          f"{os.cpu_count()} cores")
    print_load(load_start)
    verdicts = []
    for data, times in results:
        med = table(data, times, "sender", ("storescu",))
        ratio = med["storescu"] / med["send_files"]
        verdicts.append(f"{data.name}: send_files {ratio:.2f}x storescu (target {TARGET}x): "
                        f"{'met' if ratio >= TARGET else 'NOT met'}")
    print_end(verdicts, t_start, args.cache)


if __name__ == "__main__":
    main()
