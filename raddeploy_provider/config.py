"""All settings of raddeploy-provider, read from ``RADDEPLOY_*`` environment variables.

One place so that the listener, the Airflow workers and the CLI agree: they run in different
processes (and, in production, on different hosts) and share only the environment and the
data dir. README.md lists every variable with its default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PREFIX = "RADDEPLOY_"


def _env(name: str, default: str) -> str:
    return os.environ.get(PREFIX + name, default)


@dataclass(frozen=True)
class Settings:
    """A snapshot of the environment; build it with :func:`load_settings`."""

    data_dir: Path
    flows_dir: Path
    listen_host: str
    listen_port: int
    ae_title: str
    airflow_url: str
    airflow_user: str
    airflow_password: str
    static_dir: Path
    gpu_pool: str
    gpu_queue: str
    fsync: bool

    @property
    def studies_dir(self) -> Path:
        return self.data_dir / "studies"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def index_path(self) -> Path:
        return self.data_dir / "index.sqlite3"


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _env(name, default).strip().lower()
    if value not in choices:
        raise ValueError(f"{PREFIX}{name}={value!r}: use one of {', '.join(choices)}")
    return value


def load_settings() -> Settings:
    """Read the settings now (not at import, so tests and `raddeploy run` can set them)."""
    data_dir = Path(_env("DATA", str(Path.cwd() / ".raddeploy" / "data"))).absolute()
    return Settings(
        data_dir=data_dir,
        flows_dir=Path(_env("FLOWS", str(Path.cwd() / "flows"))).absolute(),
        listen_host=_env("LISTEN_HOST", "0.0.0.0"),
        listen_port=int(_env("LISTEN_PORT", "11112")),
        ae_title=_env("AE_TITLE", "RADDEPLOY"),
        airflow_url=_env("AIRFLOW_URL", "http://127.0.0.1:8080").rstrip("/"),
        airflow_user=_env("AIRFLOW_USER", "listener"),
        airflow_password=_env("AIRFLOW_PASSWORD", ""),
        static_dir=Path(_env("STATIC", str(data_dir / "static"))).absolute(),
        gpu_pool=_env("GPU_POOL", "raddeploy_gpu"),
        gpu_queue=_env("GPU_QUEUE", "gpu"),
        fsync=_choice("FSYNC", "never", ("always", "never")) == "always",
    )
