"""PgBouncer in transaction pooling in front of the primary (issue 17, tracepipe/pooler.py):
a throwaway stack of this module's own with TP_SCALE=2 and TP_POOLER=1, a deliberately
small server pool, and everything over HTTP through the proxy, or SQL through PgBouncer as
the real authenticator role."""

from __future__ import annotations

import json
import tempfile
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from tracepipe import credentials, pooler
from tracepipe.settings import REPO_ROOT, StackSettings
from tracepipe.stack import Stack, throwaway_stack

POOL = 4
IDENTITY_POOL = 2
# ext's connections that need a server session of their own go to PostgreSQL directly
DIRECT_APPS = {"tracepipe-ext pipeline listener", "tracepipe-ext tus"}


@pytest.fixture(scope="module")
def pstack() -> Iterator[Stack]:
    with throwaway_stack("tp-test-pooler-", scale=2, pooler=True, pooler_pool_size=POOL,
                         pooler_identity_pool_size=IDENTITY_POOL,
                         auth_rate="2000r/s", auth_burst=4000) as st:  # the load test exchanges keys
        yield st


@pytest.fixture(scope="module")
def secrets(pstack: Stack) -> credentials.StackSecrets:
    return credentials.load_or_create(pstack.state)


def primary(st: Stack) -> psycopg.Connection[Any]:
    return psycopg.connect(st.superuser_conninfo(), autocommit=True)


def through_pooler(st: Stack, secrets: credentials.StackSecrets, **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(pooler.client_url(st, secrets), prepare_threshold=None, **kw)


def server_connections(st: Stack) -> tuple[int, set[str]]:
    """authenticator's sessions on the primary: how many come from PgBouncer (its unix socket)
    and the application names of those over TCP (direct)."""
    with primary(st) as conn:
        rows = conn.execute("select client_addr is null, application_name from pg_stat_activity"
                            " where usename = 'authenticator' and backend_type = 'client backend'").fetchall()
    return sum(1 for local, _ in rows if local), {app for local, app in rows if not local}


def signup(st: Stack) -> httpx.Client:
    email = f"p-{uuid.uuid4().hex[:10]}@example.test"
    r = httpx.post(f"{st.s.proxy_url}/auth/signup", timeout=30,
                   json={"email": email, "password": "correct horse battery staple", "display_name": "P"})
    assert r.status_code == 201, r.text
    return httpx.Client(base_url=st.s.proxy_url, timeout=60,
                        headers={"Authorization": f"Bearer {r.json()['access_token']}"})


def test_postgrest_and_ext_connect_through_pgbouncer(pstack: Stack) -> None:
    s = pstack.s
    assert [st.name for st in pstack.status() if st.healthy and st.name == "pgbouncer"] == ["pgbouncer"]
    for name in ("postgrest", "postgrest-1"):
        conf = (pstack.state / f"{name}.conf").read_text()
        assert f"@{s.host}:{s.pooler_port}/{s.db_name}\"" in conf
        assert "db-prepared-statements = false" in conf and "db-channel-enabled = false" in conf
    secrets = credentials.load_or_create(pstack.state)
    env = pstack.ext_env(secrets, 1)
    assert f":{s.pooler_port}/" in env["TP_EXT_DATABASE_URL"]
    assert f":{s.pg_port}/" in env["TP_EXT_DATABASE_SESSION_URL"]
    assert env["TP_EXT_DB_PREPARED_STATEMENTS"] == "false"
    pooled, direct = server_connections(pstack)
    assert 0 < pooled <= POOL + IDENTITY_POOL
    assert direct <= DIRECT_APPS, direct


def test_transaction_local_settings_and_set_local_role_stay_in_their_transaction(
        pstack: Stack, secrets: credentials.StackSecrets) -> None:
    claims = {"role": "tp_user", "sub": str(uuid.uuid4())}
    conns = [through_pooler(pstack, secrets) for _ in range(POOL + 2)]  # more clients than server connections
    try:
        default = conns[0].execute("show statement_timeout").fetchone()
        conns[0].rollback()
        assert default is not None and default[0] != "1234ms"
        for conn in conns:
            with conn.transaction():
                row = conn.execute(
                    "select set_config('request.jwt.claims', %s, true), set_config('role', 'tp_user', true),"
                    " current_user", [json.dumps(claims)]).fetchone()
                assert row is not None and row[2] == "tp_user"
                conn.execute("set local statement_timeout = '1234ms'")
                assert conn.execute("show statement_timeout").fetchone() == ("1234ms",)
        for conn in conns:  # whichever server connection each now gets: nothing of the above
            with conn.transaction():
                row = conn.execute("select current_user, coalesce(current_setting('request.jwt.claims', true), ''),"
                                   " current_setting('statement_timeout')").fetchone()
            assert row == ("authenticator", "", default[0]), row
    finally:
        for conn in conns:
            conn.close()


def test_the_key_exchange_pool_is_tp_auth_through_its_own_pooler_database(
        pstack: Stack, secrets: credentials.StackSecrets) -> None:
    url = pooler.ext_env(pstack, secrets)["TP_EXT_DATABASE_IDENTITY_URL"]
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        for _ in range(3 * IDENTITY_POOL):
            assert conn.execute("select current_user").fetchone() == ("tp_auth",)


def test_the_request_path_works_through_the_pooler(pstack: Stack) -> None:
    """Signup, login, suites through PostgREST (pre-request hook, role and claims per
    request), an API key and its exchange (ext's identity pool), all many times over so
    requests meet other server connections than their last (prepared statements)."""
    client = signup(pstack)
    slug = f"s-{uuid.uuid4().hex[:10]}"
    r = client.post("/suites", json={"name": slug, "slug": slug}, headers={"Prefer": "return=representation"})
    assert r.status_code == 201, r.text
    suite_id = r.json()[0]["id"]
    r = client.post("/api-keys", json={"name": "k", "access": "read"})
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    stranger = signup(pstack)

    def one(i: int) -> tuple[int, int, int, int]:
        got = client.get("/suites", params={"id": f"eq.{suite_id}"})
        hidden = stranger.get("/suites", params={"id": f"eq.{suite_id}"})  # RLS, as the other caller
        token = httpx.post(f"{pstack.s.proxy_url}/auth/token", headers={"Authorization": f"ApiKey {key}"},
                           timeout=60)
        patched = client.patch("/suites", params={"id": f"eq.{suite_id}"}, json={"description": f"d{i}"})
        assert len(got.json()) == 1 and hidden.json() == [], (got.text, hidden.text)
        return got.status_code, hidden.status_code, token.status_code, patched.status_code

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(48)))
    assert set(results) == {(200, 200, 200, 204)}, results


def test_under_load_the_primary_sees_at_most_the_configured_server_connections(pstack: Stack) -> None:
    clients = [signup(pstack) for _ in range(4)]
    for c in clients:
        slug = f"s-{uuid.uuid4().hex[:10]}"
        assert c.post("/suites", json={"name": slug, "slug": slug}).status_code == 201
    stop = threading.Event()
    peak = {"pooled": 0}
    direct_seen: set[str] = set()

    def sample() -> None:
        while not stop.is_set():
            pooled, direct = server_connections(pstack)
            peak["pooled"] = max(peak["pooled"], pooled)
            direct_seen.update(direct)
            stop.wait(0.05)

    r = clients[0].post("/api-keys", json={"name": "k", "access": "read"})
    assert r.status_code == 201, r.text
    key = r.json()["key"]

    def one(i: int) -> int:
        c = clients[i % len(clients)]
        if i % 4 == 0:  # ext: the key exchange
            return c.post("/auth/token", headers={"Authorization": f"ApiKey {key}"}).status_code
        return c.get("/suites", params={"select": "id,name"} if i % 2 else None).status_code

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(32) as pool:  # 32 concurrent requests over 2 PostgREST × db-pool 20
            statuses = list(pool.map(one, range(1200)))
    finally:
        stop.set()
        sampler.join()
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}  # nothing lost
    assert 0 < peak["pooled"] <= POOL + IDENTITY_POOL, peak
    assert direct_seen <= DIRECT_APPS, direct_seen


def test_the_pipeline_listen_stays_on_a_direct_connection(pstack: Stack) -> None:
    with primary(pstack) as conn:
        rows = conn.execute("select client_addr is not null from pg_stat_activity"
                            " where application_name = 'tracepipe-ext pipeline listener'").fetchall()
    assert rows and all(r[0] for r in rows), rows  # over TCP, not from PgBouncer's socket
    assert len(rows) == pstack.s.scale * pstack.s.ext_workers


def test_compose_pgbouncer_runs_the_local_configuration() -> None:
    """A file test (no stack): docker-compose.yml's PgBouncer has the local settings."""
    from tests.test_compose_parity import resolve

    compose = resolve(yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text()))
    settings = StackSettings(state_dir=Path(tempfile.gettempdir()) / "tp-never-created")

    def section(text: str, name: str) -> dict[str, str]:
        body = text.split(f"[{name}]", 1)[1].split("\n[", 1)[0]
        return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in body.splitlines() if "=" in line)}

    local = section(pooler.config(Stack(settings)), "pgbouncer")
    there = section(compose["configs"]["pgbouncer_ini"]["content"], "pgbouncer")
    places = {"listen_addr", "listen_port", "auth_file", "pidfile"}
    assert {k: v for k, v in there.items() if k not in places} == {k: v for k, v in local.items() if k not in places}
    dbs = compose["configs"]["pgbouncer_ini"]["content"].split("[databases]")[1].split("[pgbouncer]")[0]
    assert f"pool_size={settings.pooler_identity_pool_size} connect_query='set role tp_auth'" in dbs
    assert "pgbouncer=1.18." in compose["services"]["pgbouncer"]["build"]["dockerfile_inline"]
