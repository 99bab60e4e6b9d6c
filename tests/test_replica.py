"""The read replica (issue 17, tracepipe/replica.py): a real PostgreSQL hot standby fed by
streaming replication from the stack's primary, on a throwaway stack of this module's own
(`make up REPLICA=1` is TP_REPLICA=1). Analysts are created through the CLI and connect as
their real login role, like psql would, to the URL it prints."""

from __future__ import annotations

import json
import re
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import errors

from tests.conftest import run_cli
from tracepipe import replica
from tracepipe.ports import port_is_free
from tracepipe.settings import REPO_ROOT, StackSettings
from tracepipe.stack import Stack, throwaway_stack

MAX_LAG_S = 1.0


@pytest.fixture(scope="module")
def rstack() -> Iterator[Stack]:
    with throwaway_stack("tp-test-replica-", replica=True, replica_max_lag_s=MAX_LAG_S) as st:
        yield st


@pytest.fixture(scope="module")
def env(rstack: Stack) -> dict[str, str]:
    return rstack.cli_env()


def primary(st: Stack) -> psycopg.Connection[Any]:
    return psycopg.connect(st.superuser_conninfo(), autocommit=True)


def standby(st: Stack) -> psycopg.Connection[Any]:
    return psycopg.connect(replica.superuser_conninfo(st), autocommit=True)


def caught_up(st: Stack) -> None:
    with primary(st) as conn:
        assert replica.wait_replayed(st, replica.current_lsn(conn)), replica.describe_lag(st)


def make_analyst(env: dict[str, str], **extra: str) -> tuple[str, str, str]:
    name = "a_" + uuid.uuid4().hex[:12]
    out = run_cli({**env, **extra}, "analyst", "create", name).stdout
    return name, out.strip().splitlines()[-1], out


def signup(st: Stack) -> httpx.Client:
    email = f"r-{uuid.uuid4().hex[:10]}@example.test"
    r = httpx.post(f"{st.s.proxy_url}/auth/signup", timeout=30,
                   json={"email": email, "password": "correct horse battery staple", "display_name": "R"})
    assert r.status_code == 201, r.text
    return httpx.Client(base_url=st.s.proxy_url, timeout=30,
                        headers={"Authorization": f"Bearer {r.json()['access_token']}"})


# --- the replica itself -----------------------------------------------------------------------------

def test_the_replica_is_a_streaming_hot_standby_with_the_primarys_guards(rstack: Stack) -> None:
    with standby(rstack) as conn:
        assert conn.execute("select pg_is_in_recovery()").fetchone() == (True,)
        settings = dict(conn.execute(
            "select name, setting from pg_settings where name in ('hot_standby', 'hot_standby_feedback',"
            " 'shared_preload_libraries', 'port', 'data_directory')").fetchall())
    assert settings["hot_standby"] == "on" and settings["hot_standby_feedback"] == "on"
    assert set(settings["shared_preload_libraries"].split(",")) >= {"pgaudit", "tp_guard"}
    assert int(settings["port"]) == rstack.s.replica_port != rstack.s.pg_port
    assert Path(settings["data_directory"]) == replica.data_dir(rstack)
    assert replica.data_dir(rstack).resolve().is_relative_to(rstack.state.resolve()) or \
        (rstack.state / "daemon").is_symlink()
    info = replica.lag(rstack)
    assert info is not None and info["state"] == "streaming", info


def test_status_shows_the_replica_and_its_replay_lag(env: dict[str, str], rstack: Stack) -> None:
    out = run_cli(env, "status").stdout
    assert re.search(rf"^replica\s+up\s+\d+\s+{rstack.s.replica_port}\s", out, re.MULTILINE), out
    assert re.search(r"^replica: streaming, replay lag \d+ bytes, [0-9.]+s$", out, re.MULTILINE), out


def test_the_replication_role_has_least_privilege_and_a_password_outside_git(rstack: Stack) -> None:
    secret = rstack.state / "replication.json"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    password = json.loads(secret.read_text())["password"]
    assert len(password) >= 24
    assert not (REPO_ROOT / ".git").exists() or password not in (REPO_ROOT / "tracepipe" / "replica.py").read_text()
    with primary(rstack) as conn:
        row = conn.execute("select rolcanlogin, rolreplication, rolsuper, rolcreatedb, rolcreaterole, rolinherit,"
                           " rolbypassrls, rolconnlimit from pg_roles where rolname = %s", [replica.ROLE]).fetchone()
        assert row == (True, True, False, False, False, False, False, 2)
        assert conn.execute("select count(*) from pg_auth_members m join pg_roles r on r.oid = m.member"
                            " where r.rolname = %s", [replica.ROLE]).fetchone() == (0,)
    # It streams WAL and reads nothing: no database lets it in.
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(f"postgresql://{replica.ROLE}:{password}@{rstack.s.host}:{rstack.s.pg_port}/"
                        f"{rstack.s.db_name}", connect_timeout=5)


def test_a_write_through_the_api_reaches_the_replica(rstack: Stack) -> None:
    client = signup(rstack)
    slug = f"s-{uuid.uuid4().hex[:10]}"
    r = client.post("/suites", json={"name": slug, "slug": slug}, headers={"Prefer": "return=representation"})
    assert r.status_code == 201, r.text
    caught_up(rstack)
    with standby(rstack) as conn:
        row = conn.execute("select id::text from app.suites where slug = %s", [slug]).fetchone()
    assert row == (r.json()[0]["id"],)


# --- analysts on the replica --------------------------------------------------------------------------

def test_make_analyst_prints_the_replica_url(env: dict[str, str], rstack: Stack) -> None:
    name, url, out = make_analyst(env)
    assert f"@{rstack.s.host}:{rstack.s.replica_port}/{rstack.s.db_name}" in url, out
    assert "read replica" in out
    with psycopg.connect(url, connect_timeout=10, autocommit=True) as conn:
        assert conn.execute("select current_user, pg_is_in_recovery()").fetchone() == (name, True)


def test_an_analyst_reads_on_the_replica_and_nothing_reaches_the_primary(env: dict[str, str],
                                                                        rstack: Stack) -> None:
    client = signup(rstack)
    slug = f"s-{uuid.uuid4().hex[:10]}"
    assert client.post("/suites", json={"name": slug, "slug": slug}).status_code == 201
    name, url, _ = make_analyst(env)
    caught_up(rstack)
    with psycopg.connect(url, connect_timeout=10, autocommit=True) as conn:
        assert conn.execute("select count(*) from analytics.suites where slug = %s", [slug]).fetchone() == (1,)
        done = threading.Event()

        def busy() -> None:
            with psycopg.connect(url, connect_timeout=10, autocommit=True) as other:
                other.execute("select pg_sleep(2), count(*) from analytics.suites")
            done.set()

        worker = threading.Thread(target=busy)
        worker.start()
        try:
            seen_on_replica = 0
            while not done.is_set():
                with standby(rstack) as su:
                    seen_on_replica = max(seen_on_replica, su.execute(
                        "select count(*) from pg_stat_activity where usename = %s", [name]).fetchone()[0])
                with primary(rstack) as su:
                    assert su.execute("select count(*) from pg_stat_activity where usename = %s",
                                      [name]).fetchone() == (0,)
                if seen_on_replica >= 2:
                    break
        finally:
            worker.join()
        assert seen_on_replica >= 2  # this session and the busy one, both on the replica


def test_an_analyst_cannot_write_on_the_replica(env: dict[str, str], rstack: Stack) -> None:
    _, url, _ = make_analyst(env)
    with psycopg.connect(url, connect_timeout=10, autocommit=True) as conn:
        for statement in ("insert into app.analysts (role_name) values ('x')",
                          "update app.suites set name = 'x'",
                          "create table public.t (i int)"):
            with pytest.raises((errors.ReadOnlySqlTransaction, errors.InsufficientPrivilege)):
                conn.execute(statement)
        with pytest.raises((errors.ActiveSqlTransaction, errors.FeatureNotSupported, errors.InsufficientPrivilege,
                            errors.ReadOnlySqlTransaction)):
            conn.execute("begin read write")
            conn.execute("insert into app.analysts (role_name) values ('x')")


def test_the_analysts_timeout_and_guards_hold_on_the_replica(env: dict[str, str], rstack: Stack) -> None:
    name, url, _ = make_analyst(env, TP_STATEMENT_TIMEOUT_ANALYST="1s")
    with psycopg.connect(url, connect_timeout=10, autocommit=True) as conn:
        assert conn.execute("show statement_timeout").fetchone() == ("1s",)
        with pytest.raises(errors.QueryCanceled, match="statement timeout"):
            conn.execute("select pg_sleep(5)")
        # tp_guard is preloaded here too: raising the limit is refused
        with pytest.raises(errors.InsufficientPrivilege, match="statement_timeout is pinned for analysts"):
            conn.execute("set statement_timeout = '1h'")
        with pytest.raises(errors.InsufficientPrivilege, match="statement_timeout is pinned for analysts"):
            conn.execute("select set_config('statement_timeout', '0', false)")
        assert conn.execute("show statement_timeout").fetchone() == ("1s",)
    # pgaudit is preloaded here too: the replica's log has the analyst's statements
    for _ in range(50):  # the server writes its log asynchronously
        log = replica.log_file(rstack).read_text(errors="replace")
        if re.search(rf"user={name} .*AUDIT: SESSION,.*pg_sleep", log):
            break
        time.sleep(0.1)
    assert re.search(rf"user={name} .*AUDIT: SESSION,.*pg_sleep", log), log[-2000:]


def test_revoking_an_analyst_ends_its_sessions_on_the_replica(env: dict[str, str], rstack: Stack) -> None:
    name, url, _ = make_analyst(env)
    with psycopg.connect(url, connect_timeout=10, autocommit=True) as conn:
        conn.execute("select 1")
        out = run_cli(env, "analyst", "revoke", name).stdout
        assert "1 open session(s) ended" in out, out
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=10)


# --- API reads on the replica ---------------------------------------------------------------------------

def served_by(st: Stack, request_id: str) -> str:
    """The upstream(s) nginx asked for a request (its access log), e.g. "unix:/…/postgrest_ro.sock"."""
    log = st.logs / "nginx-access.log"
    for _ in range(100):  # nginx writes the line as the request ends
        for line in reversed(log.read_text(errors="replace").splitlines()):
            if f'"request_id":"{request_id}"' in line:
                return str(json.loads(line)["upstream"])
        time.sleep(0.05)
    raise AssertionError(f"request {request_id} is not in the access log")


def read(client: httpx.Client, st: Stack, path: str, **headers: str) -> tuple[httpx.Response, list[str]]:
    rid = uuid.uuid4().hex
    r = client.get(path, headers={"X-Request-Id": rid, **headers})
    return r, [u.strip() for u in served_by(st, rid).split(",")]


def replica_api(st: Stack) -> str:
    return f"unix:{st.service_socket(replica.PGRST)}"


def new_suite(client: httpx.Client) -> tuple[httpx.Response, str]:
    slug = f"s-{uuid.uuid4().hex[:10]}"
    r = client.post("/suites", json={"name": slug, "slug": slug}, headers={"Prefer": "return=representation"})
    assert r.status_code == 201, r.text
    return r, r.json()[0]["id"]


def test_reads_go_to_the_replica_and_a_writer_reads_its_own_write_at_once(rstack: Stack) -> None:
    writer = signup(rstack)
    r, suite_id = new_suite(writer)
    cookie = r.headers.get("set-cookie", "")
    assert cookie.startswith("tp_primary=1;") and f"Max-Age={rstack.s.read_your_writes_s}" in cookie, r.headers
    # the writer (its cookie): at once, from the primary
    got, upstreams = read(writer, rstack, f"/suites?id=eq.{suite_id}")
    assert got.status_code == 200 and len(got.json()) == 1, got.text
    assert replica_api(rstack) not in upstreams, upstreams
    # the same caller without the cookie (another device): from the replica, once replayed
    other = httpx.Client(base_url=rstack.s.proxy_url, timeout=30, headers={"Authorization":
                                                                            writer.headers["Authorization"]})
    caught_up(rstack)
    got, upstreams = read(other, rstack, f"/suites?id=eq.{suite_id}")
    assert got.status_code == 200 and len(got.json()) == 1, got.text
    assert upstreams == [replica_api(rstack)], upstreams
    # asking for the primary; and RPCs (GET /users/me is /rpc/me) never go to the replica
    for path, headers in ((f"/suites?id=eq.{suite_id}", {"TP-Read-Primary": "1"}), ("/users/me", {})):
        got, upstreams = read(other, rstack, path, **headers)
        assert got.status_code == 200, got.text
        assert replica_api(rstack) not in upstreams, (path, upstreams)
    assert "set-cookie" not in got.headers  # reads set no cookie


def test_a_stopped_replica_sends_reads_to_the_primary_and_back_it_is_used_again(rstack: Stack) -> None:
    client = signup(rstack)
    _, suite_id = new_suite(client)
    client.cookies.clear()
    caught_up(rstack)
    rstack.stop_component("replica")
    try:
        for _ in range(10):
            got, upstreams = read(client, rstack, f"/suites?id=eq.{suite_id}")
            assert got.status_code == 200 and len(got.json()) == 1, got.text
            assert upstreams[-1] != replica_api(rstack), upstreams
    finally:
        rstack.start_component("replica")
    for _ in range(600):  # PostgREST reconnects with a backoff of its own
        got, upstreams = read(client, rstack, f"/suites?id=eq.{suite_id}")
        assert got.status_code == 200 and len(got.json()) == 1, got.text
        if upstreams == [replica_api(rstack)]:
            break
        time.sleep(0.2)
    assert upstreams == [replica_api(rstack)], upstreams


def test_a_lagging_replica_sends_reads_to_the_primary(rstack: Stack) -> None:
    client = signup(rstack)
    caught_up(rstack)
    with standby(rstack) as su:
        su.execute("select pg_wal_replay_pause()")
        try:
            _, suite_id = new_suite(client)
            client.cookies.clear()
            statuses, fresh = [], None
            for _ in range(600):  # the replica answers until it is MAX_LAG_S behind
                got, upstreams = read(client, rstack, f"/suites?id=eq.{suite_id}")
                statuses.append(got.status_code)
                if got.json():
                    fresh = upstreams
                    break
                time.sleep(0.05)
            assert set(statuses) == {200}, statuses
            assert fresh is not None and fresh[-1] != replica_api(rstack), fresh
            assert replica.lag(rstack)["replay_lag_bytes"] > 0  # type: ignore[index]
        finally:
            su.execute("select pg_wal_replay_resume()")


def test_the_replica_stops_and_starts_with_the_stack(rstack: Stack) -> None:
    pid = rstack.pid_of("replica")
    assert pid is not None
    rstack.down()
    assert rstack.pid_of("replica") is None and port_is_free(rstack.s.replica_port)
    # the next `up` without REPLICA keeps what the last one chose
    remembered = Stack(StackSettings(**{k: v for k, v in rstack.s.model_dump().items() if k != "replica"}))
    assert remembered.s.replica is True
    remembered.up()
    assert remembered.pid_of("replica") is not None
    assert replica.lag(remembered) is not None
