"""The production workers' Celery configuration (``[celery] celery_config_options`` in
docker-compose.yaml): Airflow's own default, unchanged, and in an ``airflow celery worker``
process the modules a task start would import (:data:`raddeploy.embedded.TASK_PRELOAD`)
imported first.

Airflow's Celery provider imports this module as its app is built, before the worker forks its
prefork pool; each pool process, and each task process a pool process forks, then has them, as
the embedded stack's task processes have them from its forkserver: a task start no longer imports
the DagBag module (0.4-0.7 s of CPU on 2 cores), the DAG factory, the Docker provider or pydicom.
Other Airflow processes (the scheduler builds the same app) import nothing more.
"""

from __future__ import annotations

import sys

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG

from raddeploy.embedded import TASK_PRELOAD, preload


def is_celery_worker(argv: list[str]) -> bool:
    """Whether ``argv`` is an ``airflow celery worker`` command line."""
    return argv[1:3] == ["celery", "worker"]


if is_celery_worker(sys.argv):
    preload(TASK_PRELOAD)

CELERY_CONFIG = DEFAULT_CELERY_CONFIG
