"""A real PostgreSQL for the tests and the benchmark, and a look into an index on either backend.

:meth:`PostgresServer.start` makes a cluster with Debian's server binaries (the ``postgresql``
package, which ``scripts/ensure-system.sh`` installs with its system service left stopped)
in a temporary folder, and starts it on a free loopback port, its unix socket in that folder,
with password authentication over TCP (the index URLs carry a password, as in production).
The server refuses to run as root: as root the cluster belongs to ``postgres`` (the package's
user) or ``nobody``. Each test gets a schema of its own (:meth:`PostgresServer.new_index_url`),
so tests never see each other's rows and need no cleaning.

    server = PostgresServer.start()            # durable=False: fsync off, for tests
    url = server.new_index_url()               # postgresql://...?options=-csearch_path%3Dt_...
    server.stop()
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import sqlite3
import subprocess
import tempfile
import uuid
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from peers import free_port

USER = "raddeploy"
PASSWORD = "index-test-secret"
#: The settings that make a test server fast: it may lose everything on a crash of the machine.
NOT_DURABLE = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's server binaries are missing, or the cluster would not start (the message says why)."""


def server_bin() -> Path:
    """The newest installed ``/usr/lib/postgresql/<version>/bin``."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise PostgresUnavailable("PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/initdb): "
                                  "run scripts/ensure-system.sh (`make system`)")
    return Path(found[-1]).parent


@dataclass
class PostgresServer:
    root: Path  # the cluster (data/), its socket and its log
    port: int
    run_as: str | None  # the user the server runs as when we are root
    settings: tuple[str, ...]

    @classmethod
    def start(cls, durable: bool = False, max_connections: int = 300) -> PostgresServer:
        """A fresh cluster, started. ``durable``: the server's defaults (fsync, synchronous
        commits, full page writes), as the benchmark runs it; else :data:`NOT_DURABLE`."""
        bin_dir = server_bin()
        root = Path(tempfile.mkdtemp(prefix="raddeploy-postgres-"))
        run_as = None
        if os.geteuid() == 0:  # initdb and postgres refuse root
            run_as = next((u for u in ("postgres", "nobody") if _user_exists(u)), None)
            if run_as is None:
                raise PostgresUnavailable("running as root, with no user postgres or nobody to run PostgreSQL as")
            entry = pwd.getpwnam(run_as)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        pwfile = root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if run_as:
            os.chown(pwfile, pwd.getpwnam(run_as).pw_uid, -1)
        settings = (f"max_connections={max_connections}",) + (() if durable else NOT_DURABLE)
        server = cls(root, free_port(), run_as, settings)
        server._run(bin_dir / "initdb", "-D", str(root / "data"), "-U", USER, f"--pwfile={pwfile}",
                    "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8")
        pwfile.unlink()
        options = " ".join([f"-p {server.port}", f"-k {root}", "-c listen_addresses=127.0.0.1"]
                           + [f"-c {s}" for s in settings])
        try:
            server._run(bin_dir / "pg_ctl", "start", "-w", "-t", "60", "-D", str(root / "data"),
                        "-l", str(root / "server.log"), "-o", options)
        except PostgresUnavailable as exc:
            log = (root / "server.log").read_text(errors="replace")[-3000:] if (root / "server.log").exists() else ""
            shutil.rmtree(root, ignore_errors=True)
            raise PostgresUnavailable(f"{exc}\nits log:\n{log}") from None
        return server

    def _run(self, *argv: Any) -> None:
        cmd = [str(a) for a in argv]
        if self.run_as:
            cmd = ["runuser", "-u", self.run_as, "--"] + cmd
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.root)
        if done.returncode != 0:
            raise PostgresUnavailable(f"{' '.join(cmd)} exited {done.returncode}: {done.stdout}{done.stderr}")

    def url(self, database: str = "postgres", schema: str | None = None) -> str:
        """An index URL: TCP with the password, as a remote server is used."""
        url = f"postgresql://{USER}:{quote(PASSWORD)}@127.0.0.1:{self.port}/{database}"
        return url + (f"?options={quote(f'-csearch_path={schema}')}" if schema else "")

    def new_index_url(self) -> str:
        """The URL of an empty index of its own: a new schema, first on the search path."""
        schema = f"t_{uuid.uuid4().hex[:12]}"
        self.execute(f"CREATE SCHEMA {schema}")
        return self.url(schema=schema)

    @property
    def version(self) -> str:
        return query(self.url(), "SHOW server_version")[0][0]

    def execute(self, sql: str) -> None:
        """One statement as the superuser, outside any test's schema."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)

    def stop(self) -> None:
        try:
            self._run(server_bin() / "pg_ctl", "stop", "-m", "immediate", "-D", str(self.root / "data"))
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def query(target: Path | str, sql: str, args: tuple = ()) -> list[tuple]:
    """Rows of a read of an index as it is in its database, whichever the backend: ``target``
    is the SQLite file or the PostgreSQL URL (``StudyIndex.target``); ``sql`` has ``?`` marks
    and the words both dialects share."""
    if str(target).startswith("postgresql://"):
        import psycopg

        with psycopg.connect(str(target)) as conn:
            return [tuple(row) for row in conn.execute(sql.replace("?", "%s"), args).fetchall()]
    with closing(sqlite3.connect(target, timeout=30)) as db:
        return db.execute(sql, args).fetchall()


def run_sql(target: Path | str, *statements: str) -> None:
    """Statements committed to an index's database, whichever the backend (see :func:`query`)."""
    if str(target).startswith("postgresql://"):
        import psycopg

        with psycopg.connect(str(target), autocommit=True) as conn:
            for sql in statements:
                conn.execute(sql)
        return
    with closing(sqlite3.connect(target, timeout=30)) as db, db:
        for sql in statements:
            db.execute(sql)
