"""Identity operations an operator performs: accounts of other roles, disabling, key rotation."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable

import httpx

from tests.conftest import User, assert_error_body, create_key, create_suite, key_client, run_cli, unique


def _kid(token: str) -> str:
    header = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])


def test_disabling_an_account_stops_its_tokens_at_the_next_request(
        stack_env: dict[str, str], make_user: Callable[..., User], base_url: str) -> None:
    person = make_user()
    key_tokens = key_client(base_url, create_key(person)["key"])
    assert person.client.get("/suites").status_code == 200
    assert key_tokens.get("/suites").status_code == 200
    run_cli(stack_env, "user", "disable", person.email)
    for client in (person.client, key_tokens):
        r = client.get("/suites")
        assert r.status_code == 401
        assert_error_body(r)
    r = httpx.post(f"{base_url}/auth/login", json={"email": person.email, "password": person.password})
    assert r.status_code == 401
    run_cli(stack_env, "user", "disable", person.email, "--enable")
    assert person.client.get("/suites").status_code == 200


def test_pipeline_accounts_get_pipeline_tokens(stack_env: dict[str, str], base_url: str,
                                                make_user: Callable[..., User]) -> None:
    email = f"{unique('pipeline')}@example.test"
    out = run_cli(stack_env, "user", "create", email, "--role", "pipeline", "--password", "pipeline secret 123")
    assert len(out.stdout.strip()) == 36
    login = httpx.post(f"{base_url}/auth/login", json={"email": email, "password": "pipeline secret 123"}).json()
    pipeline = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {login['access_token']}"})
    someone = make_user()
    suite = create_suite(someone)
    # The pipeline reads every suite (to process sessions) but cannot change one.
    assert pipeline.get(f"/suites/{suite['id']}").status_code == 200
    assert pipeline.patch(f"/suites/{suite['id']}", json={"description": "x"}).status_code in (401, 403)
    assert pipeline.get("/users/me").json()["account_role"] == "tp_pipeline"
    again = run_cli(stack_env, "user", "create", email, "--password", "x" * 12, check=False)
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "already exists" in again.stderr


def test_key_rotation_keeps_old_tokens_valid(stack_env: dict[str, str], base_url: str,
                                              make_user: Callable[..., User]) -> None:
    person = make_user()
    old_kid = _kid(person.token)
    run_cli(stack_env, "rotate-jwt-key")
    jwks = httpx.get(f"{base_url}/.well-known/jwks.json").json()["keys"]
    assert old_kid in {k["kid"] for k in jwks} and len(jwks) >= 2
    # ext picks the new key up within 10 s; until then it still signs with the old one.
    deadline = time.monotonic() + 20
    while True:
        fresh = httpx.post(f"{base_url}/auth/login", json={"email": person.email, "password": person.password})
        if _kid(fresh.json()["access_token"]) != old_kid or time.monotonic() > deadline:
            break
        time.sleep(1)
    new_token = fresh.json()["access_token"]
    assert _kid(new_token) != old_kid
    for token in (person.token, new_token):  # old tokens stay valid until they expire; new ones work at once
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{base_url}/suites", headers=headers).status_code == 200
        r = httpx.post(f"{base_url}/api-keys", headers=headers, json={"name": unique("k")})
        assert r.status_code == 201, r.text
