"""The permission matrix of DESIGN.md §4 over HTTP through the proxy.

One table below says, for each resource × operation × caller, the status the caller gets.
Every cell is a test of its own, run against a fresh target row, so a gap is a visible
missing or failing cell. Callers: the suite's owner, an editor, a viewer, a non-member,
the owner's read-only API key, the owner's write key limited to the suite (key_in) and
to another suite (key_out), and no token at all (anon).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import User, add_member, assert_error_body, create_key, create_suite, key_client, unique

CALLERS = ("owner", "editor", "viewer", "non_member", "read_key", "key_in", "key_out", "anon")

# status per caller, in the order of CALLERS
MATRIX: dict[tuple[str, str], tuple[int, ...]] = {
    #                                owner editor viewer non  read  k_in  k_out anon
    ("suites", "select"):           (200,  200,   200,   404, 200,  200,  404,  401),
    ("suites", "insert"):           (201,  201,   201,   201, 403,  403,  403,  401),
    ("suites", "update"):           (200,  403,   403,   404, 403,  200,  404,  401),
    ("suites", "delete"):           (200,  403,   403,   404, 403,  200,  404,  401),
    ("members", "select"):          (200,  200,   200,   404, 200,  200,  404,  401),
    ("members", "insert"):          (201,  403,   403,   403, 403,  201,  403,  401),
    ("members", "update"):          (200,  403,   403,   404, 403,  200,  404,  401),
    ("members", "delete"):          (200,  403,   403,   404, 403,  200,  404,  401),
    ("actions", "select"):          (200,  200,   200,   404, 200,  200,  404,  401),
    ("actions", "insert"):          (201,  201,   403,   403, 403,  201,  403,  401),
    ("actions", "update"):          (200,  200,   403,   404, 403,  200,  404,  401),
    ("actions", "delete"):          (200,  200,   403,   404, 403,  200,  404,  401),
    ("bindings", "select"):         (200,  200,   200,   404, 200,  200,  404,  401),
    ("bindings", "insert"):         (201,  201,   403,   403, 403,  201,  403,  401),
    ("bindings", "update"):         (200,  200,   403,   404, 403,  200,  404,  401),
    ("bindings", "delete"):         (200,  200,   403,   404, 403,  200,  404,  401),
    ("mcp_servers", "select"):      (200,  200,   200,   200, 200,  200,  200,  401),
    ("mcp_servers", "insert"):      (201,  201,   201,   201, 403,  403,  403,  401),
    ("mcp_servers", "update"):      (200,  403,   403,   403, 403,  403,  403,  401),
    ("mcp_servers", "delete"):      (200,  403,   403,   403, 403,  403,  403,  401),
    ("tools", "select"):            (200,  200,   200,   200, 200,  200,  200,  401),
    ("tools", "insert"):            (201,  403,   403,   403, 403,  403,  403,  401),
    ("tools", "update"):            (200,  403,   403,   403, 403,  403,  403,  401),
    ("tools", "delete"):            (200,  403,   403,   403, 403,  403,  403,  401),
}


@dataclass
class World:
    owner: User
    suite: dict[str, Any]
    other_suite: dict[str, Any]
    server: dict[str, Any]
    clients: dict[str, httpx.Client]
    make_user: Callable[..., User]

    def new_suite(self) -> dict[str, Any]:
        """A suite with the same memberships as the main one (for destructive cells)."""
        suite = create_suite(self.owner)
        for name, role in (("editor", "editor"), ("viewer", "viewer")):
            add_member(self.owner, suite["id"], self.extra[name], role)
        return suite

    extra: dict[str, User] | None = None  # type: ignore[assignment]
    base_url: str = ""

    def client_for(self, caller: str, suite_id: str) -> httpx.Client:
        """key_in is a key limited to the suite under test, also for a fresh suite."""
        if caller == "key_in" and suite_id != self.suite["id"]:
            return key_client(self.base_url, create_key(self.owner, suites=[suite_id])["key"])
        return self.clients[caller]


@pytest.fixture(scope="module")
def world(base_url: str, make_user: Callable[..., User]) -> World:
    owner, editor, viewer, stranger = make_user(), make_user(), make_user(), make_user()
    suite = create_suite(owner)
    other = create_suite(owner)
    add_member(owner, suite["id"], editor, "editor")
    add_member(owner, suite["id"], viewer, "viewer")
    r = owner.client.post("/mcp-servers", json={"name": unique("srv"), "url": "https://mcp.example/sse",
                                                "transport": "sse"},
                          headers={"Prefer": "return=representation", "Accept": "application/vnd.pgrst.object+json"})
    assert r.status_code == 201, r.text
    server = r.json()
    read_key = create_key(owner, access="read")
    key_in = create_key(owner, suites=[suite["id"]])
    key_out = create_key(owner, suites=[other["id"]])
    clients = {
        "owner": owner.client, "editor": editor.client, "viewer": viewer.client, "non_member": stranger.client,
        "read_key": key_client(base_url, read_key["key"]), "key_in": key_client(base_url, key_in["key"]),
        "key_out": key_client(base_url, key_out["key"]), "anon": httpx.Client(base_url=base_url, timeout=30),
    }
    w = World(owner, suite, other, server, clients, make_user)
    w.extra = {"editor": editor, "viewer": viewer}
    w.base_url = base_url
    return w


OBJECT = {"Accept": "application/vnd.pgrst.object+json", "Prefer": "return=representation"}


def _post(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post(path, json=body, headers=OBJECT)
    assert r.status_code == 201, r.text
    return dict(r.json())


# --- per resource: create a fresh target (as its owner/creator) and the cell's request ----------

def _target(world: World, resource: str, for_delete: bool) -> tuple[str, str, str, dict[str, Any], dict[str, Any]]:
    """(suite id, item path, collection path, insert body, update body) for a fresh row."""
    o = world.owner.client
    s = world.new_suite() if (resource == "suites" and for_delete) else world.suite
    sid = s["id"]
    if resource == "suites":
        slug = unique("s")
        return sid, f"/suites/{sid}", "/suites", {"name": slug, "slug": slug}, {"description": unique("d")}
    if resource == "members":
        person = world.make_user()
        add_member(world.owner, sid, person, "viewer")
        newcomer = world.make_user()
        return (sid, f"/suites/{sid}/members/{person.id}", f"/suites/{sid}/members",
                {"user_id": newcomer.id, "role": "viewer"}, {"role": "editor"})
    if resource == "actions":
        a = _post(o, f"/suites/{sid}/actions", {"name": unique("act")})
        return (sid, f"/suites/{sid}/actions/{a['id']}", f"/suites/{sid}/actions", {"name": unique("act")},
                {"description": unique("d")})
    if resource == "bindings":
        a1 = _post(o, f"/suites/{sid}/actions", {"name": unique("act")})
        a2 = _post(o, f"/suites/{sid}/actions", {"name": unique("act")})
        srv = world.server["id"]
        t = _post(o, f"/mcp-servers/{srv}/tools", {"name": unique("tool")})
        b = _post(o, "/action-tool-maps", {"suite_id": sid, "action_id": a1["id"], "mcp_server_id": srv,
                                           "tool_id": t["id"]})
        return (sid, f"/action-tool-maps/{b['id']}", "/action-tool-maps",
                {"suite_id": sid, "action_id": a2["id"], "mcp_server_id": srv, "tool_id": t["id"]},
                {"argument_mapping": {"q": "$.query"}})
    if resource == "mcp_servers":
        m = _post(o, "/mcp-servers", {"name": unique("srv"), "url": "https://mcp.example/", "transport": "stdio"})
        return (sid, f"/mcp-servers/{m['id']}", "/mcp-servers",
                {"name": unique("srv"), "url": "https://mcp.example/", "transport": "streamable-http"},
                {"description": unique("d")})
    if resource == "tools":
        srv = world.server["id"]
        t = _post(o, f"/mcp-servers/{srv}/tools", {"name": unique("tool")})
        return (sid, f"/mcp-servers/{srv}/tools/{t['id']}", f"/mcp-servers/{srv}/tools", {"name": unique("tool")},
                {"description": unique("d")})
    raise AssertionError(resource)


CELLS = [(res, op, caller, MATRIX[(res, op)][i]) for (res, op) in MATRIX for i, caller in enumerate(CALLERS)]


@pytest.mark.parametrize(("resource", "operation", "caller", "expected"), CELLS,
                         ids=[f"{r}-{o}-{c}" for r, o, c, _ in CELLS])
def test_cell(world: World, resource: str, operation: str, caller: str, expected: int) -> None:
    suite_id, item, collection, insert_body, update_body = _target(world, resource, operation == "delete")
    client = world.client_for(caller, suite_id)
    if operation == "select":
        r = client.get(item)
    elif operation == "insert":
        r = client.post(collection, json=insert_body, headers=OBJECT)
    elif operation == "update":
        r = client.patch(item, json=update_body)
    else:
        r = client.delete(item)
    assert r.status_code == expected, f"{caller} {operation} {resource}: {r.status_code} {r.text}"

    # The row is as the status says: readable and changed on success, untouched on denial.
    check = world.owner.client.get(item)
    if operation == "select" and expected == 200:
        assert r.json()["id"] == check.json()["id"]
    elif operation == "insert" and expected == 201:
        assert all(r.json()[k] == v for k, v in insert_body.items())
    elif operation == "update":
        changed = {k: check.json().get(k) == v for k, v in update_body.items()}
        assert all(changed.values()) == (expected == 200), (changed, check.text)
    elif operation == "delete":
        assert check.status_code == (404 if expected == 200 else 200), check.text
    if expected >= 400:
        assert_error_body(r)


def test_matrix_covers_every_resource_and_operation() -> None:
    resources = {r for r, _ in MATRIX}
    assert {(r, op) for r in resources for op in ("select", "insert", "update", "delete")} == set(MATRIX)
    assert all(len(row) == len(CALLERS) for row in MATRIX.values())
