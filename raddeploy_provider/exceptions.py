"""Typed failures of the provider's tasks, carrying what an operator needs to act."""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException


class ModelFailed(AirflowException):
    """A model container ended without success.

    :param task_id: the model's task.
    :param image: the image it ran.
    :param exit_code: the container's exit code (None if it never reported one).
    :param oom_killed: the kernel killed it for exceeding its memory limit.
    :param mem_limit: that limit in bytes (or as Docker was given it), for the message.
    :param log_tail: the last lines of the container's log.
    """

    def __init__(self, task_id: str, image: str, exit_code: int | None, oom_killed: bool,
                 mem_limit: int | str | None, log_tail: list[str]) -> None:
        self.task_id = task_id
        self.image = image
        self.exit_code = exit_code
        self.oom_killed = oom_killed
        self.mem_limit = mem_limit
        self.log_tail = log_tail
        super().__init__(self._message())

    def _message(self) -> str:
        if self.oom_killed:
            limit = f"{self.mem_limit // 2**20} MiB" if isinstance(self.mem_limit, int) else str(self.mem_limit)
            reason = f"was killed for running out of memory (limit {limit}); raise mem_limit in the flow"
        else:
            reason = f"exited with code {self.exit_code}"
        tail = "\n".join(self.log_tail)
        return f"model {self.task_id} ({self.image}) {reason}\nlast log lines:\n{tail}"
