"""The capability API and identity endpoints end to end through the proxy (DESIGN.md §3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import User, add_member, assert_error_body, create_key, create_suite, key_client, unique

OBJECT = {"Accept": "application/vnd.pgrst.object+json", "Prefer": "return=representation"}


def _post(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post(path, json=body, headers=OBJECT)
    assert r.status_code == 201, r.text
    return dict(r.json())


@pytest.fixture(scope="module")
def owner(make_user: Callable[..., User]) -> User:
    return make_user()


@pytest.fixture(scope="module")
def suite(owner: User) -> dict[str, Any]:
    return create_suite(owner, description="checkout flows")


def test_health_and_ready(anon: httpx.Client) -> None:
    assert anon.get("/health").json() == {"status": "ok"}
    r = anon.get("/ready")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"database": "ok", "postgrest": "ok", "object_storage": "ok"}


def test_jwks_publishes_es256_public_keys_only(anon: httpx.Client) -> None:
    keys = anon.get("/.well-known/jwks.json").json()["keys"]
    assert keys and all(k["kty"] == "EC" and k["alg"] == "ES256" and k["kid"] for k in keys)
    assert all("d" not in k for k in keys), "private key material must never be published"


def test_openapi_is_served_at_openapi_json(anon: httpx.Client) -> None:
    r = anon.get("/openapi.json")  # GET / is an index pointing here (test_docs_page.py)
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert {"/suites", "/actions", "/mcp-servers", "/tools", "/action-tool-maps"} <= set(paths)


def test_users_me_shows_profile_and_memberships(owner: User, suite: dict[str, Any], anon: httpx.Client) -> None:
    me = owner.client.get("/users/me")
    assert me.status_code == 200, me.text
    body = me.json()
    assert body["id"] == owner.id and body["email"] == owner.email
    membership = {"suite_id": suite["id"], "name": suite["name"], "slug": suite["slug"], "role": "owner",
                  "accepted": True}
    assert any(membership.items() <= m.items() for m in body["memberships"]), body["memberships"]
    assert "password_hash" not in me.text
    r = anon.get("/users/me")
    assert r.status_code == 401
    assert_error_body(r)


def test_suite_crud_through_seed_paths(owner: User) -> None:
    created = create_suite(owner, description="first")
    assert created["created_by"] == owner.id
    sid = created["id"]
    got = owner.client.get(f"/suites/{sid}")
    assert got.status_code == 200 and got.json()["id"] == sid and isinstance(got.json(), dict)
    patched = owner.client.patch(f"/suites/{sid}", json={"description": "second"})
    assert patched.status_code == 200 and patched.json()["description"] == "second"
    assert patched.json()["updated_at"] > created["updated_at"]
    deleted = owner.client.delete(f"/suites/{sid}")
    assert deleted.status_code == 200 and deleted.json()["id"] == sid
    gone = owner.client.get(f"/suites/{sid}")
    assert gone.status_code == 404
    assert_error_body(gone)


def test_unknown_and_malformed_ids(owner: User) -> None:
    r = owner.client.get("/suites/00000000-0000-0000-0000-000000000000")
    assert r.status_code == 404
    assert_error_body(r)
    r = owner.client.get("/suites/not-a-uuid")
    assert r.status_code == 400
    assert_error_body(r)
    r = owner.client.post("/suites/00000000-0000-0000-0000-000000000000", json={})
    assert r.status_code == 405
    assert_error_body(r)


def test_postgrest_semantics_pass_through(owner: User, suite: dict[str, Any]) -> None:
    sid = suite["id"]
    names = [f"a{i:02d}-{unique('x')}" for i in range(5)]
    for n in names:
        _post(owner.client, f"/suites/{sid}/actions", {"name": n, "input_schema": {"type": "object"}})
    r = owner.client.get(f"/suites/{sid}/actions", params={"select": "name", "order": "name.desc", "limit": 2,
                                                           "offset": 1}, headers={"Prefer": "count=exact"})
    assert r.status_code == 206, r.text
    assert r.json() == [{"name": n} for n in sorted(names, reverse=True)[1:3]]
    assert r.headers["content-range"].endswith("/5")
    native = owner.client.get("/actions", params={"suite_id": f"eq.{sid}", "name": f"eq.{names[0]}"})
    assert [a["name"] for a in native.json()] == [names[0]]
    embedded = owner.client.get(f"/suites/{sid}", params={"select": "id,name"})
    assert embedded.json() == {"id": sid, "name": suite["name"]}


def test_nested_paths_take_the_parent_from_the_path(owner: User, suite: dict[str, Any]) -> None:
    sid = suite["id"]
    action = _post(owner.client, f"/suites/{sid}/actions", {"name": unique("nested")})
    assert action["suite_id"] == sid
    other = create_suite(owner)
    r = owner.client.post(f"/suites/{sid}/actions", json={"name": unique("x"), "suite_id": other["id"]})
    assert r.status_code == 400
    assert "does not match the path" in assert_error_body(r)["message"]
    r = owner.client.patch(f"/suites/{sid}/actions/{action['id']}", json={"suite_id": other["id"]})
    assert r.status_code in (400, 403), r.text  # suite_id is not updatable at all
    still = owner.client.get(f"/suites/{sid}/actions/{action['id']}")
    assert still.json()["suite_id"] == sid
    # The action is not reachable under another suite's path.
    assert owner.client.get(f"/suites/{other['id']}/actions/{action['id']}").status_code == 404


def test_action_names_are_unique_per_suite(owner: User, suite: dict[str, Any]) -> None:
    name = unique("dup")
    _post(owner.client, f"/suites/{suite['id']}/actions", {"name": name})
    r = owner.client.post(f"/suites/{suite['id']}/actions", json={"name": name})
    assert r.status_code == 409
    body = assert_error_body(r)
    assert body["code"] == "TP409" and "name" in body["details"], body
    other = create_suite(owner)
    _post(owner.client, f"/suites/{other['id']}/actions", {"name": name})


def test_mcp_catalog_and_tools(owner: User, make_user: Callable[..., User]) -> None:
    server = _post(owner.client, "/mcp-servers", {"name": unique("srv"), "url": "https://mcp.example/mcp",
                                                  "transport": "streamable-http", "description": "search"})
    assert server["created_by"] == owner.id
    tool = _post(owner.client, f"/mcp-servers/{server['id']}/tools", {"name": "search",
                                                                      "input_schema": {"type": "object"}})
    assert tool["mcp_server_id"] == server["id"]
    stranger = make_user()
    assert stranger.client.get(f"/mcp-servers/{server['id']}").json()["name"] == server["name"]
    listed = stranger.client.get(f"/mcp-servers/{server['id']}/tools").json()
    assert [t["id"] for t in listed] == [tool["id"]]
    r = owner.client.post("/mcp-servers", json={"name": unique("srv"), "url": "x", "transport": "carrier-pigeon"})
    assert r.status_code == 422
    body = assert_error_body(r)
    assert "transport" in body["message"] and "streamable-http" in body["message"], body
    r = owner.client.post(f"/mcp-servers/{server['id']}/tools", json={"name": "search"})
    assert r.status_code == 409


def test_bindings_must_be_consistent(owner: User, suite: dict[str, Any]) -> None:
    sid = suite["id"]
    other = create_suite(owner)
    action = _post(owner.client, f"/suites/{sid}/actions", {"name": unique("act")})
    foreign_action = _post(owner.client, f"/suites/{other['id']}/actions", {"name": unique("act")})
    s1 = _post(owner.client, "/mcp-servers", {"name": unique("srv"), "url": "u", "transport": "sse"})
    s2 = _post(owner.client, "/mcp-servers", {"name": unique("srv"), "url": "u", "transport": "sse"})
    tool = _post(owner.client, f"/mcp-servers/{s1['id']}/tools", {"name": "t"})
    ok = _post(owner.client, "/action-tool-maps", {"suite_id": sid, "action_id": action["id"],
                                                   "mcp_server_id": s1["id"], "tool_id": tool["id"],
                                                   "argument_mapping": {"query": "$.q"}})
    assert ok["argument_mapping"] == {"query": "$.q"}
    assert owner.client.get(f"/action-tool-maps/{ok['id']}").json()["tool_id"] == tool["id"]
    unbound = _post(owner.client, f"/suites/{sid}/actions", {"name": unique("act")})
    bad = [  # an action of another suite; a tool of another server; a tool that does not exist
        {"suite_id": sid, "action_id": foreign_action["id"], "mcp_server_id": s1["id"], "tool_id": tool["id"]},
        {"suite_id": sid, "action_id": unbound["id"], "mcp_server_id": s2["id"], "tool_id": tool["id"]},
        {"suite_id": sid, "action_id": unbound["id"], "mcp_server_id": s1["id"],
         "tool_id": "00000000-0000-0000-0000-000000000000"},
    ]
    for body, field in zip(bad, ["action_id", "mcp_server_id", "tool_id"], strict=True):
        r = owner.client.post("/action-tool-maps", json=body)
        assert r.status_code == 422, (body, r.text)
        assert field in assert_error_body(r)["details"], (field, r.text)
    count = owner.client.get("/action-tool-maps", params={"suite_id": f"eq.{sid}"}, headers={"Prefer": "count=exact"})
    assert count.headers["content-range"].endswith("/1")


def test_members_management_and_last_owner(owner: User, make_user: Callable[..., User]) -> None:
    s = create_suite(owner)
    friend = make_user()
    add_member(owner, s["id"], friend, "editor")
    members = owner.client.get(f"/suites/{s['id']}/members").json()
    assert {(m["user_id"], m["role"]) for m in members} == {(owner.id, "owner"), (friend.id, "editor")}
    assert friend.client.get(f"/suites/{s['id']}").status_code == 200
    r = owner.client.patch(f"/suites/{s['id']}/members/{friend.id}", json={"role": "owner"})
    assert r.status_code == 200 and r.json()["role"] == "owner"
    r = owner.client.patch(f"/suites/{s['id']}/members/{friend.id}", json={"role": "superuser"})
    assert r.status_code == 422 and "owner" in assert_error_body(r)["message"], r.text
    # The last owner cannot leave the suite ownerless.
    assert owner.client.delete(f"/suites/{s['id']}/members/{friend.id}").status_code == 200
    r = owner.client.delete(f"/suites/{s['id']}/members/{owner.id}")
    assert r.status_code == 409
    assert "owner" in assert_error_body(r)["message"]
    assert friend.client.get(f"/suites/{s['id']}").status_code == 404


def test_api_keys_lifecycle(owner: User, make_user: Callable[..., User], base_url: str) -> None:
    key = create_key(owner, access="read")
    assert key["key"].startswith("tp_") and key["prefix"] and key["key"].startswith(key["prefix"])
    listed = owner.client.get("/api-keys")
    assert listed.status_code == 200
    row = next(k for k in listed.json() if k["id"] == key["id"])
    assert set(row) == {"id", "name", "prefix", "suites", "access", "expires_at", "last_used_at", "revoked_at",
                        "created_at"}
    assert key["key"] not in listed.text and "hash" not in listed.text
    assert row["last_used_at"] is None
    key_client(base_url, key["key"]).close()
    assert owner.client.get(f"/api-keys/{key['id']}").json()["last_used_at"] is not None
    # Someone else can neither see nor revoke it.
    stranger = make_user()
    assert stranger.client.get(f"/api-keys/{key['id']}").status_code == 404
    assert stranger.client.delete(f"/api-keys/{key['id']}").status_code == 404
    revoked = owner.client.delete(f"/api-keys/{key['id']}")
    assert revoked.status_code == 200 and revoked.json()["id"] == key["id"]
    assert key["id"] not in {k["id"] for k in owner.client.get("/api-keys").json()}
    assert owner.client.delete(f"/api-keys/{key['id']}").status_code == 404


def test_api_key_creation_rules(owner: User, make_user: Callable[..., User], suite: dict[str, Any]) -> None:
    stranger_suite = create_suite(make_user())
    for body, status in [
        ({"name": "x", "access": "admin"}, 422),
        ({"name": "x", "suites": [stranger_suite["id"]]}, 403),  # not a member: 403, as for a suite that does not exist
        ({"name": "x", "expires_at": "2001-01-01T00:00:00Z"}, 422),  # out of range (DESIGN §9), names the field
        ({"name": ""}, 422),
        ({}, 422),
    ]:
        r = owner.client.post("/api-keys", json=body)
        assert r.status_code == status, (body, r.text)
        assert_error_body(r)
    scoped = create_key(owner, suites=[suite["id"]], expires_at="2099-01-01T00:00:00Z")
    assert scoped["suites"] == [suite["id"]]


def test_proxy_errors_are_json(owner: User, anon: httpx.Client, stack: Any) -> None:
    big = "x" * (2 * 1024 * 1024)
    r = owner.client.post("/suites", content=f'{{"name":"{big}"}}', headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert_error_body(r)
    r = anon.get("/" + "a" * 20000)
    assert r.status_code in (400, 414)
    assert_error_body(r)


def test_cors_preflight_for_the_storefront(anon: httpx.Client) -> None:
    r = anon.options("/suites", headers={"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "http://localhost:5173"
    r = anon.options("/suites", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers or r.headers["access-control-allow-origin"] == ""


def test_request_id_is_returned_and_propagated(anon: httpx.Client) -> None:
    r = anon.get("/health", headers={"X-Request-Id": "test-req-123"})
    assert r.headers["x-request-id"] == "test-req-123"
    generated = anon.get("/health").headers["x-request-id"]
    assert len(generated) >= 16


BAD_BODIES = [
    ("malformed JSON", '{"name": "x", ', 400),
    ("wrong type", '{"name": 12, "slug": ["a"]}', 422),
    ("unknown column", '{"name": "x", "slug": "x-unknown-col", "colour": "red"}', 400),
    ("not writable column",
     '{"name": "x", "slug": "x-created-by", "created_by": "00000000-0000-0000-0000-000000000000"}', 403),
    ("violates a check", '{"name": "x", "slug": "Not A Slug!"}', 422),
]


@pytest.mark.parametrize(("what", "body", "status"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_refused_and_writes_nothing(owner: User, su: psycopg.Connection[dict[str, Any]], what: str,
                                                 body: str, status: int) -> None:
    before = su.execute("select count(*) as n from app.suites").fetchone()
    r = owner.client.post("/suites", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, (what, r.text)
    assert_error_body(r)
    after = su.execute("select count(*) as n from app.suites").fetchone()
    assert before == after


def test_without_a_token_everything_is_401(anon: httpx.Client, suite: dict[str, Any]) -> None:
    for method, path in [("GET", "/suites"), ("GET", f"/suites/{suite['id']}"), ("POST", "/suites"),
                         ("GET", "/mcp-servers"), ("GET", "/api-keys"), ("POST", "/api-keys"),
                         ("GET", f"/suites/{suite['id']}/actions"), ("GET", "/sessions"), ("GET", "/examples")]:
        r = anon.request(method, path, json={} if method == "POST" else None)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert_error_body(r)


def test_membership_through_an_editor_token_view(owner: User, make_user: Callable[..., User]) -> None:
    s = create_suite(owner)
    editor = make_user()
    add_member(owner, s["id"], editor, "editor")
    me = editor.client.get("/users/me").json()
    wanted = {"suite_id": s["id"], "name": s["name"], "slug": s["slug"], "role": "editor", "accepted": True}
    assert any(wanted.items() <= m.items() for m in me["memberships"]), me["memberships"]
    seen = editor.client.get("/users", params={"id": f"eq.{owner.id}"}).json()
    assert [u["id"] for u in seen] == [owner.id]
    assert "password_hash" not in str(seen)


def test_a_taken_slug_is_a_conflict_with_or_without_representation(owner: User) -> None:
    first = create_suite(owner)
    for headers in ({}, {"Prefer": "return=representation"}, OBJECT):
        r = owner.client.post("/suites", json={"name": "again", "slug": first["slug"]}, headers=headers)
        assert r.status_code == 409, (headers, r.text)
        body = assert_error_body(r)
        assert body["code"] == "TP409" and "slug" in body["details"], body
