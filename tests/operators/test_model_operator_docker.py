"""ModelOperator against the real Docker engine: isolation, mounts, environment, failures, GPUs.

``execute(context)`` is called directly, as the task runner would, with a minimal context and
``RADDEPLOY_*`` pointing at ``tmp_path``; no scheduler. Every assertion is on what really
happened: files the container wrote, ``docker inspect`` taken while it ran, the manifest, the
exception text. Images: ``raddeploy/busybox`` (sh + coreutils) and ``raddeploy/base``
(python3), both built by ``make images``; nothing is pulled and no traffic leaves the host.
After each test no container carrying the test's run label may be left.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from datetime import datetime
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import docker
import pytest
import yaml
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowTaskTimeout
from airflow.sdk.execution_time.timeout import timeout
from docker.errors import NotFound

from raddeploy import cli
from raddeploy_provider.config import load_settings
from raddeploy_provider.flows.model import ModelSpec
from raddeploy_provider.exceptions import ModelFailed
from raddeploy_provider.gpu import GPU_LABEL, GPU_SCOPE_LABEL, GpuLease
from raddeploy_provider.gpu import NETNS_LABEL, netns_holder, remove_netns_holders
from raddeploy_provider.operators.model import RUN_LABEL, ModelOperator

pytestmark = pytest.mark.integration

BUSYBOX = "raddeploy/busybox:latest"
BASE = "raddeploy/base:bookworm"
FLOW = "docker_flow"


@pytest.fixture(scope="module")
def api() -> Iterator[docker.APIClient]:
    if shutil.which("docker") is None:
        pytest.fail("docker is not installed: run `make test` (it installs docker.io)")
    client = docker.APIClient(base_url=os.environ.get("DOCKER_HOST", "unix://var/run/docker.sock"))
    for image in (BUSYBOX, BASE):
        try:
            client.inspect_image(image)
        except docker.errors.DockerException as exc:
            pytest.fail(f"image {image} is missing or dockerd is down: run `make images` "
                        f"(scripts/build-images.sh); docker said: {exc}")
    yield client
    client.close()


def _ours(api: docker.APIClient, run_id: str) -> list[dict[str, Any]]:
    """Every container, running or not, labelled as belonging to this test's run."""
    return [c for c in api.containers(all=True, filters={"label": RUN_LABEL})
            if c["Labels"].get(RUN_LABEL, "").startswith(f"{FLOW}/{run_id}/")]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api: docker.APIClient) -> Iterator[SimpleNamespace]:
    data, static, locks = tmp_path / "data", tmp_path / "static", tmp_path / "gpu-locks"
    static.mkdir()
    for name in list(os.environ):
        if name.startswith("RADDEPLOY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RADDEPLOY_DATA", str(data))
    monkeypatch.setenv("RADDEPLOY_STATIC", str(static))
    monkeypatch.setenv("RADDEPLOY_GPUS", "")  # no GPU unless a test says so (and no nvidia-smi probe)
    monkeypatch.setenv("RADDEPLOY_GPU_LOCK_DIR", str(locks))
    monkeypatch.setenv("RADDEPLOY_GPU_LEASE_TIMEOUT", "30")
    run_id = f"docker-test-{uuid.uuid4().hex[:12]}"
    run = data / "runs" / FLOW / run_id
    (run / "input").mkdir(parents=True)
    (run / "input" / "CT.1.dcm").write_text("not really DICOM")
    ns = SimpleNamespace(run=run, run_id=run_id, static=static, locks=locks, api=api,
                         context={"dag": SimpleNamespace(dag_id=FLOW), "run_id": run_id})
    yield ns
    remove_netns_holders(api, locks)  # the GPU namespace holders of this test
    left = _ours(api, run_id)
    for container in left:
        api.remove_container(container["Id"], force=True)
    assert not left, f"containers left behind: {[(c['Id'][:12], c['Labels'][RUN_LABEL]) for c in left]}"


def model_op(task_id: str = "model", *, image: str = BUSYBOX, command: Any = None, flow_extra: Any = None,
             **spec: Any) -> ModelOperator:
    spec.setdefault("inputs", {"src": "/input"})
    spec.setdefault("outputs", {"dst": "/output"})
    return ModelOperator(task_id=task_id, model=ModelSpec(name=task_id, image=image, command=command, **spec),
                         flow_id=FLOW, flow_version="1.2.0", flow_extra=flow_extra)


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def task_manifest(env: SimpleNamespace, task_id: str) -> dict[str, Any]:
    return json.loads((env.run / "manifest.json").read_text())["tasks"][task_id]


def watch(api: docker.APIClient, label: str) -> tuple[threading.Thread, dict[str, Any]]:
    """Inspect the container labelled ``label`` as soon as it runs (in a thread)."""
    seen: dict[str, Any] = {}

    def poll() -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for container in api.containers(filters={"label": f"{RUN_LABEL}={label}"}):
                seen.update(api.inspect_container(container["Id"]))
                return
            time.sleep(0.05)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    return thread, seen


# -- isolation -------------------------------------------------------------------------------

def test_no_network_by_default_only_loopback(env: SimpleNamespace) -> None:
    model_op(command=sh("ls /sys/class/net > /output/net")).execute(env.context)
    assert (env.run / "dst" / "net").read_text().split() == ["lo"]


def test_bridge_network_when_the_flow_asks(env: SimpleNamespace) -> None:
    model_op(command=sh("ls /sys/class/net > /output/net"), network="bridge").execute(env.context)
    assert "eth0" in (env.run / "dst" / "net").read_text().split()


def _holders(env: SimpleNamespace) -> dict[str, dict[str, Any]]:
    """This test's GPU namespace holders: GPU id -> docker inspect."""
    found = {}
    for holder in env.api.containers(all=True, filters={"label": NETNS_LABEL}):
        scope, _, gpu_id = holder["Labels"][NETNS_LABEL].rpartition("/")
        if scope == str(env.locks):
            found[gpu_id] = env.api.inspect_container(holder["Id"])
    return found


def test_a_gpu_model_without_network_joins_its_gpus_network_less_namespace(env: SimpleNamespace,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADDEPLOY_GPUS", "0,1")
    monkeypatch.setenv("RADDEPLOY_GPU_MODE", "env")
    net = "ls /sys/class/net > /output/net; cat /sys/class/net/lo/ifindex >> /output/net"
    thread, seen = watch(env.api, f"{FLOW}/{env.run_id}/first")
    model_op("first", command=sh(net + "; sleep 1"), gpu=1).execute(env.context)
    thread.join()
    holders = _holders(env)
    assert list(holders) == ["0"]
    holder = holders["0"]
    assert seen["HostConfig"]["NetworkMode"] == f"container:{holder['Id']}"
    assert (env.run / "dst" / "net").read_text().split()[0] == "lo"  # the loopback alone
    assert len((env.run / "dst" / "net").read_text().split()) == 2
    assert holder["State"]["Running"] and holder["HostConfig"]["NetworkMode"] == "none"
    assert holder["HostConfig"]["CapDrop"] == ["ALL"] and holder["HostConfig"]["ReadonlyRootfs"] is True
    assert holder["HostConfig"]["SecurityOpt"] == ["no-new-privileges"] and holder["Config"]["User"] == "65534:65534"
    # The next model on GPU 0 joins the same holder; with both GPUs busy, GPU 1 gets its own.
    ops = [model_op(name, command=sh(f"sleep 1.5; echo x > /{name}/x"), gpu=1, outputs={name: f"/{name}"})
           for name in ("a", "b")]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda op: op.execute(env.context), ops))
    again = _holders(env)
    assert sorted(again) == ["0", "1"] and again["0"]["Id"] == holder["Id"]
    assert again["0"]["Name"] != again["1"]["Name"]


def test_a_stopped_holder_is_replaced_and_a_missing_image_falls_back_to_an_own_sandbox(
        env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RADDEPLOY_GPUS", "0")
    monkeypatch.setenv("RADDEPLOY_GPU_MODE", "env")
    model_op("first", command=sh("echo x > /output/x"), gpu=1).execute(env.context)
    first = _holders(env)["0"]
    env.api.stop(first["Id"], timeout=0)
    model_op("second", command=sh("ls /sys/class/net > /output/net"), gpu=1).execute(env.context)
    second = _holders(env)["0"]
    assert second["Id"] != first["Id"] and second["State"]["Running"]
    assert (env.run / "dst" / "net").read_text().split() == ["lo"]
    assert remove_netns_holders(env.api, env.locks) == 1 and _holders(env) == {}  # as a stack stopping does
    monkeypatch.setenv("RADDEPLOY_MODEL_NETNS_IMAGE", "raddeploy/does-not-exist:1")
    thread, seen = watch(env.api, f"{FLOW}/{env.run_id}/third")
    model_op("third", command=sh("ls /sys/class/net > /output/net; sleep 1"), gpu=1).execute(env.context)
    thread.join()
    assert seen["HostConfig"]["NetworkMode"] == "none" and _holders(env) == {}
    assert (env.run / "dst" / "net").read_text().split() == ["lo"]
    said = "".join(capsys.readouterr())
    assert "gets its own network sandbox" in said and "RADDEPLOY_MODEL_NETNS_IMAGE" in said


def test_cpu_models_and_bridge_gpu_models_get_their_own_network(env: SimpleNamespace,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADDEPLOY_GPUS", "0")
    monkeypatch.setenv("RADDEPLOY_GPU_MODE", "env")
    model_op("cpu", command=sh("echo x > /output/x")).execute(env.context)
    model_op("online", command=sh("ls /sys/class/net > /output/net"), gpu=1, network="bridge").execute(env.context)
    assert "eth0" in (env.run / "dst" / "net").read_text().split()
    assert _holders(env) == {}


def test_safe_defaults_in_docker_inspect(env: SimpleNamespace) -> None:
    expected_memory = load_settings().model_mem_limit
    thread, seen = watch(env.api, f"{FLOW}/{env.run_id}/guarded")
    model_op("guarded", command=sh("sleep 2; id -u > /output/uid")).execute(env.context)
    thread.join()

    assert seen, "the container was never seen running"
    host = seen["HostConfig"]
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["PidsLimit"] == load_settings().model_pids_limit == 4096
    assert host["Memory"] == expected_memory > 0
    assert host["NetworkMode"] == "none"
    assert host["Privileged"] is False
    image_user = env.api.inspect_image(BUSYBOX)["Config"].get("User") or ""
    assert seen["Config"]["User"] == image_user  # the image's own user, not one we chose
    assert (env.run / "dst" / "uid").read_text().strip() == "0"  # that image's user is root
    assert seen["Config"]["Labels"][RUN_LABEL] == f"{FLOW}/{env.run_id}/guarded"


# -- mounts ----------------------------------------------------------------------------------

def test_input_is_read_only(env: SimpleNamespace) -> None:
    op = model_op("writes_input", command=sh("echo trying; touch /input/new || exit 7"))
    with pytest.raises(ModelFailed) as info:
        op.execute(env.context)
    message = str(info.value)
    assert info.value.exit_code == 7
    assert "exited with code 7" in message
    assert "Read-only file system" in message
    assert task_manifest(env, "writes_input")["exit_code"] == 7
    assert sorted(p.name for p in (env.run / "input").iterdir()) == ["CT.1.dcm"]


def test_outputs_config_and_static_mounts(env: SimpleNamespace) -> None:
    (env.static / "weights").mkdir()
    (env.static / "weights" / "fold0.txt").write_text("0.5\n")
    config = {"fold": "all", "thresholds": [100, 300], "name": "hn"}
    script = """
        cp /input/CT.1.dcm /output/copy.dcm
        cp /config/config.yaml /output/config_seen.yaml
        cat /model/fold0.txt > /output/weights_seen
        if touch /model/x 2>/output/static_err; then echo writable; else echo read-only; fi > /output/static
        grep -E ' /(input|output|model|config/config.yaml) ' /proc/mounts > /output/mounts
    """
    model_op("full", command=sh(script), static_mounts={"weights": "/model"}, config=config).execute(env.context)

    out = env.run / "dst"
    assert (out / "copy.dcm").read_text() == "not really DICOM"
    assert yaml.safe_load((out / "config_seen.yaml").read_text()) == config
    assert (out / "weights_seen").read_text() == "0.5\n"
    assert (out / "static").read_text().strip() == "read-only"
    assert "Read-only file system" in (out / "static_err").read_text()
    options = {line.split()[1]: line.split()[3].split(",") for line in (out / "mounts").read_text().splitlines()}
    assert set(options) == {"/input", "/output", "/model", "/config/config.yaml"}
    assert "ro" in options["/input"] and "ro" in options["/model"] and "ro" in options["/config/config.yaml"]
    assert "rw" in options["/output"]
    assert not (env.static / "weights" / "x").exists()


def test_missing_static_asset_fails_before_any_container(env: SimpleNamespace) -> None:
    op = model_op("no_weights", command=sh("true"), static_mounts={"absent_weights": "/model"})
    with pytest.raises(AirflowFailException, match="static asset 'absent_weights' is missing"):
        op.execute(env.context)
    assert env.api.containers(all=True, filters={"label": f"{RUN_LABEL}={FLOW}/{env.run_id}/no_weights"}) == []
    assert op.container is None


# -- permissions: 0640 inputs, 2770 outputs in the data dir's group, whatever the model's user ---

DATA_GID = 4242  # the data dir's group (a `raddeploy` group in production); no such user or group needed


def _store_like(env: SimpleNamespace, owner: int) -> None:
    """The run's input as a store with umask 027 leaves it: 0640 files, 2750 folders, the data dir's group."""
    data = env.run.parents[2]
    os.chown(data, 0, DATA_GID)
    data.chmod(0o2750)
    for path in (env.run / "input", env.run / "input" / "CT.1.dcm"):
        os.chown(path, owner, DATA_GID)
    (env.run / "input").chmod(0o2750)
    (env.run / "input" / "CT.1.dcm").chmod(0o640)


WRITE_OUTPUTS = """
    sleep 2  # long enough for watch() to inspect the running container, however loaded the host
    cat /input/CT.1.dcm > /output/copy.dcm
    cat /config/config.yaml > /output/config_seen.yaml
    mkdir /output/sub && echo nested > /output/sub/file
    id > /output/id
"""


def _check_outputs(env: SimpleNamespace, uid: int) -> None:
    out = env.run / "dst"
    assert (out / "copy.dcm").read_text() == "not really DICOM"
    assert yaml.safe_load((out / "config_seen.yaml").read_text()) == {"fold": 1}
    assert (out / "sub" / "file").read_text() == "nested\n"
    assert f"uid={uid}" in (out / "id").read_text() and f"{DATA_GID}" in (out / "id").read_text()
    folder = out.stat()
    assert (folder.st_mode & 0o7777, folder.st_gid) == (0o2770, DATA_GID)  # others: nothing
    written = (out / "copy.dcm").stat()
    assert (written.st_uid, written.st_gid) == (uid, DATA_GID)  # setgid: the group stays the data dir's
    config = (env.run / "config" / "model" / "config.yaml").stat()
    assert (config.st_mode & 0o777, config.st_gid) == (0o640, DATA_GID)


def test_non_root_model_reads_0640_inputs_and_writes_outputs(env: SimpleNamespace) -> None:
    """`user: "1000:1000"` in a flow, inputs root's and 0640 (a root-owned store): read through the group."""
    _store_like(env, owner=0)
    thread, seen = watch(env.api, f"{FLOW}/{env.run_id}/model")
    model_op(command=sh(WRITE_OUTPUTS), user="1000:1000", config={"fold": 1}).execute(env.context)
    thread.join()
    assert seen["Config"]["User"] == "1000:1000"
    assert seen["HostConfig"]["GroupAdd"] == [str(DATA_GID)]
    _check_outputs(env, uid=1000)


def test_root_model_without_capabilities_reads_inputs_of_another_owner(env: SimpleNamespace) -> None:
    """Root with every capability dropped reads no file as root would: the listener's (uid 999) 0640
    input only through the group, and writes the 2770 output folder as a member."""
    _store_like(env, owner=999)
    thread, seen = watch(env.api, f"{FLOW}/{env.run_id}/model")
    model_op(command=sh(WRITE_OUTPUTS), config={"fold": 1}).execute(env.context)
    thread.join()
    assert seen["HostConfig"]["CapDrop"] == ["ALL"] and seen["Config"]["User"] == ""
    _check_outputs(env, uid=0)


def test_without_the_group_a_non_root_model_reads_nothing(env: SimpleNamespace,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: the same container without `group_add` cannot read the input (so the group is what works)."""
    _store_like(env, owner=0)
    original = ModelOperator._safe_defaults

    def no_group(self: ModelOperator, settings: Any) -> None:
        original(self, settings)
        self._host_extras.pop("group_add")

    monkeypatch.setattr(ModelOperator, "_safe_defaults", no_group)
    with pytest.raises(ModelFailed) as info:
        model_op(command=sh("cat /input/CT.1.dcm > /output/copy.dcm"), user="1000:1000").execute(env.context)
    assert "Permission denied" in str(info.value)


# -- flow text is data, not a template ---------------------------------------------------------

def test_flow_text_is_passed_literally(env: SimpleNamespace) -> None:
    """Nothing of a flow is a Jinja template: no connection secret rendered in, no `run.sh` template file."""
    assert (ModelOperator.template_fields, ModelOperator.template_ext) == ((), ())
    op = model_op(command="sh /scripts/run.sh", environment={"SECRET": "{{ conn.x.password }}"},
                  image="{{ var.value.image }}")
    op.resolve_template_files()  # what parsing does with template_ext: reads no run.sh
    op.render_template_fields({"conn": SimpleNamespace(x=SimpleNamespace(password="leaked")), "var": {}})
    assert op.command == "sh /scripts/run.sh"
    assert op.environment == {"SECRET": "{{ conn.x.password }}"}
    assert op.image == "{{ var.value.image }}"
    model_op(command=sh('echo "$SECRET" > /output/secret'), environment={"SECRET": "{{ conn.x.password }}"}
             ).execute(env.context)
    assert (env.run / "dst" / "secret").read_text() == "{{ conn.x.password }}\n"


# -- environment -----------------------------------------------------------------------------

def test_environment_given_and_no_secrets_leak(env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADDEPLOY_AIRFLOW_PASSWORD", "s3cret-password")
    monkeypatch.setenv("RADDEPLOY_AIRFLOW_USER", "listener")
    extra = {"site": "Odense", "levels": [1, 2]}
    model_op(command=sh("env > /output/env"), flow_extra=extra, environment={"THRESHOLD_HU": "100"}
             ).execute(env.context)

    text = (env.run / "dst" / "env").read_text()
    assert "s3cret-password" not in text
    seen = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    assert {k: v for k, v in seen.items() if k.startswith("RADDEPLOY_")} == {
        "RADDEPLOY_RUN_ID": env.run_id,
        "RADDEPLOY_FLOW": FLOW,
        "RADDEPLOY_FLOW_VERSION": "1.2.0",
        "RADDEPLOY_FLOW_EXTRA": json.dumps(extra),
    }
    assert json.loads(seen["RADDEPLOY_FLOW_EXTRA"]) == extra
    assert seen["CONTAINER_TAG"] == BUSYBOX
    assert seen["THRESHOLD_HU"] == "100"
    assert "AIRFLOW_TMP_DIR" not in seen


# -- failures --------------------------------------------------------------------------------

def test_nonzero_exit_says_code_and_last_log_lines(env: SimpleNamespace) -> None:
    # One stream: Docker reads stdout and stderr apart, so their lines can come in either order.
    op = model_op("fails", command=sh("exec >&2; for i in $(seq 1 30); do echo line $i; done; "
                                      "echo fatal: no CT; exit 3"))
    with pytest.raises(ModelFailed) as info:
        op.execute(env.context)
    message = str(info.value)
    assert (info.value.exit_code, info.value.oom_killed) == (3, False)
    assert info.value.log_tail == [*(f"line {i}" for i in range(12, 31)), "fatal: no CT"]
    assert f"model fails ({BUSYBOX}) exited with code 3" in message
    assert message.endswith("\n".join(["last log lines:", *(f"line {i}" for i in range(12, 31)), "fatal: no CT"]))
    record = task_manifest(env, "fails")
    assert (record["exit_code"], record["oom_killed"]) == (3, False)


def test_out_of_memory(env: SimpleNamespace) -> None:
    op = model_op("hungry", image=BASE, mem_limit=64 * 2**20,
                  command=["python3", "-c", "x = b'x' * (300 * 2**20); print(len(x))"])
    with pytest.raises(ModelFailed) as info:
        op.execute(env.context)
    assert info.value.oom_killed is True
    assert "was killed for running out of memory (limit 64 MiB)" in str(info.value)
    record = task_manifest(env, "hungry")
    assert record["oom_killed"] is True
    assert record["exit_code"] == 137


def test_image_not_found(env: SimpleNamespace) -> None:
    op = model_op("ghost", image="raddeploy/does-not-exist:1", command=sh("true"))
    with pytest.raises(AirflowException) as info:
        op.execute(env.context)
    assert "model ghost could not start image raddeploy/does-not-exist:1" in str(info.value)
    assert op.container is None


def test_image_not_found_with_pull_never(env: SimpleNamespace) -> None:
    op = model_op("ghost", image="raddeploy/does-not-exist:1", command=sh("true"), pull="never")
    with pytest.raises(AirflowFailException, match="is not on this host and the flow says `pull: never`"):
        op.execute(env.context)


def test_empty_output_is_named(env: SimpleNamespace) -> None:
    op = model_op("lazy", command=sh("echo done > /output/ok"), outputs={"dst": "/output", "seg": "/seg"})
    with pytest.raises(AirflowException) as info:
        op.execute(env.context)
    assert str(info.value) == "model lazy wrote nothing to output(s) seg (/seg in the container)"
    record = task_manifest(env, "lazy")
    assert record["exit_code"] == 0
    assert record["outputs"] == {"dst": ["ok"], "seg": []}


def test_timeout_removes_container_and_releases_lease(env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    monkeypatch.setenv("RADDEPLOY_GPUS", "0")
    monkeypatch.setenv("RADDEPLOY_GPU_MODE", "env")
    op = model_op("slow", command=sh("sleep 60"), gpu=1)
    started = time.monotonic()
    with pytest.raises(AirflowTaskTimeout):
        # As Airflow's task runner does it: execution_timeout, then on_kill.
        try:
            with timeout(2):
                op.execute(env.context)
        except AirflowTaskTimeout:
            op.on_kill()
            raise
    while _ours(env.api, env.run_id) and time.monotonic() - started < 10:
        time.sleep(0.1)
    assert _ours(env.api, env.run_id) == []
    assert time.monotonic() - started < 6
    lease = GpuLease(["0"], 1, env.locks, timeout=0)
    assert lease.acquire() == ["0"]  # at once: the task gave GPU 0 back
    lease.release()
    record = task_manifest(env, "slow")
    assert record["gpus"] == ["0"] and "ended" in record


def test_the_gpu_is_free_once_the_container_exits(env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next model may take the GPU while this one's exited container is still being inspected
    and removed; the record has the lease's span and Docker's own start and finish inside it."""
    monkeypatch.setenv("RADDEPLOY_GPUS", "0")
    monkeypatch.setenv("RADDEPLOY_GPU_MODE", "env")
    taken: list[Any] = []

    class Watching(ModelOperator):
        def _state(self) -> dict[str, Any]:  # the real inspect, after a try at the GPU's lease
            lease = GpuLease(["0"], 1, env.locks, timeout=0)
            try:
                taken.append(lease.acquire())
                lease.release()
            except Exception as exc:  # noqa: BLE001 - what it was is the assertion
                taken.append(exc)
            return super()._state()

    Watching(task_id="quick", model=ModelSpec(name="quick", image=BUSYBOX, command=sh("echo 1 > /output/x; sleep 1"),
                                              inputs={"src": "/input"}, outputs={"dst": "/output"}, gpu=1),
             flow_id=FLOW).execute(env.context)
    assert taken == [["0"]]
    record = task_manifest(env, "quick")

    def at(text: str) -> float:  # Docker's RFC 3339 with nanoseconds, ours with milliseconds
        head, _, frac = text.rstrip("Z").partition(".")
        return datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (frac.split("+")[0] or "0"))

    started, finished = at(record["container"]["started"]), at(record["container"]["finished"])
    assert at(record["started"]) <= started < finished <= at(record["released"]) <= at(record["ended"])
    assert finished - started >= 1.0
    assert _ours(env.api, env.run_id) == []


# -- GPUs, without a GPU ---------------------------------------------------------------------

def _uptime_script() -> str:
    # busybox date has no sub-second format; /proc/uptime is the host's clock (no time namespace).
    return ("echo $NVIDIA_VISIBLE_DEVICES > /output/gpu; cut -d' ' -f1 /proc/uptime > /output/start; "
            "sleep 2; cut -d' ' -f1 /proc/uptime > /output/end")


def test_env_mode_three_tasks_on_two_gpus(env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADDEPLOY_GPUS", "0,1")
    monkeypatch.setenv("RADDEPLOY_GPU_MODE", "env")
    names = ["gpu_a", "gpu_b", "gpu_c"]
    ops = [model_op(name, command=sh(_uptime_script().replace("/output", f"/{name}")), gpu=1,
                    outputs={name: f"/{name}"}) for name in names]
    with ThreadPoolExecutor(len(ops)) as pool:
        results = [f.result() for f in [pool.submit(op.execute, env.context) for op in ops]]

    seen = {}
    for name, result in zip(names, results):
        folder = env.run / name
        gpu = (folder / "gpu").read_text().strip()
        seen[name] = (float((folder / "start").read_text()), float((folder / "end").read_text()), gpu)
        assert result["gpus"] == [gpu]
        assert task_manifest(env, name)["gpus"] == [gpu]
    first, second, third = sorted(seen.values())
    assert {first[2], second[2]} == {"0", "1"}  # the two that ran together: one GPU each
    assert second[0] < first[1]  # (they did run together)
    assert third[0] >= min(first[1], second[1])  # the third waited for one to end
    # No two containers ever shared a GPU while both ran.
    for a in seen.values():
        for b in seen.values():
            if a is not b and a[2] == b[2]:
                assert a[1] <= b[0] or b[1] <= a[0]


def test_env_mode_two_gpus_for_one_task(env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADDEPLOY_GPUS", "0,1")
    monkeypatch.setenv("RADDEPLOY_GPU_MODE", "env")
    thread, seen = watch(env.api, f"{FLOW}/{env.run_id}/big")
    result = model_op("big", command=sh("echo $NVIDIA_VISIBLE_DEVICES > /output/gpu; sleep 1"), gpu=2
                      ).execute(env.context)
    thread.join()
    assert (env.run / "dst" / "gpu").read_text().strip() == "0,1"
    assert result["gpus"] == ["0", "1"]
    assert seen["Config"]["Labels"][GPU_LABEL] == "0,1"
    assert seen["HostConfig"]["ShmSize"] == 2 * 1024**3
    assert not seen["HostConfig"].get("DeviceRequests")  # env mode: the NVIDIA runtime reads the variable


def test_more_gpus_than_the_host_has(env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADDEPLOY_GPUS", "0,1")
    monkeypatch.setenv("RADDEPLOY_GPU_MODE", "env")
    op = model_op("huge", command=sh("echo hi > /output/x"), gpu=3)
    with pytest.raises(AirflowFailException) as info:  # no retry: more GPUs will not appear
        op.execute(env.context)
    assert str(info.value).startswith("model huge: 3 GPU(s) asked for, but this host has 2 (0, 1): set RADDEPLOY_GPUS")
    assert op.container is None


def test_device_request_mode_container_shape(env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """The container is created as the operator does for leased GPU 1; starting it needs a GPU."""
    monkeypatch.setenv("RADDEPLOY_GPUS", "0,1")
    monkeypatch.setenv("RADDEPLOY_GPU_MODE", "device_request")
    holder = GpuLease(["0"], 1, env.locks, timeout=0)  # GPU 0 is busy: the task gets 1
    holder.acquire()
    created: dict[str, Any] = {}

    class NotStarted(Exception):
        pass

    start = docker.APIClient.start

    def start_instead(self: docker.APIClient, container: Any, *args: Any, **kwargs: Any) -> None:
        seen = self.inspect_container(container)
        if RUN_LABEL not in seen["Config"]["Labels"]:  # the GPU's namespace holder starts
            return start(self, container, *args, **kwargs)
        created.update(seen)
        raise NotStarted()

    monkeypatch.setattr(docker.APIClient, "start", start_instead)
    op = model_op("segment", command=sh("nvidia-smi > /output/smi"), gpu=1)
    try:
        with pytest.raises(NotStarted):
            op.execute(env.context)
    finally:
        holder.release()

    assert created["HostConfig"]["DeviceRequests"] == [
        {"Driver": "", "Count": 0, "DeviceIDs": ["1"], "Capabilities": [["gpu"]], "Options": {}}]
    assert created["Config"]["Labels"][GPU_LABEL] == "1"
    assert not any(e.startswith("NVIDIA_VISIBLE_DEVICES=") for e in created["Config"]["Env"])
    assert created["HostConfig"]["ShmSize"] == 2 * 1024**3
    assert created["HostConfig"]["CapDrop"] == ["ALL"]
    assert task_manifest(env, "segment")["gpus"] == ["1"]
    # the operator removed it although it never ran (the fixture checks nothing is left)


@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="no NVIDIA GPU on this machine (nvidia-smi absent)")
def test_device_request_mode_on_a_real_gpu(env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RADDEPLOY_GPUS")  # found with nvidia-smi -L
    monkeypatch.setenv("RADDEPLOY_GPU_MODE", "device_request")
    result = model_op("on_gpu", command=sh("ls /dev > /output/dev"), gpu=1).execute(env.context)
    devices = (env.run / "dst" / "dev").read_text().split()
    assert "nvidiactl" in devices
    assert [d for d in devices if d.startswith("nvidia") and d[6:].isdigit()] == [f"nvidia{result['gpus'][0]}"]


def test_orphan_on_our_gpu_is_removed(env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADDEPLOY_GPUS", "0")
    monkeypatch.setenv("RADDEPLOY_GPU_MODE", "env")
    api = env.api
    orphan = api.create_container(BUSYBOX, ["sleep", "300"],
                                  labels={GPU_LABEL: "0", GPU_SCOPE_LABEL: str(env.locks),
                                          RUN_LABEL: f"{FLOW}/{env.run_id}/dead_task"},
                                  host_config=api.create_host_config(network_mode="none"))
    api.start(orphan["Id"])
    assert api.inspect_container(orphan["Id"])["State"]["Running"]

    model_op("heir", command=sh("echo $NVIDIA_VISIBLE_DEVICES > /output/gpu"), gpu=1).execute(env.context)

    assert (env.run / "dst" / "gpu").read_text().strip() == "0"
    with pytest.raises(NotFound):
        api.inspect_container(orphan["Id"])


# -- manifest --------------------------------------------------------------------------------

def test_manifest_after_success_and_runs_show(env: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    model_op("seg", command=sh("mkdir /output/RTSTRUCT; echo a > /output/RTSTRUCT/rs.dcm; echo b > /output/log.txt"),
             outputs={"dst": "/output"}).execute(env.context)

    record = task_manifest(env, "seg")
    assert record["image"] == BUSYBOX
    assert record["image_id"] == env.api.inspect_image(BUSYBOX)["Id"]
    assert record["image_id"].startswith("sha256:")
    assert record["exit_code"] == 0 and record["oom_killed"] is False
    assert record["gpus"] == []
    assert record["started"] <= record["ended"]
    assert record["outputs"] == {"dst": ["RTSTRUCT/rs.dcm", "log.txt"]}

    assert cli.main(["runs", "show", env.run_id]) == 0
    out = capsys.readouterr().out  # (after a log line of Airflow's, when its logging writes to stdout)
    shown = json.loads(out[out.index('{\n  "'):])
    assert (shown["dag_id"], shown["run_id"]) == (FLOW, env.run_id)
    assert shown["tasks"]["seg"] == record


def test_cpu_fallback_runs_a_gpu_model_without_a_device_and_tells_it(env: SimpleNamespace,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """RADDEPLOY_GPU_FALLBACK=cpu on a host without GPUs: no lease, no device, the container is told."""
    monkeypatch.setenv("RADDEPLOY_GPU_FALLBACK", "cpu")
    thread, seen = watch(env.api, f"{FLOW}/{env.run_id}/fold")
    result = model_op("fold", gpu=1, command=sh("sleep 1; echo \"$RADDEPLOY_GPU_FALLBACK:${NVIDIA_VISIBLE_DEVICES:-}\" "
                                                 "> /output/where")).execute(env.context)
    thread.join()
    assert (env.run / "dst" / "where").read_text() == "1:\n"
    assert result["gpus"] == [] and not seen["HostConfig"].get("DeviceRequests")
    assert GPU_LABEL not in seen["Config"]["Labels"]
    assert task_manifest(env, "fold")["gpu_fallback"] == "cpu"
    assert not env.locks.exists() or not list(env.locks.iterdir())  # no lease taken


def test_without_the_fallback_a_gpu_model_on_a_host_without_gpus_fails_saying_what_to_set(
        env: SimpleNamespace) -> None:
    with pytest.raises(AirflowFailException) as info:
        model_op("fold", gpu=1, command=sh("true")).execute(env.context)
    assert "this host has 0 (none)" in str(info.value)


def test_a_model_without_codecs_reads_the_uncompressed_copies_of_compressed_inputs(env: SimpleNamespace) -> None:
    """input.transfer_syntax: uncompressed. The model is Debian's pydicom 2.3 with numpy and no codec
    (no GDCM, no pylibjpeg, no Pillow in raddeploy/base): it fails on the files as received and reads
    the sensor's copies, whose pixels equal what the provider's codecs decode."""
    import hashlib

    import numpy
    import pydicom
    from pydicom.data import get_testdata_file

    from raddeploy_provider.store import StoredInstance, snapshot

    samples = {"JPEG 2000": "MR_small_jp2klossless.dcm", "JPEG-LS": "MR_small_jpeg_ls_lossless.dcm",
               "RLE": "MR_small_RLE.dcm", "JPEG 2000 lossy": "JPEG2000.dcm"}
    stored, expected = env.run.parent / "stored", {}
    stored.mkdir()
    instances = []
    for name, sample in samples.items():
        ds = pydicom.dcmread(get_testdata_file(sample))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()  # MR_small_*: one image
        ds.save_as(stored / sample)  # pixel data as it was, compressed
        expected[ds.SOPInstanceUID] = hashlib.sha256(numpy.ascontiguousarray(ds.pixel_array).tobytes()).hexdigest()
        instances.append(StoredInstance(
            sop_uid=ds.SOPInstanceUID, study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
            sop_class_uid=ds.SOPClassUID, transfer_syntax=ds.file_meta.TransferSyntaxUID, path=sample, size=1,
            sha256="", received_at=0.0, tags={"Modality": ds.Modality}))
    (env.run / "input" / "CT.1.dcm").unlink()
    read = ("import json,sys,hashlib,pathlib,pydicom,numpy\n"
            "out={}\n"
            "for p in sorted(pathlib.Path('/input').iterdir()):\n"
            "    ds=pydicom.dcmread(str(p))\n"
            "    try: out[ds.SOPInstanceUID]=hashlib.sha256(numpy.ascontiguousarray(ds.pixel_array).tobytes()).hexdigest()\n"
            "    except Exception as e: out[ds.SOPInstanceUID]='cannot: '+type(e).__name__\n"
            "json.dump(out,open('/output/read.json','w'))\n")

    snapshot(instances, stored, env.run / "input")  # as received: the model cannot decode them
    model_op("as_received", image=BASE, command=["python3", "-c", read]).execute(env.context)
    as_received = json.loads((env.run / "dst" / "read.json").read_text())
    assert sorted(sop for sop, value in as_received.items() if value.startswith("cannot")) == sorted(
        sop for sop, inst in zip(expected, instances) if "RLE" not in inst.transfer_syntax.name)  # RLE: pydicom's own

    shutil.rmtree(env.run / "input")
    made = snapshot(instances, stored, env.run / "input", uncompressed=True)
    model_op("uncompressed", image=BASE, command=["python3", "-c", read]).execute(env.context)
    assert json.loads((env.run / "dst" / "read.json").read_text()) == expected
    for path in made:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian and path.stat().st_nlink == 1
    assert all(pydicom.dcmread(stored / s).file_meta.TransferSyntaxUID.is_compressed for s in samples.values())


def test_a_stopping_embedded_stack_removes_its_gpus_namespace_holders(api: docker.APIClient, tmp_path: Path) -> None:
    from raddeploy.embedded import EmbeddedStack

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    names = [netns_holder(api, BUSYBOX, lock_dir, gpu_id) for lock_dir in (ours, theirs) for gpu_id in ("0", "1")]
    stack = EmbeddedStack(home=tmp_path / "home", flows_dir=tmp_path / "flows", api_port=1, dicom_port=2,
                          extra_env={"RADDEPLOY_GPU_LOCK_DIR": str(ours)})
    try:
        stack.stop()  # nothing of it started: the holders of its lease folder go all the same
        left = {c["Names"][0].lstrip("/") for c in api.containers(all=True, filters={"label": NETNS_LABEL})}
        assert not left & set(names[:2]) and set(names[2:]) <= left
    finally:
        remove_netns_holders(api, ours)
        remove_netns_holders(api, theirs)
