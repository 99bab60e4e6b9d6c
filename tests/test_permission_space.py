"""The permission space between the matrix's cells (issue 12, DESIGN §4 and §9).

tests/test_permission_matrix.py checks each table x operation x caller with a session token
and one request shape. This file generates the space around it from data: caller kinds
(session token, write key, read key, keys scoped to this or another suite, an invitee who
has not accepted, accepted viewer and editor, an outsider, the pipeline) x every exposed
table x request shapes (by id, filtered, unfiltered, embedded select, insert, bulk insert,
upsert, and unfiltered UPDATE/DELETE in SQL as the real role). Each cell asks the model
below whether the caller may do it, sends the request, and checks the status class and
that nothing changed or leaked when it may not (and that the change happened when it may).

Every write cell acts on a row made for that cell (by the superuser, as an operator would),
so cells are independent and a cell that wrongly succeeds cannot hide another.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import User, add_member, create_key, create_suite, invite, key_client, set_account_role, unique

CALLERS = ["owner", "write_key", "read_key", "key_this_suite", "key_other_suite", "invitee", "viewer", "editor",
           "outsider", "pipeline"]
SUITE_READERS = {"owner", "write_key", "read_key", "key_this_suite", "viewer", "editor", "pipeline"}
SUITE_EDITORS = {"owner", "write_key", "key_this_suite", "editor"}
SUITE_OWNERS = {"owner", "write_key", "key_this_suite"}
SIGNED_IN = set(CALLERS)
UNSCOPED_WRITERS = {"owner", "write_key", "invitee", "viewer", "editor", "outsider"}  # full-access tp_user tokens
OWNER_PERSONAL = {"owner", "write_key"}  # rows of no suite that belong to the owner


@dataclass(frozen=True)
class Table:
    """One exposed table and who may do what to a row of suite S made by the owner O."""
    name: str            # app.<name>
    path: str            # collection path through the proxy ({S}, {M} are filled in)
    read: set[str]
    patch: set[str]
    delete: set[str]
    insert: set[str]
    patch_body: dict[str, Any] = field(default_factory=dict)
    item: str = "{path}/{id}"  # singular path
    embed: str | None = None   # parent collection and select that embeds this table


TABLES = [
    Table("suites", "/suites", SUITE_READERS, SUITE_OWNERS, SUITE_OWNERS, UNSCOPED_WRITERS,
          {"description": "changed"}),
    Table("actions", "/actions", SUITE_READERS, SUITE_EDITORS, SUITE_EDITORS, SUITE_EDITORS,
          {"description": "changed"}, item="/suites/{S}/actions/{id}", embed="/suites?select=id,actions(id)"),
    Table("action_tool_maps", "/action-tool-maps", SUITE_READERS, SUITE_EDITORS, SUITE_EDITORS, SUITE_EDITORS,
          {"argument_mapping": {"changed": True}}, embed="/suites?select=id,action_tool_maps(id)"),
    Table("suite_members", "/suites/{S}/members", SUITE_READERS, SUITE_OWNERS, SUITE_OWNERS, SUITE_OWNERS,
          {"role": "editor"}, item="", embed="/suites?select=id,suite_members(id)"),
    Table("mcp_servers", "/mcp-servers", SIGNED_IN, OWNER_PERSONAL, OWNER_PERSONAL, UNSCOPED_WRITERS,
          {"description": "changed"}),
    Table("tools", "/mcp-servers/{M}/tools", SIGNED_IN, OWNER_PERSONAL, OWNER_PERSONAL, OWNER_PERSONAL,
          {"description": "changed"}, embed="/mcp-servers?select=id,tools(id)"),
    Table("sessions", "/sessions", SUITE_READERS, SUITE_OWNERS, set(), set(), {"metadata": {"changed": True}},
          embed="/suites?select=id,sessions(id)"),
    Table("examples", "/examples", SUITE_READERS, set(), set(), set(), {"model": "changed"},
          embed="/suites?select=id,examples(id)"),
    Table("api_keys", "/api-keys", {"owner", "write_key", "read_key"}, set(), OWNER_PERSONAL, set(),
          {"name": "changed"}),
    # the owner is also in the other suite, so the key scoped to it sees the owner as a co-member
    Table("users", "/users",
          {"owner", "write_key", "read_key", "key_this_suite", "key_other_suite", "viewer", "editor"},
          OWNER_PERSONAL, set(), set(), {"display_name": "changed"}),
]
BY_NAME = {t.name: t for t in TABLES}
# sessions of the owner without a suite: only the owner's unscoped tokens (and the pipeline) see them
UNTAGGED_READ = {"owner", "write_key", "read_key", "pipeline"}


@dataclass
class World:
    su: psycopg.Connection[dict[str, Any]]
    owner: User
    suite: str
    other_suite: str
    server: str
    clients: dict[str, httpx.Client]
    people: dict[str, User]
    spare_suites: list[str]


def _sql_one(su: psycopg.Connection[dict[str, Any]], query: str, params: list[Any]) -> dict[str, Any]:
    row = su.execute(query, params).fetchone()
    assert row is not None
    return row


def _spare_suite(su: psycopg.Connection[dict[str, Any]], owner: User, people: dict[str, User]) -> str:
    """A suite with the same members as S, for a cell that may delete it (its creator's owner
    row comes from the suites trigger)."""
    sid = str(uuid.uuid4())
    with su.transaction():
        su.execute("insert into app.suites (id, name, slug, created_by) values (%s, %s, %s, %s)",
                   [sid, "spare", unique("spare"), owner.id])
        for who, role in (("viewer", "viewer"), ("editor", "editor")):
            su.execute("insert into app.suite_members (suite_id, user_id, invitee, role, accepted, accepted_at)"
                       " values (%s, %s, %s, %s, true, now())", [sid, people[who].id, people[who].id, role])
        su.execute("insert into app.suite_members (suite_id, invitee, role) values (%s, %s, 'editor')",
                   [sid, people["invitee"].id])
    return sid


@pytest.fixture(scope="module")
def world(base_url: str, make_user: Callable[..., User], superuser_dsn: str) -> Iterator[World]:
    owner, viewer, editor, invitee, outsider = make_user(), make_user(), make_user(), make_user(), make_user()
    pipeline = make_user()
    set_account_role(superuser_dsn, pipeline.id, "tp_pipeline")
    r = httpx.post(f"{base_url}/auth/login", json={"email": pipeline.email, "password": pipeline.password})
    assert r.status_code == 200, r.text
    pipeline.client.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
    people = {"viewer": viewer, "editor": editor, "invitee": invitee, "outsider": outsider}
    s = create_suite(owner)
    t = create_suite(owner)
    create_suite(outsider)
    add_member(owner, s["id"], viewer, "viewer")
    add_member(owner, s["id"], editor, "editor")
    invite(owner, s["id"], invitee, "editor")
    server = owner.client.post("/mcp-servers", json={"name": unique("srv"), "url": "https://mcp.example/x"},
                               headers={"Prefer": "return=representation"})
    assert server.status_code == 201, server.text
    su = psycopg.connect(superuser_dsn, autocommit=True, row_factory=dict_row)
    spares = [_spare_suite(su, owner, {**people, "owner": owner}) for _ in range(8 * len(CALLERS))]
    keys = {
        "write_key": create_key(owner, access="write"),
        "read_key": create_key(owner, access="read"),
        "key_this_suite": create_key(owner, access="write", suites=[s["id"], *spares]),
        "key_other_suite": create_key(owner, access="write", suites=[t["id"]]),
    }
    clients = {"owner": owner.client, "pipeline": pipeline.client,
               **{who: p.client for who, p in people.items()},
               **{who: key_client(base_url, k["key"]) for who, k in keys.items()}}
    yield World(su, owner, s["id"], t["id"], server.json()[0]["id"], clients, people, spares)
    su.close()


# --- rows made for one cell -----------------------------------------------------------

def fresh_row(w: World, table: str, suite: str | None = None) -> str:
    """A row of `table` in suite S (or the given one), made by the owner, for one cell."""
    su, o, s = w.su, w.owner.id, suite or w.suite
    rid = str(uuid.uuid4())
    if table == "suites":
        return w.spare_suites.pop()
    if table == "actions":
        su.execute("insert into app.actions (id, suite_id, name) values (%s, %s, %s)", [rid, s, unique("act")])
    elif table == "action_tool_maps":
        action, tool = fresh_row(w, "actions", s), fresh_row(w, "tools")
        su.execute("insert into app.action_tool_maps (id, suite_id, action_id, mcp_server_id, tool_id)"
                   " values (%s, %s, %s, %s, %s)", [rid, s, action, w.server, tool])
    elif table == "suite_members":
        uid = _sql_one(su, "insert into app.users (email) values (%s) returning id",
                       [f"{unique('m')}@example.test"])["id"]
        su.execute("insert into app.suite_members (id, suite_id, user_id, invitee, role, accepted, accepted_at)"
                   " values (%s, %s, %s, %s, 'viewer', true, now())", [rid, s, uid, uid])
    elif table == "mcp_servers":
        su.execute("insert into app.mcp_servers (id, name, url, transport, created_by) values (%s, %s, 'https://x', "
                   "'sse', %s)", [rid, unique("srv"), o])
    elif table == "tools":
        su.execute("insert into app.tools (id, mcp_server_id, name) values (%s, %s, %s)", [rid, w.server, unique("t")])
    elif table in ("sessions", "sessions_untagged"):
        su.execute("insert into app.sessions (id, user_id, suite_id, size_bytes, sha256, files, metadata)"
                   " values (%s, %s, %s, 1, repeat('0', 64), '[]', '{}')",
                   [rid, o, None if table == "sessions_untagged" else s])
    elif table == "examples":
        su.execute("insert into app.examples (id, suite_id, model, message_count, size_bytes, sha256)"
                   " values (%s, %s, 'm', 1, 1, repeat('0', 64))", [rid, s])
    elif table == "api_keys":
        su.execute("insert into app.api_keys (id, user_id, name, prefix, key_hash) values (%s, %s, %s, %s, %s)",
                   [rid, o, unique("k"), "tp_" + uuid.uuid4().hex[:12], uuid.uuid4().bytes])
    elif table == "users":
        return o
    else:
        raise AssertionError(table)
    return rid


def snapshot(w: World, table: str, rid: str) -> dict[str, Any] | None:
    name = "sessions" if table == "sessions_untagged" else table
    row = w.su.execute(f"select to_jsonb(t) - 'updated_at' - 'last_used_at' as r from app.{name} t where t.id = %s",
                       [rid]).fetchone()
    return None if row is None else dict(row["r"])


def item_path(w: World, t: Table, rid: str) -> str:
    if t.name == "suite_members":
        uid = _sql_one(w.su, "select user_id from app.suite_members where id = %s", [rid])["user_id"]
        return f"/suites/{w.suite}/members/{uid}"
    return t.item.format(path=t.path, id=rid, S=w.suite).format(M=w.server, S=w.suite)


def coll(w: World, t: Table) -> str:
    return t.path.format(S=w.suite, M=w.server)


def body_of(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return None


# --- the cells ----------------------------------------------------------------------

READ_SHAPES = ["get_by_id", "get_filtered", "get_unfiltered", "get_embedded"]
WRITE_SHAPES = ["patch_by_id", "patch_filtered", "patch_unfiltered", "delete_by_id", "delete_filtered",
                "delete_unfiltered"]
READ_TABLES = [*BY_NAME, "sessions_untagged"]


def _table(name: str) -> Table:
    if name == "sessions_untagged":
        base = BY_NAME["sessions"]
        return Table("sessions_untagged", base.path, UNTAGGED_READ, OWNER_PERSONAL, set(), set(), base.patch_body)
    return BY_NAME[name]


def read_cells() -> list[tuple[str, str, str]]:
    return [(tb, shape, c) for tb in READ_TABLES for shape in READ_SHAPES for c in CALLERS
            if not (shape == "get_embedded" and _table(tb).embed is None)]


def write_cells() -> list[tuple[str, str, str]]:
    return [(tb, shape, c) for tb in READ_TABLES for shape in WRITE_SHAPES for c in CALLERS]


def _ids_in(payload: Any) -> str:
    return json.dumps(payload)


@pytest.mark.parametrize(("table", "shape", "caller"), read_cells())
def test_read_cell(world: World, table: str, shape: str, caller: str) -> None:
    t = _table(table)
    rid = fresh_row(world, "sessions_untagged" if table == "sessions_untagged" else table) \
        if table not in ("suites", "users") else (world.suite if table == "suites" else world.owner.id)
    client = world.clients[caller]
    allowed = caller in t.read
    if shape == "get_by_id":
        if table == "suite_members":
            r = client.get(item_path(world, t, rid))
        elif table in ("users", "sessions_untagged"):  # no {id} path: one object asked of the collection
            r = client.get(f"{coll(world, t)}?id=eq.{rid}", headers={"Accept": "application/vnd.pgrst.object+json"})
            assert r.status_code == (200 if allowed else 406), (caller, r.status_code, r.text[:300])
            return
        else:
            r = client.get(item_path(world, t, rid))
        assert r.status_code == (200 if allowed else 404), (caller, r.status_code, r.text[:300])
        return
    if shape == "get_filtered":
        r = client.get(coll(world, t), params={"id": f"eq.{rid}"})
        assert r.status_code == 200, (caller, r.status_code, r.text[:300])
        seen = rid in _ids_in(body_of(r))
    else:  # the collection newest first, page by page (db-max-rows caps one answer); the target is
        # among the newest rows (made for this cell, or the module's suite made after the scale data)
        target = coll(world, t) if shape == "get_unfiltered" else t.embed
        assert target is not None
        path, _, query = target.partition("?")
        extra = dict(part.split("=", 1) for part in query.split("&") if part)
        seen, offset = False, 0
        while not seen and offset < 5000:
            r = client.get(path, params={**extra, "limit": "1000", "offset": str(offset), "order": "created_at.desc"})
            assert r.status_code == 200, (caller, r.status_code, r.text[:300])
            rows = body_of(r)
            seen = rid in _ids_in(rows)
            if len(rows) < 1000:
                break
            offset += 1000
    assert seen == allowed, (caller, shape, "sees" if seen else "does not see", r.text[:300])


@pytest.mark.parametrize(("table", "shape", "caller"), write_cells())
def test_write_cell(world: World, table: str, shape: str, caller: str) -> None:
    t = _table(table)
    op = shape.split("_", 1)[0]
    rid = fresh_row(world, table)
    before = snapshot(world, table, rid)
    assert before is not None
    client = world.clients[caller]
    if shape.endswith("by_id") and table in ("users", "sessions_untagged"):
        shape = shape.replace("by_id", "filtered")  # no singular path of their own
    path, params = ((item_path(world, t, rid), None) if shape.endswith("by_id")
                    else (coll(world, t), {"id": f"eq.{rid}"} if shape.endswith("filtered") else None))
    if shape.endswith("unfiltered"):
        params = None
    if table == "sessions" and op == "delete" and shape.endswith("by_id"):
        pass  # DELETE /sessions/{id} is ext's: deletes the row and its objects
    if op == "patch":
        r = client.patch(path, params=params, json=t.patch_body)
        allowed = caller in t.patch
    else:
        r = client.delete(path, params=params)
        allowed = caller in t.delete or (table == "sessions" and shape.endswith("by_id") and caller in SUITE_OWNERS)
    nested = "{" in t.path  # /suites/{S}/members, /mcp-servers/{M}/tools: the parent in the path is the filter
    if shape.endswith("unfiltered") and not nested:
        allowed = False  # safe writes: a collection write needs a row filter (400)
        assert r.status_code == 400 and r.json()["code"] == "TP400", (caller, shape, r.status_code, r.text[:300])
    after = snapshot(world, table, rid)
    if table == "users" and after != before:
        world.su.execute("update app.users set display_name = %s where id = %s", [before["display_name"], rid])
    changed = after != before
    if shape.endswith("unfiltered") and allowed:  # every member of S (the owner too: the last-owner rule)
        assert r.status_code < 300 or r.status_code == 409, (caller, shape, r.status_code, r.text[:300])
        return
    if allowed:
        assert r.status_code < 300, (caller, shape, r.status_code, r.text[:300])
        if shape.endswith("unfiltered"):
            return  # a nested collection (members of S): the parent is the filter; what it hit is checked below
        if op == "delete":
            assert after is None or (table == "api_keys" and after.get("revoked_at")), (caller, shape, after)
        else:
            assert changed, (caller, shape, "answered", r.status_code, "but nothing changed")
    else:
        assert r.status_code >= 400 or r.status_code == 204 or body_of(r) == [], (caller, shape, r.status_code, r.text)
        assert not changed, (caller, shape, r.status_code, "changed", before, after)


INSERTS: dict[str, Callable[[World], tuple[str, dict[str, Any], str]]] = {
    # path, body, the SQL that counts the rows the body would make (by its marker)
    "suites": lambda w: ("/suites", {"name": (m := unique("ins"))}, m),
    "actions": lambda w: ("/actions", {"suite_id": w.suite, "name": (m := unique("ins"))}, m),
    "suite_members": lambda w: (f"/suites/{w.suite}/members", {"email": f"{(m := unique('ins'))}@example.test",
                                                              "role": "viewer"}, m),
    "mcp_servers": lambda w: ("/mcp-servers", {"name": (m := unique("ins")), "url": "https://x.example"}, m),
    "tools": lambda w: (f"/mcp-servers/{w.server}/tools", {"name": (m := unique("ins"))}, m),
}
MARKER_SQL = {
    "suites": "select count(*) as n from app.suites where name like %s",
    "actions": "select count(*) as n from app.actions where name like %s",
    "suite_members": "select count(*) as n from app.suite_members where invitee_email like %s",
    "mcp_servers": "select count(*) as n from app.mcp_servers where name like %s",
    "tools": "select count(*) as n from app.tools where name like %s",
}


@pytest.mark.parametrize("bulk", [False, True], ids=["insert", "bulk_insert"])
@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("table", list(INSERTS))
def test_insert_cell(world: World, table: str, caller: str, bulk: bool) -> None:
    path, body, marker = INSERTS[table](world)
    payload: Any = body
    if bulk:
        second = json.loads(json.dumps(body).replace(marker, marker + "-2"))
        payload = [body, second]
    r = world.clients[caller].post(path, json=payload)
    made = _sql_one(world.su, MARKER_SQL[table], [f"{marker}%"])["n"]
    allowed = caller in BY_NAME[table].insert
    if allowed:
        assert r.status_code == 201, (caller, r.status_code, r.text[:300])
        assert made == (2 if bulk else 1)
    else:
        assert r.status_code in (401, 403, 404, 422), (caller, r.status_code, r.text[:300])
        assert made == 0, (caller, "made", made)


def test_an_insert_naming_an_id_is_refused_everywhere(world: World) -> None:
    for table in INSERTS:
        path, body, marker = INSERTS[table](world)
        r = world.clients["owner"].post(path, json={**body, "id": world.other_suite})
        assert r.status_code in (400, 403), (table, r.status_code, r.text)
        assert "suites_pkey" not in r.text and _sql_one(world.su, MARKER_SQL[table], [f"{marker}%"])["n"] == 0


UPSERTS = {
    "actions": ("suite_id,name", lambda w, rid: {"suite_id": w.suite, "name": _name(w, "actions", rid),
                                                  "description": "upserted"}),
    "tools": ("mcp_server_id,name", lambda w, rid: {"mcp_server_id": w.server, "name": _name(w, "tools", rid),
                                                     "description": "upserted"}),
}


def _name(w: World, table: str, rid: str) -> str:
    return str(_sql_one(w.su, f"select name from app.{table} where id = %s", [rid])["name"])


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("table", list(UPSERTS))
def test_upsert_cell(world: World, table: str, caller: str) -> None:
    on_conflict, make_body = UPSERTS[table]
    rid = fresh_row(world, table)
    r = world.clients[caller].post(f"/{table}", params={"on_conflict": on_conflict}, json=make_body(world, rid),
                                   headers={"Prefer": "resolution=merge-duplicates,return=representation"})
    after = snapshot(world, table, rid)
    assert after is not None
    if caller in BY_NAME[table].patch:
        assert r.status_code in (200, 201), (caller, r.status_code, r.text[:300])
        assert after["description"] == "upserted" and r.json()[0]["id"] == rid
    else:
        assert r.status_code in (401, 403, 404, 422), (caller, r.status_code, r.text[:300])
        assert after.get("description") != "upserted"


# --- SQL as the real role: unfiltered writes the proxy would refuse, sent straight ------

def claims_of(w: World, caller: str) -> dict[str, Any]:
    token = w.clients[caller].headers["Authorization"].split()[1]
    import jwt
    return dict(jwt.decode(token, options={"verify_signature": False}))


SQL_WRITES = {
    "suites": "update app.suites set description = 'sql' returning id",
    "actions": "update app.actions set description = 'sql' returning id",
    "action_tool_maps": "update app.action_tool_maps set argument_mapping = '{\"sql\": 1}' returning id",
    "suite_members": "update app.suite_members set role = 'viewer' returning id",
    "mcp_servers": "update app.mcp_servers set description = 'sql' returning id",
    "tools": "update app.tools set description = 'sql' returning id",
    "sessions": "update app.sessions set metadata = '{\"sql\": 1}' returning id",
    "api_keys": "update app.api_keys set revoked_at = now() returning id",
    "users": "update app.users set display_name = 'sql' returning id",
}


@pytest.mark.parametrize("caller", [c for c in CALLERS if c != "pipeline"])
@pytest.mark.parametrize("table", list(SQL_WRITES))
@pytest.mark.parametrize("op", ["update", "delete"])
def test_sql_unfiltered_write_cell(world: World, superuser_dsn: str, table: str, caller: str, op: str) -> None:
    """An unfiltered UPDATE or DELETE as tp_user with the caller's claims touches only rows the
    model lets that caller write (a read-only key: none; a suite-scoped key: none outside
    its suites and none of no suite)."""
    rid = fresh_row(world, table)
    statement = SQL_WRITES[table] if op == "update" else f"delete from app.{table} returning id"
    claims = claims_of(world, caller)
    with psycopg.connect(superuser_dsn, row_factory=dict_row) as conn:
        conn.execute("select set_config('role', 'tp_user', true), set_config('request.jwt.claims', %s, true)",
                     [json.dumps(claims)])
        try:
            with conn.transaction():
                hit = {str(r["id"]) for r in conn.execute(statement).fetchall()}
        except psycopg.Error:
            hit = set()
        conn.rollback()
    t = BY_NAME[table]
    allowed = caller in (t.patch if op == "update" and table != "api_keys" else t.delete)
    if table == "sessions" and op == "delete":
        allowed = caller in SUITE_OWNERS  # the uploader deletes (ext removes the objects)
    if not allowed:
        assert rid not in hit, (caller, op, table, "touched a row it may not write")
    if caller in ("read_key",):
        assert hit == set(), (caller, op, table, hit)
    if caller == "key_other_suite":
        assert rid not in hit


def test_the_space_is_at_least_600_cells() -> None:
    n = (len(read_cells()) + len(write_cells()) + len(INSERTS) * len(CALLERS) * 2 + len(UPSERTS) * len(CALLERS)
         + 2 * len(SQL_WRITES) * (len(CALLERS) - 1))
    assert n >= 600, n
