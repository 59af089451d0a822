"""ModelOperator: run one model container of a flow on the run's folders."""

from __future__ import annotations

import shutil
from typing import Any, Sequence

from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.providers.docker.operators.docker import DockerOperator
from airflow.sdk.exceptions import AirflowException
from docker.types import Mount

from .run_folder import mount_dir

LOG_TAIL_LINES = 20


class ModelOperator(DockerOperator):
    """A DockerOperator that mounts a flow run's named folders and checks what the model wrote.

    :param inputs: mount name -> path in the container; mounted read-only. ``src`` is the
        matched DICOM the fingerprint sensor snapshotted, other names are outputs of
        upstream models.
    :param outputs: mount name -> path in the container; each starts empty and must hold
        at least one file when the container exits, or the task fails.
    :param flow_id: the flow's DAG id, given to the container as ``RADDEPLOY_FLOW``.
    :param network: Docker network mode; ``none`` (the default) cuts the model off.

    Every other keyword goes to :class:`DockerOperator` (``image``, ``command``,
    ``environment``, ``mem_limit``, ...).
    """

    template_fields: Sequence[str] = tuple(DockerOperator.template_fields)
    ui_color = "#c7e3f4"

    def __init__(self, *, inputs: dict[str, str], outputs: dict[str, str], flow_id: str,
                 network: str = "none", **kwargs: Any) -> None:
        kwargs.setdefault("auto_remove", "success")
        kwargs.setdefault("mount_tmp_dir", False)
        super().__init__(network_mode=network, **kwargs)
        self.inputs = dict(inputs)
        self.outputs = dict(outputs)
        self.flow_id = flow_id

    def execute(self, context: Any) -> dict[str, Any]:
        mounts = []
        for name, target in self.inputs.items():
            source = mount_dir(context, name)
            if not source.is_dir():
                raise AirflowException(f"input {name!r} has no folder at {source}: did the task that "
                                       "writes it succeed? Clear that task to run it again.")
            mounts.append(Mount(target=target, source=str(source), type="bind", read_only=True))
        for name, target in self.outputs.items():
            folder = mount_dir(context, name)
            if folder.exists():  # a retry starts from an empty output, never a half-written one
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            mounts.append(Mount(target=target, source=str(folder), type="bind", read_only=False))
        self.mounts = mounts
        self.environment = {**self.environment, "RADDEPLOY_RUN_ID": context["run_id"],
                            "RADDEPLOY_FLOW": self.flow_id}
        try:
            super().execute(context)
        except DockerContainerFailedException as exc:
            tail = "\n".join((exc.logs or [])[-LOG_TAIL_LINES:]) if isinstance(exc.logs, list) else ""
            raise AirflowException(f"model container {self.image} failed: {exc}\nlast log lines:\n{tail}") from None
        written = {name: sum(1 for p in mount_dir(context, name).rglob("*") if p.is_file())
                   for name in self.outputs}
        empty = [name for name, count in written.items() if count == 0]
        if empty:
            raise AirflowException(f"model {self.task_id} wrote nothing to output(s) {', '.join(empty)} "
                                   f"({', '.join(self.outputs[n] for n in empty)} in the container)")
        self.log.info("outputs written: %s", written)
        return {"outputs": written}
