"""Throttles an attacker cannot turn against the owner, a bounded throttle table, password
hashing that cannot saturate the service, and refresh rotation that survives a retry or a
concurrent refresh. Against the real stack through the proxy.

Each test speaks from source addresses of its own: Linux answers all of 127/8 on the
loopback, so a client bound to 127.x.y.z reaches the proxy as another machine would, the
proxy passes that address to ext (X-Forwarded-For) and keeps nginx's per-IP limits apart."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import User, assert_error_body, create_key, run_cli, unique

Conn = psycopg.Connection[dict[str, Any]]
REFRESH_GRACE_S = 30  # ext's default refresh_grace_s (the test stack does not change it)


def fresh_source() -> str:
    a, b, c = os.urandom(3)
    return f"127.{a}.{b}.{max(c, 2)}"


@contextmanager
def from_source(base_url: str, source: str | None = None) -> Iterator[httpx.Client]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    transport = httpx.HTTPTransport(local_address=source or fresh_source(), limits=limits)
    with httpx.Client(base_url=base_url, transport=transport, timeout=60) as client:
        yield client


def login(client: httpx.Client, user: User, password: str | None = None) -> httpx.Response:
    return client.post("/auth/login", json={"email": user.email, "password": password or user.password})


def exchange(client: httpx.Client, key: str) -> httpx.Response:
    return client.post("/auth/token", headers={"Authorization": f"ApiKey {key}"})


def one(su: Conn, query: str, *params: Any) -> Any:
    row = su.execute(query, list(params)).fetchone()
    assert row is not None
    return next(iter(row.values()))


def retry_after(r: httpx.Response) -> int:
    assert r.status_code == 429, (r.status_code, r.text)
    assert assert_error_body(r)["code"] == "TP429"
    value = r.headers.get("retry-after", "")
    assert value.isdigit() and int(value) > 0, dict(r.headers)
    return int(value)


@pytest.fixture
def owner_key(make_user: Callable[..., User]) -> tuple[User, str]:
    owner = make_user()
    return owner, str(create_key(owner)["key"])


# --- lockout as a weapon ------------------------------------------------------------------------------


def test_wrong_passwords_from_elsewhere_never_lock_the_owner_out(base_url: str, make_user: Callable[..., User]) -> None:
    owner = make_user()
    with from_source(base_url) as attacker:
        statuses = [login(attacker, owner, "not the password").status_code for _ in range(10)]
        assert statuses == [401] * 10, statuses
        for _ in range(2):  # two more failures, each after the delay: the next one is 4 s
            wait = retry_after(login(attacker, owner, "not the password"))
            assert wait <= 4, f"{wait} s: a lock, not a growing delay"
            time.sleep(wait + 0.2)
            assert login(attacker, owner, "not the password").status_code == 401
        # the failing source is throttled for this account, even with the right password
        retry_after(login(attacker, owner))
    with from_source(base_url) as home:
        r = login(home, owner)
        assert r.status_code == 200, r.text
        assert home.get("/users/me", headers={"Authorization": f"Bearer {r.json()['access_token']}"}
                        ).status_code == 200


def test_failed_logins_grow_the_delay_and_it_ends(base_url: str, make_user: Callable[..., User]) -> None:
    """No hard lock: past the free failures each one doubles the wait, and once it has
    passed the source may try again (a right password then signs in)."""
    owner = make_user()
    waits: list[int] = []
    with from_source(base_url) as client:
        for _ in range(10):
            assert login(client, owner, "wrong").status_code == 401
        for _ in range(3):
            wait = retry_after(login(client, owner, "wrong"))
            assert wait <= 8, f"waits {[*waits, wait]}: a lock, not a growing delay"
            waits.append(wait)
            time.sleep(wait + 0.2)
            assert login(client, owner, "wrong").status_code == 401  # the wait is over: one more try
        wait = retry_after(login(client, owner))
        assert wait <= 16
        waits.append(wait)
        assert waits == sorted(waits) and waits[-1] > waits[0], waits
        time.sleep(wait + 0.2)
        assert login(client, owner).status_code == 200


def test_a_right_key_is_never_refused_for_failures_on_its_prefix(base_url: str, owner_key: tuple[User, str]) -> None:
    _, key = owner_key
    wrong = key[:-8] + ("0" * 8 if not key.endswith("0" * 8) else "1" * 8)
    with from_source(base_url) as attacker:
        responses = []
        for _ in range(24):
            responses.append(exchange(attacker, wrong))
            time.sleep(0.06)  # under the proxy's per-IP rate: these are ext's answers
        statuses = [r.status_code for r in responses]
        assert statuses[:20] == [401] * 20 and 429 in statuses[20:], statuses
        retry_after(next(r for r in responses if r.status_code == 429))
        # the secret has 192 bits: even the failing source is served when it has it
        assert exchange(attacker, key).status_code == 200
    with from_source(base_url) as elsewhere:
        assert exchange(elsewhere, key).status_code == 200
        assert exchange(elsewhere, wrong).status_code == 401  # another source is not throttled


def test_a_source_spraying_key_prefixes_is_slowed_down(base_url: str, owner_key: tuple[User, str]) -> None:
    """Per prefix alone, every new prefix would bring 20 free failures."""
    _, key = owner_key
    with from_source(base_url) as sprayer:
        statuses = []
        for _ in range(305):  # ext's source_max_key_failures (300) and a few
            statuses.append(exchange(sprayer, f"tp_{os.urandom(6).hex()}_{'0' * 48}").status_code)
            time.sleep(0.05)
        assert statuses[:300] == [401] * 300 and 429 in statuses[300:], statuses[295:]
        assert exchange(sprayer, key).status_code == 200


def test_the_throttle_table_is_swept_and_capped(base_url: str, stack_env: dict[str, str], su: Conn) -> None:
    source = fresh_source()
    with from_source(base_url, source) as client:
        for _ in range(3):
            r = client.post("/auth/login", json={"email": f"{unique('nobody')}@example.test", "password": "wrong"})
            assert r.status_code == 401
        for _ in range(10):
            assert exchange(client, f"tp_{os.urandom(6).hex()}_{'0' * 48}").status_code == 401
            time.sleep(0.06)

    def rows() -> int:
        return int(one(su, "select count(*) from app.auth_throttle where subject like %s", f"%{source}"))

    assert rows() >= 13  # 3 unknown emails, 10 prefixes, the source's two counters

    def sweep(**env: str) -> dict[str, int]:
        result = run_cli({**stack_env, **env}, "sweep")
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))

    report = sweep(TP_EXT_THROTTLE_MAX_ROWS="5")
    assert report["throttle_evicted"] >= 8, report
    assert one(su, "select count(*) from app.auth_throttle") <= 5

    time.sleep(1.1)
    report = sweep(TP_EXT_THROTTLE_WINDOW_S="1")
    assert report["throttle_expired"] >= 1, report
    assert rows() == 0


# --- password hashing cannot saturate the service -----------------------------------------------------


@contextmanager
def health_watch(base_url: str) -> Iterator[list[int]]:
    """/health polled from another address for as long as the block runs."""
    health: list[int] = []
    done = threading.Event()

    def poll() -> None:
        with from_source(base_url) as watcher:
            while not done.is_set():
                health.append(watcher.get("/health").status_code)
                time.sleep(0.02)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        yield health
    finally:
        done.set()
        thread.join()


def assert_refused_at_once(r: httpx.Response, setting: str) -> None:
    body = assert_error_body(r)
    assert body["code"] == f"TP{r.status_code}" and body["details"] == setting, body
    assert r.headers.get("retry-after", "").isdigit(), dict(r.headers)


def test_a_burst_of_logins_is_refused_at_once_while_health_answers(base_url: str, make_user: Callable[..., User]
                                                                   ) -> None:
    """20 logins at once from 5 addresses: ext's 2 workers hash at most 2 each, the rest is
    answered 503 (or 429: one address's second) with Retry-After instead of queueing."""
    owner = make_user()
    barrier = threading.Barrier(20)
    sources = [fresh_source() for _ in range(5)]

    def one(i: int) -> httpx.Response:
        with from_source(base_url, sources[i % 5]) as client:
            barrier.wait()
            return login(client, owner)

    with health_watch(base_url) as health, ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(one, range(20)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429, 503} and 200 in statuses and 503 in statuses, statuses
    for r in responses:
        if r.status_code == 503:
            assert_refused_at_once(r, "password_hash_concurrency")
        elif r.status_code == 429:
            assert_refused_at_once(r, "password_hash_per_source")
    assert health and set(health) == {200}, health


def test_one_address_cannot_take_every_hashing_slot(base_url: str, make_user: Callable[..., User]) -> None:
    """An address logging in as fast as it can holds one slot per worker: sign-ins from
    elsewhere still find one."""
    owner, other = make_user(), make_user()
    stop = threading.Event()
    barrier = threading.Barrier(4)
    flood: list[httpx.Response] = []

    def hammer() -> None:
        with from_source(base_url, source) as client:
            barrier.wait()
            while not stop.is_set():
                flood.append(login(client, owner))
                time.sleep(0.25)  # about 16 requests a second in all: under the proxy's per-IP rate

    source = fresh_source()
    threads = [threading.Thread(target=hammer) for _ in range(4)]
    with health_watch(base_url) as health:
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            with from_source(base_url) as elsewhere:
                for _ in range(3):
                    r = login(elsewhere, other)
                    assert r.status_code == 200, r.text
        finally:
            stop.set()
            for t in threads:
                t.join()
    statuses = [r.status_code for r in flood]
    assert set(statuses) <= {200, 429} and 429 in statuses, statuses
    for r in flood:
        if r.status_code == 429:
            assert_refused_at_once(r, "password_hash_per_source")
    assert health and set(health) == {200}, health


# --- refresh: retried and concurrent --------------------------------------------------------------------


def refresh(client: httpx.Client, token: str) -> httpx.Response:
    return client.post("/auth/refresh", json={"refresh_token": token})


def assert_reused(r: httpx.Response) -> None:
    assert r.status_code == 401, (r.status_code, r.text)


def works(client: httpx.Client, access_token: str) -> bool:
    return client.get("/users/me", headers={"Authorization": f"Bearer {access_token}"}).status_code == 200


@pytest.mark.parametrize("run", range(3))
def test_refreshes_of_one_token_at_once_get_the_same_pair(base_url: str, make_user: Callable[..., User],
                                                          run: int) -> None:
    user = make_user()
    with from_source(base_url) as client:
        barrier = threading.Barrier(4)

        def once(_: int) -> httpx.Response:
            barrier.wait()
            return refresh(client, user.refresh_token)

        with ThreadPoolExecutor(max_workers=4) as pool:
            responses = list(pool.map(once, range(4)))
        assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
        pairs = [r.json() for r in responses]
        assert len({p["refresh_token"] for p in pairs}) == 1, pairs
        assert all(works(client, p["access_token"]) for p in pairs)
        # the login goes on: the pair is live, not revoked
        nxt = refresh(client, pairs[0]["refresh_token"])
        assert nxt.status_code == 200, nxt.text
        assert works(client, nxt.json()["access_token"])


def test_a_retry_after_a_lost_response_gets_the_same_pair(base_url: str, make_user: Callable[..., User]) -> None:
    user = make_user()
    with from_source(base_url) as client:
        lost = refresh(client, user.refresh_token)  # rotated server side; say the answer never arrived
        assert lost.status_code == 200
        for _ in range(3):
            retried = refresh(client, user.refresh_token)
            assert retried.status_code == 200, retried.text
            assert retried.json()["refresh_token"] == lost.json()["refresh_token"]
            assert works(client, retried.json()["access_token"])
        # the successor is used: the old token's grace is over (single use), a replay ends the login
        newest = refresh(client, lost.json()["refresh_token"])
        assert newest.status_code == 200
        assert_reused(refresh(client, user.refresh_token))
        assert_reused(refresh(client, newest.json()["refresh_token"]))
        assert not works(client, newest.json()["access_token"])


def test_the_sealed_successor_is_no_secret_at_rest(base_url: str, make_user: Callable[..., User], su: Conn) -> None:
    user = make_user()
    with from_source(base_url) as client:
        pair = refresh(client, user.refresh_token).json()
    sealed = bytes(one(su, "select r.successor_sealed from app.refresh_tokens r where r.user_id = %s"
                          " and r.successor_sealed is not null", user.id))
    assert pair["refresh_token"].encode() not in sealed and pair["refresh_token"][4:].encode() not in sealed


def test_reuse_after_the_grace_still_ends_the_login(base_url: str, make_user: Callable[..., User],
                                                    stack_env: dict[str, str], su: Conn) -> None:
    user = make_user()
    with from_source(base_url) as client:
        pair = refresh(client, user.refresh_token).json()
        time.sleep(REFRESH_GRACE_S + 1)
        report = json.loads(run_cli(stack_env, "sweep").stdout.strip().splitlines()[-1])
        assert report["refresh_successors_forgotten"] >= 1, report
        assert one(su, "select count(*) from app.refresh_tokens where user_id = %s"
                       " and successor_sealed is not null", user.id) == 0
        assert_reused(refresh(client, user.refresh_token))
        assert_reused(refresh(client, pair["refresh_token"]))
        assert not works(client, pair["access_token"])
