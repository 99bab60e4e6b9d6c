"""`tracepipe analyst`: SQL access for analysts (DESIGN.md §4).

Each analyst is a PostgreSQL login role of its own, member of the group `tp_analyst` and of
nothing else (never `tp_user`), with a generated password. The group's privileges are read
only (db/schema/40_analytics.sql); what rows it reads is decided by the same RLS policies as
the API, through the analyst policies keyed on `current_user` and `app.analysts` (the
suites a role is limited to, null for every suite).

Guards: PostgreSQL does not hand ALTER ROLE settings of a group down to its members, so the
statement timeout, work_mem, temp_file_limit, idle-in-transaction timeout, read-only default,
pgaudit.log and the connection limit are set on every analyst login role, at creation and
again by every migrate (`reapply_guards`, from `migrate.bootstrap`), so a changed setting
reaches existing analysts. temp_file_limit and pgaudit.log are superuser-only and hold; the
others are session settings any role may SET, so the cluster preloads tp_guard
(db/ext/tp_guard), which lets a member of tp_analyst lower them but never raise them or turn
read-only off, by any path (SET, SET LOCAL, set_config, a function's SET clause, startup
options, ALTER ROLE ... SET). ext's watchdog (auth.stop_overrunning_analysts, every few
seconds) holds each session to its role's current values: a query past them is cancelled,
one still running a grace later (it caught the cancel) terminated, an idle transaction
ended. What PUBLIC may run by default and an analyst must not (plpgsql, large objects,
advisory locks, pg_notify) is revoked in db/schema/02_builtins.database.superuser.sql.

Creating and dropping roles needs the superuser connection of the local stack.
"""

from __future__ import annotations

import argparse
import re
import secrets
import uuid
from typing import Any

import psycopg
from psycopg import sql

from tracepipe import replica
from tracepipe.settings import StackSettings
from tracepipe.stack import Stack, StackError

GROUP = "tp_analyst"
# A plain lowercase identifier (no quoting needed in psql or a URL); pg_ is reserved by
# PostgreSQL and tp_ for the platform's own roles.
NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
RESERVED_PREFIXES = ("pg_", "tp_")


def guard_settings(settings: StackSettings) -> dict[str, str]:
    """The session settings every analyst login role gets (ALTER ROLE … SET)."""
    return {
        "statement_timeout": settings.statement_timeout_analyst,
        "work_mem": settings.analyst_work_mem,
        "temp_file_limit": settings.analyst_temp_file_limit,
        "idle_in_transaction_session_timeout": settings.analyst_idle_in_transaction_timeout,
        "default_transaction_read_only": "on",
        "pgaudit.log": settings.analyst_audit_log,  # superuser-only: the analyst cannot turn it off
    }


def apply_guards(conn: psycopg.Connection[Any], role: str, settings: StackSettings) -> None:
    """(Re)state an analyst role's attributes, limits and session settings. Superuser only
    (temp_file_limit is a superuser setting)."""
    name = sql.Identifier(role)
    conn.execute(sql.SQL("alter role {} inherit nosuperuser nocreatedb nocreaterole noreplication nobypassrls"
                         " connection limit {}").format(name, sql.Literal(settings.analyst_connection_limit)))
    for key, value in guard_settings(settings).items():
        conn.execute(sql.SQL("alter role {} set {} = {}").format(name, sql.Identifier(key), sql.Literal(value)))


def analyst_roles(conn: psycopg.Connection[Any]) -> list[str]:
    """Login roles that are direct members of tp_analyst."""
    rows = conn.execute(
        "select r.rolname from pg_auth_members m join pg_roles r on r.oid = m.member"
        " join pg_roles g on g.oid = m.roleid where g.rolname = %s and r.rolcanlogin order by r.rolname",
        [GROUP]).fetchall()
    return [r[0] for r in rows]


def reapply_guards(conn: psycopg.Connection[Any], settings: StackSettings) -> list[str]:
    """Bring every existing analyst's limits to the current settings (called by migrate)."""
    roles = analyst_roles(conn)
    for role in roles:
        apply_guards(conn, role, settings)
    return roles


def validate_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise StackError(f"analyst name {name!r} must be a lowercase identifier: a-z, 0-9, _ (at most 63, "
                         "not starting with a digit)")
    if name.startswith(RESERVED_PREFIXES):
        raise StackError(f"analyst name {name!r} must not start with {' or '.join(RESERVED_PREFIXES)} (reserved)")


def parse_suites(text: str | None) -> list[uuid.UUID] | None:
    if text is None:
        return None
    ids: list[uuid.UUID] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            suite = uuid.UUID(part)
        except ValueError:
            raise StackError(f"--suites: {part!r} is not a suite id (uuid)") from None
        if suite not in ids:
            ids.append(suite)
    if not ids:
        raise StackError("--suites names no suite; leave it out for an analyst of every suite")
    return ids


def _connect(stack: Stack, autocommit: bool) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(stack.superuser_conninfo(), autocommit=autocommit)
    except psycopg.OperationalError as e:
        raise StackError(f"cannot reach the stack's PostgreSQL as superuser (is it up? `make up`): "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else e}") from None


def _role(conn: psycopg.Connection[Any], name: str) -> bool | None:
    """Whether the role is a direct member of tp_analyst; None when there is no such role."""
    row = conn.execute(
        "select exists (select from pg_auth_members m join pg_roles g on g.oid = m.roleid"
        "               where m.member = r.oid and g.rolname = %s)"
        " from pg_roles r where r.rolname = %s", [GROUP, name]).fetchone()
    return None if row is None else bool(row[0])


def _require_migrated(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute("select exists (select from pg_roles where rolname = %s), to_regclass('app.analysts')",
                       [GROUP]).fetchone()
    if row is None or not row[0] or row[1] is None:
        raise StackError("the database has no analyst support yet: run `make migrate` first")


def create(settings: StackSettings, name: str, suites: list[uuid.UUID] | None) -> str:
    """Create the analyst's login role and mapping row in one transaction; return its URL."""
    validate_name(name)
    stack = Stack(settings)
    password = secrets.token_urlsafe(24)  # URL-safe: goes into the connection URL as is
    with _connect(stack, autocommit=False) as conn:
        _require_migrated(conn)
        role = _role(conn, name)
        if role is not None:
            if role:
                raise StackError(f"analyst {name} already exists (revoke it first to issue a new password)")
            raise StackError(f"{name} is an existing database role that is not an analyst; choose another name")
        if suites is not None:
            found = {r[0] for r in conn.execute("select id from app.suites where id = any(%s)", [suites])}
            missing = [str(s) for s in suites if s not in found]
            if missing:
                raise StackError(f"no such suite: {', '.join(missing)}")
        # The SCRAM verifier is computed here: the password never reaches the server (or its logs).
        verifier = conn.pgconn.encrypt_password(password.encode(), name.encode(), b"scram-sha-256").decode()
        ident = sql.Identifier(name)
        conn.execute(sql.SQL("create role {} login password {}").format(ident, sql.Literal(verifier)))
        conn.execute(sql.SQL("grant {} to {}").format(sql.Identifier(GROUP), ident))
        apply_guards(conn, name, settings)
        comment = "Analyst (tracepipe analyst create): read-only SQL access through the analytics schema."
        conn.execute(sql.SQL("comment on role {} is {}").format(ident, sql.Literal(comment)))
        conn.execute("insert into app.analysts (role_name, suites) values (%s, %s)", [name, suites])
        conn.commit()
        if stack.s.replica:  # the URL works once the replica has the role (tracepipe/replica.py)
            if not replica.wait_replayed(stack, replica.current_lsn(conn)):
                raise StackError(f"analyst {name} was created, but the read replica has not replayed it yet"
                                 f" (`tracepipe status` shows its lag); its URL: "
                                 f"{replica.url(stack.s, name, password)}")
            return replica.url(stack.s, name, password)
    return f"postgresql://{name}:{password}@{settings.host}:{settings.pg_port}/{settings.db_name}"


def revoke(settings: StackSettings, name: str) -> int:
    """Refuse new logins, end the analyst's sessions, drop its role and mapping row.
    Returns how many sessions were ended."""
    validate_name(name)
    stack = Stack(settings)
    with _connect(stack, autocommit=True) as conn:
        _require_migrated(conn)
        role = _role(conn, name)
        mapped = conn.execute("select 1 from app.analysts where role_name = %s", [name]).fetchone() is not None
        if role is None and not mapped:
            raise StackError(f"no analyst named {name}")
        if role is False:
            raise StackError(f"{name} is not an analyst (not a member of {GROUP}); refusing to drop it")
        ended = 0
        if role is not None:
            ident = sql.Identifier(name)
            # Committed first, so no new session starts between the terminations and the drop.
            conn.execute(sql.SQL("alter role {} nologin connection limit 0").format(ident))
            row = conn.execute("select count(*) filter (where pg_terminate_backend(pid, 5000))"
                               " from pg_stat_activity where usename = %s", [name]).fetchone()
            ended = int(row[0]) if row else 0
            if stack.s.replica:  # its sessions there too, once the replica knows it may not log in
                replica.wait_replayed(stack, replica.current_lsn(conn))
                ended += replica.terminate_sessions(stack, name)
        with conn.transaction():
            if role is not None:
                conn.execute(sql.SQL("drop owned by {}").format(sql.Identifier(name)))
                conn.execute(sql.SQL("drop role {}").format(sql.Identifier(name)))
            conn.execute("delete from app.analysts where role_name = %s", [name])
    return ended


def list_analysts(settings: StackSettings) -> list[dict[str, Any]]:
    """Every analyst: its suites, connection limit and open sessions. Includes members of
    tp_analyst without a mapping row (they read no suite) and rows without a role."""
    stack = Stack(settings)
    with _connect(stack, autocommit=True) as conn:
        _require_migrated(conn)
        cur = conn.execute("""
            with members as (
                select r.rolname::text as role_name, r.rolconnlimit, r.rolcanlogin
                from pg_auth_members m join pg_roles r on r.oid = m.member
                join pg_roles g on g.oid = m.roleid
                where g.rolname = %s
            )
            select coalesce(a.role_name, m.role_name) as name, a.role_name is not null as mapped,
                   a.suites, a.created_at, m.role_name is not null as has_role, m.rolconnlimit, m.rolcanlogin,
                   (select count(*) from pg_stat_activity s
                    where s.usename = coalesce(a.role_name, m.role_name)) as sessions
            from app.analysts a full join members m on m.role_name = a.role_name
            order by 1
        """, [GROUP])
        cols = [c.name for c in cur.description or []]
        rows = [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]
    if stack.s.replica:
        for r in rows:
            r["sessions"] += replica.session_count(stack, r["name"])
    return rows


# --- CLI ------------------------------------------------------------------------------------------------

def cmd_create(args: argparse.Namespace) -> int:
    settings = StackSettings()
    suites = parse_suites(args.suites)
    url = create(settings, args.name, suites)
    scope = "every suite" if suites is None else "suites " + ", ".join(str(s) for s in suites)
    guards = " ".join(f"{k}={v}" for k, v in guard_settings(settings).items())
    print(f"analyst {args.name} created, reads {scope} through the analytics schema")
    print(f"guards: {guards} connection_limit={settings.analyst_connection_limit}")
    if Stack(settings).s.replica:
        print(f"connects to the read replica (port {settings.replica_port}): nothing it runs reaches the primary")
    print("the password is shown only this once; connect with:")
    print(url)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    ended = revoke(StackSettings(), args.name)
    print(f"analyst {args.name} revoked: role dropped, {ended} open session(s) ended")
    return 0


def cmd_list(_: argparse.Namespace) -> int:
    rows = list_analysts(StackSettings())
    if not rows:
        print("no analysts")
        return 0
    print(f"{'NAME':<24} {'SUITES':<40} {'CONN LIMIT':<10} {'SESSIONS':<8} CREATED")
    for r in rows:
        if not r["has_role"]:
            suites = "(role missing: revoke it)"
        elif not r["mapped"]:
            suites = "(no entry: reads no suite)"
        elif r["suites"] is None:
            suites = "all"
        else:
            suites = ",".join(str(s) for s in r["suites"])
        limit = "-" if r["rolconnlimit"] is None else str(r["rolconnlimit"])
        created = r["created_at"].isoformat(timespec="seconds") if r["created_at"] else "-"
        print(f"{r['name']:<24} {suites:<40} {limit:<10} {r['sessions']:<8} {created}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `tracepipe analyst create|revoke|list` to the CLI."""
    analyst = subparsers.add_parser("analyst", help="SQL access for analysts: read-only login roles (operators)")
    actions = analyst.add_subparsers(dest="analyst_command", required=True, metavar="ACTION")
    create_p = actions.add_parser("create", help="create an analyst login role; prints its connection URL last")
    create_p.add_argument("name", help="the role name: lowercase letters, digits and _")
    create_p.add_argument("--suites", default=None,
                          help="comma-separated suite ids the analyst is limited to (default: every suite)")
    create_p.set_defaults(func=cmd_create)
    revoke_p = actions.add_parser("revoke", help="drop an analyst's role, ending its open sessions")
    revoke_p.add_argument("name")
    revoke_p.set_defaults(func=cmd_revoke)
    actions.add_parser("list", help="analysts, their suites, connection limits and open sessions"
                       ).set_defaults(func=cmd_list)
