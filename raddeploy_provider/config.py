"""All settings of raddeploy-provider, read from ``RADDEPLOY_*`` environment variables.

One place so that the listener, the Airflow workers and the CLI agree: they run in different
processes (and, in production, on different hosts) and share only the environment and the
data dir. One table, :data:`SETTINGS`, drives both :func:`load_settings` (which variable fills
which field, its default, how it is read) and the reference ``docs/configuration.md``
(``python -m raddeploy_provider.config > docs/configuration.md``; a test fails when the
committed file differs from the table, or when the code reads a variable the table lacks).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from raddeploy_provider.gpu import FALLBACK_CHOICES, default_lock_dir
from raddeploy_provider.notices import DEFAULT_EVENTS, EVENTS
from raddeploy_provider.store.index import POSTGRES_SCHEMES
from raddeploy_provider.store.layout import DataDir
from raddeploy_provider.units import parse_duration, parse_size

PREFIX = "RADDEPLOY_"
#: The file creation mask of our processes (listener, the embedded stack's Airflow): files 0640,
#: folders 0750, nothing for other users (README "Security").
PROCESS_UMASK = 0o027
_DAY = 86400.0


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
    gpu_queue_depth: int  # pool slots per GPU: 2, the next GPU task waits started for the lease
    model_mem_limit: int
    model_pids_limit: int
    model_netns_image: str | None  # the image of the GPUs' network-less namespace holders; None: none
    outbox_give_up: float  # seconds a trigger Airflow keeps refusing is retried before it is given up
    # Notifications (docs/notifications.md): a flow's `notify` overrides these field by field.
    notify_on: tuple[str, ...]  # events: failure, rejection, deadline, delivery
    notify_webhook: str | None  # an Airflow HTTP connection id; None: no webhook
    notify_email: tuple[str, ...]  # addresses; (): no mail
    notify_smtp: str  # the Airflow SMTP connection id mails go through
    ui_url: str  # the Airflow UI as people reach it, for the links in notifications
    # Retention (store/retention.py). The defaults are the table's (a test keeps them equal), so
    # code that builds a Settings by hand need not name them.
    retain_delivered: float = 30 * _DAY  # s a study of delivered runs is kept after their last activity
    retain_failed: float = 90 * _DAY  # ... of failed or rejected runs
    retain_unmatched: float = 7 * _DAY  # s a study no flow ran on is kept after its last instance
    disk_low_water: int = 10 * 2**30  # free bytes under which delivered data goes early; 0: off
    retention_schedule: str | None = "@hourly"  # cron or Airflow preset; None: only by hand
    show_patient_names: bool = False  # in `raddeploy status` and the status page (else UIDs only)

    @property
    def data(self) -> DataDir:
        """The data dir's layout (studies, runs, index, static assets, caches)."""
        return DataDir(self.data_dir, static_override=self.static_dir)


# -- how a value is read -------------------------------------------------------------------------
# Each parser takes the variable's name (without PREFIX, for its error message) and its text.

Parse = Callable[[str, str], Any]


def _text(name: str, text: str) -> str:
    return text


def _stripped(name: str, text: str) -> str:
    return text.strip()


def _int(name: str, text: str) -> int:
    return int(text)


def _at_least_one(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{PREFIX}{name}={text!r}: write a whole number, 1 or more")
    return value


def _float(name: str, text: str) -> float:
    return float(text)


def _url(name: str, text: str) -> str:
    return text.strip().rstrip("/")


def _optional(name: str, text: str) -> str | None:
    return text.strip() or None


def _choice(*choices: str) -> Parse:
    def parse(name: str, text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"{PREFIX}{name}={value!r}: use one of {', '.join(choices)}")
        return value
    return parse


def _switch(on: str, off: str) -> Parse:
    """A two-valued choice read as a bool: ``on`` is True."""
    choice = _choice(on, off)
    return lambda name, text: choice(name, text) == on


def _list(name: str, text: str) -> tuple[str, ...]:
    return tuple(part for part in (p.strip() for p in text.split(",")) if part)


def _events(name: str, text: str) -> tuple[str, ...]:
    events = tuple(part.lower() for part in (p.strip() for p in text.split(",")) if part)
    unknown = [event for event in events if event not in EVENTS]
    if unknown:
        raise ValueError(f"{PREFIX}{name}={text!r}: {unknown[0]!r} is no event; use some of {', '.join(EVENTS)} "
                         "(comma-separated), or nothing for no notifications")
    return events


def _size(name: str, text: str) -> int:
    if text.strip() == "0":
        return 0
    try:
        return parse_size(text)
    except ValueError:
        raise ValueError(f"{PREFIX}{name}={text!r}: write bytes or a number with k, m or g (2g)") from None


def _duration(name: str, text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError:
        raise ValueError(f"{PREFIX}{name}={text!r}: write seconds or a number with s, m or h (30s, 6h)") from None


def _days(name: str, text: str) -> float:
    """A duration that is usually days (retention)."""
    try:
        return parse_duration(text)
    except ValueError:
        raise ValueError(f"{PREFIX}{name}={text!r}: write seconds or a number with s, m, h or d (30d, 12h)") from None


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _path(name: str, text: str) -> Path | None:
    return Path(text).absolute() if text else None


def _folder(name: str, text: str) -> Path:
    return Path(text).absolute()


def _index_url(name: str, text: str) -> str | None:
    text = text.strip()
    if text and not text.startswith(POSTGRES_SCHEMES):  # the value itself may hold a password: not said
        raise ValueError(f"{PREFIX}{name} must be postgresql://user:password@host:port/database, "
                         "or empty for the SQLite index in the data dir")
    return text or None


#: The schedule presets Airflow knows (``airflow.utils.dates.cron_presets``; a test keeps them
#: equal). ``@once`` and ``@continuous`` are no schedule for a job that repeats.
CRON_PRESETS = ("@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
#: The five fields of a cron expression: lowest and highest value, and the names it takes.
_CRON_FIELDS = ((0, 59, ()), (0, 23, ()), (1, 31, ()), (1, 12, _MONTHS), (0, 7, _WEEKDAYS))
_CRON_ITEM = re.compile(r"^(?:(\*)|([0-9a-z]+)(?:-([0-9a-z]+))?)(?:/([0-9]+))?$")


def _cron_field_ok(text: str, low: int, high: int, names: tuple[str, ...]) -> bool:
    def number(word: str) -> int | None:
        if word.isdigit():
            return int(word)
        return names.index(word) + low if word in names else None  # jan is 1, sun is 0

    for item in text.lower().split(","):
        match = _CRON_ITEM.match(item)
        if not match:
            return False
        star, first, last, step = match.groups()
        if step is not None and int(step) < 1:
            return False
        if star:
            continue
        a, b = number(first), number(last) if last is not None else None
        if a is None or not low <= a <= high or (last is not None and (b is None or not a <= b <= high)):
            return False
    return True


def _schedule(name: str, text: str) -> str | None:
    """``off`` (None: only by hand), an Airflow preset, or a five-field cron expression."""
    value = " ".join(text.split())
    if value.lower() == "off":
        return None
    if value.lower() in CRON_PRESETS:
        return value.lower()
    parts = value.split(" ")
    if len(parts) == 5 and all(_cron_field_ok(part, *spec) for part, spec in zip(parts, _CRON_FIELDS)):
        return value
    raise ValueError(f"{PREFIX}{name}={text!r}: write a cron expression (0 * * * *), @hourly, @daily or off")


# -- the table -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One ``RADDEPLOY_<name>`` variable: the :class:`Settings` field it fills, its default, how
    it is read (``parse``: name and text -> value), its documentation and its section of
    ``docs/configuration.md``. ``shown``: the default as the docs write it, where it is not the
    literal ``default``; ``blank_is_default``: an empty value (or only spaces) means the default.
    ``field`` None: read elsewhere (the docs say where), documented here with the others.
    ``default``: the text a user would write, or, where it is computed, a function of the fields
    read before it (table order) that gives that text (``shown`` then says it in words).
    """

    name: str
    field: str | None
    default: str | Callable[[Mapping[str, Any]], str]
    parse: Parse | None
    doc: str
    section: str
    shown: str = ""
    blank_is_default: bool = False

    @property
    def variable(self) -> str:
        return PREFIX + self.name

    def default_text(self, done: Mapping[str, Any]) -> str:
        return self.default(done) if callable(self.default) else self.default

    def read(self, done: Mapping[str, Any], environ: Mapping[str, str]) -> Any:
        """This setting's value from ``environ``, or its default."""
        if self.parse is None:
            raise TypeError(f"{self.variable} is read elsewhere, not by load_settings")
        text = environ.get(self.variable)
        if text is None or (self.blank_is_default and not text.strip()):
            text = self.default_text(done)
        return self.parse(self.name, text)


PATHS, LISTENER, INDEX, AIRFLOW, GPUS, MODELS, NOTIFY, RETENTION, DISPLAY = (
    "Paths", "Listener (DICOM)", "Study index", "Airflow", "GPUs", "Models", "Notifications",
    "Retention and audit", "Display")

SETTINGS: tuple[Setting, ...] = (
    # -- Paths
    Setting("DATA", "data_dir", lambda done: str(Path.cwd() / ".raddeploy" / "data"), _folder,
            "The data dir shared by the listener and the workers: studies, run folders, the SQLite index, "
            "static assets. The same path everywhere (compose: on the host and in every container).",
            PATHS, shown="`./.raddeploy/data`"),
    Setting("FLOWS", "flows_dir", lambda done: str(Path.cwd() / "flows"), _folder,
            "The flows folder, searched recursively for `*.yaml` and `*.yml` ([flows.md](flows.md)).",
            PATHS, shown="`./flows`"),
    Setting("STATIC", "static_dir", "", _path,
            "Static model assets: a flow's `static_mounts` names folders here.",
            PATHS, shown="`$RADDEPLOY_DATA/static`"),
    # -- Listener (DICOM)
    Setting("LISTEN_HOST", "listen_host", "0.0.0.0", _text,
            "The listener's bind address (README, \"Security\").",
            LISTENER, shown="`0.0.0.0`; `raddeploy run`: `127.0.0.1`"),
    Setting("LISTEN_PORT", "listen_port", "11112", _int, "The listener's DICOM port.", LISTENER),
    Setting("AE_TITLE", "ae_title", "RADDEPLOY", _text, "The listener's AE title.", LISTENER),
    Setting("CHECK_CALLED_AE", "check_called_ae", "true", _switch("true", "false"),
            "`true`: refuse associations addressed to another AE title. `false`: accept any called AE title.",
            LISTENER),
    Setting("ALLOWED_CALLING_AETS", "allowed_calling_aets", "", _list,
            "Comma-separated calling AE titles that may send (empty: any).", LISTENER, shown="(any)"),
    Setting("ALLOWED_NETWORKS", "allowed_networks", "", _list,
            "Comma-separated addresses or CIDR blocks (`10.0.0.0/24`) that may send (empty: any). With "
            "neither allow-list set the standalone listener warns at start, and `return_to_sender` returns "
            "nothing: results go back only to a sender on the allow-list ([delivery.md](delivery.md)).",
            LISTENER, shown="(any)"),
    Setting("MIN_FREE_DISK", "min_free_disk", "1g", _size,
            "Below this much free space in the data dir, associations are refused (transient), and so is each "
            "instance (`0xA700`, checked per instance and every 16 MiB of one). `0`: no check.", LISTENER),
    Setting("TLS_CERT", "tls_cert", "", _path,
            "DICOM TLS: the listener's certificate. With `RADDEPLOY_TLS_KEY` (both or neither) the listener "
            "speaks TLS.", LISTENER, shown="(off)"),
    Setting("TLS_KEY", "tls_key", "", _path, "DICOM TLS: the listener's private key.", LISTENER, shown="(off)"),
    Setting("TLS_CA", "tls_ca", "", _path,
            "With it, senders must present a certificate this CA signed.", LISTENER, shown="(none)"),
    Setting("MAX_CONNECTIONS", "max_connections", "200", _int,
            "Open DICOM connections at most, all senders together; one more is refused at once "
            "(A-ASSOCIATE-RJ transient, local limit exceeded).", LISTENER),
    Setting("MAX_CONNECTIONS_PER_HOST", "max_connections_per_host", "20", _int,
            "Open DICOM connections at most from one address (a flooding host cannot lock others out).", LISTENER),
    Setting("ASSOCIATION_SETUP_TIMEOUT", "association_setup_timeout", "30s", _duration,
            "From TCP accept to a complete association request, TLS handshake included, in all (a trickling "
            "peer is cut then).", LISTENER),
    Setting("ASSOCIATION_IDLE_TIMEOUT", "association_idle_timeout", "60s", _duration,
            "An association silent this long is aborted.", LISTENER),
    # -- Study index
    Setting("INDEX_URL", "index_url", "", _index_url,
            "`postgresql://user:password@host:port/db`: the study index, run register and outbox on PostgreSQL, "
            "for a listener, workers and triggerer on several hosts (an SQLite file must not be shared over "
            "NFS); the same value for all of them ([architecture.md](architecture.md), \"The study index\").",
            INDEX, shown="(empty: SQLite in the data dir)"),
    Setting("FSYNC", "fsync", "never", _switch("always", "never"),
            "`always`: each file and index commit reaches the disk before the instance is acknowledged "
            "(survives a power cut, at about half the throughput; README, \"Durability\"). `never`: the "
            "operating system's page cache decides (survives a crash of the listener, not a power cut).",
            INDEX, shown="`never`; compose: `always`"),
    # -- Airflow
    Setting("AIRFLOW_URL", "airflow_url", "http://127.0.0.1:8080", _url,
            "The Airflow API server the listener triggers runs on.", AIRFLOW),
    Setting("AIRFLOW_USER", "airflow_user", "listener", _text,
            "The Airflow user that triggers runs (role `user` suffices).", AIRFLOW),
    Setting("AIRFLOW_PASSWORD", "airflow_password", "", _text,
            "Its password.", AIRFLOW, shown="(empty)"),
    Setting("OUTBOX_GIVE_UP", "outbox_give_up", "6h", _duration,
            "A trigger Airflow keeps refusing (its flow deleted or renamed) backs off on its own, then is "
            "given up after this long, with an error in the log.", AIRFLOW),
    Setting("UI_URL", "ui_url", lambda done: done["airflow_url"], _url,
            "The Airflow UI as people reach it: notifications link to `<it>/dags/<dag>/runs/<run>` "
            "(compose: `AIRFLOW_BASE_URL`).", AIRFLOW, shown="`$RADDEPLOY_AIRFLOW_URL`", blank_is_default=True),
    # -- GPUs
    Setting("GPUS", None, "", None,
            "This host's GPU device ids, e.g. `0,1`; each GPU host names its own. No field of the settings: "
            "read where GPUs are leased and counted (each worker, `raddeploy run`, `raddeploy status`).",
            GPUS, shown="`nvidia-smi -L`"),
    Setting("GPU_MODE", "gpu_mode", "device_request", _choice("device_request", "env"),
            "How a model gets its GPUs. `device_request`: Docker's `--gpus` (needs the NVIDIA container "
            "toolkit). `env`: as `NVIDIA_VISIBLE_DEVICES` (hosts whose default runtime is NVIDIA's).", GPUS),
    Setting("GPU_FALLBACK", "gpu_fallback", "none", _choice(*FALLBACK_CHOICES),
            "`cpu`: on a host with fewer GPUs than a model asks (none: a laptop, CI), run GPU models without a "
            "device, 2 at a time; the container gets `RADDEPLOY_GPU_FALLBACK=1`. `none`: they wait, and the run "
            "note says why.", GPUS),
    Setting("GPU_POOL", "gpu_pool", "raddeploy_gpu", _text,
            "The Airflow pool of GPU slots (created by `raddeploy run`; compose: the `init` service, sized by "
            "`RADDEPLOY_GPU_SLOTS`).", GPUS),
    Setting("GPU_QUEUE", "gpu_queue", "gpu", _text, "The Celery queue of GPU model tasks.", GPUS),
    Setting("GPU_LOCK_DIR", "gpu_lock_dir", lambda done: str(default_lock_dir()), _path,
            "A host-local, private (0700) folder of GPU lease locks, never a path in `/tmp` "
            "(README, \"Security\"). The workers of one host share leases only if they run as one user "
            "(or name one folder of that user's).",
            GPUS, shown="root: `/run/raddeploy/gpu-locks`, others: `$XDG_RUNTIME_DIR/raddeploy-gpu-locks` or "
            "`~/.cache/raddeploy/gpu-locks`", blank_is_default=True),
    Setting("GPU_LEASE_TIMEOUT", "gpu_lease_timeout", "3600", _float,
            "Seconds a GPU task waits for a free device.", GPUS),
    Setting("GPU_QUEUE_DEPTH", "gpu_queue_depth", "2", _at_least_one,
            "GPU pool slots per GPU. 2: while a model runs, the next GPU task has already started (its "
            "process, DAG parse, set-up) and waits for the GPU's lease, which it takes the moment the GPU "
            "frees (measured: README, \"Measured (2 cores, loopback, Nov 2026)\", the GPU slots). 1: a GPU task starts only when a GPU is free; for "
            "several GPU hosts behind one pool (compose), where a started task could wait on a busy host "
            "while another host's GPU is idle. The CPU fallback's slots are never deeper.", GPUS),
    # -- Models
    Setting("MODEL_MEM_LIMIT", "model_mem_limit", lambda done: str(int(_host_memory() * 0.75)), _size,
            "The memory limit of model containers whose flow gives no `mem_limit`.", MODELS,
            shown="75 % of RAM"),
    Setting("MODEL_PIDS_LIMIT", "model_pids_limit", "4096", _int, "The process limit of model containers.", MODELS),
    Setting("MODEL_NETNS_IMAGE", "model_netns_image", "raddeploy/busybox:latest", _optional,
            "A GPU model with no network joins its GPU's own network-less namespace, kept by a small "
            "container of this image (`sleep` in it; no capabilities, read-only, no network, user nobody) "
            "that outlives the model: Docker starts a container a few tenths of a second sooner when it "
            "need not make the network sandbox (README, \"Measured (2 cores, loopback, Nov 2026)\"). The GPU's lease gives the namespace "
            "to one model at a time; CPU models and models with `network: bridge` get their own. Empty, or "
            "the image not on the host: every model gets its own.", MODELS),
    # -- Notifications
    Setting("NOTIFY_ON", "notify_on", ",".join(DEFAULT_EVENTS), _events,
            "Which events notify (`delivery` too, if wanted; empty: none). A flow's `notify` overrides this "
            "one, the webhook and the e-mail ([notifications.md](notifications.md)).", NOTIFY),
    Setting("NOTIFY_WEBHOOK", "notify_webhook", "", _optional,
            "An Airflow HTTP connection id: each notification is POSTed there as JSON.", NOTIFY,
            shown="(empty: none)"),
    Setting("NOTIFY_EMAIL", "notify_email", "", _list,
            "Comma-separated e-mail addresses that get each notification.", NOTIFY, shown="(empty: none)"),
    Setting("NOTIFY_SMTP", "notify_smtp", "smtp_default", _stripped,
            "The Airflow SMTP connection mails go through (its \"From email\" is the sender).", NOTIFY,
            blank_is_default=True),
    # -- Retention and audit
    Setting("RETAIN_DELIVERED", "retain_delivered", "30d", _days,
            "How long the study data and run folders of runs that delivered their results are kept, counted "
            "from the run's last activity. A study goes when the time of its last run is up (the longest "
            "of its runs'); a run still open or running keeps it, whatever its age.", RETENTION),
    Setting("RETAIN_FAILED", "retain_failed", "90d", _days,
            "The same for runs that failed or whose review rejected them: kept longer, for whoever "
            "investigates them, and never deleted early for disk space.", RETENTION),
    Setting("RETAIN_UNMATCHED", "retain_unmatched", "7d", _days,
            "How long a study no flow matched is kept, counted from the last instance received.", RETENTION),
    Setting("DISK_LOW_WATER", "disk_low_water", "10g", _size,
            "When the data dir's free space falls below this, the retention job deletes the oldest delivered "
            "data ahead of its time (then unmatched studies) until it is above again, and raises an alert "
            "(to the deployment's webhook and e-mail). `0`: off.", RETENTION),
    Setting("RETENTION_SCHEDULE", "retention_schedule", "@hourly", _schedule,
            "When the `raddeploy_retention` maintenance DAG runs (it applies the settings above and exports the "
            "audit trail): a 5-field cron expression in UTC (`30 2 * * *`), an Airflow preset ("
            + ", ".join(f"`{p}`" for p in CRON_PRESETS) + "), or `off`: only when triggered by hand.",
            RETENTION, blank_is_default=True),
    # -- Display
    Setting("SHOW_PATIENT_NAMES", "show_patient_names", "false", _switch("true", "false"),
            "`true`: `raddeploy status` and the status page show patient names. `false`: UIDs only. Log lines "
            "and run notes never name patients, whatever this says.", DISPLAY),
)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the settings now (not at import, so tests and `raddeploy run` can set them), from this
    process's environment or ``environ`` (another process's, such as the embedded stack's)."""
    environ = dict(os.environ if environ is None else environ)
    done: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.field is not None:
            done[setting.field] = setting.read(done, environ)
    return Settings(**done)


def configure_logging(verbose: bool = False) -> None:
    """The log format of our own processes (listener, CLI): one line per event, UIDs, no names."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- docs/configuration.md -----------------------------------------------------------------------

DOCS_COMMAND = "python -m raddeploy_provider.config > docs/configuration.md"

DOCS_INTRO = f"""\
# Settings: the reference

<!-- Generated by `{DOCS_COMMAND}` from the SETTINGS
     table in raddeploy_provider/config.py. Edit the table, not this file. -->

Every setting is an environment variable, read alike by the DICOM listener, the Airflow
processes (workers, triggerer, DAG processor) and the `raddeploy` CLI. They run in different
processes, in production on different hosts, and share only the environment and the data dir:
give every one of them the same values (`RADDEPLOY_GPUS` excepted: each GPU host names its
own).

- `raddeploy run` sets `RADDEPLOY_DATA`, `RADDEPLOY_FLOWS`, `RADDEPLOY_AIRFLOW_URL`,
  `RADDEPLOY_AIRFLOW_USER`, `RADDEPLOY_AIRFLOW_PASSWORD`, `RADDEPLOY_LISTEN_HOST`,
  `RADDEPLOY_LISTEN_PORT` and `RADDEPLOY_AE_TITLE` for its own processes; the others it passes
  on from its environment.
- The compose stack reads `.env` next to `docker-compose.yaml` (copy `deploy/env.example`) and
  gives the services the variables `docker-compose.yaml` names: the `x-airflow-env` block
  (every Airflow service) and the listener's `environment`. A setting it does not name keeps
  its default there until you add it.
- Durations are seconds or a number with `s`, `m`, `h` or `d` (`90`, `30s`, `6h`, `30d`);
  sizes are bytes or a number with `k`, `m` or `g` (`512m`, `2g`). A value that cannot be read
  is an error when a process reads its settings (the listener: at start).
"""

DOCS_END = """
## Not here

The compose stack's own variables (the published address and ports, the secrets, worker slots
and host names, `RADDEPLOY_GPU_SLOTS`, sign-in with LDAP, the images) are read by
`docker-compose.yaml` and `deploy/`, not by raddeploy-provider: `deploy/env.example` lists and
explains them. What a model container gets in its environment (`RADDEPLOY_RUN_ID`,
`RADDEPLOY_FLOW`, ...) is in README, "What a model container gets".
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _shown_default(setting: Setting) -> str:
    if setting.shown:
        return setting.shown
    return f"`{setting.default}`" if setting.default else "(empty)"


def render_docs() -> str:
    """``docs/configuration.md``: the intro, then per section a table of its settings."""
    out = [DOCS_INTRO]
    sections: dict[str, list[Setting]] = {}
    for setting in SETTINGS:
        sections.setdefault(setting.section, []).append(setting)
    for section, settings in sections.items():
        out.append(f"\n## {section}\n")
        out.append("| variable | default | what it does |")
        out.append("|---|---|---|")
        out.extend(f"| `{s.variable}` | {_cell(_shown_default(s))} | {_cell(s.doc)} |" for s in settings)
    out.append(DOCS_END)
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render_docs())
