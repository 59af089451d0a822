"""The GPUs of this host: configured (``RADDEPLOY_GPUS=0,1``) or found with ``nvidia-smi -L``.

The count sizes the Airflow pool that GPU model tasks take slots of; the ids are what a
task's lease picks from.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Mapping

_GPU_LINE = re.compile(r"^GPU (\d+):", re.MULTILINE)


def host_gpu_ids(env: Mapping[str, str] = os.environ) -> list[str]:
    configured = env.get("RADDEPLOY_GPUS")
    if configured is not None:
        return [part for part in re.split(r"[,\s]+", configured) if part]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return _GPU_LINE.findall(out)
