"""Typed failures of the provider's tasks, carrying what an operator needs to act."""

from __future__ import annotations

from dataclasses import dataclass, field

from airflow.sdk.exceptions import AirflowException


@dataclass
class ModelFailed(AirflowException):
    """A model container ended without success.

    ``exit_code`` is None when the container never reported one; ``oom_killed``: the kernel
    killed it for exceeding its memory limit (``mem_limit``, bytes or as Docker was given
    it); ``log_tail``: the last lines of its log. ``str()`` says all of it in words.
    """

    task_id: str
    image: str
    exit_code: int | None
    oom_killed: bool = False
    mem_limit: int | str | None = None
    log_tail: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.oom_killed:
            limit = f"{self.mem_limit // 2**20} MiB" if isinstance(self.mem_limit, int) else str(self.mem_limit)
            reason = f"was killed for running out of memory (limit {limit}); raise mem_limit in the flow"
        else:
            reason = f"exited with code {self.exit_code}"
        tail = "\n".join(self.log_tail)
        return f"model {self.task_id} ({self.image}) {reason}\nlast log lines:\n{tail}"
