"""PgBouncer in transaction pooling between PostgREST/ext and the primary (`make up
POOLER=1`, TP_POOLER).

Every PostgREST and ext instance keeps its own client-side pool, but to PgBouncer: the
primary sees at most pooler_pool_size server connections for all of them together, plus
pooler_identity_pool_size for ext's key exchange. PgBouncer reaches PostgreSQL over its unix
socket (the unprivileged user's 0700 dir), and answers on pooler_port on loopback only,
authenticating authenticator by SCRAM against <daemon dir>/pgbouncer/userlist.txt (0600).

What the request path needs, under transaction pooling (each transaction may get another
server connection):
- transaction-local settings, `set_config(..., true)` / SET LOCAL ROLE and the pre-request
  hook: they live in the transaction, which keeps its server connection: unchanged;
- prepared statements: PgBouncer 1.18 does not track them, so PostgREST runs with
  `db-prepared-statements = false` and ext's psycopg with prepare_threshold None
  (TP_EXT_DB_PREPARED_STATEMENTS=false);
- PostgREST's schema-reload LISTEN (db-channel) would listen on whichever server connection
  PgBouncer gave it: off (`db-channel-enabled = false`); a migrate reloads PostgREST with
  SIGUSR1 instead (`reload_postgrest`);
- ext's session-bound work goes to PostgreSQL directly (TP_EXT_DATABASE_SESSION_URL): the
  pipeline queue's LISTEN and tus's advisory locks, held across a PATCH's transactions;
- ext's key-exchange pool is tp_auth for the whole session: it gets a PgBouncer database of
  its own (`<db>_identity`) whose server connections run `SET ROLE tp_auth` when opened.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from tracepipe import credentials
from tracepipe.settings import StackSettings

if TYPE_CHECKING:
    from tracepipe.stack import Stack

NAME = "pgbouncer"
_FLAG = "pooler"
IDENTITY_SUFFIX = "_identity"


def remembered(state: Path, settings: StackSettings) -> StackSettings:
    """settings with `pooler` as the last `up` left it, unless this run names it."""
    flag = state / _FLAG
    if "pooler" not in settings.model_fields_set and flag.exists():
        return settings.model_copy(update={"pooler": flag.read_text().strip() == "1"})
    return settings


def remember(stack: Stack) -> None:
    (stack.state / _FLAG).write_text("1" if stack.s.pooler else "0")


def names(settings: StackSettings) -> list[str]:
    return [NAME] if settings.pooler else []


def binary() -> str:
    return shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def conf_dir(stack: Stack) -> Path:
    return stack.daemon_dir / "pgbouncer"


def log_file(stack: Stack) -> Path:
    """PgBouncer logs to stderr, which the stack keeps in <state>/logs like the others'."""
    return stack.logs / f"{NAME}.log"


# --- URLs the services get -----------------------------------------------------------------------------
def client_url(stack: Stack, secrets: credentials.StackSecrets) -> str:
    """authenticator's URL for PostgREST and ext's request pool: PgBouncer's when it runs."""
    if not stack.s.pooler:
        return stack.authenticator_url(secrets)
    s = stack.s
    return f"postgresql://authenticator:{secrets.authenticator_password}@{s.host}:{s.pooler_port}/{s.db_name}"


def postgrest_lines(settings: StackSettings) -> list[str]:
    if not settings.pooler:
        return []
    return ["db-prepared-statements = false", "db-channel-enabled = false"]


def ext_env(stack: Stack, secrets: credentials.StackSecrets) -> dict[str, str]:
    if not stack.s.pooler:
        return {}
    s = stack.s
    return {
        "TP_EXT_DATABASE_SESSION_URL": stack.authenticator_url(secrets),
        "TP_EXT_DATABASE_IDENTITY_URL": f"postgresql://authenticator:{secrets.authenticator_password}"
                                        f"@{s.host}:{s.pooler_port}/{s.db_name}{IDENTITY_SUFFIX}",
        "TP_EXT_DB_PREPARED_STATEMENTS": "false",
    }


# --- PgBouncer ---------------------------------------------------------------------------------------------
def config(stack: Stack) -> str:
    s = stack.s
    d = conf_dir(stack)
    server = f"host={stack.socket_dir} port={s.pg_port} dbname={s.db_name}"
    return "\n".join([
        "[databases]",
        f"{s.db_name} = {server}",
        f"{s.db_name}{IDENTITY_SUFFIX} = {server} pool_size={s.pooler_identity_pool_size}"
        " connect_query='set role tp_auth'",
        "",
        "[pgbouncer]",
        f"listen_addr = {s.host}",
        f"listen_port = {s.pooler_port}",
        "unix_socket_dir =",
        "auth_type = scram-sha-256",
        f"auth_file = {d / 'userlist.txt'}",
        "pool_mode = transaction",
        f"default_pool_size = {s.pooler_pool_size}",
        "min_pool_size = 0",
        "reserve_pool_size = 0",
        f"max_client_conn = {s.pooler_max_client_conn}",
        f"query_wait_timeout = {s.pooler_query_wait_timeout_s}",
        # never DISCARD ALL between clients: it would end the identity database's SET ROLE
        "server_reset_query =",
        "server_check_query = select 1",
        "server_check_delay = 10",
        "application_name_add_host = 0",
        f"pidfile = {d / 'pgbouncer.pid'}",
        "log_connections = 0",
        "log_disconnections = 0",
        "log_pooler_errors = 1",
        "stats_period = 60",
        "",
    ])


def start(stack: Stack, secrets: credentials.StackSecrets) -> None:
    from tracepipe.stack import StackError, _port_open, _wait

    if stack.pid_of(NAME) is not None:
        return
    stack._prepare_daemon_dir()
    d = conf_dir(stack)
    d.mkdir(exist_ok=True)
    ids = stack._pg_user_ids()
    users = f'"authenticator" "{secrets.authenticator_password}"\n'
    credentials.write_private_text(d / "userlist.txt", users)
    credentials.write_private_text(d / "pgbouncer.ini", config(stack))
    if ids is not None:  # PgBouncer refuses to run as root: the unprivileged user runs it
        for path in (d, d / "userlist.txt", d / "pgbouncer.ini"):
            os.chown(path, *ids)
    os.chmod(d, 0o700)
    log = open(log_file(stack), "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [binary(), str(d / "pgbouncer.ini")], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=d, umask=0o077, user=ids[0] if ids else None,
            group=ids[1] if ids else None, extra_groups=[] if ids else None)
    except OSError as e:
        raise StackError(f"PgBouncer could not start ({binary()}): {e}; `make bootstrap` installs it") from None
    finally:
        log.close()
    stack.pidfile(NAME).write_text(str(proc.pid))
    _wait("PgBouncer", lambda: _port_open(stack.s.host, stack.s.pooler_port), 30, log_file(stack))


def reload_postgrest(stack: Stack) -> None:
    """With db-channel off, PostgREST reloads its schema cache on SIGUSR1 (after a migrate)."""
    if not stack.s.pooler:
        return
    for name in stack.process_names():
        if name.split("-")[0] == "postgrest" and (pid := stack.pid_of(name)) is not None:
            os.kill(pid, signal.SIGUSR1)
