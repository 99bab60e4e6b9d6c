"""`tracepipe`: run and operate the local stack.

Errors are one readable line on stderr and a non-zero exit code: 1 for a failed
operation, 2 for wrong usage (argparse).
"""

from __future__ import annotations

import argparse
import sys

from tracepipe import credentials, migrate
from tracepipe.settings import StackSettings
from tracepipe.stack import Stack, StackError


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
    statuses = _stack().status()
    for st in statuses:
        state = "up" if st.healthy else ("unhealthy" if st.pid else "down")
        print(f"{st.name:<10} {state:<10} port {st.port:<6} pid {st.pid or '-'}")
    return 0 if all(st.healthy for st in statuses) else 1


def cmd_migrate(_: argparse.Namespace) -> int:
    stack = _stack()
    secrets = credentials.load_or_create(stack.state)
    migrate.bootstrap(stack.superuser_conninfo("postgres"), stack.s, secrets)
    applied = migrate.migrate(stack.owner_url(secrets))
    print(f"applied {len(applied)} migration(s){': ' + ', '.join(applied) if applied else ''}; API surface re-applied")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    stack = _stack()
    secrets = credentials.load_or_create(stack.state)
    undone = migrate.rollback_migrations(stack.owner_url(secrets), None if args.all else args.count)
    print(f"rolled back {len(undone)} migration(s){': ' + ', '.join(undone) if undone else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracepipe", description="Run and operate the Tracepipe stack.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("up", help="start the whole local stack (installs and migrates as needed), print its URL"
                   ).set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the local stack").set_defaults(func=cmd_down)
    sub.add_parser("status", help="each component: state, port, pid (exit 1 unless all are up)"
                   ).set_defaults(func=cmd_status)
    sub.add_parser("migrate", help="apply pending migrations, then the API surface and policies"
                   ).set_defaults(func=cmd_migrate)
    rb = sub.add_parser("rollback", help="roll back migrations (drops the API surface; run migrate after)")
    group = rb.add_mutually_exclusive_group()
    group.add_argument("--count", type=int, default=1, help="how many of the newest migrations (default 1)")
    group.add_argument("--all", action="store_true", help="all applied migrations")
    rb.set_defaults(func=cmd_rollback)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (StackError, OSError) as e:
        print(f"tracepipe: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # one readable line, not a traceback
        print(f"tracepipe: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
