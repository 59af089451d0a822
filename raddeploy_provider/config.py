"""All settings of raddeploy-provider, read from ``RADDEPLOY_*`` environment variables.

One place so that the listener, the Airflow workers and the CLI agree: they run in different
processes (and, in production, on different hosts) and share only the environment and the
data dir. README.md lists every variable with its default.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from raddeploy_provider.gpu import FALLBACK_CHOICES, default_lock_dir
from raddeploy_provider.notices import DEFAULT_EVENTS, EVENTS
from raddeploy_provider.store.index import POSTGRES_SCHEMES
from raddeploy_provider.store.layout import DataDir
from raddeploy_provider.units import parse_duration, parse_size

PREFIX = "RADDEPLOY_"
#: The file creation mask of our processes (listener, the embedded stack's Airflow): files 0640,
#: folders 0750, nothing for other users (README "Security").
PROCESS_UMASK = 0o027


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
    static_dir: Path | None  # None: <data>/static (DataDir.static)
    gpu_pool: str
    gpu_queue: str
    fsync: bool
    # The study index on PostgreSQL (a postgresql:// URL, with its password: never in a repr);
    # None: SQLite in the data dir (DataDir.index).
    index_url: str | None = field(repr=False)
    check_called_ae: bool
    allowed_calling_aets: tuple[str, ...]
    allowed_networks: tuple[str, ...]
    min_free_disk: int
    tls_cert: Path | None
    tls_key: Path | None
    tls_ca: Path | None
    max_connections: int  # the listener's open connections, all peers together
    max_connections_per_host: int  # ... and from one peer address
    association_setup_timeout: float  # s from TCP accept to a complete A-ASSOCIATE-RQ (TLS included)
    association_idle_timeout: float  # s an association may stay silent
    gpu_mode: str
    gpu_fallback: str  # "none" (GPU models wait for a GPU) or "cpu" (they run without one where there is none)
    gpu_lock_dir: Path
    gpu_lease_timeout: float
    model_mem_limit: int
    model_pids_limit: int
    outbox_give_up: float  # seconds a trigger Airflow keeps refusing is retried before it is given up
    # Notifications (docs/notifications.md): a flow's `notify` overrides these field by field.
    notify_on: tuple[str, ...]  # events: failure, rejection, deadline, delivery
    notify_webhook: str | None  # an Airflow HTTP connection id; None: no webhook
    notify_email: tuple[str, ...]  # addresses; (): no mail
    notify_smtp: str  # the Airflow SMTP connection id mails go through
    ui_url: str  # the Airflow UI as people reach it, for the links in notifications

    @property
    def data(self) -> DataDir:
        """The data dir's layout (studies, runs, index, static assets, caches)."""
        return DataDir(self.data_dir, static_override=self.static_dir)


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _env(name, default).strip().lower()
    if value not in choices:
        raise ValueError(f"{PREFIX}{name}={value!r}: use one of {', '.join(choices)}")
    return value


def _list(name: str) -> tuple[str, ...]:
    return tuple(part for part in (p.strip() for p in _env(name, "").split(",")) if part)


def _events(name: str, default: str) -> tuple[str, ...]:
    text = _env(name, default)
    events = tuple(part.lower() for part in (p.strip() for p in text.split(",")) if part)
    unknown = [event for event in events if event not in EVENTS]
    if unknown:
        raise ValueError(f"{PREFIX}{name}={text!r}: {unknown[0]!r} is no event; use some of {', '.join(EVENTS)} "
                         "(comma-separated), or nothing for no notifications")
    return events


def _size(name: str, default: str) -> int:
    text = _env(name, default)
    if text.strip() == "0":
        return 0
    try:
        return parse_size(text)
    except ValueError:
        raise ValueError(f"{PREFIX}{name}={text!r}: write bytes or a number with k, m or g (2g)") from None


def _duration(name: str, default: str) -> float:
    text = _env(name, default)
    try:
        return parse_duration(text)
    except ValueError:
        raise ValueError(f"{PREFIX}{name}={text!r}: write seconds or a number with s, m or h (30s, 6h)") from None


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _path(name: str) -> Path | None:
    text = _env(name, "")
    return Path(text).absolute() if text else None


def _index_url() -> str | None:
    text = _env("INDEX_URL", "").strip()
    if text and not text.startswith(POSTGRES_SCHEMES):  # the value itself may hold a password: not said
        raise ValueError(f"{PREFIX}INDEX_URL must be postgresql://user:password@host:port/database, "
                         "or empty for the SQLite index in the data dir")
    return text or None


def load_settings() -> Settings:
    """Read the settings now (not at import, so tests and `raddeploy run` can set them)."""
    data_dir = Path(_env("DATA", str(Path.cwd() / ".raddeploy" / "data"))).absolute()
    airflow_url = _env("AIRFLOW_URL", "http://127.0.0.1:8080").rstrip("/")
    return Settings(
        data_dir=data_dir,
        flows_dir=Path(_env("FLOWS", str(Path.cwd() / "flows"))).absolute(),
        listen_host=_env("LISTEN_HOST", "0.0.0.0"),
        listen_port=int(_env("LISTEN_PORT", "11112")),
        ae_title=_env("AE_TITLE", "RADDEPLOY"),
        airflow_url=airflow_url,
        airflow_user=_env("AIRFLOW_USER", "listener"),
        airflow_password=_env("AIRFLOW_PASSWORD", ""),
        static_dir=_path("STATIC"),
        gpu_pool=_env("GPU_POOL", "raddeploy_gpu"),
        gpu_queue=_env("GPU_QUEUE", "gpu"),
        fsync=_choice("FSYNC", "never", ("always", "never")) == "always",
        index_url=_index_url(),
        check_called_ae=_choice("CHECK_CALLED_AE", "true", ("true", "false")) == "true",
        allowed_calling_aets=_list("ALLOWED_CALLING_AETS"),
        allowed_networks=_list("ALLOWED_NETWORKS"),
        min_free_disk=_size("MIN_FREE_DISK", "1g"),
        tls_cert=_path("TLS_CERT"),
        tls_key=_path("TLS_KEY"),
        tls_ca=_path("TLS_CA"),
        max_connections=int(_env("MAX_CONNECTIONS", "200")),
        max_connections_per_host=int(_env("MAX_CONNECTIONS_PER_HOST", "20")),
        association_setup_timeout=_duration("ASSOCIATION_SETUP_TIMEOUT", "30s"),
        association_idle_timeout=_duration("ASSOCIATION_IDLE_TIMEOUT", "60s"),
        gpu_mode=_choice("GPU_MODE", "device_request", ("device_request", "env")),
        gpu_fallback=_choice("GPU_FALLBACK", "none", FALLBACK_CHOICES),
        gpu_lock_dir=_path("GPU_LOCK_DIR") or default_lock_dir(),  # private, never a path in /tmp
        gpu_lease_timeout=float(_env("GPU_LEASE_TIMEOUT", "3600")),
        model_mem_limit=_size("MODEL_MEM_LIMIT", str(int(_host_memory() * 0.75))),
        model_pids_limit=int(_env("MODEL_PIDS_LIMIT", "4096")),
        outbox_give_up=_duration("OUTBOX_GIVE_UP", "6h"),
        notify_on=_events("NOTIFY_ON", ",".join(DEFAULT_EVENTS)),
        notify_webhook=_env("NOTIFY_WEBHOOK", "").strip() or None,
        notify_email=_list("NOTIFY_EMAIL"),
        notify_smtp=_env("NOTIFY_SMTP", "").strip() or "smtp_default",
        ui_url=(_env("UI_URL", "").strip() or airflow_url).rstrip("/"),
    )


def configure_logging(verbose: bool = False) -> None:
    """The log format of our own processes (listener, CLI): one line per event, UIDs, no names."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
