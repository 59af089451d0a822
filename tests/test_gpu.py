"""The GPU module: leases with real locks, threads and processes; what containers are given (no Docker, no Airflow).

flock locks belong to an open file description: two leases opened separately conflict even
in one process (Airflow runs one task per process, the tests use threads too), and the
kernel drops a lock when its holder dies, SIGKILL included.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from raddeploy_provider import gpu
from raddeploy_provider.gpu import (
    GPU_LABEL,
    GPU_SCOPE_LABEL,
    GpuLease,
    LeaseTimeout,
    NotEnoughGpus,
    UnsafeLockDir,
    container_gpus,
    default_lock_dir,
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
    assert not (tmp_path / "locks").exists()  # a CPU model touches no lock folder


# -- the lock folder is private: no /tmp path, no link, nobody else's ---------------------------

def test_default_lock_dir_is_private_never_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_lock_dir({}, euid=0) == Path("/run/raddeploy/gpu-locks")
    assert default_lock_dir({"XDG_RUNTIME_DIR": "/run/user/1000"}, euid=1000) == \
        Path("/run/user/1000/raddeploy-gpu-locks")
    assert default_lock_dir({"XDG_CACHE_HOME": "/home/u/.cache"}, euid=1000) == \
        Path("/home/u/.cache/raddeploy/gpu-locks")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_lock_dir({}, euid=1000) == tmp_path / ".cache" / "raddeploy" / "gpu-locks"

    from raddeploy_provider.config import load_settings

    monkeypatch.delenv("RADDEPLOY_GPU_LOCK_DIR", raising=False)
    assert load_settings().gpu_lock_dir == default_lock_dir()
    assert not str(load_settings().gpu_lock_dir).startswith("/tmp")
    monkeypatch.setenv("RADDEPLOY_GPU_LOCK_DIR", str(tmp_path / "mine"))
    assert load_settings().gpu_lock_dir == tmp_path / "mine"  # the setting still wins


def test_lock_dir_is_created_0700_and_lock_files_0600(tmp_path: Path) -> None:
    locks = tmp_path / "deep" / "locks"
    with lease(locks) as ids:
        assert (locks.stat().st_mode & 0o7777) == 0o700
        assert (locks / f"gpu-{ids[0]}.lock").stat().st_mode & 0o7777 == 0o600


def _victim(tmp_path: Path) -> Path:
    """A file of root's (the worker's) that a local user would like truncated."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me\n")
    return victim / "precious"


def test_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = _victim(tmp_path)
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    (locks / "gpu-0.lock").symlink_to(target)
    (locks / "gpu-1.lock").symlink_to(tmp_path / "victim" / "absent")  # a dangling one: not created either
    for ids in (["0"], ["1"]):
        with pytest.raises(UnsafeLockDir, match=r"gpu-\d\.lock is a symbolic link: refused"):
            lease(locks, ids=ids).acquire()
    assert target.read_text() == "keep me\n"
    assert not (tmp_path / "victim" / "absent").exists()


def test_hard_linked_lock_file_is_refused(tmp_path: Path) -> None:
    target = _victim(tmp_path)
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    os.link(target, locks / "gpu-0.lock")
    with pytest.raises(UnsafeLockDir, match="has other hard links"):
        lease(locks, ids=["0"]).acquire()
    assert target.read_text() == "keep me\n"


def test_symlinked_lock_dir_is_refused_and_nothing_written_behind_it(tmp_path: Path) -> None:
    behind = _victim(tmp_path).parent
    (tmp_path / "locks").symlink_to(behind)
    with pytest.raises(UnsafeLockDir, match="is a symbolic link or not a folder: refused"):
        lease(tmp_path / "locks").acquire()
    assert sorted(p.name for p in behind.iterdir()) == ["precious"]


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_group_or_world_writable_lock_dir_is_refused(tmp_path: Path, mode: int) -> None:
    locks = tmp_path / "locks"
    locks.mkdir()
    locks.chmod(mode)
    with pytest.raises(UnsafeLockDir, match=f"is group- or world-writable \\(mode {mode:04o}\\)"):
        lease(locks).acquire()
    assert list(locks.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a folder of another user's, as a root worker meets it")
def test_a_local_users_trap_in_tmp_does_not_truncate_roots_file(tmp_path: Path) -> None:
    """The attack: user 1000 prepares the lock folder a root worker would use, with a link to root's file."""
    target = _victim(tmp_path)
    shared_tmp = Path(tempfile.mkdtemp(prefix="raddeploy-test-tmp-"))  # pytest's tmp_path is root's only
    try:
        shared_tmp.chmod(0o1777)  # like /tmp
        trap = subprocess.run(["sh", "-c", 'mkdir -m 755 "$1" && ln -s "$2" "$1/gpu-0.lock"', "trap",
                               str(shared_tmp / "raddeploy-gpu-locks"), str(target)],
                              user=1000, group=1000, capture_output=True, text=True)
        assert trap.returncode == 0, trap.stderr
        with pytest.raises(UnsafeLockDir, match=r"is owned by uid 1000, not by this user \(uid 0\)"):
            lease(shared_tmp / "raddeploy-gpu-locks", ids=["0"]).acquire()
        assert target.read_text() == "keep me\n"
    finally:
        shutil.rmtree(shared_tmp)


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


# -- hosts without GPUs ------------------------------------------------------------------------

def test_the_cpu_fallback_applies_only_where_the_host_has_too_few_gpus_and_it_is_allowed() -> None:
    assert gpu.runs_on_cpu(1, [], "cpu")
    assert gpu.runs_on_cpu(2, ["0"], "cpu")
    assert not gpu.runs_on_cpu(1, ["0"], "cpu")  # a GPU there: it is used
    assert not gpu.runs_on_cpu(1, [], "none")  # not allowed: the task waits
    assert not gpu.runs_on_cpu(0, [], "cpu")  # a CPU model is no fallback


def test_pool_size_one_slot_per_gpu_or_the_fallback_slots() -> None:
    assert gpu.pool_size(["0", "1"], "none")[0] == 2
    assert gpu.pool_size(["0", "1"], "cpu")[0] == 2
    assert gpu.pool_size([], "cpu") == (gpu.FALLBACK_SLOTS, "no GPU on this host: GPU models run on the CPU "
                                        f"(RADDEPLOY_GPU_FALLBACK=cpu), {gpu.FALLBACK_SLOTS} at a time")
    slots, description = gpu.pool_size([], "none")
    assert slots == 0 and "RADDEPLOY_GPUS" in description and "RADDEPLOY_GPU_FALLBACK=cpu" in description


def test_shortfall_names_the_pool_its_slots_the_models_and_what_to_set() -> None:
    assert gpu.shortfall("raddeploy_gpu", 2, [("seg", 1), ("refine", 2)]) is None  # busy slots are no shortfall
    assert gpu.shortfall("raddeploy_gpu", 0, [("fold_0", 1), ("merge", 0)]) == (
        "waiting for a GPU: pool raddeploy_gpu has 0 slots; 'fold_0' needs 1; set RADDEPLOY_GPUS (the host's GPU "
        "ids) or RADDEPLOY_GPU_FALLBACK=cpu to run GPU models on the CPU")
    assert gpu.shortfall("p", 1, [("a", 1), ("b", 3)]).startswith("waiting for a GPU: pool p has 1 slot; 'b' needs 3;")


def test_start_up_summary_lists_flows_with_gpu_models_and_what_they_will_do() -> None:
    flows = [("ensemble", [("fold_0", 1), ("merge", 0)]), ("threshold", [("threshold", 0)]), ("big", [("x", 3)])]
    assert gpu.summary("raddeploy_gpu", [], "none", flows) == [
        "GPUs: none found; pool raddeploy_gpu: 0 slots (no GPU found on this host: GPU models wait (set "
        "RADDEPLOY_GPUS, or RADDEPLOY_GPU_FALLBACK=cpu))",
        "  flow ensemble: fold_0 (1 GPU): " + gpu.shortfall("raddeploy_gpu", 0, [("fold_0", 1)]),
        "  flow big: x (3 GPUs): " + gpu.shortfall("raddeploy_gpu", 0, [("x", 3)]),
    ]
    on_cpu = gpu.summary("raddeploy_gpu", [], "cpu", flows)
    assert on_cpu[1:] == ["  flow ensemble: fold_0 (1 GPU): runs on the CPU (RADDEPLOY_GPU_FALLBACK=cpu)",
                          "  flow big: x (3 GPUs): " + gpu.shortfall("raddeploy_gpu", 2, [("x", 3)], "cpu")]
    # with the fallback on, the advice is not to turn it on
    assert gpu.shortfall("raddeploy_gpu", 2, [("x", 3)], "cpu").endswith(
        "'x' needs 3; RADDEPLOY_GPU_FALLBACK=cpu runs at most 2 GPUs' worth at a time: give the model `gpu: 2` or "
        "fewer, or set RADDEPLOY_GPUS on a host that has the GPUs")
    assert gpu.summary("raddeploy_gpu", ["0", "1"], "none", flows)[1:] == [
        "  flow ensemble: fold_0 (1 GPU): ok",
        "  flow big: x (3 GPUs): " + gpu.shortfall("raddeploy_gpu", 2, [("x", 3)]),
    ]


# -- queue depth -------------------------------------------------------------------------------

def test_the_pool_holds_depth_slots_per_gpu_and_never_deepens_the_cpu_fallback() -> None:
    assert gpu.pool_size(["0", "1"], "none", depth=2) == (
        4, "GPUs of this host (0, 1); 2 slots each: one model runs, the next has started and waits for the GPU's lease")
    assert gpu.pool_size(["0", "1"], "cpu", depth=2)[0] == 4  # GPUs there: they are used, leased
    assert gpu.pool_size([], "cpu", depth=2)[0] == gpu.FALLBACK_SLOTS  # CPU runs, no lease to wait on
    assert gpu.pool_size([], "none", depth=2)[0] == 0


def test_shortfall_counts_gpus_not_slots_at_a_deeper_queue() -> None:
    assert gpu.shortfall("raddeploy_gpu", 4, [("seg", 2)], depth=2) is None  # 2 GPUs hold it
    # Within the pool's 4 slots but more than its 2 GPUs: the task would start and fail at its lease.
    assert gpu.shortfall("raddeploy_gpu", 4, [("huge", 3)], depth=2) == (
        "too few GPUs (the model task fails): pool raddeploy_gpu has 4 slots, 2 per GPU: 2 GPUs; 'huge' needs 3; "
        "set RADDEPLOY_GPUS (the host's GPU ids) or RADDEPLOY_GPU_FALLBACK=cpu to run GPU models on the CPU")
    assert gpu.shortfall("raddeploy_gpu", 4, [("huge", 5)], depth=2).startswith(
        "waiting for a GPU: pool raddeploy_gpu has 4 slots, 2 per GPU: 2 GPUs; 'huge' needs 5;")  # never scheduled
    # The CPU fallback's slots are GPUs' worth already.
    assert gpu.shortfall("raddeploy_gpu", 2, [("x", 2)], "cpu", depth=2) is None
    assert gpu.summary("raddeploy_gpu", ["0", "1"], "none", [("big", [("x", 3)])], depth=2)[1] == (
        "  flow big: x (3 GPUs): " + gpu.shortfall("raddeploy_gpu", 4, [("x", 3)], depth=2))


def test_a_task_started_ahead_takes_the_lease_the_moment_the_gpu_frees(tmp_path) -> None:
    """Queue depth 2: the next task waits started; the GPU passes to it within a lease poll (gpu.POLL),
    not after a task start."""
    import threading
    locks = tmp_path / "locks"
    first = gpu.GpuLease(["0"], 1, locks)
    assert first.acquire() == ["0"]
    got: list[float] = []
    second = gpu.GpuLease(["0"], 1, locks, timeout=10)
    waiter = threading.Thread(target=lambda: (second.acquire(), got.append(time.monotonic())))
    waiter.start()
    time.sleep(0.3)
    assert got == []  # still held by the first
    freed = time.monotonic()
    first.release()
    waiter.join(5)
    assert got and got[0] - freed < 0.5 and second.ids == ["0"]
    second.release()
