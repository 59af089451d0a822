"""ModelOperator: run one model container of a flow on the run's folders, safely."""

from __future__ import annotations

import json
import os
import shutil
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import yaml
from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.providers.docker.operators.docker import DockerOperator
from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from docker.errors import APIError, DockerException
from docker.types import DeviceRequest, Mount

from raddeploy_provider import gpu
from raddeploy_provider.config import Settings, load_settings
from raddeploy_provider.exceptions import ModelFailed
from raddeploy_provider.flows.model import ModelSpec
from raddeploy_provider.store import RunDir, manifest, outputs
from raddeploy_provider.utils import audit
from raddeploy_provider.utils.runs import run_dir

LOG_TAIL_LINES = 20
#: Container label: ``<flow>/<run>/<task>`` of the run a model container belongs to.
RUN_LABEL = "org.raddeploy.run"


class _HostConfigExtras:
    """The Docker API client, with further settings added to each container's host config.

    DockerOperator builds the host config from a fixed set of arguments; the safe defaults
    (no new privileges, no capabilities, a pids limit) and a RadDeploy ``docker_kwargs``'s
    CPU and IO limits ride along here.
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

    Inputs are mounted read-only; each output starts empty and must hold a file when the
    container exits; static assets are mounted read-only; ``config`` is written as YAML to
    ``config_path``. Safe defaults: no network (unless the flow asks), no new privileges,
    every capability dropped, a memory and a pids limit, the image's own user. Permissions:
    an output folder is 2770 with the data dir's group, the config file 0640, and the
    container is a member of that group (``group_add``), so a model running as any user, or
    as root without capabilities, reads its 0640 inputs and writes its outputs while other
    users of the host can do neither (README "Security"). The flow's text is passed to
    Docker literally: nothing of it is a Jinja template (``template_fields`` is empty).
    A model with ``gpu: N`` leases N device ids of this host for as long as it runs (see
    :mod:`raddeploy_provider.gpu`). Failures say why: a :class:`ModelFailed` with the exit
    code, out of memory, and the last lines of the container's log; timeout, image not found.
    Each run is recorded in the run manifest.

    :param model: the flow's model (image, command, mounts, limits, ...).
    :param flow_id: the flow's DAG id, given to the container as ``RADDEPLOY_FLOW``.
    :param flow_version: given as ``RADDEPLOY_FLOW_VERSION``.
    :param flow_extra: the flow's ``extra``, given as JSON in ``RADDEPLOY_FLOW_EXTRA``.
    :param provenance: stamp a Contributing Equipment item (flow, version, image digest) on every
        file of the sent (``dst*``) outputs when the model succeeds
        (:mod:`raddeploy_provider.dicom.provenance`).

    Other keywords go to :class:`DockerOperator` and Airflow's BaseOperator.
    """

    # Flow text is data, never a template: `{{ conn.x.password }}` in a command or environment must
    # not be rendered into the container, and a command ending in `.sh` is not a template file.
    template_fields: Sequence[str] = ()
    template_ext: Sequence[str] = ()
    template_fields_renderers: dict[str, str] = {}
    ui_color = "#c7e3f4"

    def __init__(self, *, model: ModelSpec, flow_id: str, flow_version: str = "",
                 flow_extra: dict[str, Any] | None = None, provenance: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("mount_tmp_dir", False)
        command = list(model.command) if isinstance(model.command, tuple) else model.command
        entrypoint = list(model.entrypoint) if isinstance(model.entrypoint, tuple) else model.entrypoint
        shm_size = model.shm_size or (gpu.DEFAULT_GPU_SHM if model.gpu else None)
        super().__init__(
            image=model.image, command=command, entrypoint=entrypoint, environment=dict(model.environment),
            network_mode=model.network, mem_limit=model.mem_limit, shm_size=shm_size, user=model.user,
            working_dir=model.working_dir, labels=dict(model.labels), ipc_mode=model.ipc_mode,
            force_pull=model.pull == "always", auto_remove="never", **kwargs,
        )
        self.model = model
        self.flow_id = flow_id
        self.flow_version = flow_version
        self.flow_extra = dict(flow_extra or {})
        self.provenance = provenance
        self._host_extras: dict[str, Any] = {}

    @property
    def cli(self) -> Any:
        return _HostConfigExtras(self.hook.api_client, self._host_extras)

    # -- preparing ---------------------------------------------------------------------------
    def _prepare_mounts(self, run: RunDir, settings: Settings) -> list[Mount]:
        """The container's mounts; what is missing is said before anything is changed on disk."""
        mounts = []
        for name, target in self.model.inputs.items():
            source = run.mount(name)
            if not source.is_dir():
                raise AirflowException(f"input {name!r} has no folder at {source}: did the task that "
                                       "writes it succeed? Clear that task to run it again.")
            mounts.append(Mount(target=target, source=str(source), type="bind", read_only=True))
        static_dir = settings.data.static
        for name, target in self.model.static_mounts.items():
            source = static_dir / name
            if not source.is_dir():
                raise AirflowFailException(f"static asset {name!r} is missing: no folder {source}. Put the "
                                           "asset there (RADDEPLOY_STATIC) or fix static_mounts in the flow.")
            mounts.append(Mount(target=target, source=str(source), type="bind", read_only=True))
        gid = _data_group(settings)
        for name, target in self.model.outputs.items():
            folder = run.mount(name)
            if folder.exists():  # a retry starts from an empty output, never a half-written one
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            _share_with_group(folder, gid, 0o2770)  # the container writes as a group member; others nothing
            mounts.append(Mount(target=target, source=str(folder), type="bind", read_only=False))
        if self.model.config is not None:
            config_file = run.config_file(self.task_id)
            config_file.parent.mkdir(parents=True, exist_ok=True)
            config_file.write_text(yaml.safe_dump(self.model.config, sort_keys=False))
            _share_with_group(config_file, gid, 0o640)
            mounts.append(Mount(target=self.model.config_path, source=str(config_file), type="bind",
                                read_only=True))
        return mounts

    def _safe_defaults(self, settings: Settings) -> None:
        self._host_extras = {
            "security_opt": ["no-new-privileges"],
            "cap_drop": ["ALL"],
            "pids_limit": settings.model_pids_limit,
            # The data dir's group: 0640 inputs readable, 2770 outputs writable, whatever the user.
            "group_add": [str(_data_group(settings))],
            **self.model.host_config,
        }
        if self.mem_limit is None:
            self.mem_limit = settings.model_mem_limit

    def _use_gpus(self, ids: list[str], settings: Settings) -> None:
        given = gpu.container_gpus(ids, settings.gpu_mode, settings.gpu_lock_dir)
        self.labels = {**(self.labels or {}), **given.labels}
        self.environment = {**self.environment, **given.environment}
        if given.device_ids:
            self.device_requests = [DeviceRequest(device_ids=given.device_ids, capabilities=[["gpu"]])]
        self._remove_orphans(ids, settings)
        if self.model.network == "none" and settings.model_netns_image:
            self.network_mode = self._gpu_netns(ids[0], settings)

    def _gpu_netns(self, gpu_id: str, settings: Settings) -> str:
        """``container:<holder>`` of the GPU's network-less namespace (started if it is not running),
        or ``none`` when it cannot be had: an optimisation never fails a model."""
        try:
            return f"container:{gpu.netns_holder(self.hook.api_client, settings.model_netns_image, settings.gpu_lock_dir, gpu_id)}"
        except DockerException as exc:
            self.log.warning("model %s gets its own network sandbox (a slower start): GPU %s's namespace holder "
                             "(image %s) could not be started: %s. Build the image on this host (`make images`) or "
                             "set RADDEPLOY_MODEL_NETNS_IMAGE to an empty value.", self.task_id, gpu_id,
                             settings.model_netns_image, exc)
            return "none"

    def _remove_orphans(self, ids: list[str], settings: Settings) -> None:
        """Containers still on our GPUs belong to a task that died (we hold the lease): stop them."""
        listed = self.hook.api_client.containers(filters=gpu.scope_filter(settings.gpu_lock_dir))
        for container_id, shared in gpu.orphans(listed, ids):
            self.log.warning("removing container %s left on GPU %s by a task that died",
                             container_id[:12], ",".join(shared))
            try:
                self.hook.api_client.remove_container(container_id, force=True)
            except APIError as exc:
                self.log.warning("could not remove it: %s", exc)

    # -- running -----------------------------------------------------------------------------
    def execute(self, context: Context) -> dict[str, Any]:
        settings = load_settings()
        run = run_dir(context)
        self.mounts = self._prepare_mounts(run, settings)
        self.network_mode = self.model.network  # a GPU's namespace is chosen under its lease (_use_gpus)
        self._safe_defaults(settings)
        self.environment = {**self.environment, "RADDEPLOY_RUN_ID": context["run_id"], "RADDEPLOY_FLOW": self.flow_id,
                            "RADDEPLOY_FLOW_VERSION": self.flow_version, "CONTAINER_TAG": self.image}
        if self.flow_extra:
            self.environment["RADDEPLOY_FLOW_EXTRA"] = json.dumps(self.flow_extra)
        self.labels = {**(self.labels or {}), RUN_LABEL: f"{self.flow_id}/{context['run_id']}/{self.task_id}"}
        record: dict[str, Any] = {"image": self.image, "host": socket.gethostname(), "gpus": [],
                                  "queued": _now()}
        if self.model.pull == "never" and not self.hook.api_client.images(name=self.image):
            raise AirflowFailException(f"image {self.image} is not on this host and the flow says `pull: never`: "
                                       "load or build it on every worker first")
        devices = gpu.host_gpu_ids() if self.model.gpu else []  # no nvidia-smi probe for CPU models
        wanted = self.model.gpu
        if gpu.runs_on_cpu(wanted, devices, settings.gpu_fallback):
            self.log.warning("model %s asks for %d GPU(s) and this host has %d: running it on the CPU "
                             "(RADDEPLOY_GPU_FALLBACK=cpu); the container gets %s=1", self.task_id, wanted,
                             len(devices), gpu.FALLBACK_ENV)
            self.environment[gpu.FALLBACK_ENV] = "1"
            record["gpu_fallback"] = "cpu"
            wanted = 0
        try:
            lease = gpu.GpuLease(devices, wanted, settings.gpu_lock_dir,
                                 settings.gpu_lease_timeout, on_wait=self.log.info)
        except gpu.NotEnoughGpus as exc:  # no retry: more GPUs will not appear
            raise AirflowFailException(f"model {self.task_id}: {exc}") from None
        try:
            with lease as ids:
                record["started"] = _now()
                if ids:
                    self.log.info("leased GPU(s) %s", ",".join(ids))
                    record["gpus"] = ids
                    self._use_gpus(ids, settings)
                failed = self._run(context)
            # The container has exited: its GPUs are free for the next model while this one is inspected and removed.
            record["released"] = _now()
            self._finish(failed, record)
        except gpu.UnsafeLockDir as exc:  # no retry: a person must look at the lock folder
            raise AirflowFailException(f"model {self.task_id}: {exc}") from None
        finally:
            record["ended"] = _now()
            manifest.record(run, self.task_id, record)
            if "exit_code" in record:  # the container ran
                audit.record(context, "model_run", outcome="success" if record["exit_code"] == 0 else "serious_failure",
                             actor=socket.gethostname(), image=self.image,
                             digest=(record.get("image_digests") or [record.get("image_id", "")])[0],
                             exit_code=record["exit_code"], gpus=record["gpus"])
        found = {name: outputs.walk(run.mount(name), run.root) for name in self.model.outputs}
        written = {name: [str(p.relative_to(run.mount(name))) for p in files] for name, (files, _) in found.items()}
        record["outputs"] = written
        manifest.record(run, self.task_id, record)
        empty = [name for name, files in written.items() if not files]
        if empty:
            raise AirflowException(f"model {self.task_id} wrote nothing to output(s) {', '.join(empty)} "
                                   f"({', '.join(self.model.outputs[n] for n in empty)} in the container)")
        for name, (_, problems) in found.items():
            for problem in problems:  # the send task refuses to send them; say so where the model ran
                self.log.warning("output %s: %s", name, problem)
        if self.provenance:
            self._stamp([p for name in self.model.sent_outputs for p in found[name][0]], record)
        counts = {name: len(files) for name, files in written.items()}
        self.log.info("outputs written: %s", counts)
        return {"outputs": counts, "gpus": record["gpus"]}

    def _stamp(self, files: list[Path], record: dict[str, Any]) -> None:
        """Provenance on every result that will be sent; files that are not DICOM are left to the output guard."""
        from raddeploy_provider.dicom import provenance  # pydicom's writer: only where a model succeeded

        digest = (record.get("image_digests") or [record.get("image_id", "")])[0]
        made = provenance.Provenance(self.flow_id, self.flow_version, self.task_id, self.image, digest)
        stamped = 0
        for path in files:
            try:
                stamped += provenance.stamp(path, made)
            except Exception as exc:  # not DICOM, or unreadable: the send task's guard refuses it by name
                self.log.warning("no provenance on %s: %s", path.name, exc)
        self.log.info("provenance (Contributing Equipment) added to %d of %d results", stamped, len(files))

    def _run(self, context: Context) -> DockerContainerFailedException | None:
        """Run the container to its exit (under the caller's GPU lease). A container that exited
        non-zero is returned as its failure, to be inspected and removed by :meth:`_finish` once the
        lease is given back; on any other end (the Docker engine, a timeout, a kill) it is removed here,
        before the lease is: a container still running never outlives its GPUs' lease."""
        try:
            super().execute(context)
            return None
        except DockerContainerFailedException as exc:
            return exc
        except (APIError, DockerException) as exc:
            self._remove()
            if "could not select device driver" in str(exc):
                raise AirflowFailException(
                    f"model {self.task_id} asks for GPUs but Docker here has no GPU driver ({exc}). Install the "
                    "NVIDIA container toolkit, or set RADDEPLOY_GPU_MODE=env where NVIDIA's runtime is the "
                    "default.") from None
            if self.container is None:  # never started: the image, or the Docker engine
                raise AirflowException(f"model {self.task_id} could not start image {self.image}: {exc}. "
                                       "Is the image on this host (`docker images`) or pullable?") from None
            raise
        except BaseException:
            self._remove()
            raise

    def _finish(self, failed: DockerContainerFailedException | None, record: dict[str, Any]) -> None:
        """The exited container's state into the record (exit code, out of memory, image, Docker's own
        start and finish times), then the container goes; a non-zero exit is raised as :class:`ModelFailed`."""
        try:
            record.update(self._state())
        finally:
            self._remove()
        if failed is not None:
            tail = list(failed.logs[-LOG_TAIL_LINES:]) if isinstance(failed.logs, list) else []
            raise ModelFailed(self.task_id, self.image, record.get("exit_code"), bool(record.get("oom_killed")),
                              self.mem_limit, tail) from None

    def _state(self) -> dict[str, Any]:
        if self.container is None:
            return {}
        info = self.hook.api_client.inspect_container(self.container["Id"])
        state = info.get("State", {})
        image_id = info.get("Image", "")
        digests: list[str] = []
        try:
            digests = self.hook.api_client.inspect_image(image_id).get("RepoDigests") or []
        except APIError:
            pass
        return {"exit_code": state.get("ExitCode"), "oom_killed": bool(state.get("OOMKilled")),
                "image_id": image_id, "image_digests": digests,
                "container": {"started": state.get("StartedAt"), "finished": state.get("FinishedAt")}}

    def _remove(self) -> None:
        if self.container is None:
            return
        try:
            self.hook.api_client.remove_container(self.container["Id"], force=True)
        except APIError as exc:
            if getattr(exc, "status_code", None) != 404:
                self.log.warning("could not remove container %s: %s", self.container["Id"][:12], exc)
        self.container = None

    def on_kill(self) -> None:
        """Timeout, or a user marked the task failed: the container goes, its GPUs with it."""
        if self.container is not None:
            self.log.info("stopping and removing container %s", self.container["Id"][:12])
            self._remove()


def _data_group(settings: Settings) -> int:
    """The group of the data dir: the one group, besides the owner, that may read and write run folders."""
    return os.stat(settings.data_dir).st_gid


def _share_with_group(path: Path, gid: int, mode: int) -> None:
    """``path`` in group ``gid`` with ``mode`` (a setgid folder keeps the group for what the model writes)."""
    if os.stat(path).st_gid != gid:
        try:
            os.chown(path, -1, gid)
        except PermissionError:
            raise AirflowFailException(f"cannot give {path} the data dir's group (gid {gid}): run the "
                                       "worker as a member of that group") from None
    os.chmod(path, mode)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
