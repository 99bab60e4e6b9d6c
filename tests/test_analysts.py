"""SQL access for analysts (issue 5, DESIGN.md §4), as real analyst login roles.

Every analyst here is created through the CLI (`tracepipe analyst create`, what `make
analyst` runs) and connects like a person with psql would: over TCP to 127.0.0.1 on the
stack's PostgreSQL port, with the generated password from the printed URL. The data comes
from the API (people, suites, actions, the MCP catalog, bindings, an API key); sessions and
examples rows are written with the superuser for setup only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import errors, sql
from psycopg.rows import dict_row

from tests.conftest import User, add_member, create_key, create_suite, run_cli, unique
from tracepipe.settings import REPO_ROOT
from tracepipe.stack import Stack

OBJECT = {"Accept": "application/vnd.pgrst.object+json", "Prefer": "return=representation"}
URL_RE = re.compile(r"^postgresql://(?P<user>[a-z_][a-z0-9_]*):(?P<password>[A-Za-z0-9_-]{20,})"
                    r"@(?P<host>[^:/]+):(?P<port>\d+)/(?P<db>[A-Za-z0-9_]+)$")
SCHEMAS = ("app", "api", "auth", "analytics", "public")

# What an analyst may read of each data table in app: every column but the secrets.
READABLE_APP_COLUMNS = {
    "users": {"id", "email", "display_name", "account_role", "disabled_at", "created_at", "updated_at"},
    "api_keys": {"id", "user_id", "name", "suites", "access", "expires_at", "last_used_at", "revoked_at",
                 "created_at"},
    "suites": {"id", "name", "slug", "description", "created_by", "created_at", "updated_at"},
    "suite_members": {"id", "suite_id", "user_id", "role", "created_at", "updated_at", "accepted", "accepted_at"},
    "actions": {"id", "suite_id", "name", "description", "input_schema", "created_at", "updated_at"},
    "mcp_servers": {"id", "name", "url", "transport", "description", "created_by", "created_at", "updated_at"},
    "tools": {"id", "mcp_server_id", "name", "description", "input_schema", "created_at", "updated_at"},
    "action_tool_maps": {"id", "suite_id", "action_id", "mcp_server_id", "tool_id", "argument_mapping",
                         "created_at", "updated_at"},
    "sessions": {"id", "user_id", "suite_id", "size_bytes", "sha256", "started_at", "ended_at", "event_count",
                 "network_count", "screenshot_count", "files", "metadata", "created_at", "updated_at"},
    "examples": {"id", "session_id", "suite_id", "model", "message_count", "size_bytes", "sha256", "metadata",
                 "created_at", "job_id"},
    # the queue's jobs, never their lease tokens
    "pipeline_jobs": {"id", "session_id", "suite_id", "state", "generation", "reason", "attempt", "max_attempts",
                      "run_after", "leased_by", "leased_at", "lease_expires_at", "last_error", "example_ids",
                      "created_at", "updated_at", "finished_at"},
    "analysts": {"role_name", "suites", "created_at"},
}
# A key's prefix is public to its owner, but it names the key at /auth/token (and its lockout).
SECRET_COLUMNS = {("app", "users", "password_hash"), ("app", "api_keys", "key_hash"), ("app", "api_keys", "prefix")}
SECRET_TABLES = {("app", "refresh_tokens")}
SECRET_NAMES = {"password_hash", "key_hash", "token_hash"}

# analytics view -> (base table, the column that names the suite; None for the catalog)
TABLE_VIEWS = {
    "suites": ("suites", "id"),
    "suite_members": ("suite_members", "suite_id"),
    "actions": ("actions", "suite_id"),
    "action_tool_maps": ("action_tool_maps", "suite_id"),
    "sessions": ("sessions", "suite_id"),
    "examples": ("examples", "suite_id"),
    "pipeline_jobs": ("pipeline_jobs", "suite_id"),  # every committed session has a job
    "mcp_servers": ("mcp_servers", None),
    "tools": ("tools", None),
}
OTHER_ROLES = ("tp_user", "tp_owner", "postgres", "authenticator", "tp_admin", "tp_pipeline", "tp_auth", "anon")


# --- fixtures -------------------------------------------------------------------------------------------

@dataclass
class World:
    owner: User           # owns suites s1 and s2
    stranger: User        # owns suite s3, member of nothing else
    member: User          # viewer of s1 only
    s1: str
    s2: str
    s3: str
    key_id: str
    models: tuple[str, str]


def _post(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post(path, json=body, headers=OBJECT)
    assert r.status_code == 201, r.text
    return dict(r.json())


@pytest.fixture(scope="module")
def world(make_user: Callable[..., User], superuser_dsn: str) -> World:
    owner, stranger, member = make_user(), make_user(), make_user()
    s1, s2 = create_suite(owner)["id"], create_suite(owner)["id"]
    s3 = create_suite(stranger)["id"]
    add_member(owner, s1, member, "viewer")
    server = _post(owner.client, "/mcp-servers", {"name": unique("srv"), "url": "https://mcp.example/mcp",
                                                  "transport": "streamable-http"})
    tool = _post(owner.client, f"/mcp-servers/{server['id']}/tools", {"name": "search"})
    for suite, user in ((s1, owner), (s2, owner), (s3, stranger)):
        action = _post(user.client, f"/suites/{suite}/actions", {"name": unique("act"),
                                                                  "input_schema": {"type": "object"}})
        _post(user.client, "/action-tool-maps", {"suite_id": suite, "action_id": action["id"],
                                                 "mcp_server_id": server["id"], "tool_id": tool["id"]})
    key = create_key(owner, access="read")
    models = (unique("model-a"), unique("model-b"))
    with psycopg.connect(superuser_dsn, autocommit=True) as conn:  # setup only: the upload path is ext's
        for suite, user in ((s1, owner), (s2, owner), (s3, stranger), (None, owner)):
            for i in range(2):
                (session_id,) = conn.execute(
                    "insert into app.sessions (user_id, suite_id, size_bytes, sha256, started_at, ended_at,"
                    " event_count, network_count, screenshot_count) values (%s, %s, %s, %s, now() - interval '1 hour',"
                    " now(), 10, 3, 2) returning id",
                    [user.id, suite, 1000 * (i + 1), "a" * 64]).fetchone()  # type: ignore[misc]
                if suite is not None:
                    conn.execute(
                        "insert into app.examples (session_id, suite_id, model, message_count, size_bytes, sha256)"
                        " values (%s, %s, %s, %s, %s, %s)",
                        [session_id, suite, models[i], 4 + i, 500, "b" * 64])
    return World(owner, stranger, member, s1, s2, s3, key["id"], models)


@dataclass
class Analyst:
    name: str
    url: str
    stdout: str


@pytest.fixture
def make_analyst(stack_env: dict[str, str]) -> Iterator[Callable[..., Analyst]]:
    """Creates analysts through the CLI; revokes those still there afterwards."""
    made: list[str] = []

    def make(suites: list[str] | None = None, env: dict[str, str] | None = None) -> Analyst:
        name = "a_" + uuid.uuid4().hex[:12]
        args = ["analyst", "create", name] + (["--suites", ",".join(suites)] if suites is not None else [])
        result = run_cli({**stack_env, **(env or {})}, *args)
        made.append(name)
        url = result.stdout.strip().splitlines()[-1]
        return Analyst(name, url, result.stdout)

    yield make
    for name in made:
        run_cli(stack_env, "analyst", "revoke", name, check=False)


def connect(url: str, **kw: Any) -> psycopg.Connection[dict[str, Any]]:
    """The analyst's own connection: TCP, password auth, what psql would do with the URL."""
    return psycopg.connect(url, row_factory=dict_row, autocommit=True, connect_timeout=10, **kw)


def ids(conn: psycopg.Connection[dict[str, Any]], query: str, params: Any = None) -> set[str]:
    return {str(r["id"]) for r in conn.execute(query, params).fetchall()}


def normalized(su: psycopg.Connection[dict[str, Any]], name: str, value: str) -> str:
    """How PostgreSQL shows `value` for the setting `name` (60s -> 1min)."""
    with su.transaction():
        row = su.execute("select set_config(%s, %s, true) as v", [name, value]).fetchone()
    assert row is not None
    return str(row["v"])


# --- creation --------------------------------------------------------------------------------------------

def test_create_prints_the_url_last_and_makes_a_plain_member_of_tp_analyst(
        stack: Stack, make_analyst: Callable[..., Analyst], su: psycopg.Connection[dict[str, Any]]) -> None:
    a = make_analyst()
    m = URL_RE.match(a.url)
    assert m, a.stdout
    assert (m["user"], m["host"], int(m["port"]), m["db"]) == (a.name, "127.0.0.1", stack.s.pg_port, stack.s.db_name)
    assert m["password"] not in a.stdout.rsplit("\n", 2)[0]  # shown once, in the URL only

    role = su.execute("select * from pg_roles where rolname = %s", [a.name]).fetchone()
    assert role is not None
    assert role["rolcanlogin"] and role["rolinherit"]
    assert not any(role[k] for k in ("rolsuper", "rolcreaterole", "rolcreatedb", "rolreplication", "rolbypassrls"))
    assert role["rolconnlimit"] == stack.s.analyst_connection_limit
    direct = su.execute("select g.rolname from pg_auth_members m join pg_roles g on g.oid = m.roleid"
                        " join pg_roles r on r.oid = m.member where r.rolname = %s", [a.name]).fetchall()
    assert [r["rolname"] for r in direct] == ["tp_analyst"]
    for other in OTHER_ROLES:
        row = su.execute("select pg_has_role(%s, %s, 'member') as m", [a.name, other]).fetchone()
        assert row is not None and row["m"] is False, other
    assert su.execute("select suites from app.analysts where role_name = %s", [a.name]).fetchone() == {"suites": None}

    # The password works over TCP; a wrong one does not.
    with connect(a.url) as conn:
        assert conn.info.host == "127.0.0.1" and conn.info.port == stack.s.pg_port
        assert conn.execute("select current_user as u, session_user as s").fetchone() == {"u": a.name, "s": a.name}
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(a.url.replace(m["password"], m["password"][:-1] + ("x" if m["password"][-1] != "x" else "y")))


def test_analyst_sessions_run_under_the_guards(stack: Stack, make_analyst: Callable[..., Analyst],
                                               su: psycopg.Connection[dict[str, Any]]) -> None:
    a = make_analyst()
    s = stack.s
    expected = {
        "statement_timeout": normalized(su, "statement_timeout", s.statement_timeout_analyst),
        "work_mem": normalized(su, "work_mem", s.analyst_work_mem),
        "temp_file_limit": normalized(su, "temp_file_limit", s.analyst_temp_file_limit),
        "idle_in_transaction_session_timeout": normalized(su, "idle_in_transaction_session_timeout",
                                                          s.analyst_idle_in_transaction_timeout),
        "default_transaction_read_only": "on",
        "transaction_read_only": "on",
    }
    assert expected["statement_timeout"] == "30s"  # the documented default
    with connect(a.url) as conn:
        shown = {k: conn.execute(sql.SQL("show {}").format(sql.Identifier(k))).fetchone() for k in expected}
        assert {k: next(iter(v.values())) for k, v in shown.items() if v} == expected
        # temp_file_limit is a superuser setting: the analyst cannot lift it.
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("set temp_file_limit = '100GB'")


def test_statement_timeout_fires(make_analyst: Callable[..., Analyst]) -> None:
    # The guard's value comes from the settings (TP_STATEMENT_TIMEOUT_ANALYST); a short one
    # keeps the test fast. The default (30s) is checked above.
    a = make_analyst(env={"TP_STATEMENT_TIMEOUT_ANALYST": "1s"})
    with connect(a.url) as conn:
        assert conn.execute("select 1 as ok from pg_sleep(0.1)").fetchone() == {"ok": 1}
        started = time.monotonic()
        with pytest.raises(errors.QueryCanceled, match="statement timeout"):
            conn.execute("select pg_sleep(10)")
        assert time.monotonic() - started < 5
        # A query over the analytics views is cancelled the same way.
        with pytest.raises(errors.QueryCanceled):
            conn.execute("select count(*) from analytics.suites, pg_sleep(3)")


def test_an_analyst_cannot_set_its_timeouts_away(make_analyst: Callable[..., Analyst]) -> None:
    """tp_guard refuses raising or turning off the timeouts; lowering them is allowed."""
    a = make_analyst(env={"TP_STATEMENT_TIMEOUT_ANALYST": "1s", "TP_ANALYST_IDLE_IN_TRANSACTION_TIMEOUT": "1s"})
    with connect(a.url) as conn:
        for setting in ("statement_timeout", "idle_in_transaction_session_timeout"):
            for value in ("0", "1h"):
                with pytest.raises(errors.InsufficientPrivilege, match=f"{setting} is pinned for analysts"):
                    conn.execute(sql.SQL("set {} = {}").format(sql.Identifier(setting), sql.Literal(value)))
            conn.execute(sql.SQL("set {} = '500ms'").format(sql.Identifier(setting)))
        with pytest.raises(errors.QueryCanceled, match="statement timeout"):
            conn.execute("select pg_sleep(60)")
        assert conn.execute("select 1 as ok").fetchone() == {"ok": 1}  # the session itself lives on


def test_the_watchdog_holds_open_sessions_to_tightened_limits(make_analyst: Callable[..., Analyst],
                                                              su: psycopg.Connection[dict[str, Any]]) -> None:
    """An operator lowers an analyst's limits (migrate does it for every analyst): sessions
    already open keep the values they logged in with, and the watchdog holds them to the
    role's new ones."""
    a = make_analyst()
    with connect(a.url) as busy, connect(a.url) as idle:
        ident = sql.Identifier(a.name)
        su.execute(sql.SQL("alter role {} set statement_timeout = '1s'").format(ident))
        su.execute(sql.SQL("alter role {} set idle_in_transaction_session_timeout = '1s'").format(ident))
        assert busy.execute("show statement_timeout").fetchone() == {"statement_timeout": "30s"}
        with pytest.raises(errors.QueryCanceled, match="user request"):  # the watchdog's, not its own timeout
            busy.execute("select pg_sleep(25)")
        idle.autocommit = False
        idle.execute("select 1")
        time.sleep(8)  # the role's 1 s, plus a round of the watchdog (5 s)
        with pytest.raises(psycopg.OperationalError):
            idle.execute("select 1")
        assert idle.closed


def test_temp_file_limit_and_idle_in_transaction_timeout_fire(make_analyst: Callable[..., Analyst]) -> None:
    a = make_analyst(env={"TP_ANALYST_TEMP_FILE_LIMIT": "1MB", "TP_ANALYST_IDLE_IN_TRANSACTION_TIMEOUT": "1s"})
    with connect(a.url) as conn:
        conn.execute("set work_mem = '64kB'")  # the analyst may shrink work_mem; spills still stop at the limit
        with pytest.raises(errors.ConfigurationLimitExceeded, match="temp_file_limit"):
            conn.execute("select sum(x) from (select g as x from generate_series(1, 1000000) g"
                         " order by g desc offset 0) s")
    with connect(a.url) as conn:
        conn.autocommit = False
        conn.execute("select 1")
        time.sleep(2.5)
        with pytest.raises(psycopg.Error, match=r"idle-in-transaction|closed"):
            conn.execute("select 1")
        assert conn.closed


# --- escapes (issue 13): settings, procedural code, large objects, locks, notifications --------------------

PINNED_ESCAPES = [
    # (statement(s) in one transaction, the setting named in the refusal)
    (["set work_mem = '4GB'"], "work_mem"),
    (["begin", "set local work_mem = '4GB'"], "work_mem"),
    (["select set_config('work_mem', '4GB', false)"], "work_mem"),
    (["begin", "select set_config('work_mem', '4GB', true)"], "work_mem"),
    (["set hash_mem_multiplier = 100"], "hash_mem_multiplier"),
    (["select set_config('hash_mem_multiplier', '100', false)"], "hash_mem_multiplier"),
    (["set max_parallel_workers_per_gather = 64"], "max_parallel_workers_per_gather"),
    (["set default_transaction_read_only = off"], "default_transaction_read_only"),
    (["select set_config('default_transaction_read_only', 'off', false)"], "default_transaction_read_only"),
    (["set session characteristics as transaction read write"], "default_transaction_read_only"),
    (["begin read write"], "transaction_read_only"),
    (["start transaction read write"], "transaction_read_only"),
    (["begin", "set transaction read write"], "transaction_read_only"),
    (["begin", "set transaction_read_only = off"], "transaction_read_only"),
    (["begin", "reset transaction_read_only"], "transaction_read_only"),
    # set_config(…, NULL) resets without a check; the next query of the transaction is refused
    (["begin", "select set_config('transaction_read_only', null, true)", "select 1"], "transaction_read_only"),
    (["set role tp_analyst", "set work_mem = '4GB'"], "work_mem"),
    (["select tp_escape.big_work_mem()"], "work_mem"),  # a function's SET clause
]


@pytest.fixture
def escape_functions(su: psycopg.Connection[dict[str, Any]]) -> Iterator[str]:
    """Functions an analyst could not create but may be handed: a SET clause, and a plpgsql
    loop that catches every cancel (what the DO block of the report did)."""
    schema = "tp_escape"
    su.execute(sql.SQL("create schema {}").format(sql.Identifier(schema)))
    su.execute("create function tp_escape.big_work_mem() returns text language sql set work_mem = '4GB'"
               " as $$ select current_setting('work_mem') $$")
    su.execute("""
        create function tp_escape.swallow_cancels(seconds int) returns int language plpgsql as $$
        declare
            caught int := 0;
            stop timestamptz := clock_timestamp() + make_interval(secs => seconds);
        begin
            while clock_timestamp() < stop loop
                begin
                    perform pg_sleep(0.2);
                exception when query_canceled then
                    caught := caught + 1;
                end;
            end loop;
            return caught;
        end $$""")
    su.execute("grant usage on schema tp_escape to tp_analyst")
    su.execute("grant execute on all functions in schema tp_escape to tp_analyst")
    yield schema
    su.execute("drop schema tp_escape cascade")


def test_pinned_settings_cannot_be_raised_by_any_path(make_analyst: Callable[..., Analyst], escape_functions: str,
                                                      su: psycopg.Connection[dict[str, Any]]) -> None:
    a = make_analyst()
    with connect(a.url) as conn:
        before = conn.execute("select current_setting('work_mem') as w, current_setting('hash_mem_multiplier') as h,"
                              " current_setting('default_transaction_read_only') as r").fetchone()
        escaped = []
        for statements, setting in PINNED_ESCAPES:
            try:
                for statement in statements:
                    conn.execute(statement)
                escaped.append(statements)
            except errors.InsufficientPrivilege as e:
                assert setting in str(e) and "analysts" in str(e), (statements, str(e))
            finally:
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.execute("rollback")
                conn.execute("reset role")
        assert escaped == []
        assert conn.execute("select current_setting('work_mem') as w, current_setting('hash_mem_multiplier') as h,"
                            " current_setting('default_transaction_read_only') as r").fetchone() == before
        # Lowering stays allowed, and RESET goes back to the role's value.
        conn.execute("set work_mem = '1MB'")
        conn.execute("set hash_mem_multiplier = 1")
        assert conn.execute("show work_mem").fetchone() == {"work_mem": "1MB"}
        conn.execute("reset all")
        assert conn.execute("show work_mem").fetchone() == {"work_mem": before["w"]}
        # Its own login defaults are not its to change (the watchdog reads them).
        for statement in ("alter role current_user set work_mem = '4GB'",
                          "alter role current_user set statement_timeout = 0",
                          "alter role current_user reset all",
                          "alter role current_user password 'in-clear-text'",
                          sql.SQL("alter role {} in database {} set default_transaction_read_only = off")
                          .format(sql.Identifier(a.name), sql.Identifier(conn.info.dbname))):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(statement)
    role = su.execute("select setconfig from pg_db_role_setting where setrole = %s::regrole", [a.name]).fetchone()
    assert role is not None and "work_mem=" + before["w"] in role["setconfig"]
    # Nor can the connection's startup options raise them.
    for option in ("work_mem=4GB", "default_transaction_read_only=off", "statement_timeout=0"):
        with pytest.raises(psycopg.OperationalError, match="cannot be set in an analyst's connection options"):
            connect(a.url, options=f"-c {option}")


def test_analysts_run_no_procedural_code(make_analyst: Callable[..., Analyst]) -> None:
    a = make_analyst()
    with connect(a.url) as conn:
        # The reproduction: a DO loop catching every cancel outlived its statement_timeout
        # (bounded here to 40 s, past the role's 30 s).
        with pytest.raises(errors.InsufficientPrivilege, match="language plpgsql"):
            conn.execute("do $$ declare stop timestamptz := clock_timestamp() + interval '40 s';"
                         " begin while clock_timestamp() < stop loop begin perform pg_sleep(0.5);"
                         " exception when query_canceled then null; end; end loop; end $$")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("do $$ begin perform 1; end $$")
        langs = conn.execute("select lanname from pg_language where has_language_privilege(lanname, 'usage')"
                             " and lanname not in ('internal', 'c')").fetchall()
        assert langs == [{"lanname": "sql"}]


def test_the_watchdog_terminates_a_query_that_swallows_its_cancels(
        make_analyst: Callable[..., Analyst], escape_functions: str) -> None:
    """Cancelled and still running past its limit plus TP_EXT_ANALYST_CANCEL_GRACE_S (10 s):
    the watchdog ends the backend, which no exception handler can catch."""
    a = make_analyst(env={"TP_STATEMENT_TIMEOUT_ANALYST": "1s"})
    with connect(a.url) as conn:
        with pytest.raises(psycopg.OperationalError, match=r"terminat|closed|lost"):
            caught = conn.execute("select tp_escape.swallow_cancels(60) as caught").fetchone()
            pytest.fail(f"ran to its end, swallowing {caught} cancels")
        assert conn.closed or conn.broken


LARGE_OBJECT_WRITES = [
    "select lo_from_bytea(0, 'x')", "select lo_create(0)", "select lo_creat(-1)",
    "select lo_import('/etc/hostname')", "select lo_open(1, 131072)", "select lowrite(0, 'x')",
    "select lo_put(1, 0, 'x')", "select lo_truncate(0, 0)", "select lo_unlink(1)",
]


def test_large_objects_wal_messages_xids_and_notifications_are_refused(
        make_analyst: Callable[..., Analyst], su: psycopg.Connection[dict[str, Any]]) -> None:
    a = make_analyst()
    before = su.execute("select count(*) as n from pg_largeobject_metadata").fetchone()
    with connect(a.url) as conn:
        statements = [*LARGE_OBJECT_WRITES, "select pg_logical_emit_message(true, 'x', 'y')",
                      "select txid_current()", "select pg_current_xact_id()",
                      "select pg_notify('pgrst', 'reload schema')", "notify pgrst, 'reload config'", "listen pgrst"]
        passed = []
        for statement in statements:
            try:
                conn.execute(statement)
                passed.append(statement)
            except errors.InsufficientPrivilege:
                pass
        assert passed == []
    assert su.execute("select count(*) as n from pg_largeobject_metadata").fetchone() == before


SWEEP_LOCK = 7_340_002  # ext.maintenance.SWEEP_LOCK
ADVISORY_CALLS = [
    f"select pg_advisory_lock({SWEEP_LOCK})", f"select pg_try_advisory_lock({SWEEP_LOCK})",
    f"select pg_advisory_lock_shared({SWEEP_LOCK})", f"select pg_try_advisory_lock_shared({SWEEP_LOCK})",
    "select pg_advisory_lock(734, 2)", "select pg_try_advisory_lock(734, 2)",
    "begin; select pg_advisory_xact_lock(7340001)", "begin; select pg_try_advisory_xact_lock(7340001)",
    "begin; select pg_advisory_xact_lock_shared(7340001)",
]


def test_the_services_advisory_locks_cannot_be_taken(stack: Stack, make_analyst: Callable[..., Analyst],
                                                     secrets: Any) -> None:
    a = make_analyst()
    with connect(a.url) as conn:
        taken = []
        for call in ADVISORY_CALLS:
            try:
                for statement in call.split("; "):
                    conn.execute(statement)
                taken.append(call)
            except errors.InsufficientPrivilege:
                pass
            finally:
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.execute("rollback")
        assert taken == []
    # ext's sweep (as authenticator) still takes its lock.
    with psycopg.connect(stack.authenticator_url(secrets), autocommit=True) as ext:
        assert ext.execute("select pg_try_advisory_lock(%s)", [SWEEP_LOCK]).fetchone() == (True,)
        assert ext.execute("select pg_advisory_unlock(%s)", [SWEEP_LOCK]).fetchone() == (True,)


def test_pgaudit_logs_every_analyst_statement(stack: Stack, make_analyst: Callable[..., Analyst]) -> None:
    a = make_analyst()
    marker = f"audit-{uuid.uuid4().hex}"
    with connect(a.url) as conn:
        conn.execute(sql.SQL("select {} as m").format(sql.Literal(marker))).fetchone()
        assert conn.execute("show pgaudit.log").fetchone() == {"pgaudit.log": stack.s.analyst_audit_log}
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("set pgaudit.log = 'none'")
    log = stack.logfile("postgres")
    for _ in range(50):  # the server writes its log asynchronously
        lines = [line for line in log.read_text(errors="replace").splitlines() if marker in line]
        if any("AUDIT: SESSION" in line for line in lines):
            break
        time.sleep(0.1)
    assert any("AUDIT: SESSION" in line and f"user={a.name}" in line for line in lines), lines


# --- the service's own connections (issue 13, item 11) -----------------------------------------------------

def test_authenticator_and_ext_caller_transactions_are_bounded(stack: Stack, secrets: Any,
                                                               su: psycopg.Connection[dict[str, Any]]) -> None:
    expected = normalized(su, "statement_timeout", stack.s.statement_timeout_authenticator)
    assert expected != "0"
    with psycopg.connect(stack.authenticator_url(secrets)) as conn:
        assert conn.execute("show statement_timeout").fetchone() == (expected,)
        # A bare role switch keeps authenticator's bound ...
        conn.execute("select set_config('role', 'tp_user', true)")
        assert conn.execute("select current_user, current_setting('statement_timeout')").fetchone() == (
            "tp_user", expected)


def test_ext_queries_as_the_caller_get_the_callers_statement_timeout(
        stack: Stack, secrets: Any, su: psycopg.Connection[dict[str, Any]], make_user: Callable[..., User]) -> None:
    """... so ext.db.become_caller applies the caller role's own statement_timeout, as
    PostgREST does for the requests it runs as that role (tp_user: 8 s, not 60 s)."""
    from ext.db import become_caller
    expected = normalized(su, "statement_timeout", stack.s.statement_timeout_user)
    assert expected != normalized(su, "statement_timeout", stack.s.statement_timeout_authenticator)
    payload = make_user().token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["role"] == "tp_user"

    async def caller_timeout() -> tuple[Any, ...] | None:
        async with await psycopg.AsyncConnection.connect(stack.authenticator_url(secrets)) as conn, \
                conn.transaction():
            await become_caller(conn, claims)
            cur = await conn.execute("select current_user, current_setting('statement_timeout')")
            return await cur.fetchone()

    assert asyncio.run(caller_timeout()) == ("tp_user", expected)


def test_the_slow_log_carries_no_bind_parameters(stack: Stack, secrets: Any,
                                                 su: psycopg.Connection[dict[str, Any]]) -> None:
    """PostgREST sends request.headers (the bearer token) as a bind parameter; a statement
    slower than log_min_duration_statement must not write it to the server log."""
    assert su.execute("show log_parameter_max_length").fetchone() == {"log_parameter_max_length": "0"}
    marker = f"Bearer tp-secret-{uuid.uuid4().hex}"
    with psycopg.connect(stack.authenticator_url(secrets), autocommit=True) as conn:
        conn.execute("select set_config('request.headers', %s, false), pg_sleep(1.2)",
                     [json.dumps({"authorization": marker})])
    log = stack.logfile("postgres")
    for _ in range(50):
        text = log.read_text(errors="replace")
        if "pg_sleep(1.2)" in text:
            break
        time.sleep(0.1)
    assert "pg_sleep(1.2)" in text  # the slow statement was logged ...
    assert marker not in text  # ... without its parameters


# --- planner estimates and key prefixes -----------------------------------------------------------------------

def test_planner_estimates_do_not_reveal_other_tenants_table_sizes(
        world: World, make_user: Callable[..., User], su: psycopg.Connection[dict[str, Any]]) -> None:
    su.execute("analyze app.suites, app.examples, app.sessions")
    newcomer = make_user()
    for path in ("/suites", "/examples", "/sessions"):
        exact = newcomer.client.get(path, params={"limit": 1}, headers={"Prefer": "count=exact"})
        assert exact.status_code in (200, 206), exact.text
        total = exact.headers["content-range"].rsplit("/", 1)[1]
        for prefer in ("count=planned", "count=estimated", "handling=lenient, count=planned"):
            r = newcomer.client.get(path, params={"limit": 1}, headers={"Prefer": prefer})
            assert r.status_code in (200, 206), r.text
            assert r.headers["content-range"].rsplit("/", 1)[1] == total, (path, prefer, r.headers["content-range"])


def test_analysts_see_no_key_prefixes(world: World, make_analyst: Callable[..., Analyst]) -> None:
    a = make_analyst()
    with connect(a.url) as conn:
        assert conn.execute("select count(*) as n from analytics.api_keys where id = %s",
                            [world.key_id]).fetchone() == {"n": 1}
        cols = {r["column_name"] for r in conn.execute(
            "select column_name from information_schema.columns where table_schema = 'analytics'"
            " and table_name = 'api_keys'").fetchall()}
        assert "prefix" not in cols and "key_hash" not in cols
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("select prefix from app.api_keys")


def test_migrate_reapplies_the_guards_to_existing_analysts(stack: Stack, stack_env: dict[str, str],
                                                           make_analyst: Callable[..., Analyst],
                                                           su: psycopg.Connection[dict[str, Any]]) -> None:
    a = make_analyst()
    ident = sql.Identifier(a.name)
    su.execute(sql.SQL("alter role {} set statement_timeout = '1h'").format(ident))
    su.execute(sql.SQL("alter role {} reset work_mem").format(ident))
    su.execute(sql.SQL("alter role {} connection limit 50").format(ident))
    run_cli(stack_env, "migrate")
    role = su.execute("select r.rolconnlimit, s.setconfig from pg_roles r left join pg_db_role_setting s"
                      " on s.setrole = r.oid and s.setdatabase = 0 where r.rolname = %s", [a.name]).fetchone()
    assert role is not None
    assert role["rolconnlimit"] == stack.s.analyst_connection_limit
    assert f"statement_timeout={stack.s.statement_timeout_analyst}" in role["setconfig"]
    assert f"work_mem={stack.s.analyst_work_mem}" in role["setconfig"]
    with connect(a.url) as conn:
        assert conn.execute("show statement_timeout").fetchone() == {"statement_timeout": "30s"}


def test_names_are_validated_and_other_roles_are_never_touched(
        stack_env: dict[str, str], make_analyst: Callable[..., Analyst], world: World,
        su: psycopg.Connection[dict[str, Any]]) -> None:
    def roles() -> set[str]:
        return {r["rolname"] for r in su.execute("select rolname from pg_roles").fetchall()}

    before = roles()
    for bad in ("Alice", "1abc", "a-b", "a;drop role postgres", "tp_alice", "pg_alice", "x" * 64, ""):
        r = run_cli(stack_env, "analyst", "create", bad, check=False)
        assert r.returncode != 0 and "analyst name" in r.stderr, (bad, r.stderr)
    for existing in ("authenticator", "postgres", "anon"):
        r = run_cli(stack_env, "analyst", "create", existing, check=False)
        assert r.returncode == 1 and "not an analyst" in r.stderr, (existing, r.stderr)
        r = run_cli(stack_env, "analyst", "revoke", existing, check=False)
        assert r.returncode == 1 and "not an analyst" in r.stderr, (existing, r.stderr)
    name = "a_" + uuid.uuid4().hex[:12]
    r = run_cli(stack_env, "analyst", "create", name, "--suites", str(uuid.uuid4()), check=False)
    assert r.returncode == 1 and "no such suite" in r.stderr
    r = run_cli(stack_env, "analyst", "create", name, "--suites", f"{world.s1},not-a-uuid", check=False)
    assert r.returncode == 1 and "not a suite id" in r.stderr
    assert roles() == before  # nothing created, nothing dropped
    assert su.execute("select count(*) as n from app.analysts where role_name = %s", [name]).fetchone() == {"n": 0}

    a = make_analyst()
    r = run_cli(stack_env, "analyst", "create", a.name, check=False)
    assert r.returncode == 1 and "already exists" in r.stderr


# --- what analysts read ------------------------------------------------------------------------------------

def test_an_unrestricted_analyst_reads_every_row_through_analytics(
        world: World, make_analyst: Callable[..., Analyst], su: psycopg.Connection[dict[str, Any]]) -> None:
    a = make_analyst()
    with connect(a.url) as conn:
        for view, (table, _) in TABLE_VIEWS.items():
            everything = ids(su, f"select id from app.{table}")
            assert everything, table
            assert ids(conn, f"select id from analytics.{view}") == everything, view
            assert ids(conn, f"select id from app.{table}") == everything, table  # same RLS on the tables
        assert ids(conn, "select id from analytics.users") == ids(su, "select id from app.users")
        assert ids(conn, "select id from analytics.api_keys") == ids(su, "select id from app.api_keys")
        assert world.key_id in ids(conn, "select id from analytics.api_keys")
        assert conn.execute("select all_suites, suites from analytics.my_access").fetchall() == [
            {"all_suites": True, "suites": None}]
        per_day = conn.execute("select suite_id, model, sum(examples) as n from analytics.examples_per_day"
                               " where suite_id = any(%s) group by 1, 2",
                               [[world.s1, world.s2, world.s3]]).fetchall()
        assert {(str(r["suite_id"]), r["model"], r["n"]) for r in per_day} == {
            (s, m, 1) for s in (world.s1, world.s2, world.s3) for m in world.models}
        untagged = conn.execute("select sum(sessions) as n from analytics.sessions_per_day where suite_id is null"
                                ).fetchone()
        assert untagged is not None and untagged["n"] >= 2


def test_a_suite_limited_analyst_sees_exactly_its_suites(
        world: World, make_analyst: Callable[..., Analyst], su: psycopg.Connection[dict[str, Any]]) -> None:
    mine = [world.s1, world.s2]
    a = make_analyst(suites=mine)
    assert "suites " in a.stdout and world.s1 in a.stdout
    with connect(a.url) as conn:
        for view, (table, column) in TABLE_VIEWS.items():
            if column is None:
                expected = ids(su, f"select id from app.{table}")
            else:
                expected = ids(su, f"select id from app.{table} where {column} = any(%s::uuid[])", [mine])
            assert expected, view
            assert ids(conn, f"select id from analytics.{view}") == expected, view
            assert ids(conn, f"select id from app.{table}") == expected, table
        members = "select user_id from app.suite_members where suite_id = any(%s::uuid[])"
        people = ids(su, f"select id from app.users where id in ({members})", [mine])
        assert ids(conn, "select id from analytics.users") == people
        assert {world.owner.id, world.member.id} <= ids(conn, "select id from analytics.users")
        assert world.stranger.id not in ids(conn, "select id from analytics.users")
        assert ids(conn, "select id from analytics.api_keys") == ids(
            su, f"select id from app.api_keys where user_id in ({members})", [mine])
        # The convenience views aggregate only what the policies let through.
        for view in ("examples_per_day", "sessions_per_day", "suite_overview"):
            seen = {str(r["suite_id"]) for r in conn.execute(f"select suite_id from analytics.{view}").fetchall()}
            assert seen == set(mine), view
        details = conn.execute("select distinct suite_id from analytics.example_details").fetchall()
        assert {str(r["suite_id"]) for r in details} == set(mine)
        models = conn.execute("select model, examples, suites from analytics.models where model = any(%s)",
                              [list(world.models)]).fetchall()
        assert {(r["model"], r["examples"], r["suites"]) for r in models} == {(m, 2, 2) for m in world.models}
        overview = conn.execute("select * from analytics.suite_overview where suite_id = %s", [world.s1]).fetchone()
        assert overview is not None
        assert (overview["members"], overview["actions"], overview["bindings"], overview["sessions"],
                overview["examples"]) == (2, 1, 1, 2, 2)
        access = conn.execute("select all_suites, suites from analytics.my_access").fetchall()
        assert [(r["all_suites"], sorted(map(str, r["suites"]))) for r in access] == [(False, sorted(mine))]


def test_claims_and_set_role_do_not_widen_a_suite_limited_analyst(
        world: World, make_analyst: Callable[..., Analyst], su: psycopg.Connection[dict[str, Any]]) -> None:
    a = make_analyst(suites=[world.s1])
    other = make_analyst(suites=[world.s3])
    everything = ids(su, "select id from app.suites")
    with connect(a.url) as conn:
        assert ids(conn, "select id from analytics.suites") == {world.s1}
        # Claims of the stranger (owner of s3), then of an admin: analyst policies never read them.
        for claims in ({"sub": world.stranger.id, "role": "tp_user", "aud": "tracepipe", "iss": "tracepipe"},
                       {"sub": world.owner.id, "role": "tp_admin"}):
            conn.execute("select set_config('request.jwt.claims', %s, false)", [json.dumps(claims)])
            assert ids(conn, "select id from analytics.suites") == {world.s1}
            assert ids(conn, "select suite_id as id from analytics.examples") == {world.s1}
            assert ids(conn, "select id from app.suites") == {world.s1}
        conn.execute("reset request.jwt.claims")
        # SET ROLE to anything else is refused, another analyst included.
        for target in (*OTHER_ROLES, other.name):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(sql.SQL("set role {}").format(sql.Identifier(target)))
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("set session authorization postgres")
        # On PostgreSQL 15 a member may always SET ROLE to its group; the bare group has no
        # entry in app.analysts, so it reads no suite at all (fail closed), only the catalog.
        conn.execute("set role tp_analyst")
        assert ids(conn, "select id from analytics.suites") == set()
        assert ids(conn, "select id from analytics.examples") == set()
        assert ids(conn, "select id from analytics.users") == set()
        assert ids(conn, "select id from analytics.mcp_servers") == ids(su, "select id from app.mcp_servers")
        conn.execute("reset role")
        assert ids(conn, "select id from analytics.suites") == {world.s1} != everything


# --- what analysts cannot do ---------------------------------------------------------------------------------

def _catalog(su: psycopg.Connection[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every column of every table, view, materialized view and foreign table in SCHEMAS."""
    return su.execute("""
        select n.nspname as schema, c.relname as rel, c.relkind::text as kind, a.attname as col
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
        where n.nspname = any(%s) and c.relkind in ('r', 'p', 'v', 'm', 'f')
        order by 1, 2, a.attnum
    """, [list(SCHEMAS)]).fetchall()


def test_every_secret_column_is_refused_and_no_readable_relation_exposes_one(
        world: World, make_analyst: Callable[..., Analyst], su: psycopg.Connection[dict[str, Any]]) -> None:
    a = make_analyst()
    catalog = _catalog(su)
    assert {("app", "refresh_tokens"), ("app", "users"), ("app", "api_keys")} <= {(c["schema"], c["rel"])
                                                                                   for c in catalog}
    readable: dict[tuple[str, str], set[str]] = {}
    refused: dict[tuple[str, str, str], str] = {}
    with connect(a.url) as conn:
        for c in catalog:
            query = sql.SQL("select {} from {}.{} limit 1").format(
                sql.Identifier(c["col"]), sql.Identifier(c["schema"]), sql.Identifier(c["rel"]))
            try:
                conn.execute(query).fetchall()
                readable.setdefault((c["schema"], c["rel"]), set()).add(c["col"])
            except errors.InsufficientPrivilege as e:
                refused[(c["schema"], c["rel"], c["col"])] = str(e)

        secret = SECRET_COLUMNS | {(c["schema"], c["rel"], c["col"]) for c in catalog
                                   if (c["schema"], c["rel"]) in SECRET_TABLES}
        assert len(secret) >= 10
        assert {s: "permission denied" in refused.get(s, "") for s in secret} == dict.fromkeys(secret, True)
        # Nothing in api, auth or public; every analytics column; exactly the non-secret app columns.
        assert {k for k in readable if k[0] in ("api", "auth", "public")} == set()
        analytics = {(c["schema"], c["rel"]) for c in catalog if c["schema"] == "analytics"}
        assert len(analytics) >= 16
        for rel in analytics:
            assert readable.get(rel) == {c["col"] for c in catalog if (c["schema"], c["rel"]) == rel}, rel
        app = {k[1]: cols for k, cols in readable.items() if k[0] == "app"}
        assert app == READABLE_APP_COLUMNS  # any other app table (operational ones) stays unreadable
        assert {col for cols in readable.values() for col in cols} & SECRET_NAMES == set()

        # The values: no readable relation carries a password hash, key hash or refresh-token hash.
        planted = [r["v"] for r in su.execute(
            "select password_hash as v from app.users where id = any(%s::uuid[])"
            " union all select encode(key_hash, 'hex') from app.api_keys where id = %s"
            " union all select encode(token_hash, 'hex') from app.refresh_tokens where user_id = any(%s::uuid[])",
            [[world.owner.id, world.stranger.id], world.key_id, [world.owner.id, world.stranger.id]]).fetchall()]
        assert len(planted) >= 5 and all(planted)
        for (schema, rel), cols in readable.items():
            text = sql.SQL("select coalesce(string_agg(concat_ws('|', {}), '\n'), '') as t from {}.{}").format(
                sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(col)) for col in sorted(cols)),
                sql.Identifier(schema), sql.Identifier(rel))
            row = conn.execute(text).fetchone()
            assert row is not None
            assert [p for p in planted if p in row["t"]] == [], (schema, rel)
        # ext's identity functions hand out hashes: not to analysts.
        for call in ("select * from auth.login_lookup('x@example.test')", "select * from auth.key_lookup('tp_x')",
                     "select auth.claims()", "select api.me()"):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(call)
    executable = su.execute("""
        select p.oid::regprocedure::text as f from pg_proc p join pg_namespace n on n.oid = p.pronamespace
        where n.nspname in ('app', 'api', 'auth', 'analytics') and has_function_privilege(%s, p.oid, 'execute')
    """, [a.name]).fetchall()
    assert sorted(r["f"] for r in executable) == ["auth.analyst_sees_all()", "auth.analyst_suites()"]


def _write_statements(su: psycopg.Connection[dict[str, Any]]) -> list[tuple[str, bool, sql.Composable]]:
    """(label, whether only a privilege can refuse it, statement) for every app table and
    analytics view. A view that is not automatically updatable (aggregates, joins) refuses
    writes before privileges are even checked."""
    relations = su.execute("""
        select n.nspname as schema, c.relname as rel, c.relkind::text as kind,
               pg_relation_is_updatable(c.oid, false) as updatable,
               (select a.attname from pg_attribute a where a.attrelid = c.oid and a.attnum > 0
                and not a.attisdropped order by a.attnum limit 1) as col
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where (n.nspname = 'app' and c.relkind in ('r', 'p')) or (n.nspname = 'analytics' and c.relkind = 'v')
        order by 1, 2
    """).fetchall()
    statements: list[tuple[str, bool, sql.Composable]] = []
    for r in relations:
        rel = sql.SQL("{}.{}").format(sql.Identifier(r["schema"]), sql.Identifier(r["rel"]))
        col = sql.Identifier(r["col"])
        name = f"{r['schema']}.{r['rel']}"
        table = r["kind"] != "v"
        bits = {"insert": 8, "update": 4, "delete": 16}
        statements += [
            (f"insert {name}", table or bool(r["updatable"] & bits["insert"]),
             sql.SQL("insert into {} default values").format(rel)),
            (f"update {name}", table or bool(r["updatable"] & bits["update"]),
             sql.SQL("update {} set {} = {}").format(rel, col, col)),
            (f"delete {name}", table or bool(r["updatable"] & bits["delete"]), sql.SQL("delete from {}").format(rel)),
        ]
        if table:
            statements += [
                (f"lock rows {name}", True, sql.SQL("select 1 from {} for update").format(rel)),
                (f"truncate {name}", True, sql.SQL("truncate {}").format(rel)),
            ]
    return statements


def test_every_write_is_refused(world: World, make_analyst: Callable[..., Analyst],
                                su: psycopg.Connection[dict[str, Any]]) -> None:
    a = make_analyst()
    statements = _write_statements(su)
    assert len(statements) >= 5 * 12 + 3 * 16
    assert sum(1 for _, by_privilege, _ in statements if by_privilege) >= 5 * 12 + 3 * 10
    counts = {t: su.execute(sql.SQL("select count(*) as n from app.{}").format(sql.Identifier(t))).fetchone()
              for t in READABLE_APP_COLUMNS}
    with connect(a.url) as conn:
        # Sessions are read-only, and stay so (tp_guard) ...
        assert conn.execute("show transaction_read_only").fetchone() == {"transaction_read_only": "on"}
        with pytest.raises(errors.ReadOnlySqlTransaction):
            conn.execute("create table analytics.t_read_only (x int)")
        with pytest.raises(errors.InsufficientPrivilege, match="pinned on for analysts"):
            conn.execute("set session characteristics as transaction read write")
    # ... and privileges refuse every write even in a writable transaction: the superuser
    # takes the analyst's role (only an analyst's own session is held read-only).
    with psycopg.connect(su.info.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("set role {}").format(sql.Identifier(a.name)))
        assert conn.execute("show transaction_read_only").fetchone() == ("off",)
        wrong = []
        for label, by_privilege, statement in statements:
            try:
                conn.execute(statement)
                wrong.append((label, "succeeded"))
            except errors.InsufficientPrivilege:
                pass
            except (errors.ObjectNotInPrerequisiteState, errors.FeatureNotSupported) as e:
                if by_privilege:
                    wrong.append((label, str(e)))
        assert wrong == []
    for t, before in counts.items():
        assert su.execute(sql.SQL("select count(*) as n from app.{}").format(sql.Identifier(t))).fetchone() == before


def test_ddl_and_temporary_objects_are_refused(stack: Stack, make_analyst: Callable[..., Analyst]) -> None:
    a = make_analyst()
    # As the analyst's role in a writable transaction (the superuser's SET ROLE): privileges
    # alone refuse all of it, read-only or not.
    with psycopg.connect(stack.superuser_conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("set role {}").format(sql.Identifier(a.name)))
        statements = [f"create table {schema}.t_{uuid.uuid4().hex[:6]} (x int)"
                      for schema in (*SCHEMAS, "extensions")]
        statements += [
            "create temp table t (x int)",
            "create temporary view v as select 1",
            "create schema s_analyst",
            "create view analytics.v as select 1",
            "create function public.f() returns int language sql as 'select 1'",
            "create index on app.suites (name)",
            "comment on table app.suites is 'x'",
            "create role someone",
            "create database someplace",
        ]
        survived = []
        for statement in statements:
            try:
                conn.execute(statement)
                survived.append(statement)
            except errors.InsufficientPrivilege:
                pass
        assert survived == []
        # Without the grant option a GRANT only warns; it must not pass anything on.
        conn.execute("grant select on analytics.suites to public")
    with psycopg.connect(stack.superuser_conninfo()) as su:
        row = su.execute("select has_table_privilege('anon', 'analytics.suites', 'select'),"
                         " has_table_privilege('anon', 'app.suites', 'select')").fetchone()
        assert row == (False, False)
    # No other database of the cluster lets it in (where it could make temp tables).
    for other in ("postgres", "template1"):
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            connect(a.url.rsplit("/", 1)[0] + f"/{other}")


def test_the_connection_limit_holds(stack: Stack, make_analyst: Callable[..., Analyst]) -> None:
    a = make_analyst()
    limit = stack.s.analyst_connection_limit
    assert 0 < limit < 20
    conns = [connect(a.url) for _ in range(limit)]
    try:
        with pytest.raises(psycopg.OperationalError, match="too many connections for role"):
            connect(a.url)
        conns.pop().close()
        for _ in range(50):  # the server notices the closed backend a moment later
            try:
                conns.append(connect(a.url))
                break
            except psycopg.OperationalError:
                time.sleep(0.1)
        assert len(conns) == limit
    finally:
        for c in conns:
            c.close()


# --- revocation and listing -------------------------------------------------------------------------------

def test_revocation_ends_the_login(stack_env: dict[str, str], make_analyst: Callable[..., Analyst], world: World,
                                   su: psycopg.Connection[dict[str, Any]]) -> None:
    a = make_analyst(suites=[world.s1])
    listed = run_cli(stack_env, "analyst", "list").stdout
    line = next(ln for ln in listed.splitlines() if ln.startswith(a.name + " "))
    assert world.s1 in line
    conn = connect(a.url)
    assert ids(conn, "select id from analytics.suites") == {world.s1}
    r = run_cli(stack_env, "analyst", "revoke", a.name)
    assert "1 open session(s) ended" in r.stdout
    with pytest.raises(psycopg.OperationalError):
        conn.execute("select 1")
    conn.close()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(a.url)
    assert su.execute("select count(*) as n from pg_roles where rolname = %s", [a.name]).fetchone() == {"n": 0}
    assert su.execute("select count(*) as n from app.analysts where role_name = %s", [a.name]).fetchone() == {"n": 0}
    assert a.name not in run_cli(stack_env, "analyst", "list").stdout
    again = run_cli(stack_env, "analyst", "revoke", a.name, check=False)
    assert again.returncode == 1 and "no analyst named" in again.stderr


def test_list_shows_every_analyst_and_its_scope(stack_env: dict[str, str], make_analyst: Callable[..., Analyst],
                                                world: World) -> None:
    everything, limited = make_analyst(), make_analyst(suites=[world.s2, world.s3])
    out = run_cli(stack_env, "analyst", "list").stdout.splitlines()
    assert out[0].split()[:2] == ["NAME", "SUITES"]
    rows = {ln.split()[0]: ln.split() for ln in out[1:]}
    assert rows[everything.name][1] == "all"
    assert set(rows[limited.name][1].split(",")) == {world.s2, world.s3}
    assert all(URL_RE.match(ln) is None for ln in out)  # never a password


# --- the README's queries -----------------------------------------------------------------------------------

def readme_queries() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## SQL access for analysts", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, flags=re.S)


def test_the_readme_queries_run_as_an_analyst(world: World, make_analyst: Callable[..., Analyst]) -> None:
    queries = readme_queries()
    assert len(queries) >= 3
    a = make_analyst(suites=[world.s1, world.s3])
    with connect(a.url) as conn:
        for q in queries:
            rows = conn.execute(q).fetchall()
            assert rows, q
    assert "psql 'postgresql://" in (REPO_ROOT / "README.md").read_text()
