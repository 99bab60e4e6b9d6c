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
    with psycopg.connect(stack.superuser_conninfo("postgres"), autocommit=True) as conn:
        ensure_primary(conn, password, stack.s)
    return password


def ensure_primary(conn: psycopg.Connection[Any], password: str, s: StackSettings, *, slot: bool = True) -> None:
    """On the primary, as a superuser (autocommit): the replication role with `password`, the
    WAL cap and (`slot`) the slot. The local stack's prepare_primary runs it; so does compose's
    migrate job, without the slot: there the replica's first pg_basebackup creates it (-C),
    so a compose stack without the `replica` profile keeps no WAL for a replica that never came."""
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
    if slot and conn.execute("select 1 from pg_replication_slots where slot_name = %s", [SLOT]).fetchone() is None:
        conn.execute("select pg_create_physical_replication_slot(%s, true)", [SLOT])


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
    # primary_conninfo (written by -R, 0600 in the data dir) carries the password of replication.json,
    # which prepare_primary sets on the role again at every start
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


# --- API reads on the replica (a PostgREST pool of its own; nginx routes GET/HEAD to it) -----------
PGRST = "postgrest_ro"

# Created on the primary by the superuser (replicated like everything else). lagging() is the
# one SECURITY DEFINER part (pg_stat_wal_receiver shows its state to the privileged only);
# check_request() runs as the request's role, as PostgREST's pre-request hook on the replica.
LAG_SQL = """
create schema if not exists tp_replica authorization postgres;
revoke all on schema tp_replica from public;
create or replace function tp_replica.lagging() returns boolean
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select pg_is_in_recovery() and (
        coalesce((select status <> 'streaming' from pg_stat_wal_receiver), true)
        or (pg_last_wal_receive_lsn() is distinct from pg_last_wal_replay_lsn()
            and now() - pg_last_xact_replay_timestamp() > make_interval(secs => {max_lag})))
$$;
create or replace function tp_replica.check_request() returns void
language plpgsql stable set search_path = pg_catalog, pg_temp as $$
begin
    if tp_replica.lagging() then  -- PostgREST answers 503; nginx asks the primary's PostgREST
        raise sqlstate 'PT503' using message = 'the read replica is behind the primary',
            hint = 'the proxy retries this read on the primary';
    end if;
    perform auth.check_request();
end
$$;
revoke all on function tp_replica.lagging(), tp_replica.check_request() from public;
grant usage on schema tp_replica to anon, tp_user, tp_pipeline, tp_admin, tp_auth, authenticator;
grant execute on function tp_replica.lagging(), tp_replica.check_request()
    to anon, tp_user, tp_pipeline, tp_admin, tp_auth, authenticator;
"""


def reads_on(settings: StackSettings) -> bool:
    return settings.replica and settings.replica_reads


def pgrst_names(settings: StackSettings) -> list[str]:
    return [PGRST] if reads_on(settings) else []


def prepare_reads(stack: Stack) -> None:
    with psycopg.connect(stack.superuser_conninfo(), autocommit=True) as conn:
        conn.execute(LAG_SQL.replace("{max_lag}", repr(float(stack.s.replica_max_lag_s))))
        lsn = current_lsn(conn)
    wait_replayed(stack, lsn)


def postgrest_config(stack: Stack, secrets: credentials.StackSecrets) -> str:
    """The primary's PostgREST configuration, on the replica: its own ports and socket, the
    lag-checking pre-request hook, no schema LISTEN (a standby cannot LISTEN)."""
    s = stack.s
    sock = stack.service_socket(PGRST)
    override = {
        "db-uri": f'"postgresql://authenticator:{secrets.authenticator_password}@{s.host}:{s.replica_port}/'
                  f'{s.db_name}"',
        "db-pre-request": '"tp_replica.check_request"',
        "server-port": str(s.replica_pgrst_port),
        "admin-server-port": str(s.replica_pgrst_admin_port),
        "db-channel-enabled": "false",
        **({"server-unix-socket": f'"{sock}"'} if sock is not None else {}),
    }
    lines = []
    for line in stack.postgrest_config(secrets, 0).splitlines():
        key = line.partition("=")[0].strip()
        if key in ("db-prepared-statements", *override):  # the replica is reached directly
            continue
        if line:
            lines.append(line)
    lines += [f"{k} = {v}" for k, v in override.items()]
    return "\n".join([*lines, ""])


def start_postgrest(stack: Stack, secrets: credentials.StackSecrets) -> None:
    from tracepipe.stack import _http_ok, _wait

    prepare_reads(stack)
    conf = stack.state / f"{PGRST}.conf"
    credentials.write_private_text(conf, postgrest_config(stack, secrets))
    sock = stack.service_socket(PGRST)
    if sock is not None:
        stack._prepare_daemon_dir()
        sock.unlink(missing_ok=True)
    stack._spawn(PGRST, [str(stack.postgrest_bin), str(conf)])
    admin = f"http://{stack.s.host}:{stack.s.replica_pgrst_admin_port}/ready"
    _wait(f"PostgREST ({PGRST})", lambda: _http_ok(admin) and (sock is None or sock.exists()), 60,
          stack.logfile(PGRST))


def pgrst_ready(stack: Stack) -> bool:
    from tracepipe.stack import _http_ok

    return _http_ok(f"http://{stack.s.host}:{stack.s.replica_pgrst_admin_port}/ready")


def nginx_snippet(stack: Stack) -> str:
    """proxy/tracepipe/replica_reads.conf for this stack: the read pool (the replica's
    PostgREST, the primary's as backup) and the read-your-writes cookie."""
    s = stack.s

    def server(component: str, base: int, i: int) -> str:
        sock = stack.service_socket(component, i)
        return f"unix:{sock}" if sock is not None else f"{s.host}:{stack.port(base, i)}"

    primary = [server("postgrest", s.pgrst_port, i) for i in range(s.scale)]
    if reads_on(s):
        fail_s = max(1, round(s.replica_max_lag_s))
        servers = [f"server {server(PGRST, s.replica_pgrst_port, 0)} max_fails=1 fail_timeout={fail_s}s;",
                   *(f"server {p} backup;" for p in primary)]
        cookie = f'"tp_primary=1; Max-Age={s.read_your_writes_s}; Path=/; HttpOnly; SameSite=Lax"'
    else:
        servers, cookie = [f"server {p} max_fails=0;" for p in primary], '""'
    template = (stack_repo_proxy() / "replica_reads.conf").read_text()
    head, _, rest = template.partition("upstream tp_postgrest_read {")
    _, _, rest = rest.partition("}\n")
    upstream = "\n".join(["upstream tp_postgrest_read {", *(f"    {x}" for x in servers),
                          "    keepalive 64;", "    keepalive_timeout 20s;", "}", ""])
    rest = rest.replace('    default "";\n}', f"    default {cookie};\n}}")
    return head + upstream + rest


def stack_repo_proxy() -> Path:
    from tracepipe.settings import REPO_ROOT

    return REPO_ROOT / "proxy" / "tracepipe"


def render_nginx(stack: Stack, conf_dir: Path) -> None:
    (conf_dir / "replica_reads.conf").write_text(nginx_snippet(stack))


def reload_postgrest(stack: Stack) -> None:
    """After a migrate: the replica's PostgREST reloads its schema once the replica has it."""
    import signal

    pid = stack.pid_of(PGRST)
    if pid is None:
        return
    with psycopg.connect(stack.superuser_conninfo(), autocommit=True) as conn:
        lsn = current_lsn(conn)
    wait_replayed(stack, lsn)
    os.kill(pid, signal.SIGUSR1)
