"""`tracepipe`: run and operate the local stack; `cli_api` adds the commands for users of a
running stack (key, suite, session, example, demo), which talk HTTP.

Errors are one readable line on stderr and a non-zero exit code: 1 for a failed
operation, 2 for wrong usage (argparse), 3 when the server cannot be reached or
authentication failed (`cli_api.EPILOG`).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import operator
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import psycopg

from tracepipe import analysts, cli_api, credentials, migrate, pooler, replica
from tracepipe.settings import StackSettings
from tracepipe.stack import COMPONENTS, Stack, StackError

if TYPE_CHECKING:  # ext is imported only by the commands that run its code
    from psycopg_pool import AsyncConnectionPool

    from ext.config import ExtSettings
    from ext.storage import ObjectStore


def _stack() -> Stack:
    return Stack(StackSettings())


def cmd_up(_: argparse.Namespace) -> int:
    url = _stack().up()
    print(url)
    return 0


def cmd_down(_: argparse.Namespace) -> int:
    _stack().down()
    return 0


def cmd_status(_: argparse.Namespace) -> int:
    stack = _stack()
    statuses = stack.status()
    versions = stack.versions()
    width = max(6, *(len(st.address) for st in statuses))
    print(f"{'component':<10} {'state':<10} {'pid':<8} {'address':<{width}} version")
    for st in statuses:
        state = "up" if st.healthy else ("unhealthy" if st.pid else "down")
        print(f"{st.name:<10} {state:<10} {st.pid or '-'!s:<8} {st.address:<{width}} "
              f"{versions[st.name.split('-')[0]]}")
    if stack.s.replica:
        print(f"replica: {replica.describe_lag(stack)}")
    print(f"proxy: {stack.s.proxy_url}")
    _print_backup_status(stack)
    return 0 if all(st.healthy for st in statuses) else 1


def _print_backup_status(stack: Stack) -> None:
    """The last backup and the WAL archive's lag (pg_stat_archiver), when PostgreSQL answers."""
    from tracepipe import backup

    if not stack.s.backup_enabled or stack.pid_of("postgres") is None:
        return
    try:
        last = backup.backups(stack)[-1:]
        print(f"last backup: {last[0]['label']} ({last[0]['type']}, finished {last[0]['stop']})" if last
              else "last backup: none yet")
    except backup.BackupError as e:
        print(f"last backup: unknown ({_first_line(e)})")
    try:
        a = backup.archive_status(stack)
    except psycopg.Error as e:
        print(f"WAL archive: unknown ({_first_line(e)})")
        return
    scheduler = stack.pid_of("backup")
    print(f"backup scheduler: {f'running (pid {scheduler})' if scheduler else 'not running'}, a full backup "
          f"every {stack.s.backup_full_every_s} s, {stack.s.backup_retention_full} kept")
    lag = a["lag_bytes"] if a["lag_bytes"] is not None else "-"
    failed = f" (last {a['last_failed_wal']} at {a['last_failed_time']})" if a["failed_count"] else ""
    print(f"WAL archive: last {a['last_archived_wal'] or '-'} at {a['last_archived_time'] or '-'}, "
          f"lag {lag} bytes, {a['failed_count']} failed{failed}")


def cmd_backup(args: argparse.Namespace) -> int:
    """A backup now (`tracepipe backup [--type]`) or the list (`tracepipe backup list`)."""
    from tracepipe import backup

    stack = _stack()
    if not stack.s.backup_enabled:
        raise StackError("backups are off (TP_BACKUP_ENABLED=false)")
    if args.backup_command == "list":
        found = backup.backups(stack)
        if args.json:
            print(json.dumps(found, indent=2))
            return 0
        print(f"{'label':<26} {'type':<5} {'finished':<26} {'db bytes':>12} {'repo bytes':>12}")
        for b in found:
            print(f"{b['label']:<26} {b['type']:<5} {b['stop']:<26} {b['size_bytes']:>12} {b['repo_bytes']:>12}")
        return 0
    print(json.dumps(backup.backup(stack, args.type)))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """The database from the backup repository into this stopped (or fresh) stack, to --to or
    the latest; then the stack starts and the scrub runs. Prints the JSON report; exit code 1
    when the scrub found anything (rows without objects, objects newer than the target)."""
    from pathlib import Path

    from tracepipe import backup

    target = backup.parse_time(args.to) if args.to else None
    report = backup.restore(_stack(), target, Path(args.source) if args.source else None)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0 if report["scrub"]["ok"] else 1


def cmd_logs(args: argparse.Namespace) -> int:
    stack = _stack()
    names = [args.component] if args.component else stack.process_names()
    for name in names:
        path = stack.logfile(name)
        if not path.exists():
            continue
        lines = path.read_text(errors="replace").splitlines()[-args.lines:]
        for line in lines:
            print(f"{name}: {line}" if len(names) > 1 else line)
    if args.follow:
        import time

        sizes = {n: stack.logfile(n).stat().st_size for n in names if stack.logfile(n).exists()}
        while True:
            time.sleep(0.5)
            for name in names:
                path = stack.logfile(name)
                if not path.exists():
                    continue
                with open(path, errors="replace") as f:
                    f.seek(sizes.get(name, 0))
                    chunk = f.read()
                    sizes[name] = f.tell()
                for line in chunk.splitlines():
                    print(f"{name}: {line}" if len(names) > 1 else line, flush=True)
    return 0


def cmd_migrate(_: argparse.Namespace) -> int:
    stack = _stack()
    secrets = credentials.load_or_create(stack.state)
    migrate.bootstrap(stack.superuser_conninfo("postgres"), stack.s, secrets)
    applied = migrate.migrate(stack.owner_url(secrets))
    pooler.reload_postgrest(stack)  # PostgREST behind PgBouncer does not LISTEN for the reload
    replica.reload_postgrest(stack)
    print(f"applied {len(applied)} migration(s){': ' + ', '.join(applied) if applied else ''}; API surface re-applied")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    stack = _stack()
    secrets = credentials.load_or_create(stack.state)
    undone = migrate.rollback_migrations(stack.owner_url(secrets), None if args.all else args.count)
    print(f"rolled back {len(undone)} migration(s){': ' + ', '.join(undone) if undone else ''}")
    return 0


def cmd_rotate_jwt_key(_: argparse.Namespace) -> int:
    stack = _stack()
    kid = credentials.add_signing_key(stack.state)
    if stack.daemon_dir.exists():
        stack.publish_nginx_jwks()  # PostgREST's JWKS, and the proxy's copy: it verifies the new key's tokens too
    for name in stack.process_names():  # every instance (make up SCALE=N runs N)
        pid = stack.pid_of(name) if name.partition("-")[0] == "postgrest" else None
        if pid is not None:
            os.kill(pid, signal.SIGUSR2)  # PostgREST re-reads its config, the JWKS file included
    print(f"new signing key {kid}; older keys stay valid until their tokens expire "
          f"(ext signs with the new key within 10 s)")
    return 0


def _normal_email(raw: str) -> str:
    from ext.emails import InvalidEmail, normalize

    try:
        return normalize(raw)
    except InvalidEmail as e:
        raise StackError(f"email {raw!r}: {e}") from None


def cmd_user_create(args: argparse.Namespace) -> int:
    from argon2 import PasswordHasher

    stack = _stack()
    secrets = credentials.load_or_create(stack.state)
    email = _normal_email(args.email)
    password = args.password or getpass.getpass("password: ")
    try:
        with psycopg.connect(stack.owner_url(secrets)) as conn:
            row = conn.execute(
                "insert into app.users (email, display_name, password_hash, account_role) values (%s, %s, %s, %s)"
                " returning id", [email, args.display_name, PasswordHasher().hash(password), ROLES[args.role]],
            ).fetchone()
    except psycopg.errors.UniqueViolation:
        raise StackError(f"an account with email {email} (or a confusable spelling of it) already exists") from None
    assert row is not None
    print(row[0])
    return 0


def cmd_user_disable(args: argparse.Namespace) -> int:
    stack = _stack()
    secrets = credentials.load_or_create(stack.state)
    with psycopg.connect(stack.owner_url(secrets)) as conn:
        cur = conn.execute("update app.users set disabled_at = case when %s then null else now() end"
                           " where email = %s", [args.enable, _normal_email(args.email)])
    if cur.rowcount != 1:
        raise StackError(f"no account with email {args.email}")
    print(f"{args.email} {'enabled' if args.enable else 'disabled'}; its tokens stop at the next request")
    return 0


def cmd_mail_list(args: argparse.Namespace) -> int:
    from tracepipe import mailsink

    stored = mailsink.messages(_stack().mail_dir)
    rows = [{"id": m.id, "to": m.to, "from": m.mail_from, "subject": m.subject, "date": m.date} for m in stored]
    columns = [(name, operator.itemgetter(name)) for name in ("id", "to", "subject")]
    return cli_api.emit(args, rows, lambda: cli_api.print_table(rows, columns, "no mail received"))


def cmd_mail_show(args: argparse.Namespace) -> int:
    from tracepipe import mailsink

    try:
        found = mailsink.find(_stack().mail_dir, args.id)
    except KeyError:
        raise StackError(f"no message {args.id} (see `tracepipe mail list`)") from None
    sys.stdout.write(found.path.read_bytes().decode(errors="replace"))
    return 0


@asynccontextmanager
async def _ext_services() -> AsyncIterator[tuple[ExtSettings, AsyncConnectionPool, ObjectStore]]:
    """ext's settings, database pool and object store for the local stack, as `tracepipe up`
    configures ext: for the commands that run ext's maintenance code once, from here."""
    from ext.config import ExtSettings
    from ext.db import make_pool
    from ext.storage import ObjectStore, make_client

    stack = _stack()
    secrets = credentials.load_or_create(stack.state)
    values: dict[str, Any] = {k.removeprefix("TP_EXT_").lower(): v for k, v in stack.ext_env(secrets).items()}
    settings = ExtSettings(**values)
    async with make_pool(settings) as pool:
        yield settings, pool, ObjectStore(make_client(settings), settings)


def cmd_sweep(args: argparse.Namespace) -> int:
    """ext's maintenance sweep, once, against the stack's database and object store: drain
    the deletion outbox, abort stale multipart uploads, remove objects without a row older
    than the grace period, expire idempotency records. Prints the report as one JSON line."""
    from ext import maintenance

    if args.grace_seconds is not None and args.grace_seconds < 0:
        raise StackError("--grace-seconds must be 0 or more")
    grace = timedelta(seconds=args.grace_seconds) if args.grace_seconds is not None else None

    async def run() -> dict[str, int]:
        async with _ext_services() as (settings, pool, store):
            report = await maintenance.sweep(pool, store, settings, grace)
            if store.pending_cleanups:
                raise StackError(f"{store.pending_cleanups} cleanup(s) failed (is the object store up?)")
            return report

    print(json.dumps(asyncio.run(run()), sort_keys=True))
    return 0


def cmd_scrub(args: argparse.Namespace) -> int:
    """Every session bundle and example object against its row: present, the recorded size
    and (unless --no-digests) the recorded sha256; and every object has a row. Prints the
    JSON report; exit code 1 when anything is off."""
    from ext.scrub import scrub

    async def run() -> dict[str, Any]:
        async with _ext_services() as (_, pool, store):
            return (await scrub(pool, store, verify_digests=not args.no_digests)).as_dict()

    report = asyncio.run(run())
    json.dump(report, sys.stdout, indent=2)  # written piece by piece: the lists can be long
    print()
    return 0 if report["ok"] else 1


def cmd_seed_examples(args: argparse.Namespace) -> int:
    from tracepipe.seed import seed_examples

    stack = _stack()
    secrets = credentials.load_or_create(stack.state)
    report = seed_examples(stack.owner_url(secrets), args.rows, args.suites, args.models)
    print(f"seeded {int(report['rows_added'])} example rows in {report['seconds']} s")
    return 0


ROLES = {"user": "tp_user", "pipeline": "tp_pipeline", "admin": "tp_admin"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracepipe", description="Run and operate the Tracepipe stack.",
                                     epilog=cli_api.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("up", help="start the whole local stack (installs and migrates as needed), print its URL"
                   ).set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the local stack").set_defaults(func=cmd_down)
    sub.add_parser("status", help="each component: state, pid, address (port or unix socket), version"
                                  " (exit 1 unless all are up)").set_defaults(func=cmd_status)
    logs = sub.add_parser("logs", help="the last lines of a component's log (all components when omitted)")
    logs.add_argument("component", nargs="?",
                      help=f"one of {', '.join(COMPONENTS)} (instances of a scaled stack: ext-1, postgrest-1, …)")
    logs.add_argument("-n", "--lines", type=int, default=50, help="how many lines (default 50)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.set_defaults(func=cmd_logs)
    sub.add_parser("migrate", help="apply pending migrations, then the API surface and policies"
                   ).set_defaults(func=cmd_migrate)
    rb = sub.add_parser("rollback", help="roll back migrations (drops the API surface; run migrate after)")
    group = rb.add_mutually_exclusive_group()
    group.add_argument("--count", type=int, default=1, help="how many of the newest migrations (default 1)")
    group.add_argument("--all", action="store_true", help="all applied migrations")
    rb.set_defaults(func=cmd_rollback)
    seed = sub.add_parser("seed-examples", help="scale data: example rows (no objects) across suites and models")
    seed.add_argument("--rows", type=int, default=1_000_000)
    seed.add_argument("--suites", type=int, default=1000)
    seed.add_argument("--models", type=int, default=20)
    seed.set_defaults(func=cmd_seed_examples)
    sub.add_parser("rotate-jwt-key", help="add a new ES256 signing key; tokens of older keys stay valid until exp"
                   ).set_defaults(func=cmd_rotate_jwt_key)
    sweep = sub.add_parser("sweep", help="remove objects without a row (older than the grace period), stale "
                           "multipart uploads and queued deletions; prints a JSON report")
    sweep.add_argument("--grace-seconds", type=int, default=None,
                       help="only objects older than this (default: ext's TP_EXT_ORPHAN_GRACE_S, 3600)")
    sweep.set_defaults(func=cmd_sweep)
    scrub = sub.add_parser("scrub", help="verify every stored object against its row (size, sha256) and report "
                           "orphans both ways; prints a JSON report, exit code 1 when anything is off")
    scrub.add_argument("--no-digests", action="store_true",
                       help="check presence and size only (no object is read)")
    scrub.set_defaults(func=cmd_scrub)
    bk = sub.add_parser("backup", help="a backup of the database into the S3 repository now (pgBackRest), or "
                        "`backup list`")
    bk.add_argument("--type", choices=("full", "diff", "incr"), default="full", help="default full")
    bk_sub = bk.add_subparsers(dest="backup_command", metavar="ACTION")
    bk_list = bk_sub.add_parser("list", help="every backup in the repository, oldest first")
    bk_list.add_argument("--json", action="store_true", help="print JSON")
    bk.set_defaults(func=cmd_backup)
    rs = sub.add_parser("restore", help="restore the database into this stopped or fresh stack (point in time), "
                        "start it and scrub; prints a JSON report")
    rs.add_argument("--to", default=None, metavar="TIME",
                    help="ISO 8601 time to recover to (UTC when no offset); default: the latest")
    rs.add_argument("--from", dest="source", default=None, metavar="STATE_DIR",
                    help="a fresh state dir first takes this stopped stack's secrets, JWT keys and S3 data")
    rs.set_defaults(func=cmd_restore)
    user = sub.add_parser("user", help="manage accounts (operators)")
    user_sub = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    create = user_sub.add_parser("create", help="create an account; prints its id")
    create.add_argument("email")
    create.add_argument("--role", choices=sorted(ROLES), default="user",
                        help="user (a person), pipeline (the Session-to-Example pipeline) or admin")
    create.add_argument("--display-name", default=None)
    create.add_argument("--password", default=None, help="asked for when omitted")
    create.set_defaults(func=cmd_user_create)
    disable = user_sub.add_parser("disable", help="disable an account: its tokens stop at the next request")
    disable.add_argument("email")
    disable.add_argument("--enable", action="store_true", help="enable it again instead")
    disable.set_defaults(func=cmd_user_disable)
    mail = sub.add_parser("mail", help="mail the stack sent, as its SMTP sink stored it (<state>/mail)")
    mail_sub = mail.add_subparsers(dest="mail_command", required=True, metavar="ACTION")
    mail_list = mail_sub.add_parser("list", help="every stored message, oldest first: id, recipient, subject")
    mail_list.add_argument("--json", action="store_true", help="print JSON")
    mail_list.set_defaults(func=cmd_mail_list)
    mail_show = mail_sub.add_parser("show", help="one message as received (headers and body)")
    mail_show.add_argument("id", help="an id from `tracepipe mail list`")
    mail_show.set_defaults(func=cmd_mail_show)
    analysts.register(sub)
    cli_api.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (StackError, OSError) as e:
        print(f"tracepipe: {_first_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # one readable line, not a traceback
        print(f"tracepipe: {type(e).__name__}: {_first_line(e)}", file=sys.stderr)
        return 1


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
