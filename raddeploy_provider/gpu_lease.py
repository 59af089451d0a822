"""GPU leases: which device ids of this host a model task may use, held until it ends.

The Airflow pool counts GPUs across the whole deployment; it cannot say *which* GPU. Each
task therefore takes, at run time, an exclusive lock per device id (``flock`` on a file in
a host-local folder). The kernel drops the locks when the task process dies, crash or
SIGKILL included, so a GPU is never lost to a dead task, and two live tasks never share
one. No Airflow import: tested alone, with real processes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger(__name__)


class LeaseTimeout(Exception):
    """No set of free devices came up in time."""


class GpuLease:
    """Holds locks on ``count`` device ids out of ``device_ids``; use as a context manager."""

    def __init__(self, device_ids: Sequence[str], count: int, lock_dir: Path, timeout: float | None = None,
                 poll: float = 0.25, on_wait: Callable[[str], None] | None = None) -> None:
        if count > len(device_ids):
            raise LeaseTimeout(f"{count} GPUs asked for, but this host has {len(device_ids)} "
                               f"({', '.join(device_ids) or 'none'}): set RADDEPLOY_GPUS or run the task "
                               "on a host with enough GPUs (its Celery queue)")
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
