"""ModelOperator: run one model container of a flow on the run's folders."""

from __future__ import annotations

import json
import shutil
from typing import Any, Sequence

import yaml
from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.providers.docker.operators.docker import DockerOperator
from airflow.sdk.exceptions import AirflowException
from docker.types import Mount

from raddeploy_provider.config import load_settings
from raddeploy_provider.flows.model import ModelSpec

from .run_folder import mount_dir, run_dir

LOG_TAIL_LINES = 20


class _HostConfigExtras:
    """The Docker API client, with the flow's further container settings added to each host config.

    DockerOperator builds the host config from a fixed set of arguments; CPU and IO limits
    from a RadDeploy ``docker_kwargs`` (allow-listed by the schema) ride along here.
    """

    def __init__(self, client: Any, extras: dict[str, Any]) -> None:
        self._client = client
        self._extras = extras

    def create_host_config(self, **kwargs: Any) -> Any:
        return self._client.create_host_config(**{**kwargs, **self._extras})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class ModelOperator(DockerOperator):
    """A DockerOperator that runs one model of a flow on a run's named folders.

    Inputs are mounted read-only, each output starts empty and must hold a file when the
    container exits, static assets are mounted read-only, ``config`` is written as YAML to
    ``config_path``, and the container gets no network unless the flow asks for one.

    :param model: the flow's model (image, command, mounts, limits, ...).
    :param flow_id: the flow's DAG id, given to the container as ``RADDEPLOY_FLOW``.
    :param flow_version: given as ``RADDEPLOY_FLOW_VERSION``.
    :param flow_extra: the flow's ``extra``, given as JSON in ``RADDEPLOY_FLOW_EXTRA``.

    Other keywords go to :class:`DockerOperator` and Airflow's BaseOperator.
    """

    template_fields: Sequence[str] = tuple(DockerOperator.template_fields)
    ui_color = "#c7e3f4"

    def __init__(self, *, model: ModelSpec, flow_id: str, flow_version: str = "",
                 flow_extra: dict[str, Any] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("auto_remove", "success")
        kwargs.setdefault("mount_tmp_dir", False)
        command = list(model.command) if isinstance(model.command, tuple) else model.command
        entrypoint = list(model.entrypoint) if isinstance(model.entrypoint, tuple) else model.entrypoint
        super().__init__(
            image=model.image, command=command, entrypoint=entrypoint, environment=dict(model.environment),
            network_mode=model.network, mem_limit=model.mem_limit, shm_size=model.shm_size, user=model.user,
            working_dir=model.working_dir, labels=dict(model.labels) or None, ipc_mode=model.ipc_mode,
            force_pull=model.pull == "always", **kwargs,
        )
        self.model = model
        self.flow_id = flow_id
        self.flow_version = flow_version
        self.flow_extra = dict(flow_extra or {})

    @property
    def cli(self) -> Any:
        client = self.hook.api_client
        return _HostConfigExtras(client, self.model.host_config) if self.model.host_config else client

    def _prepare_mounts(self, context: Any) -> list[Mount]:
        mounts = []
        for name, target in self.model.inputs.items():
            source = mount_dir(context, name)
            if not source.is_dir():
                raise AirflowException(f"input {name!r} has no folder at {source}: did the task that "
                                       "writes it succeed? Clear that task to run it again.")
            mounts.append(Mount(target=target, source=str(source), type="bind", read_only=True))
        for name, target in self.model.outputs.items():
            folder = mount_dir(context, name)
            if folder.exists():  # a retry starts from an empty output, never a half-written one
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            mounts.append(Mount(target=target, source=str(folder), type="bind", read_only=False))
        static_dir = load_settings().static_dir
        for name, target in self.model.static_mounts.items():
            source = static_dir / name
            if not source.is_dir():
                raise AirflowException(f"static asset {name!r} is missing: no folder {source}. Put the "
                                       "asset there (RADDEPLOY_STATIC) or fix static_mounts in the flow.")
            mounts.append(Mount(target=target, source=str(source), type="bind", read_only=True))
        if self.model.config is not None:
            config_dir = run_dir(context) / "config" / self.task_id
            config_dir.mkdir(parents=True, exist_ok=True)
            config_file = config_dir / "config.yaml"
            config_file.write_text(yaml.safe_dump(self.model.config, sort_keys=False))
            mounts.append(Mount(target=self.model.config_path, source=str(config_file), type="bind",
                                read_only=True))
        return mounts

    def execute(self, context: Any) -> dict[str, Any]:
        self.mounts = self._prepare_mounts(context)
        env = {"RADDEPLOY_RUN_ID": context["run_id"], "RADDEPLOY_FLOW": self.flow_id,
               "RADDEPLOY_FLOW_VERSION": self.flow_version, "CONTAINER_TAG": self.image}
        if self.flow_extra:
            env["RADDEPLOY_FLOW_EXTRA"] = json.dumps(self.flow_extra)
        self.environment = {**self.environment, **env}
        if self.model.pull == "never" and not self.cli.images(name=self.image):
            raise AirflowException(f"image {self.image} is not on this host and the flow says `pull: never`: "
                                   "load or build it on every worker first")
        try:
            super().execute(context)
        except DockerContainerFailedException as exc:
            tail = "\n".join((exc.logs or [])[-LOG_TAIL_LINES:]) if isinstance(exc.logs, list) else ""
            raise AirflowException(f"model container {self.image} failed: {exc}\nlast log lines:\n{tail}") from None
        written = {name: sum(1 for p in mount_dir(context, name).rglob("*") if p.is_file())
                   for name in self.model.outputs}
        empty = [name for name, count in written.items() if count == 0]
        if empty:
            raise AirflowException(f"model {self.task_id} wrote nothing to output(s) {', '.join(empty)} "
                                   f"({', '.join(self.model.outputs[n] for n in empty)} in the container)")
        self.log.info("outputs written: %s", written)
        return {"outputs": written}
