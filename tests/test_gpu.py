"""The GPU module: leases with real locks, threads and processes; what containers are given (no Docker, no Airflow).

flock locks belong to an open file description: two leases opened separately conflict even
in one process (Airflow runs one task per process, the tests use threads too), and the
kernel drops a lock when its holder dies, SIGKILL included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from raddeploy_provider.gpu import (
    GPU_LABEL,
    GPU_SCOPE_LABEL,
    GpuLease,
    LeaseTimeout,
    NotEnoughGpus,
    container_gpus,
    host_gpu_ids,
    orphans,
    scope_filter,
)

IDS = ["0", "1"]


def lease(lock_dir: Path, count: int = 1, ids: list[str] = IDS, **kwargs: object) -> GpuLease:
    kwargs.setdefault("poll", 0.02)
    return GpuLease(ids, count, lock_dir, **kwargs)  # type: ignore[arg-type]


def test_two_leases_in_one_process_get_different_ids(tmp_path: Path) -> None:
    with lease(tmp_path) as first, lease(tmp_path) as second:
        assert sorted(first + second) == IDS
        assert (tmp_path / f"gpu-{first[0]}.lock").read_text() == f"{os.getpid()}\n"  # who holds it
    with lease(tmp_path, 2, timeout=0) as both:  # both given back
        assert both == IDS


def test_third_lease_waits_until_one_is_released(tmp_path: Path) -> None:
    first, second = lease(tmp_path), lease(tmp_path)
    first.acquire()
    second.acquire()
    waits: list[str] = []
    third = lease(tmp_path, timeout=10, on_wait=waits.append)
    got: dict[str, object] = {}

    def take() -> None:
        got["ids"] = third.acquire()
        got["at"] = time.monotonic()

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    time.sleep(0.4)
    assert thread.is_alive() and "ids" not in got  # both GPUs busy: it waits
    assert waits == ["waiting for 1 free GPU(s) among 0, 1"]
    freed = second.ids
    released = time.monotonic()
    second.release()
    thread.join(timeout=5)
    assert got["ids"] == freed
    assert got["at"] - released < 0.5  # taken at its next poll
    third.release()
    first.release()


def test_waiting_for_two_hoards_nothing(tmp_path: Path) -> None:
    """A lease waiting for 2 GPUs gives back the one it got, so a task needing 1 is not blocked."""
    holder = lease(tmp_path, ids=["0", "1"])
    holder.acquire()  # takes "0"
    greedy = lease(tmp_path, 2, timeout=10)
    thread = threading.Thread(target=greedy.acquire, daemon=True)
    thread.start()
    time.sleep(0.1)
    with lease(tmp_path, timeout=2) as small:
        assert small == ["1"]
    holder.release()
    thread.join(timeout=5)
    assert greedy.ids == IDS
    greedy.release()


CHILD = """
import sys, time
from pathlib import Path
from raddeploy_provider.gpu import GpuLease
lease = GpuLease(["0"], 1, Path(sys.argv[1]))
print(lease.acquire()[0], flush=True)
time.sleep(60)
"""


def test_lease_of_a_killed_process_is_released(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "0"
        assert (tmp_path / "gpu-0.lock").read_text() == f"{child.pid}\n"
        with pytest.raises(LeaseTimeout):
            lease(tmp_path, ids=["0"], timeout=0).acquire()  # held by the child
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=5) == -signal.SIGKILL
        started = time.monotonic()
        with lease(tmp_path, ids=["0"], timeout=0) as ids:
            assert ids == ["0"]
        assert time.monotonic() - started < 0.1  # at once, no waiting
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_more_than_the_host_has_is_refused_at_once(tmp_path: Path) -> None:
    with pytest.raises(NotEnoughGpus) as info:
        lease(tmp_path, 3)
    assert str(info.value).startswith("3 GPU(s) asked for, but this host has 2 (0, 1): set RADDEPLOY_GPUS")
    with pytest.raises(NotEnoughGpus, match=r"1 GPU\(s\) asked for, but this host has 0 \(none\)"):
        lease(tmp_path, 1, ids=[])


def test_no_gpu_asked_for_is_no_lock(tmp_path: Path) -> None:
    with lease(tmp_path / "locks", 0, ids=[], timeout=0) as ids:
        assert ids == []


def test_timeout_when_none_frees_up(tmp_path: Path) -> None:
    with lease(tmp_path, 2):
        started = time.monotonic()
        with pytest.raises(LeaseTimeout, match=r"no 1 free GPU\(s\) among 0, 1 after 0 s"):
            lease(tmp_path, timeout=0.3).acquire()
        assert 0.3 <= time.monotonic() - started < 1.5
    with lease(tmp_path, timeout=0) as ids:  # and the timed-out lease kept nothing
        assert ids == ["0"]


# -- what a container is given, and which left-overs hold our GPUs ----------------------------

def test_host_gpu_ids_from_the_setting() -> None:
    assert host_gpu_ids({"RADDEPLOY_GPUS": "0, 2,3"}) == ["0", "2", "3"]
    assert host_gpu_ids({"RADDEPLOY_GPUS": ""}) == []  # set but empty: none, and no nvidia-smi probe


def test_container_gpus_in_both_modes(tmp_path: Path) -> None:
    request = container_gpus(["1", "3"], "device_request", tmp_path)
    assert request.labels == {GPU_LABEL: "1,3", GPU_SCOPE_LABEL: str(tmp_path)}
    assert (request.device_ids, request.environment) == (["1", "3"], {})
    env = container_gpus(["1", "3"], "env", tmp_path)
    assert (env.device_ids, env.environment) == ([], {"NVIDIA_VISIBLE_DEVICES": "1,3"})
    assert env.labels == request.labels


def test_orphans_are_the_containers_on_our_ids(tmp_path: Path) -> None:
    listed = [{"Id": "a" * 64, "Labels": {GPU_LABEL: "0,1"}},
              {"Id": "b" * 64, "Labels": {GPU_LABEL: "2"}},
              {"Id": "c" * 64, "Labels": {}}]
    assert orphans(listed, ["1", "2"]) == [("a" * 64, ["1"]), ("b" * 64, ["2"])]
    assert orphans(listed, ["3"]) == []
    assert scope_filter(tmp_path) == {"label": f"{GPU_SCOPE_LABEL}={tmp_path}"}
