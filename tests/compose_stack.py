"""The production stack (docker-compose.yaml) brought up for a test, as an IT admin would.

:class:`ComposeStack` writes a ``.env`` from ``deploy/env.example`` with freshly generated
secrets (every ``change-me`` replaced), a data dir at a path that is the same on the host and
in the containers, and drives ``docker-compose`` (Debian's 1.29) with its own project name,
so it never touches another stack on the machine.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import docker

from peers import free_port, wait_for

from raddeploy_provider.gpu import remove_netns_holders

#: Where docker-compose.yaml mounts each GPU worker's lease volume (the holders' label names it).
GPU_LOCKS_IN_WORKERS = Path("/var/lib/raddeploy/gpu-locks")

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yaml"
ENV_EXAMPLE = REPO / "deploy" / "env.example"


def docker_socket_gid() -> int:
    return os.stat("/var/run/docker.sock").st_gid


def env_file_text(settings: dict[str, str]) -> str:
    """deploy/env.example with a new secret for every ``change-me`` and ``settings`` applied."""
    lines = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            if name in settings:
                value = settings[name]
            elif value == "change-me":
                value = (base64.urlsafe_b64encode(os.urandom(32)).decode() if name == "AIRFLOW_FERNET_KEY"
                         else secrets.token_urlsafe(24))
            line = f"{name}={value}"
        lines.append(line)
    missing = set(settings) - {line.partition("=")[0] for line in lines}
    lines += [f"{name}={settings[name]}" for name in sorted(missing)]
    return "\n".join(lines) + "\n"


class ComposeStack:
    """One docker-compose project under ``root`` (``root/.env``, ``root/data``, ``root/flows``)."""

    def __init__(self, root: Path, project: str, settings: dict[str, str] | None = None,
                 profiles: tuple[str, ...] = ()) -> None:
        self.root = root
        self.project = project
        self.profiles = profiles
        self.dicom_port = free_port()
        self.ui_port = free_port()
        self.data_dir = root / "data"
        self.flows_dir = root / "flows"
        # Containers run as uid 50000: every folder above the data and flows dirs must let it pass.
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        self.flows_dir.mkdir(mode=0o755, exist_ok=True)
        self.flows_dir.chmod(0o755)
        self.settings = {
            "RADDEPLOY_DATA": str(self.data_dir),
            "RADDEPLOY_FLOWS_DIR": str(self.flows_dir),
            "DOCKER_GID": str(docker_socket_gid()),
            "RADDEPLOY_DICOM_PORT": str(self.dicom_port),
            "AIRFLOW_UI_PORT": str(self.ui_port),
            **(settings or {}),
        }
        env = root / ".env"
        env.write_text(env_file_text(self.settings))
        env.chmod(0o600)

    def env(self, name: str) -> str:
        for line in (self.root / ".env").read_text().splitlines():
            if line.startswith(name + "="):
                return line.partition("=")[2]
        raise KeyError(name)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        profiles = [arg for profile in self.profiles for arg in ("--profile", profile)]
        command = [shutil.which("docker-compose") or "docker-compose", "-f", str(COMPOSE_FILE),
                   "--project-directory", str(self.root), "-p", self.project, *profiles, *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return done

    def up(self) -> None:
        self.compose("up", "-d")

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", check=False)
        # The GPUs' network-namespace holders the GPU workers started through the host's Docker
        # (docs/production.md): compose does not know them.
        client = docker.from_env()
        try:
            remove_netns_holders(client.api, GPU_LOCKS_IN_WORKERS)
        finally:
            client.close()
        # The data dir belongs to uid 50000 now: removed as root by the test, not by the stack.
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def state(self, service: str) -> dict:
        out = subprocess.run(["docker", "inspect", self.container(service)], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)[0]

    def health(self, service: str) -> str:
        state = self.state(service)["State"]
        return state.get("Health", {}).get("Status", state["Status"])

    def wait_healthy(self, services: list[str], timeout: float = 420) -> None:
        def all_healthy():
            states = {s: self.health(s) for s in services}
            return states if all(v == "healthy" for v in states.values()) else None

        try:
            wait_for(all_healthy, timeout, f"{', '.join(services)} healthy", interval=2)
        except AssertionError:
            raise AssertionError(f"not healthy: {({s: self.health(s) for s in services})}\n{self.logs()}") from None

    def logs(self, service: str = "", tail: int = 60) -> str:
        return self.compose("logs", "--no-color", "--tail", str(tail), *([service] if service else []), check=False).stdout

    def psql(self, database: str, sql: str) -> str:
        """One query in the stack's PostgreSQL (as Airflow's superuser), its rows as text."""
        return self.compose("exec", "-T", "-e", f"PGPASSWORD={self.env('POSTGRES_PASSWORD')}", "postgres", "psql",
                            "-h", "127.0.0.1", "-U", "airflow", "-d", database, "-tAc", sql).stdout.strip()

    def stats(self) -> str:
        """``docker stats`` of the stack's containers now: CPU and memory per service (docs/production.md)."""
        ids = self.compose("ps", "-q").stdout.split()
        out = subprocess.run(["docker", "stats", "--no-stream", "--format", "{{.Name}}\t{{.CPUPerc}}\t{{.MemUsage}}", *ids],
                             capture_output=True, text=True)
        return out.stdout

    def network_gateway(self) -> str:
        """The host's address on the stack's network: where containers reach a peer on the host."""
        out = subprocess.run(["docker", "network", "inspect", f"{self.project}_default", "-f",
                              "{{(index .IPAM.Config 0).Gateway}}"], capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def kill_main_process(self, service: str) -> int:
        """SIGKILL the container's first process from the host, as a crash would: returns the restart count."""
        state = self.state(service)
        os.kill(state["State"]["Pid"], 9)
        return state["RestartCount"]

    def wait_restarted(self, service: str, count_before: int, timeout: float = 120) -> None:
        wait_for(lambda: self.state(service)["RestartCount"] > count_before and self.health(service) == "healthy",
                 timeout, f"{service} restarted by compose and healthy", interval=1)


def bridge_address() -> str:
    """An address of this host that every container reaches (Docker's default bridge, docker0),
    known before ``up``: where the test's own peers (slapd) listen for the stack."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "docker0"], capture_output=True, text=True)
    found = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out.stdout)
    if found:
        return found.group(1)
    subnet = subprocess.run(["docker", "network", "inspect", "bridge", "-f", "{{(index .IPAM.Config 0).Subnet}}"],
                            capture_output=True, text=True, check=True).stdout.strip()
    return str(ipaddress.ip_network(subnet)[1])  # Docker gives the bridge the subnet's first address


def project_name(prefix: str = "rdtest") -> str:
    return re.sub(r"[^a-z0-9]", "", f"{prefix}{secrets.token_hex(3)}")


def since(start: float) -> str:
    return f"{time.monotonic() - start:.0f} s"
