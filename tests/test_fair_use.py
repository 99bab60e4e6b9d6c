"""Fair use per caller (issue 13): the proxy limits each caller, on PostgREST's paths and on
ext's, to fair_use_rate requests/s after a burst of fair_use_burst, and answers 429 in the
error body with Retry-After and RateLimit-* headers. A caller is the API key of a key's
token, else the subject of a token whose signature verifies; a token that does not verify
is counted under the client's address, so a forged token naming someone cannot spend their
budget. Real stack, over HTTP: one of its own with a small limit (1/s, burst 5), and the
session's stack (the defaults) to show the limit is the setting.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import assert_error_body, run_cli
from tracepipe.stack import Stack, throwaway_stack

RATE, BURST = 1, 5
FLOOD = 20  # sent back to back: far more than BURST + what RATE gives back meanwhile
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def small() -> Iterator[Stack]:
    with throwaway_stack("tp-fairuse-", fair_use_rate=RATE, fair_use_burst=BURST) as st:
        yield st


def signup(base_url: str) -> dict[str, Any]:
    email = f"fair-{uuid.uuid4().hex[:10]}@example.test"
    r = httpx.post(f"{base_url}/auth/signup", json={"email": email, "password": PASSWORD}, timeout=30)
    assert r.status_code == 201, r.text
    return {**r.json(), "email": email}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def flood(base_url: str, headers: dict[str, str], n: int = FLOOD, path: str = "/suites") -> list[httpx.Response]:
    with httpx.Client(base_url=base_url, timeout=30, headers=headers) as c:
        return [c.get(path) for _ in range(n)]


def forged(claims: dict[str, Any], kid: str) -> str:
    """A token with these claims and the stack's key id, signed with a key of the forger's own."""
    return jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": kid})


def respliced(token: str, sub: str) -> str:
    """A real token's header and signature around a payload naming another subject."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = sub
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{body}.{signature}"


def test_a_flooding_token_is_refused_429_with_the_headers_and_the_error_body(small: Stack) -> None:
    flooder = signup(small.s.proxy_url)
    answers = flood(small.s.proxy_url, bearer(flooder["access_token"]))
    statuses = [r.status_code for r in answers]
    assert set(statuses) == {200, 429}, statuses
    assert statuses[:BURST + 1] == [200] * (BURST + 1), statuses  # the burst, and the first request
    refused = next(r for r in answers if r.status_code == 429)
    body = assert_error_body(refused)
    assert body["code"] == "TP429" and str(RATE) in body["details"], body
    assert refused.headers["Retry-After"] == "1"
    assert refused.headers["RateLimit-Limit"] == str(RATE)
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert refused.headers["RateLimit-Reset"] == "1"
    assert refused.headers["RateLimit-Policy"] == f"{RATE};w=1;burst={BURST}"
    assert answers[0].headers["RateLimit-Policy"] == f"{RATE};w=1;burst={BURST}"  # on every answer
    assert "RateLimit-Remaining" in refused.headers["Access-Control-Expose-Headers"]


def test_ext_paths_are_limited_too(small: Stack) -> None:
    flooder = signup(small.s.proxy_url)
    answers = flood(small.s.proxy_url, bearer(flooder["access_token"]), path="/examples/export")
    statuses = [r.status_code for r in answers]
    assert statuses[0] == 200 and 429 in statuses, statuses
    assert assert_error_body(next(r for r in answers if r.status_code == 429))["code"] == "TP429"


def test_another_user_is_not_throttled_by_a_flooder(small: Stack) -> None:
    flooder, other = signup(small.s.proxy_url), signup(small.s.proxy_url)
    assert 429 in [r.status_code for r in flood(small.s.proxy_url, bearer(flooder["access_token"]))]
    assert [r.status_code for r in flood(small.s.proxy_url, bearer(other["access_token"]), n=BURST)] == [200] * BURST


def test_an_api_key_has_a_budget_of_its_own(small: Stack) -> None:
    owner = signup(small.s.proxy_url)
    r = httpx.post(f"{small.s.proxy_url}/api-keys", json={"name": "flood", "access": "read"},
                   headers=bearer(owner["access_token"]), timeout=30)
    assert r.status_code == 201, r.text
    r = httpx.post(f"{small.s.proxy_url}/auth/token", headers={"Authorization": f"ApiKey {r.json()['key']}"},
                   timeout=30)
    assert r.status_code == 200, r.text
    assert 429 in [x.status_code for x in flood(small.s.proxy_url, bearer(r.json()["access_token"]))]
    # the key's owner signed in is another caller (a storefront beside the owner's script)
    assert [x.status_code for x in flood(small.s.proxy_url, bearer(owner["access_token"]), n=BURST)] == [200] * BURST


@pytest.mark.parametrize("how", ["signed with another key", "payload swapped under a real signature"])
def test_a_forged_token_naming_a_victim_does_not_spend_the_victims_budget(small: Stack, how: str) -> None:
    attacker, victim = signup(small.s.proxy_url), signup(small.s.proxy_url)
    header = jwt.get_unverified_header(victim["access_token"])
    claims = jwt.decode(victim["access_token"], options={"verify_signature": False})
    token = (forged(claims, header["kid"]) if how == "signed with another key"
             else respliced(attacker["access_token"], victim["id"]))
    statuses = [r.status_code for r in flood(small.s.proxy_url, bearer(token))]
    assert set(statuses) <= {401, 429}, statuses  # never the victim's data
    assert 429 in statuses, statuses  # counted under the forger's address (another test's may have begun)
    # Had the forgery counted as the victim, the victim's burst would be spent now.
    assert [r.status_code for r in flood(small.s.proxy_url, bearer(victim["access_token"]), n=BURST)] == [200] * BURST
    # And a forgery naming the attacker does not spend the attacker's own budget either.
    assert [r.status_code for r in flood(small.s.proxy_url, bearer(attacker["access_token"]), n=BURST)] == [200] * BURST


def test_the_limit_is_the_setting(base_url: str, stack: Stack) -> None:
    """The session's stack has the default limit: the same flood passes."""
    assert stack.s.fair_use_burst >= FLOOD
    user = signup(base_url)
    answers = flood(base_url, bearer(user["access_token"]))
    assert [r.status_code for r in answers] == [200] * FLOOD
    s = stack.s
    assert answers[0].headers["RateLimit-Policy"] == f"{s.fair_use_rate};w=1;burst={s.fair_use_burst}"


def test_tokens_of_a_rotated_in_key_are_counted_per_caller(small: Stack) -> None:
    """`tracepipe rotate-jwt-key` gives the proxy the new public key: its tokens are not
    mistaken for forgeries (which would count under the address)."""
    user = signup(small.s.proxy_url)
    old_kid = jwt.get_unverified_header(user["access_token"])["kid"]
    run_cli(small.cli_env(), "rotate-jwt-key")
    token = user["access_token"]
    for _ in range(60):  # ext signs with the new key within 10 s (a bound on waiting, not a figure)
        r = httpx.post(f"{small.s.proxy_url}/auth/login", json={"email": user["email"], "password": PASSWORD},
                       timeout=30)
        assert r.status_code == 200, r.text
        token = r.json()["access_token"]
        if jwt.get_unverified_header(token)["kid"] != old_kid:
            break
        time.sleep(0.5)
    assert jwt.get_unverified_header(token)["kid"] != old_kid
    # the address's budget spent (tokens that do not verify), the new key's token still passes
    assert 429 in [r.status_code for r in flood(small.s.proxy_url, bearer("x.y.z"))]
    assert [r.status_code for r in flood(small.s.proxy_url, bearer(token), n=BURST)] == [200] * BURST
