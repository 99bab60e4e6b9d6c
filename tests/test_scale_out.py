"""Scale-out: with TP_SCALE=2 nginx balances two PostgREST and two ext instances, and the
product's flows keep working when one instance of each is killed mid-run — nothing in
them holds state (tokens, uploads and streams are all in PostgreSQL and S3)."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.bundles import bundle
from tests.conftest import run_cli
from tracepipe.stack import Stack, throwaway_stack


@pytest.fixture(scope="module")
def scaled() -> Iterator[Stack]:
    with throwaway_stack("tp-scale-", scale=2) as st:
        yield st


def _flow(base: str, n: int) -> dict[str, Any]:
    """Signup, suite, action, session upload and download, example registration and stream."""
    with httpx.Client(base_url=base, timeout=30) as c:
        email = f"scale-{n}-{threading.get_ident()}-{hashlib.md5(str(n).encode()).hexdigest()[:6]}@example.test"
        r = c.post("/auth/signup", json={"email": email, "password": "a long password"})
        assert r.status_code == 201, r.text
        c.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
        suite = c.post("/suites", json={"name": email, "slug": email.split("@")[0]},
                       headers={"Prefer": "return=representation", "Accept": "application/vnd.pgrst.object+json"})
        assert suite.status_code == 201, suite.text
        sid = suite.json()["id"]
        assert c.post(f"/suites/{sid}/actions", json={"name": "click"}).status_code == 201
        data = bundle(n_events=50, screenshots=1)
        session = c.post("/sessions", content=data, headers={"Content-Type": "application/zip"})
        assert session.status_code == 201, session.text
        assert c.get(f"/sessions/{session.json()['id']}/bundle").content == data
        lines = b"".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"}]}).encode() + b"\n"
                         for i in range(5))
        example = c.post("/examples", params={"suite_id": sid, "model": "m"}, content=lines,
                         headers={"Content-Type": "application/jsonl"})
        assert example.status_code == 201, example.text
        assert c.get(f"/examples/{example.json()['id']}/messages",
                     headers={"Accept-Encoding": "identity"}).content == lines
        assert c.get(f"/suites/{sid}/actions").json()[0]["name"] == "click"
        return {"suite": sid}


def test_two_instances_of_each_serve_behind_nginx(scaled: Stack) -> None:
    names = [st.name for st in scaled.status()]
    assert {"postgrest", "postgrest-1", "ext", "ext-1"} <= set(names)
    assert all(st.healthy for st in scaled.status())
    conf = (scaled.state / "nginx" / "tracepipe" / "tracepipe.conf").read_text()
    assert conf.count("server unix:") == 4  # PostgREST and ext on sockets only nginx reaches


def test_flows_survive_killing_one_instance_of_each(scaled: Stack) -> None:
    base = scaled.s.proxy_url
    errors: list[str] = []
    done = threading.Event()

    def background() -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            while not done.is_set():
                r = c.get("/.well-known/jwks.json")
                if r.status_code != 200:
                    errors.append(f"jwks {r.status_code}")
                time.sleep(0.02)  # a client's pace: back to back, one address meets the fair-use limit (429)

    thread = threading.Thread(target=background)
    thread.start()
    try:
        for n in range(3):
            _flow(base, n)
        scaled.stop_component("ext-1", grace=0.5)
        scaled.stop_component("postgrest-1", grace=0.5)
        for n in range(3, 8):
            _flow(base, n)
    finally:
        done.set()
        thread.join()
    assert len(errors) <= 2, errors  # at most the requests in flight on a killed instance
    scaled.start_component("ext-1")
    scaled.start_component("postgrest-1")
    assert all(st.healthy for st in scaled.status())
    _flow(base, 99)


def _kid(token: str) -> str:
    header = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])


def test_key_rotation_reaches_every_postgrest_instance(scaled: Stack) -> None:
    base = scaled.s.proxy_url
    email = f"rotate-{uuid.uuid4().hex[:10]}@example.test"
    with httpx.Client(base_url=base, timeout=30) as c:
        r = c.post("/auth/signup", json={"email": email, "password": "a long password"})
        assert r.status_code == 201, r.text
        old_kid = _kid(r.json()["access_token"])
        run_cli(scaled.cli_env(), "rotate-jwt-key")
        # each ext instance signs with the new key within 10 s; tokens of both keys must
        # then work on every PostgREST instance (nginx alternates between them)
        tokens: list[str] = []
        deadline = time.monotonic() + 120  # a bound on waiting (logins hash a password), not a figure
        while len(tokens) < 10 and time.monotonic() < deadline:
            r = c.post("/auth/login", json={"email": email, "password": "a long password"})
            assert r.status_code == 200, r.text
            if _kid(r.json()["access_token"]) != old_kid:
                tokens.append(r.json()["access_token"])
            else:
                time.sleep(0.5)
        assert len(tokens) == 10, "ext never signed with the new key"
        statuses = [c.get("/suites", headers={"Authorization": f"Bearer {t}"}).status_code
                    for t in tokens for _ in range(6)]
    assert statuses == [200] * len(statuses), statuses
