"""DESIGN §9 "Derived fields" and "Errors a person can act on" (issue 14, item 1): what a
newcomer sends first works, and what is wrong is said in the contract's body, naming the
field or parameter and the fix — never PostgreSQL's or a library's text."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import User, assert_error_body, create_suite, unique
from tests.test_tokens import Signer, bearer, fresh_claims, signer  # noqa: F401  (fixture)

RAW = ("23502", "23503", "23505", "23514", "22P02", "42P01", "42501", "PGRST301", "JWSError", "violates",
       "relation \"", "pkey")
REP = {"Prefer": "return=representation"}


def assert_plain(r: httpx.Response) -> dict[str, Any]:
    body = assert_error_body(r)
    assert not any(raw in r.text for raw in RAW), r.text
    return body


def test_a_suite_needs_only_a_name_and_slugs_clash_only_among_ones_own(make_user: Callable[..., User]) -> None:
    a, b = make_user(), make_user()
    name = f"My Suite {unique('x')}"
    first = a.client.post("/suites", json={"name": name}, headers=REP)
    assert first.status_code == 201, first.text
    slug = first.json()[0]["slug"]
    assert slug == name.lower().replace(" ", "-")
    # Another account may use the same slug: nothing tells it that a suite of that name exists.
    assert b.client.post("/suites", json={"name": name}).status_code == 201
    again = a.client.post("/suites", json={"name": name})
    body = assert_plain(again)
    assert again.status_code == 409 and body["code"] == "TP409" and "slug" in body["details"], again.text
    assert body["hint"]


def test_a_server_needs_only_name_and_url_and_a_binding_no_server_id(make_user: Callable[..., User]) -> None:
    owner = make_user()
    server = owner.client.post("/mcp-servers", json={"name": unique("srv"), "url": "https://mcp.example/x"},
                               headers=REP)
    assert server.status_code == 201 and server.json()[0]["transport"] == "streamable-http", server.text
    bad = owner.client.post("/mcp-servers", json={"name": unique("srv"), "url": "https://x", "transport": "http"})
    body = assert_plain(bad)
    assert bad.status_code == 422 and "stdio" in body["message"] and "streamable-http" in body["message"]
    local = owner.client.post("/mcp-servers", json={"name": unique("srv"), "url": "/usr/bin/mcp"})
    assert local.status_code == 422 and "transport" in assert_plain(local)["message"]
    tool = owner.client.post(f"/mcp-servers/{server.json()[0]['id']}/tools", json={"name": "t"}, headers=REP)
    suite = create_suite(owner)
    action = owner.client.post(f"/suites/{suite['id']}/actions", json={"name": "a"}, headers=REP).json()[0]
    binding = owner.client.post("/action-tool-maps", json={"suite_id": suite["id"], "action_id": action["id"],
                                                           "tool_id": tool.json()[0]["id"]}, headers=REP)
    assert binding.status_code == 201 and binding.json()[0]["mcp_server_id"] == server.json()[0]["id"], binding.text


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/suites", {"description": "no name"}, "name"),
    ("/mcp-servers", {"name": "no url"}, "url"),
    ("/action-tool-maps", {"argument_mapping": {}}, "suite_id"),
])
def test_a_missing_field_is_422_naming_it(person: User, path: str, body: dict[str, Any], field: str) -> None:
    r = person.client.post(path, json=body)
    got = assert_plain(r)
    assert r.status_code == 422 and field in got["message"], r.text


def test_unknown_paths_malformed_ids_and_credentials_are_answered_in_the_contract(
        anon: httpx.Client, person: User, suite: dict[str, Any], signer: Signer) -> None:  # noqa: F811
    r = person.client.get("/nope")
    assert r.status_code == 404 and assert_plain(r)["code"] == "TP404"
    r = person.client.get("/sessions/not-a-uuid")
    assert r.status_code == 400 and "id" in assert_plain(r)["details"]
    r = anon.get("/suites/abc")
    assert r.status_code == 401 and assert_plain(r)["code"] == "TP401"
    assert person.client.get("/suite-members", params={"suite_id": f"eq.{suite['id']}"}).status_code == 200
    for headers in ({}, {"Authorization": "Bearer garbage"}, {"Authorization": "Bearer a.b.c"}):
        r = anon.get("/suites", headers=headers)
        body = assert_plain(r)
        assert r.status_code == 401 and body["code"] == "TP401" and "/auth/" in body["hint"], r.text
        assert r.headers["www-authenticate"].startswith("Bearer"), r.headers
    # An expired token: PostgREST's cache would still accept it; the hook says it expired.
    now = int(time.time())
    live = signer.sign(fresh_claims(person))
    assert anon.get("/suites", headers=bearer(live)).status_code == 200  # now it is cached
    expired = signer.sign(fresh_claims(person, iat=now - 120, nbf=now - 120, exp=now - 1))
    for path in ("/suites", "/users/me"):
        r = anon.get(path, headers=bearer(expired))
        body = assert_plain(r)
        assert r.status_code == 401 and "expired" in body["details"] and "refresh" in body["hint"].lower(), r.text


def test_an_api_key_that_is_wrong_is_not_called_missing(anon: httpx.Client) -> None:
    missing = anon.post("/auth/token")
    wrong = anon.post("/auth/token", headers={"Authorization": "ApiKey tp_0123456789ab_" + "0" * 48})
    garbled = anon.post("/auth/token", headers={"Authorization": "ApiKey not-a-key"})
    assert {missing.status_code, wrong.status_code, garbled.status_code} == {401}
    assert assert_error_body(missing)["message"] != assert_error_body(wrong)["message"], (missing.text, wrong.text)
    assert assert_error_body(garbled)["message"] != assert_error_body(missing)["message"], garbled.text


@pytest.mark.parametrize("resolution", ["merge-duplicates", "ignore-duplicates"])
@pytest.mark.parametrize("path", ["/suites/{id}/members", "/suite-members"])
def test_a_membership_upsert_is_refused_naming_prefer_not_a_raw_42p10(
        make_user: Callable[..., User], resolution: str, path: str) -> None:
    """Memberships are invitations written through an INSTEAD OF trigger, which PostgreSQL
    cannot combine with ON CONFLICT: say so (and what to do), and change nothing."""
    owner, invitee = make_user(), make_user()
    suite = create_suite(owner)
    body = {"suite_id": suite["id"], "user_id": invitee.id, "role": "viewer"}
    r = owner.client.post(path.format(id=suite["id"]), json=body,
                          headers={"Prefer": f"resolution={resolution},return=representation"})
    assert r.status_code == 400, r.text
    err = assert_error_body(r)
    assert err["code"] == "TP400" and "upsert" in err["message"] and "Prefer" in (err["details"] or ""), err
    assert "POST" in (err["hint"] or "") and "PATCH" in (err["hint"] or ""), err
    members = owner.client.get(f"/suites/{suite['id']}/members").json()
    assert [m["user_id"] for m in members] == [owner.id], members
