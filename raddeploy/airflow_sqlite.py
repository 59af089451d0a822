"""SQLite connection settings of the embedded Airflow (``[database] sql_alchemy_connect_args``).

Measured on 2 cores, Airflow 3.3.2: in a burst of studies the API server deadlocks itself. Its
audit log of a public-API write (``action_logging``: a trigger, a run note) commits with a
blocking SQLite call on the event loop, while another request's transaction on the same loop
holds the write lock; the loop waits out the busy timeout, and meanwhile the scheduler,
triggerer and DAG processor wait for the same lock. With pysqlite's 5 s everywhere the
scheduler gives up first and dies ("database is locked"; standalone does not restart it).

So: the API server gives up quickly (that one request fails, 500, and is retried by its caller:
the listener's outbox, the task SDK's client), the others wait long. Not WAL: Airflow's
read-then-write transactions then fail at once with SQLITE_BUSY (measured: worse).
"""

from __future__ import annotations

import sys

#: Seconds a connection of the API server waits for SQLite's write lock.
API_SERVER_BUSY_TIMEOUT = 2.0
#: Seconds the scheduler, triggerer and DAG processor (and tasks) wait for it.
BUSY_TIMEOUT = 120.0


def busy_timeout(argv: list[str]) -> float:
    """The busy timeout for the Airflow process started with ``argv``."""
    return API_SERVER_BUSY_TIMEOUT if argv[1:2] == ["api-server"] else BUSY_TIMEOUT


CONNECT_ARGS = {"timeout": busy_timeout(sys.argv)}
