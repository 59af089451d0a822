"""``raddeploy demo``: the body-contour flow end to end against a running ``raddeploy run``.

It plays the clinic's two ends: a planning system that receives (a DICOM receiver on the
flow's destination, ``STORESCP`` on port 11113 of this host, as ``flows/body_contour.yaml``
says) and a CT scanner that sends (a synthetic phantom: a body ellipse with two lungs and a
spine, :mod:`raddeploy.phantom`). It pushes the phantom to the listener, waits for the
RTSTRUCT the flow's model writes, checks it (every reference resolves to the pushed CT, the
ROIs BODY, LUNG_L, LUNG_R are there, the BODY area on the middle slice is within 5 % of the
phantom's; :mod:`raddeploy.rtcheck`) and prints where the run is in the Airflow UI.

Everything it prints is UIDs, counts and areas: the phantom's name is synthetic anyway.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import RTStructureSetStorage

from raddeploy_provider.dicom.scu import Node, send_files

#: The flow the demo exercises, and where its destination is (flows/body_contour.yaml).
DAG_ID = "body_contour"
RECEIVER_AE = "STORESCP"
RECEIVER_PORT = 11113
#: The largest relative error of the BODY area on the middle slice that passes.
AREA_TOLERANCE = 0.05


@dataclass
class Outcome:
    """What the demo saw: the run's place in the UI, the RTSTRUCT, and its problems (empty: passed)."""

    run_url: str
    rtstruct: Path | None = None
    received: int = 0
    problems: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.rtstruct is not None and not self.problems


class Receiver:
    """A DICOM storage SCP (pynetdicom) that writes what it receives into ``folder``."""

    def __init__(self, folder: Path, port: int, ae_title: str, host: str = "0.0.0.0") -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        self.folder = folder
        self.received: list[Path] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        try:
            self._server = ae.start_server((host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        except OSError as exc:
            raise RuntimeError(f"cannot receive on port {port} ({exc}): stop what uses it (another demo, or a "
                               f"storescp), or give --receive-port and a flow destination on that port") from None

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = self.folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        with self._lock:
            self.received.append(path)
        return 0x0000

    def files(self) -> list[Path]:
        with self._lock:
            return list(self.received)

    def stop(self) -> None:
        self._server.shutdown()


def run_demo(*, host: str = "127.0.0.1", port: int = 11112, ae_title: str = "RADDEPLOY",
             ui_url: str = "http://127.0.0.1:8080", receive_port: int = RECEIVER_PORT, timeout: float = 300.0,
             slices: int = 20, keep: Path | None = None, say=print) -> Outcome:
    """Push a phantom CT to the listener ``ae_title`` at ``host:port`` (``raddeploy run``'s defaults),
    wait for the body-contour RTSTRUCT on ``receive_port``, check it; ``say`` gets each line."""
    from raddeploy import phantom, rtcheck

    work = keep or Path(tempfile.mkdtemp(prefix="raddeploy-demo-"))
    (work / "ct").mkdir(parents=True, exist_ok=True)
    (work / "received").mkdir(exist_ok=True)
    made = phantom.write_phantom(work / "ct", slices=slices)
    run_id = f"{made.study_uid}.1"
    outcome = Outcome(run_url=f"{ui_url.rstrip('/')}/dags/{DAG_ID}/runs/{run_id}")
    receiver = Receiver(work / "received", receive_port, RECEIVER_AE)
    try:
        say(f"phantom CT: {len(made.files)} slices, study {made.study_uid} (in {work / 'ct'})")
        node = Node(host=host, port=port, ae_title=ae_title, calling_ae_title="DEMO_CT")
        report = send_files(node, made.files)
        if report.unreachable or len(report.accepted) != len(made.files):
            why = report.unreachable or "; ".join(f"{r.sop_instance_uid}: {r.reason}" for r in report.refused)
            outcome.problems.append(f"the listener at {host}:{port} (AE {ae_title}) did not "
                                    f"take the phantom: {why}. Is `raddeploy run` (or `make run`) running?")
            return outcome
        say(f"pushed to {ae_title}@{host}:{port}; waiting for the RTSTRUCT on port "
            f"{receive_port} (the flow waits for the study to be quiet, then runs the model) ...")
        outcome.rtstruct = _wait_for_rtstruct(receiver, made.study_uid, timeout)
        outcome.received = len(receiver.files())
        if outcome.rtstruct is None:
            outcome.problems.append(f"no RTSTRUCT of study {made.study_uid} arrived in {timeout:.0f} s: look at "
                                    f"the run in the Airflow UI ({outcome.run_url}); is {DAG_ID} among the flows "
                                    f"(`raddeploy validate`), and its destination port {receive_port}?")
            return outcome
        outcome.problems += rtcheck.check_rtstruct(outcome.rtstruct, made.files)
        outcome.lines += _areas(rtcheck.roi_areas(outcome.rtstruct), made, outcome.problems)
        for line in outcome.lines:
            say(line)
    finally:
        receiver.stop()
    return outcome


def _wait_for_rtstruct(receiver: Receiver, study_uid: str, timeout: float) -> Path | None:
    deadline = time.monotonic() + timeout
    seen: set[Path] = set()
    while time.monotonic() < deadline:
        for path in receiver.files():
            if path in seen:
                continue
            seen.add(path)
            ds = dcmread(path, stop_before_pixels=True)
            if ds.SOPClassUID == RTStructureSetStorage and ds.StudyInstanceUID == study_uid:
                return path
        time.sleep(0.5)
    return None


def _areas(areas: dict[str, dict[float, float]], made, problems: list[str]) -> list[str]:
    """One line per ROI (slices, area on the middle slice); the BODY area against the phantom's."""
    lines = []
    middle = made.slice_z[len(made.slice_z) // 2]
    for name in ("BODY", "LUNG_L", "LUNG_R"):
        if name not in areas:
            problems.append(f"ROI {name} is missing")
            continue
        area = _at(areas[name], middle)
        lines.append(f"  {name}: contours on {len(areas[name])} slices; middle slice {area / 100:.1f} cm²")
    if "BODY" in areas:
        truth = made.body_area_mm2
        error = abs(_at(areas["BODY"], middle) - truth) / truth
        verdict = "ok" if error <= AREA_TOLERANCE else "TOO FAR"
        lines.append(f"  BODY area vs the phantom's {truth / 100:.1f} cm²: {error:.1%} off ({verdict}, at most "
                     f"{AREA_TOLERANCE:.0%})")
        if error > AREA_TOLERANCE:
            problems.append(f"the BODY area on the middle slice is {error:.1%} off the phantom's")
    return lines


def _at(by_z: dict[float, float], z: float) -> float:
    """The area on the slice at ``z`` (the nearest contour plane: coordinates are written rounded)."""
    if not by_z:
        return 0.0
    nearest = min(by_z, key=lambda plane: abs(plane - z))
    return by_z[nearest] if abs(nearest - z) < 0.01 + 1e-6 * abs(z) else 0.0
