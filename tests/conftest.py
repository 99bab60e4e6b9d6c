"""The test suite runs against a throwaway stack of its own: real PostgreSQL, PostgREST,
SeaweedFS, ext and nginx in a temporary state dir on free ports (never the data of a
running `make up`). Fixtures create what each test needs under unique names."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from tracepipe import credentials
from tracepipe.ports import free_stack_ports
from tracepipe.stack import Stack, throwaway_stack


def free_ports(scale: int = 1) -> dict[str, int]:
    return free_stack_ports(scale=scale)[0]


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    with throwaway_stack("tp-test-") as st:
        yield st


@pytest.fixture(scope="session")
def stack_env(stack: Stack) -> dict[str, str]:
    """Environment that points the `tracepipe` CLI at the test stack."""
    return stack.cli_env()


def run_cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    tracepipe = Path(sys.executable).parent / "tracepipe"
    result = subprocess.run([str(tracepipe), *args], env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


@pytest.fixture(scope="session")
def base_url(stack: Stack) -> str:
    return stack.s.proxy_url


@pytest.fixture(scope="session")
def anon(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="session")
def secrets(stack: Stack) -> credentials.StackSecrets:
    return credentials.load_or_create(stack.state)


@pytest.fixture(scope="session")
def superuser_dsn(stack: Stack) -> str:
    return stack.superuser_conninfo()


@pytest.fixture
def su(superuser_dsn: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """A superuser connection for inspecting the database (never for the behaviour under test)."""
    with psycopg.connect(superuser_dsn, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class User:
    id: str
    email: str
    password: str
    token: str
    refresh_token: str
    client: httpx.Client
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture(scope="session")
def make_user(base_url: str, superuser_dsn: str) -> Iterator[Callable[..., User]]:
    clients: list[httpx.Client] = []

    def make(role: str = "tp_user") -> User:
        email = f"{unique('user')}@example.test"
        password = "correct horse battery staple"
        r = httpx.post(f"{base_url}/auth/signup", json={"email": email, "password": password,
                                                         "display_name": "Test Person"}, timeout=30)
        assert r.status_code == 201, r.text
        body = r.json()
        if role != "tp_user":
            set_account_role(superuser_dsn, body["id"], role)
            r = httpx.post(f"{base_url}/auth/login", json={"email": email, "password": password}, timeout=30)
            assert r.status_code == 200, r.text
            body = {**body, **r.json()}
        client = httpx.Client(base_url=base_url, timeout=30,
                              headers={"Authorization": f"Bearer {body['access_token']}"})
        clients.append(client)
        return User(body["id"], email, password, body["access_token"], body["refresh_token"], client)

    yield make
    for c in clients:
        c.close()


def set_account_role(superuser_dsn: str, user_id: str, role: str) -> None:
    """Operator action (what `tracepipe user create --role` does): not reachable over HTTP."""
    with psycopg.connect(superuser_dsn, autocommit=True) as conn:
        conn.execute("update app.users set account_role = %s where id = %s", [role, user_id])


def create_key(user: User, **body: Any) -> dict[str, Any]:
    r = user.client.post("/api-keys", json={"name": unique("key"), **body})
    assert r.status_code == 201, r.text
    return dict(r.json())


def key_client(base_url: str, key: str) -> httpx.Client:
    r = httpx.post(f"{base_url}/auth/token", headers={"Authorization": f"ApiKey {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    return httpx.Client(base_url=base_url, timeout=30,
                        headers={"Authorization": f"Bearer {r.json()['access_token']}"})


def create_suite(user: User, **fields: Any) -> dict[str, Any]:
    slug = unique("suite")
    r = user.client.post("/suites", json={"name": slug, "slug": slug, **fields},
                         headers={"Prefer": "return=representation", "Accept": "application/vnd.pgrst.object+json"})
    assert r.status_code == 201, r.text
    return dict(r.json())


@pytest.fixture(scope="module")
def person(make_user: Callable[..., User]) -> User:
    """An account of the test module's own."""
    return make_user()


@pytest.fixture(scope="module")
def suite(person: User) -> dict[str, Any]:
    """A suite `person` owns (a module may define its own `suite`)."""
    return create_suite(person)


def invite(owner: User, suite_id: str, member: User, role: str) -> None:
    """An invitation (DESIGN §9): it grants nothing until the invitee accepts."""
    r = owner.client.post(f"/suites/{suite_id}/members", json={"user_id": member.id, "role": role})
    assert r.status_code == 201, r.text


def accept(member: User, suite_id: str) -> None:
    r = member.client.patch(f"/suites/{suite_id}/members", params={"user_id": f"eq.{member.id}"},
                            json={"accepted": True}, headers={"Prefer": "return=representation"})
    assert r.status_code == 200 and len(r.json()) == 1 and r.json()[0]["accepted"], r.text


def add_member(owner: User, suite_id: str, member: User, role: str) -> None:
    """An accepted membership: the owner invites, the member accepts."""
    invite(owner, suite_id, member, role)
    accept(member, suite_id)


def assert_error_body(r: httpx.Response) -> dict[str, Any]:
    """Every error is JSON {code, message, details, hint}."""
    assert r.headers.get("content-type", "").startswith("application/json"), (r.status_code, r.text[:300])
    body = r.json()
    assert isinstance(body, dict), body
    assert {"code", "message", "details", "hint"} <= set(body), body
    assert body["code"] and body["message"], body
    return dict(body)


@contextmanager
def as_role(dsn: str, role: str, claims: dict[str, Any]) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """SQL as the real role with the request's claims, transaction-local, rolled back."""
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        conn.execute("select set_config('role', %s, true), set_config('request.jwt.claims', %s, true)",
                     [role, json.dumps(claims)])
        try:
            yield conn
        finally:
            conn.rollback()
