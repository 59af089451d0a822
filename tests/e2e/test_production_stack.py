"""The production stack for real: images built from the local base and wheel house, the
compose file brought up, DICOM in and out through its published port, GPU tasks on two
(simulated) GPU hosts, the listener crashed and restarted by compose.

What a site's IT does, in the order it does it: `scripts/build-prod-images.sh`, a `.env` from
`deploy/env.example` with new secrets, `docker-compose up -d`, wait for health. The study
index is on PostgreSQL (RADDEPLOY_INDEX_URL), Airflow runs the CeleryExecutor with the FAB
auth manager. Each GPU worker stands for a GPU host: its own GPU id and lock folder; GPUs
reach the (CPU-only) model containers as NVIDIA_VISIBLE_DEVICES (RADDEPLOY_GPU_MODE=env).
Models run as uid 1000, not root and not the service account: they read their inputs through
the data dir's group.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread

from compose_stack import REPO, ComposeStack, bridge_address, project_name, since
from dicom_factory import make_series
from directory import ADMIN_DN, SUFFIX, Directory
from peers import StoreSCP, storescu
from raddeploy_provider.airflow_client import AirflowClient
from stack_factory import add_flow, run_finished, task_instances

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.compose]

CPU_FLOW = """
name: Compose CT threshold
id: compose_ct
triggers:
  - Modality: CT
    SeriesDescription: alpha
grouping:
  quiet_period: 2s
models:
  - name: threshold
    image: raddeploy/threshold:latest
    user: "1000:1000"
    environment: {{THRESHOLD_HU: "100"}}
    inputs: {{src: /input}}
    outputs: {{dst: /output}}
    timeout: 5m
destinations:
  - {{host: {host}, port: {port}, ae_title: {ae}}}
"""

# A GPU model that says where it ran (its worker's GPU, from NVIDIA_VISIBLE_DEVICES) and takes
# a few seconds, so a burst keeps both GPU slots busy at once.
GPU_FLOW = """
name: Compose GPU model
id: compose_gpu
triggers:
  - Modality: CT
    SeriesDescription: burst
grouping:
  quiet_period: 2s
models:
  - name: segment
    image: raddeploy/threshold:latest
    user: "1000:1000"
    gpu: 1
    entrypoint: ["/bin/sh", "-c"]
    command: ["echo gpu=$NVIDIA_VISIBLE_DEVICES; sleep 4; exec python3 /app/model.py"]
    inputs: {{src: /input}}
    outputs: {{dst: /output}}
    timeout: 5m
destinations:
  - {{host: {host}, port: {port}, ae_title: {ae}}}
"""

# Waited for before the tests push. The workers' own health check (celery ping, every 60 s) is
# not: a task queued before a worker is ready waits in Redis, and the tests see it run.
SERVICES = ["postgres", "redis", "api-server", "scheduler", "listener"]


@pytest.fixture(scope="module")
def images(docker_ready) -> None:
    start = time.monotonic()
    done = subprocess.run(["bash", str(REPO / "scripts" / "build-prod-images.sh")], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    print(f"\nproduction images ready in {since(start)}")


@pytest.fixture(scope="module")
def destination(tmp_path_factory) -> StoreSCP:
    scp = StoreSCP(tmp_path_factory.mktemp("compose-destination"), ae_title="COMPOSEDEST")
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def directory(tmp_path_factory) -> Directory:
    """The hospital's directory: a physicist in the group mapped to role User, a visitor in none."""
    ldap = Directory(tmp_path_factory.mktemp("ldap"), "directory-admin-secret", {
        "physicist": ("physicist-secret", ["rt-physics"]),
        "visitor": ("visitor-secret", ["canteen"]),
    })
    yield ldap
    ldap.stop()


@pytest.fixture(scope="module")
def compose(images, destination, directory) -> ComposeStack:
    # Under /tmp with mode 0755 above it: the containers' uid 50000 must reach the data dir
    # at the same path as the host (pytest's own temp folders are 0700).
    root = Path(tempfile.mkdtemp(prefix="raddeploy-compose-", dir="/tmp"))
    stack = ComposeStack(root, project_name(), profiles=("second-gpu-host",), settings={
        "RADDEPLOY_GPU_MODE": "env",
        "RADDEPLOY_GPUS": "0",
        "RADDEPLOY_SECOND_HOST_GPUS": "1",
        "RADDEPLOY_GPU_SLOTS": "2",
        "RADDEPLOY_CPU_WORKER_SLOTS": "4",
        "RADDEPLOY_GPU_WORKER_HOSTNAME": "gpu-host-a",
        "AIRFLOW_PARALLELISM": "8",
        # Sign-in through the directory (docs/production.md "Accounts"), reached on a host address.
        "RADDEPLOY_LDAP_SERVER": f"ldap://{bridge_address()}:{directory.port}",
        "RADDEPLOY_LDAP_BIND_USER": ADMIN_DN,
        "RADDEPLOY_LDAP_BIND_PASSWORD": directory.admin_password,
        "RADDEPLOY_LDAP_SEARCH": f"ou=people,{SUFFIX}",
        "RADDEPLOY_LDAP_UID_FIELD": "uid",
        "RADDEPLOY_LDAP_GROUP_FIELD": "seeAlso",
        "RADDEPLOY_LDAP_ROLES": json.dumps({Directory.group_dn("rt-physics"): ["User"]}),
    })
    start = time.monotonic()
    try:
        stack.up()
        stack.wait_healthy(SERVICES)
        print(f"\ncompose stack healthy in {since(start)}")
        print(f"idle:\n{stack.stats()}")  # the figures of docs/production.md
        yield stack
    finally:
        print(stack.logs(tail=40)[-6000:])
        stack.down()
        subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture(scope="module")
def airflow(compose, destination) -> AirflowClient:
    client = AirflowClient(compose.api_url, "admin", compose.env("RADDEPLOY_ADMIN_PASSWORD"))
    host = compose.network_gateway()  # the host, where the test's storescp listens
    for name, text, dag_id in (("cpu.yaml", CPU_FLOW, "compose_ct"), ("gpu.yaml", GPU_FLOW, "compose_gpu")):
        add_flow(compose, client, name, text.format(host=host, port=destination.port, ae=destination.ae_title),
                 dag_id, timeout=180)
    return client


def test_ct_pushed_to_published_port_is_delivered(compose, airflow, destination, tmp_path):
    series = make_series(tmp_path / "ct", slices=4, size=64, description="alpha")
    before = set(destination.files())
    start = time.monotonic()
    pushed = storescu(compose.dicom_port, series.files)
    assert pushed.returncode == 0, pushed.stderr

    received = destination.new_files(before, 4, "the derived series at the host's storescp")
    print(f"\npush -> delivered through the compose stack: {since(start)}")
    for path in received:
        ds = dcmread(path)
        assert ds.StudyInstanceUID == series.study_uid
        assert ds.SeriesInstanceUID != series.series_uid
        assert ds.ImageType[0] == "DERIVED"

    run = run_finished(airflow, "compose_ct", f"{series.study_uid}.1", timeout=120)
    assert run["state"] == "success"
    assert run["conf"] == {"study_uid": series.study_uid, "generation": 1}
    # The study index is PostgreSQL's, not a SQLite file on the shared data dir.
    assert compose.psql("raddeploy", f"SELECT count(*) FROM instances WHERE study_uid = '{series.study_uid}'") == "4"
    assert compose.psql("raddeploy", f"SELECT state FROM runs WHERE run_id = '{run['dag_run_id']}'") == "closing"
    assert not (compose.data_dir / "index.sqlite3").exists()
    tis = task_instances(airflow, "compose_ct", run["dag_run_id"])
    model = next(ti for ti in tis.values() if ti["task_id"].endswith("threshold"))
    assert model["hostname"] == "worker-cpu"  # a CPU model runs on the CPU worker's queue


def test_gpu_burst_runs_on_both_gpu_hosts(compose, airflow, destination, tmp_path):
    studies = [make_series(tmp_path / f"s{i}", slices=1, size=32, description="burst") for i in range(6)]
    before = set(destination.files())
    for series in studies:
        pushed = storescu(compose.dicom_port, series.files)
        assert pushed.returncode == 0, pushed.stderr
    destination.new_files(before, 1, "the first GPU result")
    print(f"\nbusy (mid-burst):\n{compose.stats()}")  # the figures of docs/production.md
    destination.new_files(before, len(studies), "every study's GPU result delivered", timeout=400)

    hosts: dict[str, list[str]] = {}
    for series in studies:
        run = run_finished(airflow, "compose_gpu", f"{series.study_uid}.1", timeout=120)
        assert run["state"] == "success", run
        tis = task_instances(airflow, "compose_gpu", run["dag_run_id"])
        model = next(ti for ti in tis.values() if ti["task_id"].endswith("segment"))
        assert model["pool"] == "raddeploy_gpu" and model["queue"] == "gpu"
        status, xcom = airflow.get(f"/api/v2/dags/compose_gpu/dagRuns/{run['dag_run_id']}/taskInstances/"
                                   f"{model['task_id']}/xcomEntries/return_value?deserialize=true")
        assert status == 200, xcom
        gpus = xcom["value"]["gpus"]
        hosts.setdefault(model["hostname"], []).extend(gpus)
    print(f"\nGPU tasks per host: { {h: len(g) for h, g in hosts.items()} }")
    # Both hosts took GPU work, each only ever its own device.
    assert set(hosts) == {"gpu-host-a", "worker-gpu-2"}, hosts
    assert set(hosts["gpu-host-a"]) == {"0"} and set(hosts["worker-gpu-2"]) == {"1"}, hosts


def test_listener_killed_and_restarted_by_compose_loses_nothing(compose, airflow, destination, tmp_path):
    series = make_series(tmp_path / "ct", slices=5, size=64, description="alpha")
    before = set(destination.files())
    pushed = storescu(compose.dicom_port, series.files)
    assert pushed.returncode == 0, pushed.stderr  # every instance acknowledged ...
    restarts = compose.kill_main_process("listener")  # ... then the listener dies at once
    compose.wait_restarted("listener", restarts)

    received = destination.new_files(before, 5, "the study acknowledged before the crash, delivered after it")
    assert {dcmread(p).StudyInstanceUID for p in received} == {series.study_uid}
    sources = {dcmread(p).SourceImageSequence[0].ReferencedSOPInstanceUID for p in received}
    assert sources == {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series.files}
    run = run_finished(airflow, "compose_ct", f"{series.study_uid}.1", timeout=120)
    assert run["state"] == "success"


def test_directory_accounts_sign_in_with_their_groups_roles(compose, airflow):
    """LDAP sign-in (FAB auth manager): the group decides the role; the database accounts still work."""
    physicist = AirflowClient(compose.api_url, "physicist", "physicist-secret")
    status, dags = physicist.get("/api/v2/dags")
    assert status == 200 and {"compose_ct", "compose_gpu"} <= {d["dag_id"] for d in dags["dags"]}

    visitor = AirflowClient(compose.api_url, "visitor", "visitor-secret")  # signs in, may see nothing
    status, dags = visitor.get("/api/v2/dags")
    assert status == 403 or (status == 200 and dags["dags"] == []), (status, dags)

    wrong = urllib.request.Request(f"{compose.api_url}/auth/token", method="POST",
                                   data=json.dumps({"username": "physicist", "password": "wrong"}).encode(),
                                   headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(wrong, timeout=10)
    assert refused.value.code == 401
    assert airflow.get("/api/v2/dags")[0] == 200  # admin: a database account, LDAP on


def test_data_dir_holds_nothing_for_other_users(compose):
    """After the runs above: the permission scheme (docs/production.md "Permissions") held.

    Other users cannot enter the data dir at all (2750); inside it, everything the services
    wrote is in the data dir's group with no bits for others. A model (uid 1000 here) writes its
    files with its own image's umask: they are reachable only through the folders above them.
    """
    top = compose.data_dir.stat()
    assert (top.st_uid, top.st_gid) == (50000, 50000) and top.st_mode & 0o7777 == 0o2750
    ours = models = 0
    for path in compose.data_dir.rglob("*"):
        info = path.lstat()
        if path.is_symlink():
            continue
        assert info.st_mode & 0o002 == 0, f"{path} is writable by other users ({oct(info.st_mode & 0o777)})"
        if info.st_uid == 50000:
            ours += 1
            assert info.st_mode & 0o007 == 0, f"{path} is open to other users ({oct(info.st_mode & 0o777)})"
            assert info.st_gid == 50000, f"{path} is not in the data dir's group"
        else:
            assert info.st_uid == 1000, f"{path} belongs to uid {info.st_uid}"  # the models' user
            models += 1
    assert ours > 20, (ours, models)  # studies, runs, sent results (provenance rewrites them as ours)


def test_placeholder_secrets_are_refused(images, tmp_path):
    """The image refuses to start with the example's `change-me`; compose refuses a missing secret."""
    done = subprocess.run(["docker", "run", "--rm", "-e", "AIRFLOW_JWT_SECRET=change-me", "raddeploy/airflow:latest",
                           "airflow", "version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 78, done
    assert "AIRFLOW_JWT_SECRET still holds the example's placeholder 'change-me'" in done.stderr

    stack = ComposeStack(tmp_path / "stack", project_name())
    env = stack.root / ".env"
    env.write_text("".join(line + "\n" for line in env.read_text().splitlines()
                           if not line.startswith("RADDEPLOY_ADMIN_PASSWORD=")))
    config = stack.compose("config", check=False)
    assert config.returncode != 0
    assert "RADDEPLOY_ADMIN_PASSWORD" in config.stderr and "set it in .env" in config.stderr


def test_workers_build_their_celery_app_with_the_task_preload(compose):
    """The workers' Celery configuration (docker-compose.yaml's celery_config_options) imports
    what a task start would import when a worker builds its app, before it forks its pool; the
    scheduler, which builds the same app, imports none of it."""
    code = ("import sys; sys.argv = ['airflow'] + sys.argv[1:]\n"
            "import airflow.providers.celery.executors.celery_executor_utils as utils\n"
            "from raddeploy.embedded import TASK_PRELOAD\n"
            "print(utils.app.conf.broker_url.split(':')[0], sorted(m for m in TASK_PRELOAD if m not in sys.modules))")
    worker = compose.compose("exec", "-T", "worker-gpu", "python", "-c", code, "celery", "worker")
    assert worker.stdout.split("\n")[-2] == "redis []", worker.stdout + worker.stderr
    scheduler = compose.compose("exec", "-T", "scheduler", "python", "-c", code, "scheduler")
    assert "raddeploy_provider.dag_factory" in scheduler.stdout.split("\n")[-2], scheduler.stdout + scheduler.stderr
