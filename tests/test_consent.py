"""Issue 12's reproductions, each a regression test: tokens narrow every write, membership
needs consent, and no answer tells another tenant's row from a row that does not exist."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import psycopg

from tests.bundles import bundle
from tests.conftest import (
    User,
    accept,
    add_member,
    assert_error_body,
    create_key,
    create_suite,
    invite,
    key_client,
    unique,
)

JSONL = {"Content-Type": "application/jsonl"}
LINE = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


def _session_row(su: psycopg.Connection[dict[str, Any]], user: User, suite_id: str | None) -> str:
    """A session row as an upload leaves it (the metadata is what these tests write)."""
    sid = str(uuid.uuid4())
    su.execute("insert into app.sessions (id, user_id, suite_id, size_bytes, sha256, files, metadata)"
               " values (%s, %s, %s, 1, repeat('0', 64), '[]', '{\"v\": 1}')", [sid, user.id, suite_id])
    return sid


def _keys_alive(su: psycopg.Connection[dict[str, Any]], user: User) -> int:
    return int(su.execute("select count(*) as n from app.api_keys where user_id = %s and revoked_at is null",
                          [user.id]).fetchone()["n"])  # type: ignore[index]


# --- 1. a read-only key revokes nothing; a scoped key never reaches profile or keys -----------------

def test_a_read_only_key_revokes_no_key(base_url: str, make_user: Callable[..., User],
                                        su: psycopg.Connection[dict[str, Any]]) -> None:
    owner = make_user()
    write = create_key(owner, access="write")
    read = create_key(owner, access="read")
    alive = _keys_alive(su, owner)
    with key_client(base_url, read["key"]) as reader:
        answers = [reader.delete("/api-keys"), reader.delete("/api_keys"),
                   reader.delete("/api_keys", params={"id": "not.is.null"}),
                   reader.delete(f"/api-keys/{write['id']}"), reader.delete(f"/api-keys/{read['id']}"),
                   reader.patch("/api_keys", params={"id": "not.is.null"}, json={"name": "x"})]
    assert all(r.status_code >= 400 or r.json() in ([], None) for r in answers if r.content), \
        [(r.status_code, r.text) for r in answers]
    assert _keys_alive(su, owner) == alive
    assert httpx.post(f"{base_url}/auth/token", headers={"Authorization": f"ApiKey {write['key']}"}).status_code == 200


def test_a_suite_scoped_key_never_reaches_its_owners_profile_or_keys(base_url: str, make_user: Callable[..., User],
                                                                    su: psycopg.Connection[dict[str, Any]]) -> None:
    owner = make_user()
    suite = create_suite(owner)
    scoped = create_key(owner, access="write", suites=[suite["id"]])
    with key_client(base_url, scoped["key"]) as c:
        r = c.patch("/users", params={"id": f"eq.{owner.id}"}, json={"display_name": "hijacked"})
        assert r.status_code == 403, r.text
        assert c.get("/api-keys").json() == []
        assert c.delete(f"/api-keys/{scoped['id']}").status_code == 404
    name = su.execute("select display_name from app.users where id = %s", [owner.id]).fetchone()
    assert name == {"display_name": "Test Person"}
    assert _keys_alive(su, owner) == 1


# --- 2. a scoped key's unfiltered or filtered write stays inside its suites -------------------------

def test_a_suite_scoped_key_writes_only_its_suites_sessions(base_url: str, make_user: Callable[..., User],
                                                           su: psycopg.Connection[dict[str, Any]]) -> None:
    owner = make_user()
    mine, other = create_suite(owner), create_suite(owner)
    untagged, tagged_other, tagged_mine = (_session_row(su, owner, None), _session_row(su, owner, other["id"]),
                                           _session_row(su, owner, mine["id"]))
    scoped = create_key(owner, access="write", suites=[mine["id"]])
    with key_client(base_url, scoped["key"]) as c:
        assert c.get(f"/sessions/{untagged}").status_code == 404
        assert c.patch("/sessions", json={"metadata": {"v": 2}}).status_code == 400  # no filter: refused
        r = c.patch("/sessions", params={"id": "not.is.null"}, json={"metadata": {"v": 2}},
                    headers={"Prefer": "return=representation"})
        assert r.status_code == 200 and [s["id"] for s in r.json()] == [tagged_mine], r.text
    meta = {str(row["id"]): row["metadata"] for row in su.execute(
        "select id, metadata from app.sessions where id = any(%s::uuid[])",
        [[untagged, tagged_other, tagged_mine]]).fetchall()}
    assert meta == {untagged: {"v": 1}, tagged_other: {"v": 1}, tagged_mine: {"v": 2}}


# --- 3. membership needs consent ------------------------------------------------------------------

def test_an_outsider_cannot_pull_anyone_into_a_suite(base_url: str, make_user: Callable[..., User],
                                                     su: psycopg.Connection[dict[str, Any]]) -> None:
    victim, outsider = make_user(), make_user()
    server = victim.client.post("/mcp-servers", json={"name": unique("srv"), "url": "https://v.example/mcp"})
    assert server.status_code == 201, server.text
    ids = {s["created_by"] for s in outsider.client.get("/mcp-servers", params={"select": "created_by"}).json()}
    assert victim.id in ids  # the catalog is shared: ids are not secret, consent is what protects
    trap = create_suite(outsider)
    invite(outsider, trap["id"], victim, "owner")
    # The invitation grants nothing: no emails, no suite, no examples in the victim's export.
    assert victim.email not in outsider.client.get("/users", params={"select": "email"}).text
    assert trap["id"] not in victim.client.get("/suites").text
    poison = outsider.client.post("/examples", params={"suite_id": trap["id"], "model": "m"}, content=LINE,
                                  headers=JSONL)
    assert poison.status_code == 201, poison.text
    export = victim.client.get("/examples/export")
    assert export.status_code == 200 and poison.json()["id"] not in export.text and b"hello" not in export.content
    # The victim sees the invitation (with the suite's name and who sent it) and declines it.
    me = victim.client.get("/users/me").json()
    pending = [m for m in me["memberships"] if m["suite_id"] == trap["id"]]
    assert pending and pending[0]["accepted"] is False and pending[0]["name"] == trap["name"], me
    assert pending[0]["invited_by"] == outsider.id
    row = victim.client.get(f"/suites/{trap['id']}/members", params={"user_id": f"eq.{victim.id}"}).json()
    assert [(m["accepted"], m["suite_name"]) for m in row] == [(False, trap["name"])]
    assert victim.client.delete(f"/suites/{trap['id']}/members/{victim.id}").status_code == 200
    assert su.execute("select count(*) as n from app.suite_members where suite_id = %s and invitee = %s",
                      [trap["id"], victim.id]).fetchone() == {"n": 0}


def test_only_the_invitee_accepts_and_any_member_may_leave(make_user: Callable[..., User]) -> None:
    owner, friend, third = make_user(), make_user(), make_user()
    s = create_suite(owner)
    invite(owner, s["id"], friend, "editor")
    forced = owner.client.patch(f"/suites/{s['id']}/members", params={"user_id": f"eq.{friend.id}"},
                                json={"accepted": True})
    assert forced.status_code == 403, forced.text
    assert third.client.patch(f"/suites/{s['id']}/members", params={"user_id": f"eq.{friend.id}"},
                              json={"accepted": True}).text == ""  # not visible: nothing changed
    assert friend.client.get(f"/suites/{s['id']}").status_code == 404
    accept(friend, s["id"])
    assert friend.client.get(f"/suites/{s['id']}").status_code == 200
    # An editor cannot raise itself, but may leave.
    assert friend.client.patch(f"/suites/{s['id']}/members/{friend.id}", json={"role": "owner"}).status_code == 403
    assert friend.client.delete(f"/suites/{s['id']}/members/{friend.id}").status_code == 200
    assert friend.client.get(f"/suites/{s['id']}").status_code == 404
    # The last owner may not leave.
    r = owner.client.delete(f"/suites/{s['id']}/members/{owner.id}")
    assert r.status_code == 409 and "owner" in assert_error_body(r)["message"]


def test_inviting_an_unknown_id_or_email_answers_as_for_a_known_one(make_user: Callable[..., User]) -> None:
    owner, known = make_user(), make_user()
    s = create_suite(owner)
    answers = []
    for body in ({"user_id": known.id}, {"user_id": str(uuid.uuid4())},
                 {"email": known.email}, {"email": f"{unique('nobody')}@example.test"}):
        r = owner.client.post(f"/suites/{s['id']}/members", json={**body, "role": "viewer"},
                              headers={"Prefer": "return=representation"})
        assert r.status_code == 201, (body, r.text)
        row = r.json()[0]
        answers.append((r.status_code, sorted(row), row["accepted"], row["suite_name"],
                        row["user_id"] == body.get("user_id"), row["email"] == body.get("email")))
    assert len(set(map(str, answers))) == 1, answers  # known and unknown, by id and by email: one shape
    assert answers[0][2] is False and answers[0][4] and answers[0][5]


def test_an_email_invitation_reaches_only_an_account_that_verified_it(
        make_user: Callable[..., User], su: psycopg.Connection[dict[str, Any]]) -> None:
    owner, invitee = make_user(), make_user()
    s = create_suite(owner)
    r = owner.client.post(f"/suites/{s['id']}/members", json={"email": invitee.email.upper(), "role": "editor"})
    assert r.status_code == 201, r.text
    assert [m for m in invitee.client.get("/users/me").json()["memberships"] if m["suite_id"] == s["id"]] == []
    assert invitee.client.get(f"/suites/{s['id']}/members").json() == []
    # The account proves it owns the address (tests/test_email.py does it through the mail).
    su.execute("update app.users set email_verified_at = now() where id = %s", [invitee.id])
    mine = [m for m in invitee.client.get("/users/me").json()["memberships"] if m["suite_id"] == s["id"]]
    assert [(m["accepted"], m["role"]) for m in mine] == [(False, "editor")]
    accept(invitee, s["id"])
    assert invitee.client.get(f"/suites/{s['id']}").status_code == 200


# --- 4. the last-owner rule holds under concurrency ------------------------------------------------

def test_two_owners_demoting_themselves_at_once_leave_an_owner(make_user: Callable[..., User],
                                                              su: psycopg.Connection[dict[str, Any]]) -> None:
    a, b = make_user(), make_user()
    for _ in range(10):
        s = create_suite(a)
        add_member(a, s["id"], b, "owner")
        barrier = threading.Barrier(2)
        results: dict[str, int] = {}

        def demote(who: User, suite_id: str, barrier: threading.Barrier, results: dict[str, int]) -> None:
            barrier.wait()
            r = who.client.patch(f"/suites/{suite_id}/members/{who.id}", json={"role": "viewer"})
            results[who.id] = r.status_code

        threads = [threading.Thread(target=demote, args=(u, s["id"], barrier, results)) for u in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        owners = su.execute("select count(*) as n from app.suite_members where suite_id = %s and role = 'owner'"
                            " and accepted", [s["id"]]).fetchone()
        assert owners == {"n": 1}, (results, owners)
        assert sorted(results.values()) == [200, 409], results


# --- 5. examples name only sessions the registrant can read; replays obey the token --------------

def test_an_example_cannot_name_a_session_its_registrant_cannot_read(make_user: Callable[..., User],
                                                                    su: psycopg.Connection[dict[str, Any]]) -> None:
    editor, stranger = make_user(), make_user()
    s = create_suite(editor)
    private = _session_row(su, stranger, None)
    answers = []
    for session_id in (private, str(uuid.uuid4())):
        r = editor.client.post("/examples", params={"suite_id": s["id"], "model": "m", "session_id": session_id},
                               content=LINE, headers=JSONL)
        answers.append((r.status_code, assert_error_body(r)["message"]))
    assert answers[0] == answers[1] and answers[0][0] == 403, answers
    assert su.execute("select count(*) as n from app.examples where session_id = %s", [private]).fetchone() == {"n": 0}


def test_an_idempotent_replay_obeys_the_narrower_token(base_url: str, make_user: Callable[..., User]) -> None:
    owner = make_user()
    s = create_suite(owner)
    body = bundle(n_events=20, har_entries=2)
    key = unique("idem")
    first = owner.client.post("/sessions", content=body, headers={"Content-Type": "application/zip",
                                                                   "Idempotency-Key": key})
    assert first.status_code == 201, first.text
    scoped = create_key(owner, access="write", suites=[s["id"]])
    with key_client(base_url, scoped["key"]) as c:
        replay = c.post("/sessions", content=body, headers={"Content-Type": "application/zip",
                                                             "Idempotency-Key": key})
        assert replay.status_code == 404, replay.text
        assert first.json()["id"] not in replay.text
    again = owner.client.post("/sessions", content=body, headers={"Content-Type": "application/zip",
                                                                   "Idempotency-Key": key})
    assert again.status_code == 201 and again.json()["id"] == first.json()["id"]


# --- 6. no oracle in an insert ----------------------------------------------------------------------

def test_an_insert_naming_another_tenants_id_is_refused_without_telling(make_user: Callable[..., User]) -> None:
    owner, other = make_user(), make_user()
    theirs = create_suite(other)
    for guess in (theirs["id"], str(uuid.uuid4())):
        r = owner.client.post("/suites", json={"id": guess, "name": unique("guess")})
        body = assert_error_body(r)
        assert (r.status_code, body["code"], body["message"]) == (400, "TP400", "id is assigned by the server")
        assert "pkey" not in r.text


# --- 7. catalog changes never reach into other tenants' suites ---------------------------------------

def test_a_catalog_entry_bound_by_a_suite_its_creator_cannot_see_stays(make_user: Callable[..., User],
                                                                       su: psycopg.Connection[dict[str, Any]]) -> None:
    a, b = make_user(), make_user()
    server = a.client.post("/mcp-servers", json={"name": unique("srv"), "url": "https://a.example/mcp"},
                           headers={"Prefer": "return=representation"}).json()[0]
    tool = a.client.post(f"/mcp-servers/{server['id']}/tools", json={"name": "search"},
                         headers={"Prefer": "return=representation"}).json()[0]
    unused = a.client.post(f"/mcp-servers/{server['id']}/tools", json={"name": "unused"},
                           headers={"Prefer": "return=representation"}).json()[0]
    bs = create_suite(b)
    action = b.client.post(f"/suites/{bs['id']}/actions", json={"name": "find"},
                           headers={"Prefer": "return=representation"}).json()[0]
    binding = b.client.post("/action-tool-maps", json={"suite_id": bs["id"], "action_id": action["id"],
                                                       "tool_id": tool["id"]},
                            headers={"Prefer": "return=representation"})
    assert binding.status_code == 201 and binding.json()[0]["mcp_server_id"] == server["id"], binding.text
    for r in (a.client.delete(f"/mcp-servers/{server['id']}/tools/{tool['id']}"),
              a.client.delete(f"/mcp-servers/{server['id']}"),
              a.client.patch(f"/mcp-servers/{server['id']}", json={"url": "https://evil.example/mcp"}),
              a.client.patch(f"/mcp-servers/{server['id']}/tools/{tool['id']}", json={"input_schema": {"x": 1}})):
        body = assert_error_body(r)
        assert r.status_code == 409 and "1 binding" in body["message"] and bs["id"] not in r.text, r.text
    assert su.execute("select count(*) as n from app.action_tool_maps where id = %s",
                      [binding.json()[0]["id"]]).fetchone() == {"n": 1}
    assert su.execute("select url from app.mcp_servers where id = %s", [server["id"]]).fetchone() == \
        {"url": "https://a.example/mcp"}
    # What no other suite depends on stays the creator's to change.
    assert a.client.patch(f"/mcp-servers/{server['id']}", json={"description": "fine"}).status_code == 200
    assert a.client.delete(f"/mcp-servers/{server['id']}/tools/{unused['id']}").status_code == 200


# --- safe writes ------------------------------------------------------------------------------------

def test_a_collection_write_without_a_filter_is_refused(make_user: Callable[..., User],
                                                       su: psycopg.Connection[dict[str, Any]]) -> None:
    owner = make_user()
    suites = [create_suite(owner) for _ in range(2)]
    for r in (owner.client.delete("/suites"), owner.client.patch("/suites", json={"description": "all"}),
              owner.client.delete("/suites", params={"select": "id", "order": "id"}),
              owner.client.delete("/rest/v1/suites")):
        body = assert_error_body(r)
        assert r.status_code == 400 and body["code"] == "TP400" and "filter" in body["message"], r.text
    assert su.execute("select count(*) as n from app.suites where created_by = %s", [owner.id]).fetchone() == {"n": 2}
    assert owner.client.delete("/suites", params={"id": f"eq.{suites[0]['id']}"}).status_code == 204
