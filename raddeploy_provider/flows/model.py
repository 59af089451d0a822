"""The typed model every flow file loads into, whichever spelling it was written in.

Plain frozen dataclasses, no Airflow: the listener, the CLI, the DAG factory and the sensor
all share these objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raddeploy_provider.store.layout import SOURCE_MOUNT  # noqa: F401  (the matched DICOM's mount, re-exported)

from .errors import FlowWarning


#: How a flow file's trigger patterns meet a value: ``whole`` (the native spelling: the pattern
#: must match all of it, ``re.fullmatch``) or ``search`` (RadDeploy's: anywhere in it, ``re.search``).
WHOLE, SEARCH = "whole", "search"


@dataclass(frozen=True)
class Pattern:
    """One regex of a trigger condition; ``exclude`` for the ``~`` form (must NOT match);
    ``match``: :data:`WHOLE` or :data:`SEARCH`, from the spelling of the flow file."""

    source: str
    regex: re.Pattern[str]
    exclude: bool = False
    match: str = WHOLE

    def hits(self, value: str) -> bool:
        """Does the regex match ``value`` (the whole of it, or anywhere in it)? ``exclude`` aside."""
        found = self.regex.fullmatch(value) if self.match == WHOLE else self.regex.search(value)
        return found is not None


@dataclass(frozen=True)
class Condition:
    """Every pattern must hold for the value of one DICOM keyword."""

    keyword: str
    patterns: tuple[Pattern, ...]


@dataclass(frozen=True)
class Trigger:
    """Every condition must hold for the same instance."""

    conditions: tuple[Condition, ...]

    def describe(self) -> str:
        """Human text for logs and run notes, e.g. ``Modality=CT, SeriesDescription~scout``."""
        parts = []
        for cond in self.conditions:
            for pat in cond.patterns:
                parts.append(f"{cond.keyword}{'!~' if pat.exclude else '='}{pat.source}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Grouping:
    """When a study is complete enough to run (read by the fingerprint sensor)."""

    quiet_period: float = 5.0
    timeout: float = 1800.0
    on_timeout: str = "skip"  # skip | fail | proceed


@dataclass(frozen=True)
class InputSpec:
    """How the matched instances are laid out in the run's ``input/`` folder."""

    layout: tuple[str, ...] = ()  # () = flat; else keywords naming nested folders
    whole_series: bool = True
    transfer_syntax: str = "as_received"  # or "uncompressed": decompressed Explicit VR Little Endian copies


@dataclass(frozen=True)
class Review:
    """A person approves a run's results before anything is sent (``review: required``)."""

    reviewers: tuple[str, ...] = ()  # Airflow user names; () = whoever may edit the DAG's runs
    timeout: float | None = None  # seconds; None: a review waits as long as it takes
    on_timeout: str = "reject"  # reject | approve


@dataclass(frozen=True)
class NotifySpec:
    """Who hears of a flow's runs; ``None`` fields take the deployment's ``RADDEPLOY_NOTIFY_*``."""

    on: tuple[str, ...] | None = None  # failure | rejection | deadline | delivery
    webhook: str | None = None  # an Airflow HTTP connection id
    email: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ModelSpec:
    """One container task. ``inputs``/``outputs`` map a mount name to a container path.

    ``host_config`` holds the further container settings a RadDeploy ``docker_kwargs`` gave
    (CPU and IO limits), passed to Docker as they are; the schema allow-lists them.
    """

    name: str
    image: str
    command: tuple[str, ...] | str | None = None
    entrypoint: tuple[str, ...] | str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    gpu: int = 0
    static_mounts: dict[str, str] = field(default_factory=dict)
    config: Any = None
    config_path: str = "/config/config.yaml"
    timeout: float | None = None
    retries: int = 0
    mem_limit: int | None = None
    shm_size: int | None = None
    network: str = "none"
    user: str | None = None
    pull: str = "missing"
    working_dir: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    ipc_mode: str | None = None
    host_config: dict[str, Any] = field(default_factory=dict)

    @property
    def sent_outputs(self) -> list[str]:
        """Outputs that destinations receive: ``dst`` and every ``dst*`` name."""
        return [name for name in self.outputs if name.startswith("dst")]


@dataclass(frozen=True)
class Destination:
    """A DICOM node results go to: an Airflow connection id, or host/port/AE title."""

    host: str | None = None
    port: int | None = None
    ae_title: str | None = None
    calling_ae_title: str | None = None
    connection: str | None = None

    def describe(self) -> str:
        if self.connection:
            return f"connection {self.connection}"
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Flow:
    """A whole flow file; ``dag_id`` is its identity in Airflow and in run folders."""

    name: str
    dag_id: str
    source: Path
    triggers: tuple[Trigger, ...]
    models: tuple[ModelSpec, ...]
    destinations: tuple[Destination, ...] = ()
    version: str = ""
    description: str = ""
    priority: int = 0
    tags: tuple[str, ...] = ()
    grouping: Grouping = field(default_factory=Grouping)
    input: InputSpec = field(default_factory=InputSpec)
    return_to_sender: tuple[int, ...] = ()
    new_study: bool = False  # results may carry another Study Instance UID than the input's
    new_patient: bool = False  # results may carry another Patient ID (implies new_study)
    provenance: bool = True  # stamp a Contributing Equipment item on every sent result
    review: Review | None = None  # None: results are sent without a person's approval
    deadline: float | None = None  # seconds from the run queued to its delivery; None: no deadline
    notify: NotifySpec = field(default_factory=NotifySpec)
    extra: dict[str, Any] = field(default_factory=dict)
    file_hash: str = ""
    warnings: tuple[FlowWarning, ...] = ()
    spelling: str = "native"  # "raddeploy" when the file uses a RadDeploy key (its patterns then search)
