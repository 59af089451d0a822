"""GPUs: which this host has, which one a model task may use, and how a container gets it.

- **The host's GPUs**: configured (``RADDEPLOY_GPUS=0,1``) or found with ``nvidia-smi -L``.
  Their count sizes the Airflow pool that GPU model tasks take slots of.
- **Leases**: the pool counts GPUs across the whole deployment; it cannot say *which* GPU.
  Each task therefore takes, at run time, an exclusive lock per device id (``flock`` on a
  file in a host-local folder). The kernel drops the locks when the task process dies, crash
  or SIGKILL included, so a GPU is never lost to a dead task, and two live tasks never share
  one.
- **The container's share**: the labels that mark a container as holding leased GPUs, and
  the two ways to hand the ids over (a Docker device request, or ``NVIDIA_VISIBLE_DEVICES``
  where NVIDIA's runtime is Docker's default); which left-over containers hold our GPUs.

No Airflow and no Docker import: tested alone, with real processes.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
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


class GpuLease:
    """Holds locks on ``count`` device ids out of ``device_ids``; use as a context manager."""

    def __init__(self, device_ids: Sequence[str], count: int, lock_dir: Path, timeout: float | None = None,
                 poll: float = 0.25, on_wait: Callable[[str], None] | None = None) -> None:
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

    def _try(self, device_id: str) -> int | None:
        fd = os.open(self.lock_dir / f"gpu-{device_id}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for people looking
        return fd

    def acquire(self) -> list[str]:
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        told = False
        while True:
            for device_id in self.device_ids:
                if device_id not in self.held and len(self.held) < self.count:
                    fd = self._try(device_id)
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
