"""One description of the whole origin: ext's OpenAPI 3.1 (FastAPI's own) merged with
PostgREST's, as the proxy exposes them (proxy/tracepipe.conf.template).

PostgREST 12 describes itself in Swagger 2.0 only; no maintained Python library converts
Swagger 2.0 to OpenAPI 3, and PostgREST uses a small, fixed part of Swagger (definitions,
shared parameters, body parameters, produces/consumes), so the converter here covers
exactly that part. The proxy's seed paths (`/suites/{suite_id}/actions/{action_id}`, …)
are derived from the PostgREST operations they are rewritten to, so a column added to a
view shows up on both its native and its seed path without touching this file.

PostgREST's Swagger knows neither which columns a view's rows always have nor which a
caller may write (a view's columns are all nullable to PostgreSQL). Those come from the
database's catalog (`CATALOG_SQL`, read by the router): the base column's NOT NULL and
default, the column privileges of tp_user, and simple CHECK constraints (lengths, regexes,
value lists). Each table then has three schemas: `<table>` (a row as read: every column,
nullable only where the base column is), `<table>_insert` (what POST takes: writable
columns, required only where the database has no default and derives nothing) and
`<table>_update` (what PATCH takes: all optional). Filters are typed as PostgREST filter
strings (`eq.<uuid>`, `in.(…)`, `is.null`) with a pattern per column type, so a generated
client or a fuzzer sends what PostgREST parses.

One path per resource: the kebab seed paths replace the snake native paths they alias
(/api-keys, not /api_keys), and every operation has a unique operationId.

Pure functions (no I/O): `merge(ext_doc, postgrest_swagger, catalog)` is all the router calls.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Doc = dict[str, Any]

OPENAPI_VERSION = "3.1.0"
OBJECT_TYPE = "application/vnd.pgrst.object+json"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

BEARER = "bearerAuth"
API_KEY = "ApiKey"
SECURITY_SCHEMES: Doc = {
    BEARER: {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
        "description": "An access token: from POST /auth/login, /auth/signup or /auth/refresh (storefront "
                       "session, short-lived, renewed with the refresh token), or from POST /auth/token "
                       "(API key exchange). ES256, verifiable with /.well-known/jwks.json.",
    },
    API_KEY: {
        "type": "apiKey", "in": "header", "name": "Authorization",
        "description": "Only for POST /auth/token: the header value is `ApiKey tp_…` (the key shown once "
                       "by POST /api-keys). The answer is a bearer JWT for every other endpoint.",
    },
}
# ext endpoints that take no credentials, and the one that takes an API key.
PUBLIC_EXT_PATHS = {"/auth/signup", "/auth/login", "/auth/refresh", "/auth/verify-email", "/.well-known/jwks.json",
                    "/health", "/ready"}
API_KEY_EXT_PATHS = {"/auth/token"}

ERROR_SCHEMA: Doc = {
    "type": "object", "required": ["code", "message", "details", "hint"],
    "description": "Every error, from PostgREST, ext or the proxy.",
    "properties": {
        "code": {"type": "string", "description": "PostgREST's (PGRST…), a SQLSTATE, or ext's/the proxy's TP…"},
        "message": {"type": "string"},
        "details": {"description": "What exactly failed (text or JSON), or null"},
        "hint": {"type": ["string", "null"], "description": "What to do about it, or null"},
    },
}
ERROR_RESPONSE: Doc = {"description": "Error", "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/Error"}}}}

# Seed paths (DESIGN.md §3) -> the PostgREST path the proxy rewrites them to, and which
# column each path parameter filters on.
SEED_COLLECTIONS: dict[str, tuple[str, dict[str, str]]] = {
    "/api-keys": ("/api_keys", {}),
    "/suites/{suite_id}/actions": ("/actions", {"suite_id": "suite_id"}),
    "/suites/{suite_id}/members": ("/suite_members", {"suite_id": "suite_id"}),
    "/mcp-servers": ("/mcp_servers", {}),
    "/mcp-servers/{mcp_server_id}/tools": ("/tools", {"mcp_server_id": "mcp_server_id"}),
    "/action-tool-maps": ("/action_tool_maps", {}),
}
SEED_OBJECTS: dict[str, tuple[str, dict[str, str]]] = {
    "/api-keys/{key_id}": ("/api_keys", {"key_id": "id"}),
    "/suites/{suite_id}": ("/suites", {"suite_id": "id"}),
    "/suites/{suite_id}/actions/{action_id}": ("/actions", {"suite_id": "suite_id", "action_id": "id"}),
    "/suites/{suite_id}/members/{user_id}": ("/suite_members", {"suite_id": "suite_id", "user_id": "user_id"}),
    "/mcp-servers/{mcp_server_id}": ("/mcp_servers", {"mcp_server_id": "id"}),
    "/mcp-servers/{mcp_server_id}/tools/{tool_id}": ("/tools", {"mcp_server_id": "mcp_server_id", "tool_id": "id"}),
    "/action-tool-maps/{map_id}": ("/action_tool_maps", {"map_id": "id"}),
    "/sessions/{session_id}": ("/sessions", {"session_id": "id"}),
    "/examples/{example_id}": ("/examples", {"example_id": "id"}),
}
SEED_ALIASES = {"/users/me": ("/rpc/me", ("get",))}
# The order of the reference page; tags not named here follow. ext's own tags are described here,
# PostgREST's tables by their `comment on`.
TAG_ORDER = ("auth", "suites", "suite_members", "actions", "mcp_servers", "tools", "action_tool_maps", "sessions",
             "examples", "api_keys", "users", "health")
EXT_TAG_DESCRIPTIONS = {
    "auth": "Sign up and in (storefront sessions), rotate refresh tokens, exchange an API key for a JWT.",
    "health": "Liveness and readiness of the stack.",
}
# ext's router tags that name the same resource as a PostgREST table tag.
EXT_TAGS = {"api-keys": "api_keys"}
# ext operations that answer a row of a PostgREST view: (path, method, status) -> schema.
EXT_ROWS = {("/sessions", "post", "201"): "sessions", ("/sessions/{session_id}", "delete", "200"): "sessions",
            ("/examples", "post", "201"): "examples"}

DESCRIPTION = """\
The whole Tracepipe API on one origin: capability CRUD and metadata are served by PostgREST
straight from PostgreSQL (row-level security decides what each caller sees), identity,
uploads and streams by ext.

**Authentication.** Exchange an API key for a short-lived JWT at `POST /auth/token` with
`Authorization: ApiKey tp_…`, or sign in at `POST /auth/login`; then send
`Authorization: Bearer <access_token>` everywhere else. Tokens expire (`expires_in`, seconds).

**Errors.** Every error body is `{code, message, details, hint}`. A `/{id}` path answers one
JSON object, and 404 when the row does not exist *or you may not see it*.

**Queries.** PostgREST paths take its filters (`?model=eq.gpt-4o`, `?id=in.(…)`), `order`,
`limit`/`offset` and `Prefer: count=exact`; POST answers the created rows (`Prefer:
return=minimal` for none, `tx=rollback` for a dry run). PostgREST's `select` (columns,
embedding) works too; the schemas here describe whole rows, what a request without it answers.
Nested paths (`/suites/{suite_id}/actions`) are the native ones (`/actions?suite_id=eq.{suite_id}`)
with the parent taken from the path.
"""


# --- the database's catalog ------------------------------------------------------------------------

# Each column of each view in `api`: its base column's NOT NULL and default, what tp_user may
# write, an enum's labels, and the CHECK constraints on that one column (its own and its domain's).
CATALOG_SQL = """
select v.relname as "table", a.attname as "column",
       coalesce(b.attnotnull, false) as not_null,
       coalesce(b.atthasdef or b.attidentity <> '' or b.attgenerated <> '', false) as has_default,
       pg_catalog.has_column_privilege('tp_user', v.oid, a.attnum, 'INSERT') as insertable,
       pg_catalog.has_column_privilege('tp_user', v.oid, a.attnum, 'UPDATE') as updatable,
       array(select e.enumlabel::text from pg_catalog.pg_enum e
             where e.enumtypid = a.atttypid order by e.enumsortorder) as enum,
       coalesce(b.checks, '{}') || array(select pg_catalog.pg_get_constraintdef(c.oid)
                                         from pg_catalog.pg_constraint c where c.contypid = a.atttypid) as checks
from pg_catalog.pg_class v
join pg_catalog.pg_namespace n on n.oid = v.relnamespace and n.nspname = 'api'
join pg_catalog.pg_attribute a on a.attrelid = v.oid and a.attnum > 0 and not a.attisdropped
left join lateral (
    select ba.attnotnull, ba.atthasdef, ba.attidentity, ba.attgenerated,
           array(select pg_catalog.pg_get_constraintdef(c.oid) from pg_catalog.pg_constraint c
                 where c.conrelid = ba.attrelid and c.contype = 'c' and c.conkey = array[ba.attnum]) as checks
    from pg_catalog.pg_rewrite r
    join pg_catalog.pg_depend d on d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass and d.objid = r.oid
         and d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass and d.refobjid <> v.oid
    join pg_catalog.pg_attribute ba on ba.attrelid = d.refobjid and ba.attnum = d.refobjsubid
         and ba.attname = a.attname
    where r.ev_class = v.oid
    limit 1
) b on true
where v.relkind in ('v', 'r', 'm')
order by 1, a.attnum
"""


@dataclass(frozen=True)
class Column:
    not_null: bool = False
    has_default: bool = False
    insertable: bool = True
    updatable: bool = True
    enum: tuple[str, ...] = ()
    checks: tuple[str, ...] = ()


Catalog = Mapping[str, Mapping[str, Column]]


def catalog_from_rows(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Column]]:
    """CATALOG_SQL's rows as {table: {column: Column}}."""
    out: dict[str, dict[str, Column]] = {}
    for r in rows:
        out.setdefault(r["table"], {})[r["column"]] = Column(
            bool(r["not_null"]), bool(r["has_default"]), bool(r["insertable"]), bool(r["updatable"]),
            tuple(r["enum"] or ()), tuple(r["checks"] or ()))
    return out


# The API's contract on writes (DESIGN.md §9 "Derived fields"), whatever the catalog says:
# the server assigns these, a body never carries them...
SERVER_ASSIGNED = frozenset({"id", "created_by", "created_at", "updated_at"})
# ...and these are derived when a POST leaves them out.
DERIVED = {
    "suites": {"slug": "Derived from `name` when left out."},
    "mcp_servers": {"transport": "`streamable-http` when left out and `url` is http(s); required otherwise."},
    "action_tool_maps": {"mcp_server_id": "The tool's server when left out."},
}
# What the tables' triggers check on writes (db/schema/2*.sql), which the catalog's CHECK
# constraints do not show: keywords per column of the insert and update schemas...
NON_BLANK = "^[^\\x00]*[^\\x00 ][^\\x00]*$"  # app.require_text: not empty, not only spaces
ROLES = ["viewer", "editor", "owner"]
WRITE_RULES: dict[str, dict[str, Doc]] = {
    "suites": {"name": {"pattern": NON_BLANK}},
    "actions": {"name": {"pattern": NON_BLANK}},
    "mcp_servers": {"name": {"pattern": NON_BLANK}, "url": {"pattern": NON_BLANK}},
    "tools": {"name": {"pattern": NON_BLANK}},
    "suite_members": {"role": {"enum": ROLES}, "email": {"pattern": NON_BLANK}},
}
# ...on the insert schema's columns only...
INSERT_RULES: dict[str, dict[str, Doc]] = {
    "suite_members": {"accepted": {"enum": [False], "description": "Only the invitee accepts (PATCH); leave it "
                                                                   "out or false."}},
}
# ...and across columns of the insert schema (if/then/else: generators that do not know them
# ignore them, and the tools that validate or fuzz apply them).
INSERT_SCHEMA_RULES: dict[str, Doc] = {
    "suite_members": {  # invite by user_id or by email, not both
        "if": {"required": ["user_id"], "properties": {"user_id": {"type": "string"}}},
        "then": {"properties": {"email": {"type": "null"}}},
        "else": {"required": ["email"], "properties": {"email": {"type": "string"}}},
    },
    "mcp_servers": {  # transport defaults only for http(s) URLs
        "if": {"properties": {"url": {"type": "string", "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://"}}},
        "else": {"required": ["transport"], "properties": {"transport": {"type": "string"}}},
    },
}


def _apply(schema: Doc, keywords: Doc) -> None:
    """Keywords on a column schema; an enum replaces the generic text pattern."""
    if "enum" in keywords:
        schema.pop("pattern", None)
        nullable = isinstance(schema.get("type"), list)
        schema["enum"] = [*keywords["enum"], *([None] if nullable else [])]
    schema.update({k: v for k, v in keywords.items() if k != "enum"})

_LENGTH = re.compile(r"length\((\w+)\) (>=|<=) (\d+)")
_REGEX = re.compile(r"\(?(\w+) ~ '((?:[^']|'')*)'::text")
_ANY = re.compile(r"\(?(\w+) = ANY \(ARRAY\[([^\]]*)\]\)")
_JSON_TYPE = re.compile(r"jsonb?_typeof\((\w+)\) = '(\w+)'::text")
_MINIMUM = re.compile(r"\((\w+) >= (-?\d+)\)")


def _check_keywords(checks: Iterable[str], column: str) -> Doc:
    """JSON Schema keywords for the simple CHECK constraints on one column (a domain's say VALUE)."""
    names = {column, "VALUE"}
    out: Doc = {}
    for check in checks:
        if " OR " in check:
            continue
        for name, op, n in _LENGTH.findall(check):
            if name in names:
                out["minLength" if op == ">=" else "maxLength"] = int(n)
        for name, regex in _REGEX.findall(check):
            if name in names:
                out["pattern"] = regex.replace("''", "'")
        for name, values in _ANY.findall(check):
            if name in names:
                out["enum"] = re.findall(r"'((?:[^']|'')*)'::text", values)
        for name, kind in _JSON_TYPE.findall(check):
            if name in names:
                out["type"] = kind
        for name, n in _MINIMUM.findall(check):
            if name in names:
                out["minimum"] = int(n)
    return out


# --- column schemas and PostgREST's query parameters --------------------------------------------------

NO_NUL = "^[^\\x00]*$"  # PostgreSQL text cannot hold U+0000
PG_FORMATS: dict[str, Doc] = {
    "uuid": {"type": "string", "format": "uuid"},
    "timestamp with time zone": {"type": "string", "format": "date-time"},
    "date": {"type": "string", "format": "date"},
    "smallint": {"type": "integer", "format": "int32"},
    "integer": {"type": "integer", "format": "int32"},
    "bigint": {"type": "integer", "format": "int64"},
    "numeric": {"type": "number"},
    "double precision": {"type": "number", "format": "double"},
    "real": {"type": "number", "format": "float"},
    "boolean": {"type": "boolean"},
    "jsonb": {}, "json": {},
}


def _pg_schema(prop: Doc) -> Doc:
    fmt = str(prop.get("format", ""))
    if fmt in PG_FORMATS:
        return dict(PG_FORMATS[fmt])
    if prop.get("type") == "array":
        return {"type": "array", "items": _pg_schema({"format": fmt.removesuffix("[]"), **prop.get("items", {})})}
    if prop.get("enum"):
        return {"type": "string", "enum": list(prop["enum"])}
    return {"type": prop["type"]} if isinstance(prop.get("type"), str) else {}


def _nullable(schema: Doc) -> Doc:
    if isinstance(schema.get("type"), str):
        schema["type"] = [schema["type"], "null"]
        if "enum" in schema:
            schema["enum"] = [*schema["enum"], None]
    return schema


def _description(prop: Doc) -> str:
    """PostgREST's column comment without its machine notes (`Note: This is a Primary Key.<pk/>`)."""
    text = str(prop.get("description", ""))
    text = re.sub(r"<(pk|fk)[^>]*/>", "", text).replace("Note:\n", "").strip()
    return text


# JSON columns. PostgreSQL's jsonb cannot hold U+0000 in a string or key, at any depth. A
# recursive schema says so, but openapi-python-client drops models that reach a recursive
# union: the columns' own keywords say it for the top two levels (what generators read), and
# an `if`/`then` (which generators skip and validators and fuzzers apply) refers to the
# recursive JSON_TEXT, kept outside components.schemas (under JSON_TEXT_HOME) so that no
# generator makes a model of it.
JSON_TEXT_HOME = "x-json"
JSON_TEXT_REF = f"#/components/{JSON_TEXT_HOME}/value"
JSON_TEXT: Doc = {"description": "Any JSON value with no U+0000 in its strings or keys, at any depth.",
                  "anyOf": [{"type": "string", "pattern": NO_NUL}, {"type": ["number", "boolean", "null"]},
                            {"type": "array", "items": {"$ref": JSON_TEXT_REF}},
                            {"type": "object", "propertyNames": {"pattern": NO_NUL},
                             "additionalProperties": {"$ref": JSON_TEXT_REF}}]}
_JSON_MEMBER: Doc = {"anyOf": [{"type": "string", "pattern": NO_NUL}, {"type": ["number", "boolean", "null"]},
                               {"type": "array", "items": {}},
                               {"type": "object", "propertyNames": {"pattern": NO_NUL}}]}
_JSON_DEEP: Doc = {"if": {}, "then": {"$ref": JSON_TEXT_REF}}
JSON_OBJECT: Doc = {"type": "object", "propertyNames": {"pattern": NO_NUL}, "additionalProperties": _JSON_MEMBER,
                    **_JSON_DEEP, "description": "A JSON object (no U+0000 in its strings or keys)."}
JSON_ANY: Doc = {**_JSON_DEEP, "description": "Any JSON value (no U+0000 in its strings or keys)."}


def _column_schema(prop: Doc, column: str, info: Column | None, *, nullable: bool) -> Doc:
    schema = _pg_schema(prop)
    if info is not None:
        if info.enum:
            schema = {"type": "string", "enum": list(info.enum)}
        schema.update(_check_keywords(info.checks, column))
    if prop.get("format") in ("json", "jsonb"):
        schema = copy.deepcopy(JSON_OBJECT if schema.get("type") == "object" else JSON_ANY)
    if schema.get("type") == "string" and "pattern" not in schema and "enum" not in schema \
            and "format" not in schema:
        schema["pattern"] = NO_NUL
    if nullable:
        _nullable(schema)
    description = _description(prop)
    if description:
        schema["description"] = description
    return schema


_UUID = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_TIMESTAMP = ("20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
              "(\\.[0-9]{1,6})?Z")
_INT = "-?[0-9]{1,9}"
_WORD = "[A-Za-z0-9_.:@/+-]{0,40}"
_TEXT = "[A-Za-z0-9 _.:@/+-]{0,80}"
_LIKE = "[A-Za-z0-9 _.:@/+*-]{0,80}"
_COMPARE = "(eq|neq|gt|gte|lt|lte)"


def _escape(text: str) -> str:
    """A literal in a pattern valid both in Python and in ECMA's unicode mode (no `\\-`)."""
    return re.sub(r"([.^$*+?()\[\]{}|\\/])", r"\\\1", text)


def _in_list(value: str) -> str:
    return f"in\\.\\({value}(,{value}){{0,9}}\\)"


def _filter(column: str, schema: Doc) -> tuple[str, str, str]:
    """(pattern, example, what) of a PostgREST filter on a column of this schema."""
    kind = schema.get("type")
    kind = next((t for t in kind if t != "null"), None) if isinstance(kind, list) else kind
    fmt = schema.get("format")
    enum = [v for v in schema.get("enum", []) if v is not None]
    if enum:
        one = "(" + "|".join(_escape(v) for v in enum) + ")"
        alternatives, example = [f"(eq|neq)\\.{one}", _in_list(one)], f"eq.{enum[0]}"
    elif fmt == "uuid":
        alternatives, example = [f"(eq|neq)\\.{_UUID}", _in_list(_UUID)], "eq.00000000-0000-0000-0000-000000000000"
    elif fmt == "date-time":
        alternatives, example = [f"{_COMPARE}\\.{_TIMESTAMP}"], "gte.2026-01-01T00:00:00Z"
    elif kind == "integer":
        alternatives, example = [f"{_COMPARE}\\.{_INT}", _in_list(_INT)], "gte.0"
    elif kind == "boolean":
        alternatives, example = ["(eq|neq)\\.(true|false)", "is\\.(true|false)"], "eq.true"
    elif kind == "string":
        alternatives = [f"{_COMPARE}\\.{_TEXT}", f"(like|ilike)\\.{_LIKE}", _in_list(_WORD)]
        example = "eq.example" if column != "name" else "ilike.*report*"
    else:  # JSON, arrays: only presence
        alternatives, example = [], "not.is.null"
    alternatives.append("is\\.null")
    pattern = "^(not\\.)?(" + "|".join(alternatives) + ")$"
    what = "`" + "`, `".join(dict.fromkeys(
        [example] + [a.split("\\.")[0].strip("()").replace("|", "`/`") + ".…" for a in alternatives])) + "`"
    return pattern, example, what


def _filter_parameter(table: str, column: str, schema: Doc) -> Doc:
    pattern, example, what = _filter(column, schema)
    return {"name": column, "in": "query", "required": False,
            "description": f"PostgREST filter on `{table}.{column}`: {what}; `not.` before any of them negates.",
            "schema": {"type": "string", "pattern": pattern, "examples": [example]}}


def _order_parameter(columns: list[str]) -> Doc:
    one = "(" + "|".join(columns) + ")(\\.(asc|desc))?(\\.(nullsfirst|nullslast))?"
    return {"name": "order", "in": "query", "required": False,
            "description": "Sort: `column[.asc|.desc][.nullsfirst|.nullslast]`, comma-separated.",
            "schema": {"type": "string", "pattern": f"^{one}(,{one}){{0,4}}$",
                       "examples": [f"{'created_at' if 'created_at' in columns else columns[0]}.desc"]}}


PAGING = [
    {"name": "limit", "in": "query", "required": False, "description": "At most this many rows.",
     "schema": {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**63 - 1, "examples": [50]}},
    {"name": "offset", "in": "query", "required": False, "description": "Skip this many rows (with `order`).",
     "schema": {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**63 - 1, "examples": [0]}},
]
_PREFER_TOKENS = {
    "get": ["count=(exact|planned|estimated)"],
    "post": ["return=representation", "count=(exact|planned|estimated)", "missing=default",
             "resolution=(merge-duplicates|ignore-duplicates)", "tx=(commit|rollback)"],
    "patch": ["return=(representation|minimal)", "count=(exact|planned|estimated)", "tx=(commit|rollback)"],
    "delete": ["return=(representation|minimal)", "count=(exact|planned|estimated)", "tx=(commit|rollback)"],
}
_PREFER_EXAMPLES = {"get": ["count=exact"], "post": ["return=representation", "return=representation,tx=rollback"],
                    "patch": ["return=representation"], "delete": ["return=representation"]}
_PREFER_NOTES = {
    "get": "`count=exact` (or `planned`, `estimated`) adds the total to Content-Range.",
    "post": "The created rows are answered unless `return=minimal` (an empty 201) or `return=headers-only` "
            "(Location only); `tx=rollback` is a dry run; `count=…`, `missing=default` and `resolution=…` "
            "as in PostgREST.",
    "patch": "`return=representation` answers the changed rows (200), `return=minimal` nothing (204); "
             "`tx=rollback` is a dry run.",
    "delete": "`return=representation` answers the deleted rows (200), `return=minimal` nothing (204); "
              "`tx=rollback` is a dry run.",
}


# Views written through INSTEAD OF triggers (api.suite_members): PostgreSQL has no ON CONFLICT
# for them, so they take no upsert (`resolution=…`); DESIGN §9 names no natural key for them.
NO_UPSERT = frozenset({"suite_members"})


def _prefer(method: str, table: str = "") -> Doc:
    tokens = "|".join(t for t in _PREFER_TOKENS[method] if not (table in NO_UPSERT and t.startswith("resolution=")))
    schema: Doc = {"type": "string", "pattern": f"^({tokens})(, ?({tokens})){{0,4}}$",
                   "examples": _PREFER_EXAMPLES[method]}
    if method == "get":
        schema = {"type": "string", "enum": ["count=exact", "count=planned", "count=estimated"]}
    return {"name": "Prefer", "in": "header", "required": False, "description": _PREFER_NOTES[method],
            "schema": schema}


def _ref(name: str) -> Doc:
    return {"$ref": f"#/components/schemas/{name}"}


def _rows(table: str, description: str, media: str = "application/json") -> Doc:
    return {"description": description,
            "content": {media: {"schema": {"type": "array", "items": _ref(table)}}}}


def _error(description: str) -> Doc:
    return {**ERROR_RESPONSE, "description": description}


CONTENT_RANGE = {"Content-Range": {"description": "`first-last/total` (total with `Prefer: count=…`, else `*`)",
                                   "schema": {"type": "string"}}}


@dataclass
class Table:
    """One PostgREST table (view) with its three schemas and its query parameters."""

    name: str
    description: str
    columns: dict[str, Doc]  # the row schema of each column
    insert: Doc
    update: Doc
    filters: list[Doc]
    order: Doc


def _table(name: str, definition: Doc, catalog: Catalog | None) -> tuple[Table, Doc]:
    """The table and its schemas (`name`, `name_insert`, `name_update`)."""
    cols: Mapping[str, Column] = (catalog or {}).get(name, {})
    known = catalog is not None and bool(cols)
    derived = DERIVED.get(name, {})
    row_props: Doc = {}
    insert_props: Doc = {}
    update_props: Doc = {}
    insert_required: list[str] = []
    for column, prop in definition.get("properties", {}).items():
        info = cols.get(column)
        not_null = bool(info and info.not_null)
        schema = _column_schema(prop, column, info, nullable=not not_null)
        if column in SERVER_ASSIGNED:
            schema["readOnly"] = True
        row_props[column] = schema
        if column in SERVER_ASSIGNED:
            continue
        writable = copy.deepcopy(schema)
        if info is None or info.insertable:
            insert_props[column] = copy.deepcopy(writable)
            if column in derived:
                insert_props[column]["description"] = " ".join(
                    filter(None, [writable.get("description"), derived[column]]))
            elif known and not_null and info is not None and not info.has_default:
                insert_required.append(column)
        if info is None or info.updatable:
            update_props[column] = writable
    for column, keywords in WRITE_RULES.get(name, {}).items():
        for props in (insert_props, update_props):
            if column in props:
                _apply(props[column], keywords)
    for column, keywords in INSERT_RULES.get(name, {}).items():
        if column in insert_props:
            _apply(insert_props[column], keywords)
    row: Doc = {"type": "object", "required": list(row_props), "properties": row_props}
    if definition.get("description"):
        row["description"] = definition["description"]
    insert: Doc = {"type": "object", "description": f"A new row of {name}: what POST takes.",
                   "properties": insert_props, "additionalProperties": False}
    if insert_required:
        insert["required"] = insert_required
    insert.update(copy.deepcopy(INSERT_SCHEMA_RULES.get(name, {})))
    update: Doc = {"type": "object", "description": f"A change to rows of {name}: what PATCH takes (any subset).",
                   "properties": update_props, "additionalProperties": False}
    filters = [_filter_parameter(name, c, s) for c, s in row_props.items()]
    table = Table(name, str(definition.get("description", "")), row_props, insert, update, filters,
                  _order_parameter(list(row_props)))
    schemas = {name: row}
    if insert_props:
        schemas[f"{name}_insert"] = insert
    if update_props:
        schemas[f"{name}_update"] = update
    return table, schemas


TABLE_SUMMARIES = {"get": "List rows", "post": "Create a row", "patch": "Update the rows the filters match",
                   "delete": "Delete the rows the filters match"}
OBJECT_SUMMARIES = {"get": "One row", "patch": "Update one row", "delete": "Delete one row"}


def _body(schema: str) -> Doc:
    return {"required": True, "content": {"application/json": {"schema": _ref(schema)}}}


def _writable(methods: Iterable[str], table: str, schemas: Doc) -> list[str]:
    """The methods a caller can use: no POST where no column may be inserted, no PATCH where
    none may be changed (the privileges say so; PostgREST would answer 401/403)."""
    need = {"post": f"{table}_insert", "patch": f"{table}_update"}
    return [m for m in methods if m in TABLE_SUMMARIES and (m not in need or need[m] in schemas)]


def _collection(table: Table, methods: Iterable[str], tags: list[str], fixed: dict[str, str],
                insert_schema: str | None) -> Doc:
    """The operations of a collection path: `fixed` maps path parameters to the columns they filter."""
    path_params = [_path_parameter(p, c, table.name) for p, c in fixed.items()]
    filters = [f for f in table.filters if f["name"] not in fixed.values()]
    item: Doc = {}
    for method in methods:
        op: Doc = {"tags": tags, "summary": TABLE_SUMMARIES[method]}
        responses: Doc = {"400": _error("A filter, parameter or body PostgREST or the database refuses"),
                          "401": _error("No valid token")}
        if method == "get":
            op["parameters"] = [*path_params, *filters, table.order, *copy.deepcopy(PAGING), _prefer("get")]
            responses = {"200": {**_rows(table.name, "The rows"), "headers": CONTENT_RANGE},
                         "206": {**_rows(table.name, "Some of the rows (limit/offset with a count)"),
                                 "headers": CONTENT_RANGE},
                         **responses,
                         "416": _error("offset beyond the last row (with `Prefer: count=…`)")}
        elif method == "post":
            op["parameters"] = [*path_params, _prefer("post", table.name)]
            if insert_schema:
                op["requestBody"] = _body(insert_schema)
            responses = {"201": {**_rows(table.name, "Created: the new rows (empty with `Prefer: return=minimal`)"),
                                 "headers": {"Location": {"description": "With `return=headers-only`",
                                                          "schema": {"type": "string"}}}},
                         **responses, "403": _error("You may not create this row"),
                         "409": _error("Conflicts with an existing row or a missing parent (unique, foreign key)"),
                         "422": _error("A field is missing or out of range, or names no row (the body names the "
                                       "field)")}
        else:
            op["parameters"] = [*path_params, *filters, _prefer(method)]
            if method == "patch":
                op["requestBody"] = _body(f"{table.name}_update")
            responses = {"200": _rows(table.name, "With `Prefer: return=representation`: the rows"),
                         "204": {"description": "Done (no body)"}, **responses,
                         "403": _error("You may not change these rows")}
            if method == "patch":
                responses["409"] = _error("Conflicts with an existing row (unique)")
                responses["422"] = _error("A field is out of range (the body names it)")
        if fixed:
            filt = "&".join(f"{c}=eq.{{{p}}}" for p, c in fixed.items())
            op["description"] = f"The native `/{table.name}?{filt}`; a body that names another parent is refused."
        responses["default"] = ERROR_RESPONSE
        op["responses"] = responses
        item[method] = op
    return item


def _one(table: Table, methods: Iterable[str], tags: list[str], fixed: dict[str, str]) -> Doc:
    """The operations of a seed `/{id}` path: one JSON object, 404 for a row that is not there or not yours."""
    schema = _ref(table.name)
    one = {"description": "The row, one JSON object",
           "content": {OBJECT_TYPE: {"schema": schema}, "application/json": {"schema": schema}}}
    item: Doc = {}
    for method in methods:
        if method not in OBJECT_SUMMARIES:
            continue
        op: Doc = {"tags": tags, "summary": OBJECT_SUMMARIES[method],
                   "parameters": [_path_parameter(p, c, table.name) for p, c in fixed.items()]}
        op["description"] = {"get": "One row.", "patch": "Changes the row and answers it.",
                             "delete": "Deletes the row and answers it."}[method] \
            + " 404 when it does not exist or you may not see it; 403 when you see it but may not do this."
        if method == "patch":
            op["requestBody"] = _body(f"{table.name}_update")
        op["responses"] = {"200": copy.deepcopy(one), "400": _error("A parameter or body is refused"),
                           "401": _error("No valid token"), "403": _error("You see the row but may not do this"),
                           "404": _error("No such row, or you may not see it"), "default": ERROR_RESPONSE}
        item[method] = op
    return item


def _path_parameter(name: str, column: str, table: str) -> Doc:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"},
            "description": f"{table}.{column}, from the path"}


# --- Swagger 2.0 -> OpenAPI 3 (the RPC functions) ---------------------------------------------------

def _rewrite_refs(node: Any) -> Any:
    """A deep copy with Swagger's #/definitions refs pointing into components."""
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    if not isinstance(node, dict):
        return node
    out: Doc = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#/definitions/"):
            value = "#/components/schemas/" + value.removeprefix("#/definitions/")
        out[key] = _rewrite_refs(value)
    return out


def _rpc_operation(op: Doc, swagger_params: Doc) -> Doc:
    """An RPC function's operation: JSON body or query arguments, JSON answer."""
    out: Doc = {k: op[k] for k in ("summary", "description", "tags") if k in op}
    params: list[Doc] = []
    for p in op.get("parameters", []):
        if "$ref" in p:
            p = swagger_params.get(p["$ref"].removeprefix("#/parameters/"), {})
            if p.get("name") == "Prefer":
                continue  # params=single-object: the body is the arguments already
        if p.get("in") == "body":
            out["requestBody"] = {"required": bool(p.get("required", False)),
                                  "content": {"application/json": {"schema": _rewrite_refs(p.get("schema", {}))}}}
        elif p.get("in") in ("query", "header"):
            params.append({"name": p["name"], "in": p["in"], "required": bool(p.get("required", False)),
                           "schema": _pg_schema(p) or {"type": "string"}})
    if params:
        out["parameters"] = params
    out["responses"] = {"200": {"description": "The function's result",
                                "content": {"application/json": {"schema": {}}}},
                        "400": _error("Arguments refused"), "401": _error("No valid token"),
                        "default": ERROR_RESPONSE}
    return out


# What /rpc/me (GET /users/me) answers: api.me() builds this object.
ME_SCHEMA: Doc = {
    "type": "object", "description": "The caller's profile and suite memberships.",
    "required": ["id", "email", "display_name", "account_role", "created_at", "updated_at", "memberships"],
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "email": {"type": "string"},
        "display_name": {"type": ["string", "null"]},
        "account_role": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
        "memberships": {"type": "array", "items": {
            "type": "object", "required": ["suite_id", "name", "slug", "role"],
            "properties": {"suite_id": {"type": "string", "format": "uuid"}, "name": {"type": "string"},
                           "slug": {"type": "string"}, "role": {"type": "string",
                                                                 "enum": ["viewer", "editor", "owner"]}}}},
    },
}
# What POST /auth/signup answers (ext's handler returns a dict).
SIGNUP_SCHEMA: Doc = {
    "type": "object", "description": "The new account, signed in.",
    "required": ["id", "email", "display_name", "access_token", "token_type", "expires_in", "refresh_token"],
    "properties": {
        "id": {"type": "string", "format": "uuid"}, "email": {"type": "string"},
        "display_name": {"type": ["string", "null"]}, "access_token": {"type": "string"},
        "token_type": {"type": "string", "enum": ["bearer"]}, "expires_in": {"type": "integer"},
        "refresh_token": {"type": "string"},
    },
}
# RPC functions another path is the documented way to: POST /api-keys calls create_api_key.
RPC_HIDDEN = {"/rpc/create_api_key"}
# The table tag each RPC function is listed under.
RPC_TAGS = {"me": "users", "create_api_key": "api_keys"}
RESPONSE_SCHEMAS = {("/auth/signup", "post", "201"): "Signup", ("/users/me", "get", "200"): "Me",
                    ("/rpc/me", "get", "200"): "Me", ("/rpc/me", "post", "200"): "Me"}


OPERATION_IDS = {("/users/me", "get"): "get_me"}


def _operation_id(method: str, path: str) -> str:
    """list_suites, create_suites_actions, get_suite, update_mcp_servers_tool, post_rpc_me, …"""
    if (path, method) in OPERATION_IDS:
        return OPERATION_IDS[path, method]
    segments = [s for s in path.strip("/").split("/") if s and not s.startswith("{")]
    words = [s.replace("-", "_").replace(".", "_") for s in segments]
    if segments and segments[0] == "rpc":
        return f"{method}_rpc_{'_'.join(words[1:])}"
    if path.endswith("}"):
        words[-1] = words[-1].removesuffix("s")
        verb = {"get": "get", "patch": "update", "delete": "delete", "put": "replace"}.get(method, method)
    else:
        verb = {"get": "list", "post": "create", "patch": "update", "delete": "delete"}.get(method, method)
    return f"{verb}_{'_'.join(words) or 'root'}"


def postgrest_paths(swagger: Doc, catalog: Catalog | None) -> tuple[Doc, Doc, dict[str, str]]:
    """(paths, schemas, tag descriptions) of PostgREST's API: its tables on one path each (the
    seed's kebab path where there is one), its RPC functions."""
    definitions = swagger.get("definitions", {})
    native = swagger.get("paths", {})
    tables: dict[str, Table] = {}
    schemas: Doc = {}
    tag_descriptions: dict[str, str] = {}
    for name, definition in definitions.items():
        tables[name], table_schemas = _table(name, definition, catalog)
        schemas.update(table_schemas)
        if tables[name].description:
            tag_descriptions[name] = tables[name].description
    aliased = {target for target, fixed in SEED_COLLECTIONS.values() if not fixed}
    paths: Doc = {}
    for path, item in native.items():
        name = path.strip("/")
        if name in tables and path not in aliased:
            methods = _writable(item, name, schemas)
            insert = f"{name}_insert" if f"{name}_insert" in schemas else None
            paths[path] = _collection(tables[name], methods, [name], {}, insert)
        elif path.startswith("/rpc/") and path not in RPC_HIDDEN:
            paths[path] = {m: _rpc_operation(op, swagger.get("parameters", {}))
                           for m, op in item.items() if m in HTTP_METHODS}
            for op in paths[path].values():
                op["tags"] = [RPC_TAGS.get(path.removeprefix("/rpc/"), "rpc")]
    for path, (target, fixed) in SEED_COLLECTIONS.items():
        name = target.strip("/")
        if target not in native or name not in tables:
            continue
        methods = _writable(native[target], name, schemas)
        insert = f"{name}_insert" if f"{name}_insert" in schemas else None
        if fixed and insert:  # the parent comes from the path: the body does not need it
            nested = copy.deepcopy(schemas[insert])
            for column in fixed.values():
                nested["properties"].pop(column, None)
                if column in nested.get("required", []):
                    nested["required"].remove(column)
            if not nested.get("required"):
                nested.pop("required", None)
            parent = next(iter(fixed)).removesuffix("_id")
            insert = f"{name}_insert_under_{parent}"
            schemas[insert] = nested
        paths[path] = _collection(tables[name], methods, [name], fixed, insert)
    for path, (target, fixed) in SEED_OBJECTS.items():
        name = target.strip("/")
        if target in native and name in tables:
            paths[path] = _one(tables[name], _writable(native[target], name, schemas), [name], fixed)
    for path, (target, alias_methods) in SEED_ALIASES.items():
        if target in native:
            paths[path] = {m: _rpc_operation(op, swagger.get("parameters", {}))
                           for m, op in native[target].items() if m in alias_methods}
            for op in paths[path].values():
                op["tags"] = ["users"]
    schemas["Me"] = ME_SCHEMA
    return paths, schemas, tag_descriptions


# --- merge ------------------------------------------------------------------------------------------

# ext's parameters whose checks are in its handlers (ext/uploads.py), not in their annotations.
EXT_PARAMETER_SCHEMAS: dict[str, Doc] = {
    "idempotency-key": {"type": "string", "pattern": "^[!-~]([ -~]{0,253}[!-~])?$",
                        "description": "1 to 255 printable characters; the same key repeats the first answer"},
    "cursor": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$",
               "description": "X-Next-Cursor of the previous page, unchanged (opaque base64url)"},
}


UUID_SCHEMA: Doc = {"type": "string", "format": "uuid"}
# tus 1.0.0 (ext/tus.py reads these headers itself): every request but OPTIONS names the version.
TUS_RESUMABLE: Doc = {"name": "Tus-Resumable", "in": "header", "required": True,
                      "description": "The tus version: 1.0.0.", "schema": {"type": "string", "enum": ["1.0.0"]}}


def _ascii_base64() -> str:
    """A pattern of the base64 of a non-empty text of bytes 0x20-0x7f (what Upload-Metadata's
    values are, as far as a pattern can say it; the server takes any UTF-8 text but U+0000)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def chars(values: Iterable[int]) -> str:
        return "[" + "".join("\\" + alphabet[v] if alphabet[v] in "+/" else alphabet[v] for v in values) + "]"

    # 3 bytes b1 b2 b3 are 4 sextets: b1>>2 | (b1&3)<<4 + b2>>4 | (b2&15)<<2 + b3>>6 | b3&63;
    # each byte >= 0x20 and < 0x80 (b3 >= 0x20: when b3>>6 is 0, b3&63 is 32 or more)
    first = chars(range(8, 32))
    second = chars(v for v in range(64) if 2 <= (v & 15) <= 7)
    third_even, third_odd = chars(v for v in range(64) if v & 3 == 0), chars(v for v in range(64) if v & 3 == 1)
    group = f"{first}{second}({third_even}{chars(range(32, 64))}|{third_odd}{chars(range(64))})"
    two = f"{first}{second}{third_even}="  # 2 bytes
    one = f"{first}{chars([0, 16, 32, 48])}=="  # 1 byte
    return f"({group})*({group}|{two}|{one})"


def tus_parameters(max_bundle_bytes: int, max_metadata_bytes: int) -> dict[tuple[str, str], list[Doc]]:
    """The headers of each tus operation (POST /uploads: the creation extension)."""
    value = _ascii_base64()
    creation = [
        TUS_RESUMABLE,
        {"name": "Upload-Length", "in": "header", "required": True, "description": "The bundle's size in bytes.",
         "schema": {"type": "integer", "minimum": 1, "maximum": max_bundle_bytes}},
        {"name": "Upload-Metadata", "in": "header", "required": True,
         "description": "Comma-separated `key base64(value)` pairs: `filename` (required) and `suite_id` (a uuid, "
                        "optional); the values are UTF-8 text without U+0000 (printable ASCII in the pattern).",
         "schema": {"type": "string", "maxLength": max_metadata_bytes, "pattern": f"^filename {value}$",
                    "examples": ["filename c2Vzc2lvbi56aXA="]}},
    ]
    return {("/uploads", "post"): creation, ("/uploads/{upload_id}", "head"): [TUS_RESUMABLE],
            ("/uploads/{upload_id}", "delete"): [TUS_RESUMABLE], ("/uploads/{upload_id}", "patch"): [TUS_RESUMABLE]}


# Refusals ext's handlers answer beyond FastAPI's 422, by operation (status -> what it means).
EXT_RESPONSES: dict[tuple[str, str], dict[str, str]] = {
    ("/sessions", "post"): {"400": "The body is not a zip bundle (§5), or the bundle field is empty",
                            "413": "Over the bundle size limit"},
    ("/examples", "post"): {"400": "A malformed multipart body", "413": "Over a size limit"},
    ("/examples/export", "get"): {"400": "cursor is not an X-Next-Cursor value"},
    ("/auth/verify-email", "post"): {"400": "The code is unknown, used or expired (details: token)"},
    ("/uploads", "post"): {"400": "Upload-Length or Upload-Metadata malformed", "412": "Tus-Resumable is not 1.0.0",
                           "413": "Upload-Length over the bundle size limit"},
    ("/uploads/{upload_id}", "head"): {"404": "No such upload, or not yours", "412": "Tus-Resumable is not 1.0.0"},
    ("/uploads/{upload_id}", "delete"): {"404": "No such upload, or not yours", "412": "Tus-Resumable is not 1.0.0"},
}


# ext's answers without a body (tus: the state is in the headers): status -> headers.
_TUS_HEADER = {"Tus-Resumable": {"description": "1.0.0", "schema": {"type": "string"}}}
EXT_NO_BODY: dict[tuple[str, str], tuple[str, Doc]] = {
    ("/uploads", "post"): ("201", {**_TUS_HEADER,
                                   "Location": {"description": "/uploads/{id}: where the bytes go (PATCH)",
                                                "schema": {"type": "string"}},
                                   "Upload-Expires": {"description": "When an upload without a PATCH expires",
                                                      "schema": {"type": "string"}}}),
    ("/uploads/{upload_id}", "head"): ("200", {**_TUS_HEADER,
                                               "Upload-Offset": {"description": "Bytes received so far",
                                                                 "schema": {"type": "integer", "minimum": 0}},
                                               "Upload-Length": {"description": "The bundle's size",
                                                                 "schema": {"type": "integer", "minimum": 1}}}),
}


def _ext_parameter(p: Doc) -> None:
    """An ext parameter's schema as its handler checks it: ids are uuids (ext answers 400 or
    404 for others), and the headers ext reads by hand (EXT_PARAMETER_SCHEMAS)."""
    name = p.get("name", "").lower()
    if name in EXT_PARAMETER_SCHEMAS:
        p["schema"] = {**p.get("schema", {}), **EXT_PARAMETER_SCHEMAS[name]}
        p["schema"].pop("anyOf", None)
    elif name.endswith("_id") and p.get("in") in ("path", "query"):
        schema = p.get("schema", {})
        kinds = [schema.get("type")] + [s.get("type") for s in schema.get("anyOf", [])]
        if "string" in kinds:
            p["schema"] = {**{k: v for k, v in schema.items() if k in ("title", "description")}, **UUID_SCHEMA}


def _ext_paths(ext_doc: Doc, row_schemas: Doc, headers: Mapping[tuple[str, str], list[Doc]]) -> Doc:
    """ext's operations with their security, their row schemas and the one error body."""
    paths: Doc = copy.deepcopy(ext_doc.get("paths", {}))
    for path, item in paths.items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            # Authorization is the security scheme's business (OpenAPI ignores it as a parameter).
            params = [p for p in op.get("parameters", []) if p.get("name", "").lower() != "authorization"]
            for p in params:
                _ext_parameter(p)
            named = {p["name"].lower() for p in params}
            params += [copy.deepcopy(h) for h in headers.get((path, method), []) if h["name"].lower() not in named]
            if params:
                op["parameters"] = params
            else:
                op.pop("parameters", None)
            for (row_path, row_method, status), table in EXT_ROWS.items():
                if (row_path, row_method) == (path, method) and table in row_schemas and status in op["responses"]:
                    op["responses"][status]["content"] = {"application/json": {"schema": _ref(table)}}
            if path in PUBLIC_EXT_PATHS:
                op["security"] = []
            elif path in API_KEY_EXT_PATHS:
                op["security"] = [{API_KEY: []}]
            op["tags"] = [EXT_TAGS.get(t, t) for t in op.get("tags", [])]
            responses = op.setdefault("responses", {})
            for status, description in EXT_RESPONSES.get((path, method), {}).items():
                responses.setdefault(status, _error(description))
            if (path, method) in EXT_NO_BODY:
                status, headers_of = EXT_NO_BODY[path, method]
                answer = responses.setdefault(status, {"description": "Done"})
                answer.pop("content", None)
                answer["headers"] = headers_of
            if "422" in responses:  # ext answers validation errors in the one error body
                responses["422"] = {**ERROR_RESPONSE, "description": "Invalid request"}
            responses.setdefault("default", ERROR_RESPONSE)
    return paths


def _ext_bodies(paths: Doc, schemas: Doc, constraints: Mapping[str, Mapping[str, Doc]]) -> None:
    """What ext checks by hand, said in its request schemas: `constraints` (schema -> property
    -> keywords), and no members beyond the documented ones (ext refuses unknown form fields,
    and a U+0000 anywhere in a JSON body)."""
    for name, props in constraints.items():
        for prop, keywords in props.items():
            if prop == "" and name in schemas:
                schemas[name].update(copy.deepcopy(keywords))
            elif prop in schemas.get(name, {}).get("properties", {}):
                schemas[name]["properties"][prop].update(keywords)
    for item in paths.values():
        for op in item.values():
            if "operationId" not in op:  # PostgREST's: additionalProperties already said
                continue
            body = op.get("requestBody", {})
            if set(body.get("content", {})) - {"application/json"}:
                body["required"] = True  # an upload without its bytes is refused
            for media in body.get("content", {}).values():
                schema = media.get("schema", {})
                target = schemas.get(schema.get("$ref", "").removeprefix("#/components/schemas/"), schema)
                if target.get("type") == "object":
                    target["additionalProperties"] = False


def _unreferenced(schemas: Doc, doc: Doc, names: tuple[str, ...]) -> None:
    for name in names:
        if name in schemas:
            rest = {**doc, "components": {**doc["components"], "schemas": {k: v for k, v in schemas.items()
                                                                           if k != name}}}
            if f'"#/components/schemas/{name}"' not in json.dumps(rest):
                del schemas[name]


def _operation_ids(paths: Doc) -> None:
    """Every operation gets an operationId (ext's are FastAPI's), unique across the document."""
    seen = {op["operationId"] for item in paths.values() for op in item.values() if "operationId" in op}
    for path, item in paths.items():
        for method, op in item.items():
            if "operationId" in op:
                continue
            base = candidate = _operation_id(method, path)
            n = 2
            while candidate in seen:
                candidate, n = f"{base}_{n}", n + 1
            op["operationId"] = candidate
            seen.add(candidate)


def merge(ext_doc: Doc, postgrest_swagger: Doc | None, catalog: Catalog | None = None, *,
          note: str | None = None, ext_constraints: Mapping[str, Mapping[str, Doc]] | None = None,
          ext_headers: Mapping[tuple[str, str], list[Doc]] | None = None) -> Doc:
    """ext's document plus PostgREST's (native and seed paths). Where the proxy sends one
    method of a path to ext (POST /sessions) and the others to PostgREST, ext's operation
    replaces PostgREST's. `None` for PostgREST (unreachable) gives ext's part alone, with `note`;
    `None` for the catalog (unreadable) leaves nullability and `required` of writes unknown;
    `ext_constraints` adds keywords to ext's request schemas (_ext_bodies; "" for the schema itself),
    `ext_headers` the headers ext's handlers read by hand (tus_parameters)."""
    pg_paths, pg_schemas, described = postgrest_paths(postgrest_swagger, catalog) if postgrest_swagger \
        else ({}, {}, {})
    schemas: Doc = {"Error": ERROR_SCHEMA, "Signup": SIGNUP_SCHEMA}
    schemas.update(pg_schemas)
    for name, schema in ext_doc.get("components", {}).get("schemas", {}).items():
        if name in schemas:
            raise ValueError(f"schema {name!r} is defined by both ext and PostgREST")
        schemas[name] = schema

    paths: Doc = dict(pg_paths)
    for path, item in _ext_paths(ext_doc, pg_schemas, ext_headers or {}).items():
        paths[path] = {**paths.get(path, {}), **item}
    for (path, method, status), name in RESPONSE_SCHEMAS.items():
        response = paths.get(path, {}).get(method, {}).get("responses", {}).get(status)
        if response is not None and name in schemas:
            response["content"] = {"application/json": {"schema": _ref(name)}}
    _ext_bodies(paths, schemas, ext_constraints or {})
    _operation_ids(paths)

    described.update({k: v for k, v in EXT_TAG_DESCRIPTIONS.items() if k not in described})
    used = [t for item in paths.values() for op in item.values() for t in op.get("tags", [])]
    names = [t for t in TAG_ORDER if t in used] + sorted({t for t in used if t not in TAG_ORDER})
    tags = [{"name": n, **({"description": described[n]} if described.get(n) else {})} for n in names]

    info_bits = [DESCRIPTION]
    if note:
        info_bits.append(f"\n**Note.** {note}\n")
    pg_version = (postgrest_swagger or {}).get("info", {}).get("version")
    ext_version = ext_doc.get("info", {}).get("version", "")
    doc: Doc = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "Tracepipe API", "version": f"ext {ext_version}" + (f", PostgREST {pg_version}"
                                                                               if pg_version else ""),
                 "description": "".join(info_bits),
                 "license": {"name": "Proprietary", "identifier": "LicenseRef-Proprietary"}},
        "servers": [{"url": "/", "description": "this origin (the proxy)"}],
        "security": [{BEARER: []}],
        "tags": tags,
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": schemas, "securitySchemes": SECURITY_SCHEMES, JSON_TEXT_HOME: {"value": JSON_TEXT}},
    }
    _unreferenced(schemas, doc, ("HTTPValidationError", "ValidationError", "Signup"))
    return doc
