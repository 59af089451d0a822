"""GPUs: which this host has, which one a model task may use, and how a container gets it.

- **The host's GPUs**: configured (``RADDEPLOY_GPUS=0,1``) or found with ``nvidia-smi -L``.
  Their count sizes the Airflow pool that GPU model tasks take slots of.
- **Leases**: the pool counts GPUs across the whole deployment; it cannot say *which* GPU.
  Each task therefore takes, at run time, an exclusive lock per device id (``flock`` on a
  file in a host-local folder). The kernel drops the locks when the task process dies, crash
  or SIGKILL included, so a GPU is never lost to a dead task, and two live tasks never share
  one. The folder is private: this user's, created 0700, never a symbolic link nor group- or
  world-writable (:func:`open_lock_dir`); the default (:func:`default_lock_dir`) is no
  predictable path in ``/tmp``, and a lock file is opened without following a link and
  without truncating it before it is checked.
- **Queue depth** (``RADDEPLOY_GPU_QUEUE_DEPTH``, :func:`pool_size`): the pool holds that many
  slots per GPU, so while a model runs the next GPU task has already started (its process, DAG
  parse and set-up) and waits for the lease, which it takes the moment the GPU frees: the GPU
  does not wait for a task start. 1: a GPU task starts only when a GPU is free.
- **Hosts without GPUs** (:func:`pool_size`, :func:`shortfall`, :func:`runs_on_cpu`): the pool
  has no slot and a GPU task would wait for ever, so the sensor says why in the run note;
  ``RADDEPLOY_GPU_FALLBACK=cpu`` (demos, CI, laptops) gives the pool :data:`FALLBACK_SLOTS`
  and runs GPU models without a device, telling the container ``RADDEPLOY_GPU_FALLBACK=1``.
- **The container's share**: the labels that mark a container as holding leased GPUs, and
  the two ways to hand the ids over (a Docker device request, or ``NVIDIA_VISIBLE_DEVICES``
  where NVIDIA's runtime is Docker's default); which left-over containers hold our GPUs.

No Airflow and no Docker import: tested alone, with real processes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

#: Container label: the device ids a model container was given.
GPU_LABEL = "org.raddeploy.gpus"
#: Container label: the lock folder the lease came from (hosts may share a Docker engine's view).
GPU_SCOPE_LABEL = "org.raddeploy.gpu-locks"
#: ``/dev/shm`` of a GPU model unless its flow says: PyTorch data loaders need more than Docker's 64 MiB.
DEFAULT_GPU_SHM = 2 * 1024**3

#: Pool slots of a host without GPUs under ``RADDEPLOY_GPU_FALLBACK=cpu``: GPU models then run on
#: the CPU, at most this many GPUs' worth at a time, so a laptop stays usable.
FALLBACK_SLOTS = 2
#: ``RADDEPLOY_GPU_FALLBACK``: ``none`` (a GPU task waits for a GPU) or ``cpu``.
FALLBACK_CHOICES = ("none", "cpu")
#: What a container is told when it runs on the CPU in place of a GPU.
FALLBACK_ENV = "RADDEPLOY_GPU_FALLBACK"

_GPU_LINE = re.compile(r"^GPU (\d+):", re.MULTILINE)


def host_gpu_ids(env: Mapping[str, str] = os.environ) -> list[str]:
    """The device ids of this host's GPUs: ``RADDEPLOY_GPUS`` if set, else ``nvidia-smi -L``."""
    configured = env.get("RADDEPLOY_GPUS")
    if configured is not None:
        return [part for part in re.split(r"[,\s]+", configured) if part]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return _GPU_LINE.findall(out)


def runs_on_cpu(count: int, device_ids: Sequence[str], fallback: str) -> bool:
    """Whether a model asking ``count`` GPUs runs without a device: the host has fewer and the
    deployment allows the CPU fallback."""
    return count > len(device_ids) and count > 0 and fallback == "cpu"


def pool_size(device_ids: Sequence[str], fallback: str, depth: int = 1) -> tuple[int, str]:
    """The GPU pool's slots on a one-host deployment, and the pool's description (shown in the UI):
    ``depth`` slots per GPU (the queue depth); the CPU fallback's slots are CPU runs, never deeper."""
    if device_ids:
        each = ("one slot each" if depth == 1 else
                f"{depth} slots each: one model runs, the next has started and waits for the GPU's lease")
        return len(device_ids) * depth, f"GPUs of this host ({', '.join(device_ids)}); {each}"
    if fallback == "cpu":
        return FALLBACK_SLOTS, (f"no GPU on this host: GPU models run on the CPU ({FALLBACK_ENV}=cpu), "
                                f"{FALLBACK_SLOTS} at a time")
    return 0, f"no GPU found on this host: GPU models wait (set RADDEPLOY_GPUS, or {FALLBACK_ENV}=cpu)"


def shortfall(pool: str, slots: int, models: Iterable[tuple[str, int]], fallback: str = "none",
              depth: int = 1) -> str | None:
    """Why GPU models of a run will not be scheduled: ``models`` are (task id, GPUs) and the pool has
    ``slots`` in all, ``depth`` per GPU (the CPU fallback's: one per GPU's worth); None when every one
    fits (busy slots are a normal wait, not said here)."""
    gpus = slots if fallback == "cpu" else slots // max(1, depth)
    short = [(name, count) for name, count in models if count > gpus]
    if not short:
        return None
    needs = ", ".join(f"{name!r} needs {count}" for name, count in short)
    if fallback == "cpu":  # already on: the CPU fallback's pool holds FALLBACK_SLOTS GPUs' worth
        todo = (f"{FALLBACK_ENV}=cpu runs at most {slots} GPUs' worth at a time: give the model `gpu: {slots}` "
                "or fewer, or set RADDEPLOY_GPUS on a host that has the GPUs")
    else:
        todo = f"set RADDEPLOY_GPUS (the host's GPU ids) or {FALLBACK_ENV}=cpu to run GPU models on the CPU"
    held = f"{slots} slot{'' if slots == 1 else 's'}"
    if gpus != slots:
        held += f", {depth} per GPU: {gpus} GPU{'' if gpus == 1 else 's'}"
    # More than the pool's slots: never scheduled. More GPUs than it has, within its slots: the
    # model task starts and fails at its lease (NotEnoughGpus), as more GPUs will not appear.
    what = "waiting for a GPU" if any(count > slots for _, count in short) else "too few GPUs (the model task fails)"
    return f"{what}: pool {pool} has {held}; {needs}; {todo}"


def summary(pool: str, device_ids: Sequence[str], fallback: str,
            flows: Iterable[tuple[str, Sequence[tuple[str, int]]]], depth: int = 1) -> list[str]:
    """What ``raddeploy run`` says at start-up: the GPUs found, and each flow with GPU models.

    ``flows`` are (DAG id, [(model, GPUs), ...]); the lines hold no patient data.
    """
    slots, description = pool_size(device_ids, fallback, depth)
    lines = [f"GPUs: {', '.join(device_ids) if device_ids else 'none found'}; pool {pool}: {slots} slot"
             f"{'' if slots == 1 else 's'} ({description})"]
    for dag_id, models in flows:
        gpu_models = [(name, count) for name, count in models if count]
        if not gpu_models:
            continue
        shown = ", ".join(f"{name} ({count} GPU{'' if count == 1 else 's'})" for name, count in gpu_models)
        problem = shortfall(pool, slots, gpu_models, fallback, depth)
        if problem:
            state = problem
        elif any(runs_on_cpu(count, device_ids, fallback) for _, count in gpu_models):
            state = f"runs on the CPU ({FALLBACK_ENV}=cpu)"
        else:
            state = "ok"
        lines.append(f"  flow {dag_id}: {shown}: {state}")
    return lines


class NotEnoughGpus(ValueError):
    """A task asks for more GPUs than its host has: waiting will not help."""


def check_enough(count: int, device_ids: Sequence[str]) -> None:
    """Raise :class:`NotEnoughGpus` if ``count`` GPUs cannot ever be leased from ``device_ids``."""
    if count > len(device_ids):
        raise NotEnoughGpus(f"{count} GPU(s) asked for, but this host has {len(device_ids)} "
                            f"({', '.join(device_ids) or 'none'}): set RADDEPLOY_GPUS, or route the flow "
                            "to a GPU host's queue (RADDEPLOY_GPU_QUEUE)")


class LeaseTimeout(Exception):
    """No set of free devices came up in time."""


class UnsafeLockDir(PermissionError):
    """The lock folder or a lock file in it is not this user's private file: refused, left untouched."""


def default_lock_dir(env: Mapping[str, str] = os.environ, euid: int | None = None) -> Path:
    """Where GPU locks live unless ``RADDEPLOY_GPU_LOCK_DIR`` says: a folder only this user can write.

    Root: ``/run/raddeploy/gpu-locks``; another user: ``$XDG_RUNTIME_DIR/raddeploy-gpu-locks``,
    else ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/raddeploy/gpu-locks``. Every worker of a host
    must run as the same user to share the leases (or name one folder of that user's).
    """
    if (os.geteuid() if euid is None else euid) == 0:
        return Path("/run/raddeploy/gpu-locks")
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_absolute():
        return Path(runtime) / "raddeploy-gpu-locks"
    cache = env.get("XDG_CACHE_HOME")
    base = Path(cache) if cache and Path(cache).is_absolute() else Path.home() / ".cache"
    return base / "raddeploy" / "gpu-locks"


def _refuse(path: Path, problem: str) -> UnsafeLockDir:
    return UnsafeLockDir(f"GPU lock {path} {problem}: refused, nothing written there. Remove it, or set "
                         "RADDEPLOY_GPU_LOCK_DIR to a folder of this user's that no one else may write")


def open_lock_dir(path: Path) -> int:
    """An open descriptor of the lock folder, made 0700 if absent; :class:`UnsafeLockDir` if it is a
    symbolic link, not a folder, another user's, or group- or world-writable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refuse(path, "is a symbolic link or not a folder") from None
        raise
    info = os.fstat(fd)
    problem = None
    if info.st_uid != os.geteuid():
        problem = f"is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})"
    elif info.st_mode & 0o022:
        problem = f"is group- or world-writable (mode {stat.S_IMODE(info.st_mode):04o})"
    if problem:
        os.close(fd)
        raise _refuse(path, problem)
    return fd


def _open_lock_file(dir_fd: int, lock_dir: Path, name: str) -> int:
    """``name`` in the lock folder, created 0600; never through a link, never truncated before it is checked."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse(lock_dir / name, "is a symbolic link") from None
        raise
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_uid != os.geteuid():
        problem = f"is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})"
    elif info.st_nlink != 1:
        problem = "has other hard links"
    if problem:
        os.close(fd)
        raise _refuse(lock_dir / name, problem)
    return fd


#: Seconds between a waiting lease's tries. A lease waits for any ``count`` of the ids (not one
#: lock it could block on), so it polls; a try is a few system calls per id, and the GPU passes to
#: the task waiting for it 5 ms after it frees, on average (50 ms polls: 25 ms, each handover).
POLL = 0.01


class GpuLease:
    """Holds locks on ``count`` device ids out of ``device_ids``; use as a context manager."""

    def __init__(self, device_ids: Sequence[str], count: int, lock_dir: Path, timeout: float | None = None,
                 poll: float = POLL, on_wait: Callable[[str], None] | None = None) -> None:
        check_enough(count, device_ids)
        self.device_ids = list(device_ids)
        self.count = count
        self.lock_dir = lock_dir
        self.timeout = timeout
        self.poll = poll
        self.on_wait = on_wait
        self.held: dict[str, int] = {}  # device id -> locked fd

    @property
    def ids(self) -> list[str]:
        return list(self.held)

    def _try(self, dir_fd: int, device_id: str) -> int | None:
        fd = _open_lock_file(dir_fd, self.lock_dir, f"gpu-{device_id}.lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        pid = f"{os.getpid()}\n".encode()  # who holds it, for people looking
        os.pwrite(fd, pid, 0)
        os.ftruncate(fd, len(pid))  # our own checked file, locked by us
        return fd

    def acquire(self) -> list[str]:
        if self.count == 0:  # a CPU model: no lock folder touched
            return []
        dir_fd = open_lock_dir(self.lock_dir)
        try:
            return self._acquire(dir_fd)
        except BaseException:
            self.release()
            raise
        finally:
            os.close(dir_fd)

    def _acquire(self, dir_fd: int) -> list[str]:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        told = False
        while True:
            for device_id in self.device_ids:
                if device_id not in self.held and len(self.held) < self.count:
                    fd = self._try(dir_fd, device_id)
                    if fd is not None:
                        self.held[device_id] = fd
            if len(self.held) == self.count:
                return self.ids
            # Not enough free: give back what we hold, so two waiting tasks cannot deadlock.
            self.release()
            if deadline is not None and time.monotonic() > deadline:
                raise LeaseTimeout(f"no {self.count} free GPU(s) among {', '.join(self.device_ids)} "
                                   f"after {self.timeout:.0f} s")
            if not told and self.on_wait:
                self.on_wait(f"waiting for {self.count} free GPU(s) among {', '.join(self.device_ids)}")
                told = True
            time.sleep(self.poll)

    def release(self) -> None:
        for fd in self.held.values():
            os.close(fd)  # closing the descriptor drops the flock
        self.held.clear()

    def __enter__(self) -> list[str]:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class ContainerGpus:
    """How a container gets leased GPUs: labels to add, and either device ids for a Docker
    device request (``mode="device_request"``) or environment (``mode="env"``)."""

    labels: dict[str, str]
    environment: dict[str, str] = field(default_factory=dict)
    device_ids: list[str] = field(default_factory=list)


def container_gpus(ids: Sequence[str], mode: str, lock_dir: Path) -> ContainerGpus:
    """The container settings for leased ``ids`` (``RADDEPLOY_GPU_MODE``: device_request | env)."""
    joined = ",".join(ids)
    labels = {GPU_LABEL: joined, GPU_SCOPE_LABEL: str(lock_dir)}
    if mode == "env":  # the host's default runtime is NVIDIA's: it reads the variable
        return ContainerGpus(labels, environment={"NVIDIA_VISIBLE_DEVICES": joined})
    return ContainerGpus(labels, device_ids=list(ids))


#: Label of a GPU's network-namespace holder: the GPU lease folder it serves, then ``/<gpu id>``.
NETNS_LABEL = "org.raddeploy.netns"


def netns_holder(api: Any, image: str, lock_dir: Path, gpu_id: str) -> str:
    """The name of GPU ``gpu_id``'s network-namespace holder, started if it is not running.

    A model container with ``network_mode: none`` costs Docker its own network sandbox (a netns made
    and set up through a hook that runs the daemon's binary again, a few tenths of a second of each
    start here); one that joins a running container's namespace does not. Each GPU of a lease folder
    has one holder: no network but the loopback, every capability dropped, no new privileges, a
    read-only root, user nobody, 8 processes, 16 MiB. The caller holds the GPU's lease, so one model at
    a time is in the namespace (no two share a loopback); models without capabilities leave nothing
    in it for the next. Docker errors are the caller's to handle.
    """
    scope = str(lock_dir)
    name = f"raddeploy-netns-{hashlib.sha256(scope.encode()).hexdigest()[:10]}-{gpu_id}"
    try:
        if api.inspect_container(name)["State"]["Running"]:
            return name
        api.remove_container(name, force=True)  # stopped (a host restart, someone's `docker stop`)
    except Exception as exc:  # the Docker SDK's NotFound (no import of it in the core)
        if getattr(exc, "status_code", None) != 404:
            raise
    host_config = api.create_host_config(network_mode="none", cap_drop=["ALL"], security_opt=["no-new-privileges"],
                                         read_only=True, pids_limit=8, mem_limit=16 * 2**20)
    created = api.create_container(image, ["sleep", "2147483647"], name=name, user="65534:65534",
                                   labels={NETNS_LABEL: f"{scope}/{gpu_id}"}, host_config=host_config)
    api.start(created["Id"])
    return name


def remove_netns_holders(api: Any, lock_dir: Path) -> int:
    """Remove the network-namespace holders of ``lock_dir``'s GPUs (a stack stopping); how many went.
    Each is started again by the next model on its GPU."""
    gone = 0
    for holder in api.containers(all=True, filters={"label": NETNS_LABEL}):
        if holder["Labels"].get(NETNS_LABEL, "").rpartition("/")[0] == str(lock_dir):
            api.remove_container(holder["Id"], force=True)
            gone += 1
    return gone


def scope_filter(lock_dir: Path) -> dict[str, str]:
    """A Docker ``containers(filters=...)`` filter for containers holding GPUs of ``lock_dir``."""
    return {"label": f"{GPU_SCOPE_LABEL}={lock_dir}"}


def orphans(containers: Iterable[Mapping[str, Any]], ids: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``(container id, our device ids it holds)`` for each listed container on one of ``ids``.

    We hold the lease on ``ids``, so such a container belongs to a task that died.
    """
    ours = set(ids)
    found = []
    for container in containers:
        theirs = set((container.get("Labels") or {}).get(GPU_LABEL, "").split(","))
        if theirs & ours:
            found.append((container["Id"], sorted(theirs & ours)))
    return found


def leases(device_ids: Sequence[str], lock_dir: Path) -> dict[str, str]:
    """Each device id of this host: ``leased`` while a task holds its lock, else ``free``
    (``raddeploy status``). Looks only; never creates a lock file or takes a lease."""
    found = {}
    for device_id in device_ids:
        try:
            fd = os.open(lock_dir / f"gpu-{device_id}.lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            found[device_id] = "free"
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            found[device_id] = "free"
        except BlockingIOError:
            found[device_id] = "leased"
        finally:
            os.close(fd)
    return found
