"""The run folder of the task instance being executed (shared by the provider's operators)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raddeploy_provider.config import load_settings
from raddeploy_provider.store import DataDir


def run_dir(context: Any) -> Path:
    """``<data>/runs/<dag_id>/<run_id>``: where the sensor put the input and models write."""
    return DataDir(load_settings().data_dir).run_dir(context["dag"].dag_id, context["run_id"])


def mount_dir(context: Any, name: str) -> Path:
    """The host folder behind a named mount: ``src`` is the snapshot in ``input/``."""
    from raddeploy_provider.flows import SOURCE_MOUNT

    return run_dir(context) / ("input" if name == SOURCE_MOUNT else name)
