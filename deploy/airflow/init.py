"""The ``init`` service of docker-compose.yaml: runs once before every other service, then exits 0.

Idempotent, so ``docker-compose up -d`` after an upgrade or a password change in ``.env``
runs it again safely:

1. **The data dir** (as root): owned by the service account, mode 2750 (setgid: what is
   written inside keeps its group, which model containers join to read their inputs);
   nothing for other users (docs/production.md "Permissions").
2. **The study index database** named by ``RADDEPLOY_INDEX_URL``: its role (password from
   ``.env``, set again at each run) and database, made with Airflow's database superuser.
3. **Airflow**: its database migrated, the ``admin`` and ``listener`` accounts made (or their
   passwords set to ``.env``'s: the listener reads the same secret), the GPU pool sized to
   ``RADDEPLOY_GPU_SLOTS`` (every GPU of every GPU host).
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time

import psycopg
from psycopg import sql

ACCOUNT = "raddeploy"


def say(message: str) -> None:
    print(f"init: {message}", flush=True)


def fail(message: str) -> None:
    print(f"init: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def prepare_data_dir(path: str, uid: int, gid: int) -> None:
    if not os.path.isabs(path):
        fail(f"RADDEPLOY_DATA={path!r} must be an absolute path, the same on the host and in every container")
    os.makedirs(path, exist_ok=True)
    info = os.stat(path)
    if (info.st_uid, info.st_gid) != (uid, gid):
        if any(os.scandir(path)):
            fail(f"{path} belongs to uid {info.st_uid}, gid {info.st_gid} and is not empty: give it to the "
                 f"service account on the host (chown -R {uid}:{gid} {path}) and start again")
        os.chown(path, uid, gid)
    os.chmod(path, 0o2750)
    say(f"data dir {path}: owner {uid}:{gid}, mode 2750")


def drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    os.umask(0o027)
    os.environ["HOME"] = pwd.getpwuid(uid).pw_dir


def connect(url: str, what: str, attempts: int = 60) -> psycopg.Connection:
    for attempt in range(attempts):
        try:
            return psycopg.connect(url, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as exc:
            if attempt == attempts - 1:
                fail(f"cannot reach {what}: {str(exc).strip().splitlines()[0]}")
            time.sleep(2)
    raise AssertionError("unreachable")


def ensure_index_database(admin_url: str, index_url: str) -> None:
    info = psycopg.conninfo.conninfo_to_dict(index_url)
    user, password, dbname = info.get("user"), info.get("password"), info.get("dbname")
    if not (user and password and dbname):
        fail("RADDEPLOY_INDEX_URL must name a user, a password and a database (postgresql://user:pw@host/db)")
    with connect(admin_url, "Airflow's PostgreSQL (POSTGRES_PASSWORD)") as db:
        exists = db.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        db.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(user), sql.Literal(password)))
        if not db.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone():
            db.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(dbname), sql.Identifier(user)))
        # Nobody else may connect: the index holds the studies' header values.
        db.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(dbname)))
    say(f"index database {dbname!r} (role {user!r}) ready")


def airflow(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["airflow", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        fail(f"airflow {args[0]} {args[1] if len(args) > 1 else ''} failed:\n{done.stderr[-3000:]}")
    return done


def ensure_account(name: str, password: str, role: str, existing: set[str]) -> None:
    if name in existing:
        airflow("users", "reset-password", "--username", name, "--password", password)
        say(f"account {name!r}: password set from .env")
    else:
        airflow("users", "create", "--username", name, "--password", password, "--role", role,
                "--firstname", name, "--lastname", "raddeploy", "--email", f"{name}@localhost")
        say(f"account {name!r} created (role {role})")


def main() -> None:
    env = os.environ
    account = pwd.getpwnam(ACCOUNT)
    if os.geteuid() == 0:
        prepare_data_dir(env["RADDEPLOY_DATA"], account.pw_uid, account.pw_gid)
        drop_privileges(account.pw_uid, account.pw_gid)
    if env.get("RADDEPLOY_INDEX_URL"):
        ensure_index_database(env["RADDEPLOY_INIT_ADMIN_URL"], env["RADDEPLOY_INDEX_URL"])
    connect(env["RADDEPLOY_INIT_ADMIN_URL"], "Airflow's PostgreSQL").close()
    airflow("db", "migrate")
    say("Airflow's database migrated")
    listed = airflow("users", "list", "--output", "plain").stdout.split()
    existing = {name for name in ("admin", "listener") if name in listed}
    ensure_account("admin", env["RADDEPLOY_ADMIN_PASSWORD"], "Admin", existing)
    ensure_account("listener", env["RADDEPLOY_LISTENER_PASSWORD"], "User", existing)
    depth = int(env.get("RADDEPLOY_GPU_QUEUE_DEPTH") or "1")
    slots = str(int(env.get("RADDEPLOY_GPU_SLOTS", "1")) * depth)
    airflow("pools", "set", env.get("RADDEPLOY_GPU_POOL", "raddeploy_gpu"), slots,
            f"GPU slots: {depth} per GPU of every GPU host (RADDEPLOY_GPU_SLOTS x RADDEPLOY_GPU_QUEUE_DEPTH)")
    say(f"GPU pool: {slots} slot(s); done")


if __name__ == "__main__":
    main()
