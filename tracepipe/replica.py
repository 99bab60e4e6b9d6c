"""A physical streaming replica of the stack's PostgreSQL (`make up REPLICA=1`, TP_REPLICA).

The replica is a hot standby of its own: `pg_basebackup -R` from the primary into
<daemon dir>/replica, its own port (replica_port), the same socket dir, the same preloaded
libraries (pgaudit logs analysts' statements there too; tp_guard keeps their limits), with
hot_standby and hot_standby_feedback on (a long analyst query is not cancelled by the
primary's vacuum; the primary keeps the rows it reads instead).

It streams as `tp_replicator`: LOGIN REPLICATION and nothing else (no superuser, no
database CONNECT, two connections), with a generated password kept in the git-ignored state
dir (<state>/replication.json, 0600) and in the replica's own data dir (primary_conninfo,
written by -R, 0600 of the unprivileged PostgreSQL user). A physical replication slot keeps
the WAL a stopped replica still needs, up to replica_max_slot_wal_keep_size.

Roles, RLS policies, views and role settings are catalog rows: they reach the replica
through replication, so an analyst's login, limits and policies are those of the primary.
Writes are refused (a standby is read only), whatever a session sets.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from tracepipe import credentials
from tracepipe.settings import StackSettings

if TYPE_CHECKING:
    from tracepipe.stack import Stack

NAME = "replica"
ROLE = "tp_replicator"
SLOT = "tp_replica"
_FLAG = "replica"  # <state>/replica: the last `up`'s choice, kept until another is asked for


# --- the setting that holds across commands -------------------------------------------------------
def remembered(state: Path, settings: StackSettings) -> StackSettings:
    """settings with `replica` as the last `up` left it, unless this run names it."""
    flag = state / _FLAG
    if "replica" not in settings.model_fields_set and flag.exists():
        return settings.model_copy(update={"replica": flag.read_text().strip() == "1"})
    return settings


def remember(stack: Stack) -> None:
    (stack.state / _FLAG).write_text("1" if stack.s.replica else "0")


def names(settings: StackSettings) -> list[str]:
    return [NAME] if settings.replica else []


# --- paths ------------------------------------------------------------------------------------------------
def data_dir(stack: Stack) -> Path:
    return stack.daemon_dir / "replica"


def log_file(stack: Stack) -> Path:
    return stack.daemon_dir / "replica.log"


def superuser_conninfo(stack: Stack, dbname: str | None = None) -> str:
    return f"host={stack.socket_dir} port={stack.s.replica_port} user=postgres dbname={dbname or stack.s.db_name}"


def url(settings: StackSettings, user: str, password: str) -> str:
    """A login's URL on the replica (what analysts get when a replica runs)."""
    return f"postgresql://{user}:{password}@{settings.host}:{settings.replica_port}/{settings.db_name}"


def _password(stack: Stack) -> str:
    path = stack.state / "replication.json"
    if path.exists():
        return str(json.loads(path.read_text())["password"])
    password = secrets.token_urlsafe(24)
    credentials.write_private_json(path, {"role": ROLE, "password": password})
    return password


# --- on the primary ---------------------------------------------------------------------------------------
def prepare_primary(stack: Stack) -> str:
    """The replication role (least privilege, its password (re)set) and the slot; returns the password."""
    password = _password(stack)
    s = stack.s
    with psycopg.connect(stack.superuser_conninfo("postgres"), autocommit=True) as conn:
        verifier = conn.pgconn.encrypt_password(password.encode(), ROLE.encode(), b"scram-sha-256").decode()
        if conn.execute("select 1 from pg_roles where rolname = %s", [ROLE]).fetchone() is None:
            conn.execute(sql.SQL("create role {} login replication").format(sql.Identifier(ROLE)))
        conn.execute(sql.SQL("alter role {} login replication nosuperuser nocreatedb nocreaterole noinherit"
                             " nobypassrls connection limit 2 password {}").format(sql.Identifier(ROLE),
                                                                                    sql.Literal(verifier)))
        # CONNECT on a database is not needed to stream; none is granted (PUBLIC has none).
        conn.execute(sql.SQL("comment on role {} is {}").format(
            sql.Identifier(ROLE), sql.Literal("Streams WAL to the read replica (tracepipe/replica.py).")))
        conn.execute(sql.SQL("alter system set max_slot_wal_keep_size = {}").format(
            sql.Literal(s.replica_max_slot_wal_keep_size)))
        conn.execute("select pg_reload_conf()")
        if conn.execute("select 1 from pg_replication_slots where slot_name = %s", [SLOT]).fetchone() is None:
            conn.execute("select pg_create_physical_replication_slot(%s, true)", [SLOT])
    return password


def drop_slot(stack: Stack) -> None:
    """Give up the slot (the replica was removed): the primary keeps no WAL for it."""
    with psycopg.connect(stack.superuser_conninfo("postgres"), autocommit=True) as conn:
        conn.execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots"
                     " where slot_name = %s and not active", [SLOT])


# --- the replica's lifecycle ------------------------------------------------------------------------------
def server_options(stack: Stack) -> str:
    s = stack.s
    return (f"-p {s.replica_port} -k {stack.socket_dir} -c listen_addresses={s.host} "
            # a standby needs max_connections (and the other limits) >= the primary's
            f"-c max_connections=200 -c shared_buffers={s.replica_shared_buffers} "
            f"-c hot_standby=on -c hot_standby_feedback=on -c password_encryption=scram-sha-256 "
            f"-c 'log_line_prefix=%m [%p] app=%a user=%u db=%d ' -c log_min_duration_statement=1s "
            f"-c log_parameter_max_length=0 -c shared_preload_libraries=pgaudit,tp_guard")


def start(stack: Stack) -> None:
    """Base backup on first start, then the standby server; waits until it accepts connections."""
    from tracepipe.stack import StackError, _log

    if stack.pid_of(NAME) is not None:
        return
    stack._prepare_daemon_dir()
    password = prepare_primary(stack)
    bindir = stack.pg_bindir
    data = data_dir(stack)
    s = stack.s
    if not (data / "PG_VERSION").exists():
        _log("taking a base backup for the read replica")
        shutil.rmtree(data, ignore_errors=True)  # what an interrupted backup left
        try:
            stack._as_pg_user([str(bindir / "pg_basebackup"), "-D", str(data), "-h", s.host, "-p", str(s.pg_port),
                               "-U", ROLE, "--no-password", "-X", "stream", "-R", "-S", SLOT, "-c", "fast"],
                              env={**os.environ, "PGPASSWORD": password, "PGAPPNAME": "tracepipe replica"},
                              capture_output=True, text=True)
        except subprocess.CalledProcessError as e:
            raise StackError(f"pg_basebackup for the read replica failed: {e.stderr.strip()}") from None
    # primary_conninfo (written by -R) carries the password: keep it current with the role's
    stack._as_pg_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log_file(stack)), "-o",
                       server_options(stack), "-w", "-t", "120", "start"], stdout=subprocess.DEVNULL)
    pid = (data / "postmaster.pid").read_text().split()[0]
    stack.pidfile(NAME).write_text(pid)


def stop(stack: Stack) -> None:
    data = data_dir(stack)
    if stack.pid_of(NAME) is not None:
        stack._as_pg_user([str(stack.pg_bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60",
                           "stop"], stdout=subprocess.DEVNULL)
    stack.pidfile(NAME).unlink(missing_ok=True)


# --- what `tracepipe status` shows, and what the analysts and tests wait for -----------------------
def lag(stack: Stack) -> dict[str, Any] | None:
    """The primary's view of the replica (pg_stat_replication): state, replay lag in bytes
    and seconds (None seconds: nothing to replay lately). None when it is not streaming."""
    try:
        with psycopg.connect(stack.superuser_conninfo("postgres"), autocommit=True, connect_timeout=3) as conn:
            row = conn.execute(
                "select state, pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint,"
                " extract(epoch from replay_lag)::float8 from pg_stat_replication"
                " where usename = %s order by backend_start desc limit 1", [ROLE]).fetchone()
    except psycopg.Error:
        return None
    if row is None:
        return None
    return {"state": row[0], "replay_lag_bytes": row[1], "replay_lag_s": row[2]}


def describe_lag(stack: Stack) -> str:
    info = lag(stack)
    if info is None:
        return "not streaming"
    seconds = "0s" if info["replay_lag_s"] is None else f"{info['replay_lag_s']:.3f}s"
    return f"{info['state']}, replay lag {info['replay_lag_bytes']} bytes, {seconds}"


def current_lsn(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("select pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def wait_replayed(stack: Stack, lsn: str, timeout: float = 30.0) -> bool:
    """Whether the replica replays up to lsn (a primary position) within timeout."""
    deadline = time.monotonic() + timeout
    try:
        with psycopg.connect(superuser_conninfo(stack, "postgres"), autocommit=True, connect_timeout=3) as conn:
            while time.monotonic() < deadline:
                row = conn.execute("select pg_last_wal_replay_lsn() >= %s::pg_lsn", [lsn]).fetchone()
                if row and row[0]:
                    return True
                time.sleep(0.05)
    except psycopg.Error:
        return False
    return False


def terminate_sessions(stack: Stack, user: str) -> int:
    """End a login's sessions on the replica (a dropped role's open sessions would go on)."""
    try:
        with psycopg.connect(superuser_conninfo(stack, "postgres"), autocommit=True, connect_timeout=3) as conn:
            row = conn.execute("select count(*) filter (where pg_terminate_backend(pid, 5000))"
                               " from pg_stat_activity where usename = %s", [user]).fetchone()
    except psycopg.OperationalError:
        return 0
    return int(row[0]) if row else 0


def session_count(stack: Stack, user: str) -> int:
    try:
        with psycopg.connect(superuser_conninfo(stack, "postgres"), autocommit=True, connect_timeout=3) as conn:
            row = conn.execute("select count(*) from pg_stat_activity where usename = %s", [user]).fetchone()
    except psycopg.OperationalError:
        return 0
    return int(row[0]) if row else 0
