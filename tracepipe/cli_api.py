"""`tracepipe key|suite|session|example|demo`: the CLI for users of a running stack.

These commands talk HTTP to the proxy through `tracepipe.client` (never to the database):
they see and may do exactly what the same credentials see and may do over the API.

Where: `--url`, else TRACEPIPE_URL, else the local stack's proxy (TP_HOST, TP_PROXY_PORT).
Who: `--api-key` (TRACEPIPE_API_KEY), or `--email` and `--password` (TRACEPIPE_EMAIL,
TRACEPIPE_PASSWORD; asked for on a terminal when only the email is given). A key wins
when both are given, except for `key create`, which needs a login.

Exit codes (also in `tracepipe --help`): 0 ok; 1 the operation failed (the server's code
and message are printed); 2 wrong usage; 3 the server cannot be reached or authentication
failed. Errors are one line on stderr; results go to stdout (tables, or the API's JSON
with `--json`); progress of transfers goes to stderr.

Everything printed may carry other people's text (a suite's name, a server's message): control
characters in it (ESC, C1, bidi overrides) are written as escapes (`\x1b`, `\u202e`), so
nobody's string rewrites the reader's terminal. This module's `print` does it for every line.
"""

from __future__ import annotations

import argparse
import builtins
import functools
import getpass
import json
import os
import re
import secrets
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

from tracepipe.client import TUS_THRESHOLD_BYTES, Client, TracepipeError
from tracepipe.progress import ProgressLine, human_bytes

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

EPILOG = """\
exit codes:
  0  success
  1  the operation failed: the server said no (its status, code and message are printed),
     or a local file could not be read or written
  2  wrong usage: unknown command or option, missing argument or credentials
  3  the server cannot be reached, or authentication failed

key, suite, session, example, pipeline and demo talk to a running stack over HTTP: --url (env
TRACEPIPE_URL; default the local stack's proxy, http://127.0.0.1:8080), authenticated by
--api-key (TRACEPIPE_API_KEY) or --email/--password (TRACEPIPE_EMAIL, TRACEPIPE_PASSWORD).
The other commands operate the local stack itself. `tracepipe COMMAND --help` for each."""

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A failure the CLI reports as one line with its exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# --- errors and exit codes ------------------------------------------------------------------------

def exit_code(e: TracepipeError) -> int:
    """No HTTP answer or 401: the server is unreachable or the credentials are not accepted."""
    if (e.status == 0 and e.code == "TPNET") or e.status == 401:
        return EXIT_UNREACHABLE
    return EXIT_FAILED


def describe(e: TracepipeError) -> str:
    if e.status == 0 and e.code == "TPNET":
        return f"cannot reach the server: {e.message}"
    text = f"{e.status} {e.code}: {e.message}" if e.status else f"{e.code}: {e.message}"
    if e.details and isinstance(e.details, (str, int)) and str(e.details) not in e.message:
        text += f" ({e.details})"
    if e.hint:
        text += f"; {e.hint}"
    return " ".join(text.split())


def _fail(message: str) -> None:
    print(f"tracepipe: {message}", file=sys.stderr)


def command(func: Handler) -> Handler:
    """Turns the client's and the CLI's errors into one stderr line and an exit code."""
    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except TracepipeError as e:
            _fail(describe(e))
            return exit_code(e)
        except CliError as e:
            _fail(e.message)
            return e.code
        except KeyboardInterrupt:
            _fail("interrupted")
            return 130
    return run


# --- connecting -----------------------------------------------------------------------------------

def default_url() -> str:
    from tracepipe.settings import StackSettings

    return os.environ.get("TRACEPIPE_URL") or StackSettings().proxy_url


def signin_error(e: TracepipeError, url: str) -> Exception:
    """What to report when signing in failed: unreachable and refused are exit 3, naming the URL."""
    if e.status == 0 and e.code == "TPNET":
        return CliError(f"cannot reach the server at {url}: {e.message.partition(': ')[2] or e.message} "
                        "(is the URL right and the stack up? `make up`)", EXIT_UNREACHABLE)
    if e.status in (401, 403):
        return CliError(f"authentication failed at {url}: {describe(e)}", EXIT_UNREACHABLE)
    return e


def connect(args: argparse.Namespace, *, login: bool = False) -> Client:
    """A client signed in with the arguments' (or environment's) credentials. The token is
    obtained here, so that a wrong key or password fails before anything else happens."""
    url = args.url or default_url()
    # Options beat the environment: `--email` wins over a TRACEPIPE_API_KEY set in the shell.
    if args.api_key or args.email:
        api_key, email = args.api_key, args.email
    else:
        api_key, email = os.environ.get("TRACEPIPE_API_KEY"), os.environ.get("TRACEPIPE_EMAIL")
    if login and not email:
        email = os.environ.get("TRACEPIPE_EMAIL")
    password = args.password or os.environ.get("TRACEPIPE_PASSWORD")
    tp = Client(url, api_key=None if login else api_key)
    try:
        if api_key and not login:
            _ = tp.token
        elif email:
            if not password:
                if not sys.stdin.isatty():
                    raise CliError("--email needs --password (or TRACEPIPE_PASSWORD)", EXIT_USAGE)
                password = getpass.getpass(f"password for {email}: ")
            tp.login(email, password)
        elif login:
            raise CliError(f"`{args.command_path}` needs a login: pass --email and --password (or TRACEPIPE_EMAIL "
                           "and TRACEPIPE_PASSWORD); an API key cannot do this", EXIT_USAGE)
        else:
            raise CliError("no credentials: pass --api-key (or TRACEPIPE_API_KEY), or --email and --password "
                           "(or TRACEPIPE_EMAIL and TRACEPIPE_PASSWORD)", EXIT_USAGE)
    except TracepipeError as e:
        tp.close()
        raise signin_error(e, url) from None
    except BaseException:
        tp.close()
        raise
    return tp


# --- output -----------------------------------------------------------------------------------------

# C0 but newline, DEL, C1, and the bidirectional controls that reorder what a line shows.
_CONTROL = "\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[{_CONTROL}]")
_UNSAFE_IN_CELL = re.compile(f"[{_CONTROL}\n]")  # a value must not start a line of its own either
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def printable(text: str, *, cell: bool = False) -> str:
    """`text` with its control characters written as Python escapes (`\x1b`, `\u202e`);
    `cell`: newlines too (a table cell, a field's value)."""
    return (_UNSAFE_IN_CELL if cell else _UNSAFE).sub(lambda m: ascii(m.group())[1:-1], text)


def print(*values: object, sep: str = " ", end: str = "\n", file: Any = None, flush: bool = False) -> None:
    """builtins.print with `printable` applied to every value: the one way this module writes."""
    builtins.print(*(printable(str(v)) for v in values), sep=sep, end=end, file=file, flush=flush)


def print_json(value: Any) -> None:
    """--json: JSON escapes C0 itself; C1 and the bidi controls get \\uXXXX too (still the same JSON)."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    builtins.print(_UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text))


def emit(args: argparse.Namespace, value: Any, for_people: Callable[[], None]) -> int:
    """The command's result: the value as JSON with --json, else what `for_people` prints."""
    if args.json:
        print_json(value)
    else:
        for_people()
    return EXIT_OK


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, Callable[[Mapping[str, Any]], Any]]],
                empty: str) -> None:
    if not rows:
        print(empty, file=sys.stderr)
        return
    cells = [[("-" if (v := get(row)) is None or v == "" else printable(str(v), cell=True)) for _, get in columns]
             for row in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (title, _) in enumerate(columns)]
    print("  ".join(title.ljust(w) for (title, _), w in zip(columns, widths, strict=True)).rstrip())
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())


def print_fields(row: Mapping[str, Any], keys: Iterable[str]) -> None:
    keys = list(keys)
    width = max(len(k) for k in keys)
    for k in keys:
        value = row.get(k)
        text = json.dumps(value) if isinstance(value, (dict, list)) else ("-" if value is None else str(value))
        print(f"{k.ljust(width)}  {printable(text, cell=True)}")


def col(key: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda row: row.get(key)


def when(key: str) -> Callable[[Mapping[str, Any]], Any]:
    """A timestamp to the second, in the API's UTC."""
    def get(row: Mapping[str, Any]) -> Any:
        value = row.get(key)
        return value[:19].replace("T", " ") if isinstance(value, str) else value
    return get


# --- resolving names --------------------------------------------------------------------------------

def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def suite_id(tp: Client, ref: str) -> str:
    """A suite given by id or slug."""
    if is_uuid(ref):
        return ref
    found = tp.list_suites({"slug": f"eq.{ref}", "select": "id"})
    if not found:
        raise CliError(f"no suite with slug {ref!r} among the suites you can see")
    return found[0]["id"]


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:100]
    if not slug:
        raise CliError(f"cannot derive a slug from {name!r}: pass --slug", EXIT_USAGE)
    return slug


def json_arg(text: str) -> Any:
    """A JSON value given inline or as @file."""
    try:
        raw = Path(text[1:]).read_text() if text.startswith("@") else text
        return json.loads(raw)
    except OSError as e:
        raise CliError(f"cannot read {text[1:]}: {e.strerror}", EXIT_USAGE) from None
    except ValueError as e:
        raise CliError(f"not valid JSON: {e}", EXIT_USAGE) from None


def progress_for(args: argparse.Namespace, label: str) -> ProgressLine:
    return ProgressLine(label, enabled=not args.no_progress)


# --- key --------------------------------------------------------------------------------------------

def key_state(row: Mapping[str, Any]) -> str:
    if row.get("revoked_at"):
        return "revoked"
    return "active"


@command
def cmd_key_create(args: argparse.Namespace) -> int:
    with connect(args, login=True) as tp:
        suites = [suite_id(tp, s) for s in args.suite] if args.suite else None
        key = tp.create_api_key(args.name, suites=suites, access=args.access, expires_at=args.expires_at)
    if args.json:
        print_json(key)
    else:
        print_fields({**key, "suites": ", ".join(key["suites"]) if key["suites"] else "all"},
                     ["id", "name", "prefix", "access", "suites", "expires_at", "key"])
        print("tracepipe: the key is shown only this once; store it now", file=sys.stderr)
    return EXIT_OK


@command
def cmd_key_list(args: argparse.Namespace) -> int:
    with connect(args) as tp:
        keys = tp.list_api_keys()
    return emit(args, keys, lambda: print_table(
        keys, [("id", col("id")), ("name", col("name")), ("prefix", col("prefix")), ("access", col("access")),
               ("suites", lambda k: len(k["suites"]) if k.get("suites") else "all"),
               ("expires", when("expires_at")), ("last used", when("last_used_at")), ("state", key_state)],
        "no API keys"))


@command
def cmd_key_revoke(args: argparse.Namespace) -> int:
    with connect(args) as tp:
        if is_uuid(args.key):
            key_id = args.key
        else:
            matches = [k for k in tp.list_api_keys()
                       if args.key in (k["prefix"], k["name"]) and not k.get("revoked_at")]
            if not matches:
                raise CliError(f"no active API key named or prefixed {args.key!r}")
            if len(matches) > 1:
                raise CliError(f"{len(matches)} active keys are named {args.key!r}: pass the id")
            key_id = matches[0]["id"]
        key = tp.revoke_api_key(key_id)
    return emit(args, key, lambda: print(f"revoked {key.get('name')} ({key.get('prefix')}, {key.get('id')})"))


# --- suite --------------------------------------------------------------------------------------------

SUITE_FIELDS = ["id", "slug", "name", "description", "created_by", "created_at", "updated_at"]


@command
def cmd_suite_list(args: argparse.Namespace) -> int:
    with connect(args) as tp:
        suites = tp.list_suites({"order": "slug"})
        roles = {m["suite_id"]: m["role"] for m in tp.me().get("memberships", []) if m.get("accepted", True)}
    return emit(args, suites, lambda: print_table(
        suites, [("id", col("id")), ("slug", col("slug")), ("name", col("name")),
                 ("role", lambda s: roles.get(s["id"])), ("created", when("created_at"))], "no suites"))


@command
def cmd_suite_create(args: argparse.Namespace) -> int:
    slug = args.slug or slugify(args.name)
    with connect(args) as tp:
        suite = tp.create_suite(args.name, slug, args.description)
    return emit(args, suite, lambda: print_fields(suite, SUITE_FIELDS))


@command
def cmd_suite_show(args: argparse.Namespace) -> int:
    with connect(args) as tp:
        sid = suite_id(tp, args.suite)
        suite = tp.get_suite(sid)
        members = tp.list_members(sid)
        actions = tp.list_actions(sid, {"order": "name"})
        bindings = tp.list_action_tool_maps(sid)
        tool_names: dict[str, str] = {}
        for server_id in {b["mcp_server_id"] for b in bindings}:
            server = tp.get_mcp_server(server_id)
            tool_names.update({t["id"]: f"{server['name']}/{t['name']}" for t in tp.list_tools(server_id)})
    if args.json:
        print_json({**suite, "members": members, "actions": actions, "action_tool_maps": bindings})
        return EXIT_OK
    print_fields(suite, SUITE_FIELDS)
    bound: dict[str, list[str]] = {}
    for b in bindings:
        bound.setdefault(b["action_id"], []).append(tool_names.get(b["tool_id"], b["tool_id"]))
    print(f"\nmembers ({len(members)})")
    print_table(members, [("user_id", col("user_id")), ("role", col("role")), ("since", when("created_at"))],
                "no members")
    print(f"\nactions ({len(actions)})")
    print_table(actions, [("id", col("id")), ("name", col("name")),
                          ("bound to (MCP server/tool)", lambda a: ", ".join(sorted(bound.get(a["id"], [])))),
                          ("description", col("description"))], "no actions")
    return EXIT_OK


@command
def cmd_suite_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError("deleting a suite deletes its actions, bindings and memberships: pass --yes", EXIT_USAGE)
        answer = input(f"delete suite {args.suite} with its actions and bindings? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise CliError("not deleted")
    with connect(args) as tp:
        suite = tp.delete_suite(suite_id(tp, args.suite))
    return emit(args, suite, lambda: print(f"deleted suite {suite.get('slug')} ({suite.get('id')})"))


@command
def cmd_member_add(args: argparse.Namespace) -> int:
    with connect(args) as tp:
        member = tp.add_member(suite_id(tp, args.suite), args.user_id, args.role)
    return emit(args, member,
                lambda: print(f"{member['user_id']} is invited as {member['role']} of suite {member['suite_id']}"))


@command
def cmd_member_invitations(args: argparse.Namespace) -> int:
    with connect(args) as tp:
        pending = tp.invitations()
    return emit(args, pending, lambda: print_table(
        pending, [("suite_id", col("suite_id")), ("name", col("name")), ("role", col("role")),
                  ("invited by", col("invited_by_name"))], "no invitations"))


@command
def cmd_member_accept(args: argparse.Namespace) -> int:
    with connect(args) as tp:
        member = tp.accept_invitation(args.suite_id)
    return emit(args, member, lambda: print(f"you are {member['role']} of suite {member['suite_id']}"))


@command
def cmd_member_list(args: argparse.Namespace) -> int:
    with connect(args) as tp:
        members = tp.list_members(suite_id(tp, args.suite))
    return emit(args, members, lambda: print_table(
        members, [("user_id", col("user_id")), ("role", col("role")), ("since", when("created_at"))], "no members"))


@command
def cmd_member_remove(args: argparse.Namespace) -> int:
    with connect(args) as tp:
        member = tp.remove_member(suite_id(tp, args.suite), args.user_id)
    return emit(args, member,
                lambda: print(f"removed {member.get('user_id')} from suite {member.get('suite_id')}"))


@command
def cmd_action_add(args: argparse.Namespace) -> int:
    schema = json_arg(args.input_schema) if args.input_schema else None
    if schema is not None and not isinstance(schema, dict):
        raise CliError("--input-schema must be a JSON object (a JSON Schema)", EXIT_USAGE)
    with connect(args) as tp:
        action = tp.create_action(suite_id(tp, args.suite), args.name, description=args.description,
                                  input_schema=schema)
    return emit(args, action,
                lambda: print_fields(action, ["id", "suite_id", "name", "description", "input_schema", "created_at"]))


@command
def cmd_action_list(args: argparse.Namespace) -> int:
    with connect(args) as tp:
        actions = tp.list_actions(suite_id(tp, args.suite), {"order": "name"})
    return emit(args, actions, lambda: print_table(
        actions, [("id", col("id")), ("name", col("name")), ("description", col("description"))], "no actions"))


# --- session ------------------------------------------------------------------------------------------

SESSION_COLUMNS: list[tuple[str, Callable[[Mapping[str, Any]], Any]]] = [
    ("id", col("id")), ("suite_id", col("suite_id")), ("size", lambda s: human_bytes(s["size_bytes"])),
    ("events", col("event_count")), ("network", col("network_count")), ("screenshots", col("screenshot_count")),
    ("started", when("started_at"))]


@command
def cmd_session_upload(args: argparse.Namespace) -> int:
    files = [Path(f) for f in args.files]
    for f in files:
        if not f.is_file():
            raise CliError(f"{f}: no such file", EXIT_USAGE)
    uploaded: list[Any] = []
    failures = 0
    with connect(args) as tp:
        tp.tus_threshold = args.tus_threshold
        for f in files:
            bar = progress_for(args, f.name)
            try:
                session = tp.upload_session(f, progress=bar)
            except TracepipeError as e:
                bar.abort()
                if exit_code(e) == EXIT_UNREACHABLE:
                    raise
                _fail(f"{f}: {describe(e)}")
                failures += 1
                continue
            bar.finish()
            uploaded.append({**session, "file": str(f)})
            if not args.json:
                print(f"{session['id']}  {f}  {human_bytes(session['size_bytes'])}  events={session['event_count']}"
                      f"  network={session['network_count']}  screenshots={session['screenshot_count']}", flush=True)
    if args.json:
        print_json(uploaded)
    if failures:
        _fail(f"{failures} of {len(files)} uploads failed")
        return EXIT_FAILED
    return EXIT_OK


@command
def cmd_session_list(args: argparse.Namespace) -> int:
    filters = {"order": "created_at.desc", "limit": str(args.limit)}
    with connect(args) as tp:
        if args.suite:
            filters["suite_id"] = f"eq.{suite_id(tp, args.suite)}"
        sessions = tp.list_sessions(filters)
    return emit(args, sessions, lambda: print_table(sessions, SESSION_COLUMNS, "no sessions"))


@command
def cmd_session_download(args: argparse.Namespace) -> int:
    dest = Path(args.output or f"{args.id}.zip")
    if dest.is_dir():
        dest = dest / f"{args.id}.zip"
    with connect(args) as tp:
        bar = progress_for(args, dest.name)
        try:
            tp.download_session(args.id, dest, progress=bar)
        except BaseException:
            bar.abort()
            raise
        bar.finish()
    size = dest.stat().st_size
    return emit(args, {"id": args.id, "path": str(dest), "size_bytes": size},
                lambda: print(f"{dest}  {human_bytes(size)}  (sha256 checked)"))


# --- example --------------------------------------------------------------------------------------------

@command
def cmd_example_list(args: argparse.Namespace) -> int:
    filters = {"order": "created_at.desc", "limit": str(args.limit)}
    if args.model:
        filters["model"] = f"eq.{args.model}"
    if args.session:
        filters["session_id"] = f"eq.{args.session}"
    with connect(args) as tp:
        if args.suite:
            filters["suite_id"] = f"eq.{suite_id(tp, args.suite)}"
        examples = tp.list_examples(filters)
    return emit(args, examples, lambda: print_table(
        examples, [("id", col("id")), ("suite_id", col("suite_id")), ("model", col("model")),
                   ("messages", col("message_count")), ("size", lambda e: human_bytes(e["size_bytes"])),
                   ("created", when("created_at"))], "no examples"))


@command
def cmd_example_export(args: argparse.Namespace) -> int:
    dest = Path(args.output)
    with connect(args) as tp:
        sid = suite_id(tp, args.suite) if args.suite else None
        bar = progress_for(args, dest.name)
        try:
            result = tp.export_examples(
                dest, suite_id=sid, model=args.model, session_id=args.session,
                split=cast(Literal["train", "validation"] | None, args.split),
                validation_percent=args.validation_percent, progress=bar)
        except BaseException:
            bar.abort()
            raise
        bar.finish()
    return emit(args, {"path": str(result.path), "examples": result.examples, "bytes": result.bytes,
                       "pages": result.pages},
                lambda: print(f"{result.path}  {result.examples} examples  {human_bytes(result.bytes)}"))


# --- demo ---------------------------------------------------------------------------------------------

def program_name() -> str:
    """How to call this program again: `tracepipe` when that is on PATH, else the path used."""
    called = sys.argv[0] if sys.argv and sys.argv[0] else "tracepipe"
    on_path = shutil.which("tracepipe")
    if on_path and Path(on_path).resolve() == Path(called).resolve():
        return "tracepipe"
    return called if "/" in called else "tracepipe"


def demo_credentials_path() -> Path:
    from tracepipe.settings import StackSettings

    return StackSettings().state_dir / "demo-credentials.json"


def demo_password(args: argparse.Namespace) -> tuple[str, bool]:
    """--password, else the one kept in the stack's state dir, else a new one (and True: to
    be kept once the account is signed up), so that a second run signs in as the same account."""
    if args.password:
        return str(args.password), False
    try:
        saved = json.loads(demo_credentials_path().read_text())
        if saved.get("email") == args.email and saved.get("password"):
            return str(saved["password"]), False
    except (OSError, ValueError):
        pass
    return secrets.token_urlsafe(12), True


def demo_pipeline(args: argparse.Namespace, url: str, log: Callable[[str], None]) -> Client | None:
    """The pipeline account the demo's worker runs as: --pipeline-key (env
    TRACEPIPE_PIPELINE_API_KEY), or on the local stack (no --url) the account
    demo-pipeline@tracepipe.test, made a pipeline account the way `tracepipe user create
    --role pipeline` does (an operator step on the local database) with a fresh password."""
    key = args.pipeline_key or os.environ.get("TRACEPIPE_PIPELINE_API_KEY")
    if key:
        return Client(url, api_key=key)
    if args.url:
        log("pipeline: skipped (pass --pipeline-key, a pipeline account's API key, to run the demo worker)")
        return None
    import psycopg
    from argon2 import PasswordHasher

    from tracepipe import credentials
    from tracepipe.settings import StackSettings
    from tracepipe.stack import Stack

    email, password = "demo-pipeline@tracepipe.test", secrets.token_urlsafe(16)
    stack = Stack(StackSettings())
    with psycopg.connect(stack.owner_url(credentials.load_or_create(stack.state))) as conn:
        hashed = PasswordHasher().hash(password)
        updated = conn.execute("update app.users set password_hash = %s, account_role = 'tp_pipeline',"
                               " disabled_at = null where email = %s", [hashed, email]).rowcount
        if not updated:
            conn.execute("insert into app.users (email, display_name, password_hash, account_role)"
                         " values (%s, 'Demo pipeline', %s, 'tp_pipeline')", [email, hashed])
    pipeline = Client(url)
    pipeline.login(email, password)
    return pipeline


def keep_demo_password(email: str, password: str) -> None:
    path = demo_credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"email": email, "password": password}, f)


@command
def cmd_demo(args: argparse.Namespace) -> int:
    from tracepipe import demo

    url = args.url or default_url()
    password, new = demo_password(args)

    def log(line: str) -> None:
        print(f"demo: {line}", file=sys.stderr, flush=True)

    with Client(url) as tp:
        try:
            how = demo.sign_in(tp, args.email, password)
        except TracepipeError as e:
            raise signin_error(e, url) from None
        if new:
            keep_demo_password(args.email, password)
        log(f"{how} as {args.email}")
        report = demo.load(tp, log)
        pipeline = demo_pipeline(args, url, log)
        if pipeline is not None:
            with pipeline:
                suite_ids = {slug: tp.list_suites({"slug": f"eq.{slug}"})[0]["id"] for slug in report.suites}
                demo.run_pipeline(pipeline, suite_ids, report, log)
    if args.json:
        print_json({**report.__dict__, "url": url, "email": args.email, "password": password})
        return EXIT_OK
    me = program_name()
    print(f"""\
demo data in {url} ({report.created} rows added in {report.seconds} s)
  suites       {len(report.suites)}: {", ".join(report.suites)}
  actions      {report.actions}, each bound to an MCP tool
  MCP servers  {report.servers} with {report.tools} tools
  sessions     {report.sessions} ({human_bytes(report.session_bytes)} of bundles)
  examples     {report.examples} across {", ".join(report.models)}
  pipeline     {report.pipeline_jobs} jobs done by a worker this run, {report.pipeline_examples} examples

sign in
  email     {args.email}
  password  {password}
  api key   {report.api_key}
(the API key is new on every run; the previous demo key is revoked)

try
  export TRACEPIPE_URL={url} TRACEPIPE_API_KEY={report.api_key}
  {me} suite list
  {me} suite show demo-checkout
  {me} example export --suite demo-checkout -o checkout.jsonl""")
    return EXIT_OK


# --- pipeline --------------------------------------------------------------------------------------------

JOB_COLUMNS = (("ID", col("id")), ("SESSION", col("session_id")), ("STATE", col("state")),
               ("GEN", col("generation")), ("ATTEMPT", col("attempt")), ("UPDATED", when("updated_at")),
               ("LAST ERROR", lambda r: (r.get("last_error") or "").splitlines()[-1:] or ""))


def _run_job(tp: Client, job: Any, args: argparse.Namespace) -> bool:
    """One job through the command: the bundle in, the JSONL it writes registered. True on success."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tracepipe-job-") as tmp:
        bundle = job.download_bundle(Path(tmp) / "bundle.zip")
        output = Path(tmp) / "examples.jsonl"
        env = {**os.environ, "TRACEPIPE_BUNDLE": str(bundle), "TRACEPIPE_OUTPUT": str(output),
               "TRACEPIPE_JOB_ID": job.id, "TRACEPIPE_SESSION_ID": job.session_id,
               "TRACEPIPE_SUITE_ID": job.suite_id or ""}
        argv = [a.replace("{bundle}", str(bundle)).replace("{output}", str(output)) for a in args.cmd]
        try:
            done = subprocess.run(argv, env=env, stdout=sys.stderr, stderr=subprocess.PIPE, text=True,
                                  errors="replace", timeout=args.timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            job.fail(f"{argv[0]}: {e}")
            _fail(f"job {job.id}: {e}")
            return False
        sys.stderr.write(done.stderr)
        if done.returncode != 0:
            job.fail(f"exit status {done.returncode}\n{done.stderr[-4000:]}")
            _fail(f"job {job.id}: the command exited with status {done.returncode}")
            return False
        examples = []
        if output.is_file() and output.stat().st_size > 0:
            examples.append(job.register_example(args.model, output, suite_id=args.example_suite))
        job.complete()
        print(json.dumps({"job_id": job.id, "session_id": job.session_id,
                          "example_ids": [e["id"] for e in examples]}) if args.json else
              f"{job.id}  session {job.session_id}  examples: {' '.join(e['id'] for e in examples) or '-'}",
              flush=True)
        return True


@command
def cmd_pipeline_run(args: argparse.Namespace) -> int:
    if args.cmd and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    if not args.cmd:
        raise CliError("give the command to run per job after --, e.g. "
                       "tracepipe pipeline run --model m -- ./make-examples {bundle} {output}", EXIT_USAGE)
    failures = handled = 0
    with connect(args) as tp:
        suite = suite_id(tp, args.suite) if args.suite else None
        for job in tp.jobs(lease_s=args.lease_s, wait_s=args.wait_s, suite_id=suite):
            with job:
                if not _run_job(tp, job, args):
                    failures += 1
            handled += 1
            if args.max_jobs and handled >= args.max_jobs:
                break
    return EXIT_FAILED if failures else EXIT_OK


@command
def cmd_pipeline_jobs(args: argparse.Namespace) -> int:
    from tracepipe.worker import list_jobs

    filters = {"order": "updated_at.desc", "limit": str(args.limit)}
    if args.state:
        filters["state"] = f"eq.{args.state}"
    if args.session:
        filters["session_id"] = f"eq.{args.session}"
    with connect(args) as tp:
        if args.suite:
            filters["suite_id"] = f"eq.{suite_id(tp, args.suite)}"
        rows = list_jobs(tp, filters)
    return emit(args, rows, lambda: print_table(rows, JOB_COLUMNS, "no jobs"))


@command
def cmd_pipeline_requeue(args: argparse.Namespace) -> int:
    from tracepipe.worker import requeue

    if not (args.session or args.suite):
        raise CliError("name --session or --suite to requeue", EXIT_USAGE)
    with connect(args) as tp:
        suite = suite_id(tp, args.suite) if args.suite else None
        result = requeue(tp, args.reason, session_id=args.session, suite_id=suite)
    return emit(args, result, lambda: print(f"requeued {result['requeued']} session(s)"))


# --- the parser -----------------------------------------------------------------------------------------

def _connection_options(*, progress: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--url", help="the stack's URL (env TRACEPIPE_URL; default the local stack's proxy, "
                                 "from TP_HOST and TP_PROXY_PORT: http://127.0.0.1:8080)")
    g.add_argument("--api-key", help="an API key, tp_… (env TRACEPIPE_API_KEY)")
    g.add_argument("--email", help="sign in with this account instead (env TRACEPIPE_EMAIL)")
    g.add_argument("--password", help="its password (env TRACEPIPE_PASSWORD; asked for on a terminal)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    if progress:
        o.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return p


def _add(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str, *,
         parents: Sequence[argparse.ArgumentParser] = (), func: Handler | None = None,
         epilog: str | None = None, path: str = "") -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                       parents=list(parents), epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    if func is not None:
        p.set_defaults(func=func, command_path=f"tracepipe {path or name}")
    return p


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds key, suite, session, example, pipeline and demo to the `tracepipe` parser."""
    conn = _connection_options()
    transfer = _connection_options(progress=True)

    key = _add(sub, "key", "API keys of your account: create, list, revoke")
    keys = key.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    p = _add(keys, "create", "create an API key; prints its secret once (needs --email/--password, not a key)",
             parents=[conn], func=cmd_key_create, path="key create",
             epilog="example:\n  tracepipe key create ci --access read --suite checkout --email ada@example.com")
    p.add_argument("name", help="a name to recognise the key by")
    p.add_argument("--suite", action="append", metavar="SUITE",
                   help="limit the key to this suite (id or slug); repeat for several (default: all your suites)")
    p.add_argument("--access", choices=("read", "write"), default="write",
                   help="read: as a viewer; write: with your own role (default write)")
    p.add_argument("--expires-at", metavar="TIME", help="RFC 3339 time after which the key stops working")
    _add(keys, "list", "your API keys (never their secrets)", parents=[conn], func=cmd_key_list, path="key list")
    p = _add(keys, "revoke", "revoke an API key: it stops at the very next request, tokens already issued too",
             parents=[conn], func=cmd_key_revoke, path="key revoke")
    p.add_argument("key", help="the key's id, prefix (tp_…) or name")

    suite = _add(sub, "suite", "suites, their members and actions")
    suites = suite.add_subparsers(dest="suite_command", required=True, metavar="ACTION")
    _add(suites, "list", "the suites you belong to, with your role", parents=[conn], func=cmd_suite_list,
         path="suite list")
    p = _add(suites, "create", "create a suite; you become its owner", parents=[conn], func=cmd_suite_create,
             path="suite create")
    p.add_argument("name", help="its display name")
    p.add_argument("--slug", help="its unique URL name: a-z, 0-9 and - (default: derived from the name)")
    p.add_argument("--description")
    p = _add(suites, "show", "a suite with its members, actions and their tool bindings", parents=[conn],
             func=cmd_suite_show, path="suite show")
    p.add_argument("suite", help="id or slug")
    p = _add(suites, "delete", "delete a suite with its actions, bindings and memberships (owners)",
             parents=[conn], func=cmd_suite_delete, path="suite delete")
    p.add_argument("suite", help="id or slug")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    member = _add(suites, "member", "who belongs to a suite, and as what (owners manage it)")
    members = member.add_subparsers(dest="member_command", required=True, metavar="ACTION")
    p = _add(members, "add", "invite a user to a suite (it counts once they accept)", parents=[conn],
             func=cmd_member_add, path="suite member add")
    p.add_argument("suite", help="id or slug")
    p.add_argument("user_id", help="the user's id (GET /users/me shows one's own)")
    p.add_argument("--role", choices=("viewer", "editor", "owner"), default="viewer",
                   help="viewer reads; editor also changes actions and bindings; owner also the suite and its "
                        "members (default viewer)")
    _add(members, "invitations", "the invitations addressed to you", parents=[conn], func=cmd_member_invitations,
         path="suite member invitations")
    p = _add(members, "accept", "accept an invitation to a suite", parents=[conn], func=cmd_member_accept,
             path="suite member accept")
    p.add_argument("suite_id", help="the suite's id (suite member invitations lists them)")
    p = _add(members, "list", "a suite's members and their roles", parents=[conn], func=cmd_member_list,
             path="suite member list")
    p.add_argument("suite", help="id or slug")
    p = _add(members, "remove", "remove a user from a suite (a suite keeps at least one owner)", parents=[conn],
             func=cmd_member_remove, path="suite member remove")
    p.add_argument("suite", help="id or slug")
    p.add_argument("user_id")

    action = _add(suites, "action", "the actions of a suite (editors and owners change them)")
    actions = action.add_subparsers(dest="action_command", required=True, metavar="ACTION")
    p = _add(actions, "add", "add an action to a suite", parents=[conn], func=cmd_action_add,
             path="suite action add",
             epilog="example:\n  tracepipe suite action add checkout search --input-schema "
                    "'{\"type\": \"object\", \"properties\": {\"query\": {\"type\": \"string\"}}}'")
    p.add_argument("suite", help="id or slug")
    p.add_argument("name", help="unique within the suite")
    p.add_argument("--description")
    p.add_argument("--input-schema", metavar="JSON", help="its input as a JSON Schema, inline or @file")
    p = _add(actions, "list", "a suite's actions", parents=[conn], func=cmd_action_list, path="suite action list")
    p.add_argument("suite", help="id or slug")

    session = _add(sub, "session", "recorded sessions: upload bundles, list, download")
    sessions = session.add_subparsers(dest="session_command", required=True, metavar="ACTION")
    p = _add(sessions, "upload", "upload session bundles (zip), one session each; prints one line per file",
             parents=[transfer], func=cmd_session_upload, path="session upload",
             epilog="A bundle tags itself with a suite through suite_id in its manifest.json.\n"
                    "Each upload is retried on connection errors and 5xx with one Idempotency-Key,\n"
                    "so a retry never creates a second session. Bundles of --tus-threshold bytes and\n"
                    "more go through tus (resumable): after Ctrl-C or a crash, the same command sends\n"
                    "only what the server lacks (resume files: $XDG_CACHE_HOME/tracepipe/uploads).\n"
                    "Exit 1 when any file failed.")
    p.add_argument("--tus-threshold", type=int, default=TUS_THRESHOLD_BYTES, metavar="BYTES",
                   help=f"upload files this large resumably through tus (default {TUS_THRESHOLD_BYTES})")
    p.add_argument("files", nargs="+", metavar="FILE", help="a bundle: manifest.json, events.jsonl, "
                   "network.har or network.jsonl, screenshots/")
    p = _add(sessions, "list", "your sessions and those of your suites, newest first", parents=[conn],
             func=cmd_session_list, path="session list")
    p.add_argument("--suite", help="only sessions tagged with this suite (id or slug)")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p = _add(sessions, "download", "download a session's bundle, byte-identical and sha256-checked; "
             "run again after an interruption, it resumes from FILE.part",
             parents=[transfer], func=cmd_session_download, path="session download")
    p.add_argument("id", help="the session's id")
    p.add_argument("-o", "--output", metavar="FILE", help="where to write it (default ID.zip; a directory works)")

    example = _add(sub, "example", "training examples: list, export as one fine-tuning JSONL file")
    examples = example.add_subparsers(dest="example_command", required=True, metavar="ACTION")
    p = _add(examples, "list", "examples you can see, newest first", parents=[conn], func=cmd_example_list,
             path="example list")
    p.add_argument("--suite", help="id or slug")
    p.add_argument("--model")
    p.add_argument("--session", metavar="ID")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p = _add(examples, "export", "write every matching example's lines to one JSONL file",
             parents=[transfer], func=cmd_example_export, path="example export",
             epilog="The total is not known in advance: progress shows bytes and rate, no ETA.\n"
                    "The file appears only when complete (written to FILE.part first).\n\n"
                    "example:\n  tracepipe example export --suite checkout --split train -o train.jsonl")
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="the JSONL file to write")
    p.add_argument("--suite", help="id or slug")
    p.add_argument("--model")
    p.add_argument("--session", metavar="ID")
    p.add_argument("--split", choices=("train", "validation"),
                   help="only one part of a deterministic split by example id (default: all)")
    p.add_argument("--validation-percent", type=int, metavar="N", help="size of the validation part (default 10)")

    pipeline = _add(sub, "pipeline", "the Session-to-Example pipeline's queue (a pipeline account's key)")
    pipelines = pipeline.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    p = _add(pipelines, "run", "work the queue: run a command per job and register the JSONL it writes",
             parents=[conn], func=cmd_pipeline_run, path="pipeline run",
             epilog="Per job the session's bundle is downloaded; the command gets its path in\n"
                    "TRACEPIPE_BUNDLE (or {bundle} in its arguments) and writes examples to\n"
                    "TRACEPIPE_OUTPUT ({output}), which is registered with the job's id. Also set:\n"
                    "TRACEPIPE_JOB_ID, TRACEPIPE_SESSION_ID, TRACEPIPE_SUITE_ID. Exit status 0\n"
                    "completes the job; any other fails it with the command's stderr (retried\n"
                    "after a backoff, dead after the server's max attempts). The lease is extended\n"
                    "while the command runs.\n\n"
                    "example:\n  tracepipe pipeline run --model gpt-4o-mini -- ./to-examples {bundle} {output}")
    p.add_argument("--model", required=True, help="the model the examples are for")
    p.add_argument("--suite", help="only jobs of this suite's sessions (id or slug)")
    p.add_argument("--example-suite", metavar="ID",
                   help="register examples in this suite (default: the session's suite)")
    p.add_argument("--lease-s", type=int, default=60, help="lease length, extended while running (default 60)")
    p.add_argument("--wait-s", type=float, default=20, help="long-poll length of each claim (default 20)")
    p.add_argument("--max-jobs", type=int, default=0, help="stop after this many jobs (default: run forever)")
    p.add_argument("--timeout", type=float, default=None, help="fail a job whose command runs longer (seconds)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="the command and its arguments")
    p = _add(pipelines, "jobs", "pipeline jobs, newest change first (people: those of their own sessions)",
             parents=[conn], func=cmd_pipeline_jobs, path="pipeline jobs")
    p.add_argument("--state", choices=("queued", "leased", "done", "failed", "dead"))
    p.add_argument("--suite", help="id or slug")
    p.add_argument("--session", metavar="ID")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p = _add(pipelines, "requeue", "enqueue a new generation of jobs (e.g. after a new pipeline version)",
             parents=[conn], func=cmd_pipeline_requeue, path="pipeline requeue")
    p.add_argument("--session", metavar="ID")
    p.add_argument("--suite", help="every session of this suite (id or slug)")
    p.add_argument("--reason", required=True, help="why, kept with the jobs (e.g. 'pipeline v2')")

    p = _add(sub, "demo", "load a realistic sample into the running stack and print how to sign in to it",
             func=cmd_demo,
             epilog="Three suites with actions, four MCP servers with tools, bindings, nine sessions uploaded\n"
                    "as generated bundles and eighteen examples, as the demo account (signed up when\n"
                    "missing; its password is generated once and kept in the state dir,\n"
                    "TP_STATE_DIR/demo-credentials.json). A second run adds nothing but a new API key.")
    p.add_argument("--url", help="the stack's URL (env TRACEPIPE_URL; default the local stack's proxy)")
    p.add_argument("--email", default="demo@tracepipe.test", help="the demo account (default %(default)s)")
    p.add_argument("--password", help="its password (default: generated on the first run and kept)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--pipeline-key", help="a pipeline account's API key for the demo worker (env "
                                          "TRACEPIPE_PIPELINE_API_KEY; default on the local stack: "
                                          "demo-pipeline@tracepipe.test, created by an operator step)")
