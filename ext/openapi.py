"""One description of the whole origin: ext's OpenAPI 3.1 (FastAPI's own) merged with
PostgREST's, as the proxy exposes them (proxy/tracepipe.conf.template).

PostgREST 12 describes itself in Swagger 2.0 only; no maintained Python library converts
Swagger 2.0 to OpenAPI 3, and PostgREST uses a small, fixed part of Swagger (definitions,
shared parameters, body parameters, produces/consumes), so the converter here covers
exactly that part. The proxy's seed paths (`/suites/{suite_id}/actions/{action_id}`, …)
are derived from the PostgREST operations they are rewritten to, so a column added to a
view shows up on both its native and its seed path without touching this file.

Pure functions (no I/O): `merge(ext_doc, postgrest_swagger)` is all the router calls.
"""

from __future__ import annotations

import copy
import json
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

**Queries.** PostgREST paths take its filters (`?model=eq.gpt-4o`), `select`, `order`,
`limit`/`offset`, `Prefer: count=exact` and `Prefer: return=representation`. Nested paths
(`/suites/{suite_id}/actions`) are the native ones (`/actions?suite_id=eq.{suite_id}`) with the
parent taken from the path.
"""


# --- Swagger 2.0 -> OpenAPI 3 -------------------------------------------------------------------

def _rewrite_refs(node: Any, body_params: set[str]) -> Any:
    """A deep copy with Swagger's #/definitions and #/parameters refs pointing into components."""
    if isinstance(node, list):
        return [_rewrite_refs(v, body_params) for v in node]
    if not isinstance(node, dict):
        return node
    out: Doc = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str):
            if value.startswith("#/definitions/"):
                value = "#/components/schemas/" + value.removeprefix("#/definitions/")
            elif value.startswith("#/parameters/"):
                name = value.removeprefix("#/parameters/")
                section = "requestBodies" if name in body_params else "parameters"
                value = f"#/components/{section}/{name}"
        out[key] = _rewrite_refs(value, body_params)
    if out.get("type") == "file":
        out["type"], out["format"] = "string", "binary"
    return out


TABLE_SUMMARIES = {"get": "List rows (PostgREST filters, select, order, limit/offset)", "post": "Create rows",
                   "patch": "Update the rows the filters match", "delete": "Delete the rows the filters match"}
OBJECT_SUMMARIES = {"get": "One row", "patch": "Update one row", "delete": "Delete one row"}
SCHEMA_KEYS = ("type", "format", "items", "enum", "default", "minimum", "maximum", "maxLength", "minLength",
               "pattern", "maxItems", "minItems", "uniqueItems", "multipleOf", "exclusiveMinimum",
               "exclusiveMaximum")


def _parameter(p: Doc) -> Doc:
    """A non-body Swagger parameter: its type keywords move into `schema`."""
    out: Doc = {k: p[k] for k in ("name", "in", "description", "required") if k in p}
    out["schema"] = {k: p[k] for k in SCHEMA_KEYS if k in p} or {"type": "string"}
    if p.get("in") == "path":
        out["required"] = True
    return out


def _request_body(p: Doc, consumes: list[str]) -> Doc:
    out: Doc = {"content": {ct: {"schema": p.get("schema", {})} for ct in consumes},
                "required": bool(p.get("required", False))}
    if p.get("description"):
        out["description"] = p["description"]
    return out


def _operation(op: Doc, consumes: list[str], produces: list[str]) -> Doc:
    out: Doc = {k: op[k] for k in ("summary", "description", "tags", "operationId", "deprecated", "externalDocs")
                if k in op}
    consumes = op.get("consumes", consumes)
    produces = op.get("produces", produces)
    params: list[Doc] = []
    form: Doc = {"type": "object", "properties": {}}
    for p in op.get("parameters", []):
        if "$ref" in p:  # already pointing into components (_rewrite_refs)
            if p["$ref"].startswith("#/components/requestBodies/"):
                out["requestBody"] = {"$ref": p["$ref"]}
            else:
                params.append({"$ref": p["$ref"]})
        elif p.get("in") == "body":
            out["requestBody"] = _request_body(p, consumes)
        elif p.get("in") == "formData":
            form["properties"][p["name"]] = _parameter(p)["schema"]
        else:
            params.append(_parameter(p))
    if form["properties"]:
        out["requestBody"] = {"content": {"application/x-www-form-urlencoded": {"schema": form}}}
    if params:
        out["parameters"] = params
    responses: Doc = {}
    for code, resp in op.get("responses", {}).items():
        converted: Doc = {"description": resp.get("description", "")}
        if "schema" in resp:
            converted["content"] = {ct: {"schema": resp["schema"]} for ct in produces}
        if "headers" in resp:
            converted["headers"] = {name: {"description": h.get("description", ""),
                                           "schema": {k: h[k] for k in SCHEMA_KEYS if k in h}}
                                    for name, h in resp["headers"].items()}
        responses[str(code)] = converted
    out["responses"] = responses or {"default": {"description": "OK"}}
    return out


def _nullable_columns(definitions: Doc) -> Doc:
    """Swagger 2.0 cannot say null: a column PostgREST does not list as required (every
    column of a view: PostgreSQL knows no NOT NULL there) may be null, as OpenAPI 3.1 says it."""
    for schema in definitions.values():
        required = set(schema.get("required", []))
        for name, prop in schema.get("properties", {}).items():
            if name not in required and isinstance(prop.get("type"), str):
                prop["type"] = [prop["type"], "null"]
    return definitions


def _rows(table: str, description: str) -> Doc:
    schema = {"type": "array", "items": {"$ref": f"#/components/schemas/{table}"}}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def swagger2_to_openapi3(swagger: Doc) -> Doc:
    """PostgREST's Swagger 2.0 as an OpenAPI 3 document (paths and components only matter)."""
    body_params = {name for name, p in swagger.get("parameters", {}).items() if p.get("in") == "body"}
    doc = _rewrite_refs(swagger, body_params)
    consumes = doc.get("consumes", ["application/json"])
    produces = doc.get("produces", ["application/json"])
    components: Doc = {"schemas": _nullable_columns(doc.get("definitions", {})), "parameters": {},
                       "requestBodies": {}}
    for name, p in doc.get("parameters", {}).items():
        if name in body_params:
            components["requestBodies"][name] = _request_body(p, consumes)
        else:
            components["parameters"][name] = _parameter(p)
    paths: Doc = {}
    tags: dict[str, str] = {}
    for path, item in doc.get("paths", {}).items():
        paths[path] = {m: _operation(op, consumes, produces) for m, op in item.items() if m in HTTP_METHODS}
        table = path.strip("/")
        if table in components["schemas"]:  # a table (view): its comment describes the tag, not each verb
            for method, op in paths[path].items():
                for tag in op.get("tags", []):
                    tags.setdefault(tag, op.get("summary", ""))
                op["summary"] = TABLE_SUMMARIES.get(method, op.get("summary", ""))
                # PATCH and DELETE answer 200 and the rows with `Prefer: return=representation`,
                # which Swagger omits. (POST answers 201 either way, with or without a body: its
                # body cannot be documented as optional, so it is left undocumented.)
                if method in ("patch", "delete"):
                    op.setdefault("responses", {}).setdefault(
                        "200", _rows(table, "With `Prefer: return=representation`: the rows"))
    return {"openapi": OPENAPI_VERSION, "info": doc.get("info", {"title": "PostgREST", "version": ""}),
            "tags": [{"name": n, "description": d} for n, d in tags.items()],
            "paths": paths, "components": components}


# --- the proxy's seed paths -----------------------------------------------------------------------

def _path_parameter(name: str, column: str, table: str) -> Doc:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"},
            "description": f"{table}.{column}, from the path"}


def _without_filters(params: list[Doc], table: str, columns: set[str]) -> list[Doc]:
    """The operation's parameters minus the row filters that the path now fixes."""
    dropped = {f"#/components/parameters/rowFilter.{table}.{c}" for c in columns}
    return [p for p in params if p.get("$ref") not in dropped]


def seed_paths(pgrst: Doc) -> Doc:
    """The proxy's REST paths, each made from the PostgREST operations it is rewritten to."""
    paths: Doc = {}
    native = pgrst["paths"]
    for path, (target, columns) in SEED_COLLECTIONS.items():
        if target not in native:
            continue
        table = target.strip("/")
        item: Doc = {}
        for method, op in native[target].items():
            new = copy.deepcopy(op)
            params = [_path_parameter(n, c, table) for n, c in columns.items()]
            new["parameters"] = params + _without_filters(op.get("parameters", []), table, set(columns.values()))
            if columns:
                filters = "&".join(f"{c}=eq.{{{n}}}" for n, c in columns.items())
                new["description"] = (f"The native `{target}?{filters}`; a body that names another parent is "
                                      "refused.")
            item[method] = new
        paths[path] = item
    for path, (target, columns) in SEED_OBJECTS.items():
        if target not in native:
            continue
        table = target.strip("/")
        schema = {"$ref": f"#/components/schemas/{table}"}
        one = {"200": {"description": "The row, one JSON object",
                       "content": {OBJECT_TYPE: {"schema": schema}, "application/json": {"schema": schema}}},
               "404": {**ERROR_RESPONSE, "description": "No such row, or you may not see it"}}
        item = {}
        for method in ("get", "patch", "delete"):
            if method not in native[target]:
                continue
            op = native[target][method]
            new = {k: copy.deepcopy(v) for k, v in op.items() if k not in ("parameters", "responses", "description")}
            new["summary"] = OBJECT_SUMMARIES[method]
            keep = [p for p in op.get("parameters", []) if p.get("$ref", "").endswith("/select")]
            new["parameters"] = [_path_parameter(n, c, table) for n, c in columns.items()] + keep
            new["responses"] = copy.deepcopy(one)
            new["description"] = {"get": "One row.", "patch": "Changes the row and answers it.",
                                  "delete": "Deletes the row and answers it."}[method] \
                + " 404 when it does not exist or you may not see it; 403 when you see it but may not do this."
            item[method] = new
        paths[path] = item
    for path, (target, methods) in SEED_ALIASES.items():
        if target in native:
            paths[path] = {m: copy.deepcopy(op) for m, op in native[target].items() if m in methods}
    return paths


# --- merge ------------------------------------------------------------------------------------------

def _ext_paths(ext_doc: Doc, row_schemas: Doc) -> Doc:
    """ext's operations with their security, their row schemas and the one error body."""
    paths: Doc = copy.deepcopy(ext_doc.get("paths", {}))
    for path, item in paths.items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            # Authorization is the security scheme's business (OpenAPI ignores it as a parameter).
            params = [p for p in op.get("parameters", []) if p.get("name", "").lower() != "authorization"]
            if params:
                op["parameters"] = params
            else:
                op.pop("parameters", None)
            for (row_path, row_method, status), table in EXT_ROWS.items():
                if (row_path, row_method) == (path, method) and table in row_schemas and status in op["responses"]:
                    op["responses"][status]["content"] = {"application/json": {
                        "schema": {"$ref": f"#/components/schemas/{table}"}}}
            if path in PUBLIC_EXT_PATHS:
                op["security"] = []
            elif path in API_KEY_EXT_PATHS:
                op["security"] = [{API_KEY: []}]
            op["tags"] = [EXT_TAGS.get(t, t) for t in op.get("tags", [])]
            responses = op.setdefault("responses", {})
            if "422" in responses:  # ext answers validation errors in the one error body
                responses["422"] = {**ERROR_RESPONSE, "description": "Invalid request"}
            responses.setdefault("default", ERROR_RESPONSE)
    return paths


def _unreferenced(schemas: Doc, doc: Doc, names: tuple[str, ...]) -> None:
    for name in names:
        if name in schemas:
            rest = {**doc, "components": {**doc["components"], "schemas": {k: v for k, v in schemas.items()
                                                                           if k != name}}}
            if f'"#/components/schemas/{name}"' not in json.dumps(rest):
                del schemas[name]


def merge(ext_doc: Doc, postgrest_swagger: Doc | None, *, note: str | None = None) -> Doc:
    """ext's document plus PostgREST's (native and seed paths). Where the proxy sends one
    method of a path to ext (POST /sessions) and the others to PostgREST, ext's operation
    replaces PostgREST's. `None` for PostgREST (unreachable) gives ext's part alone, with `note`."""
    pgrst = swagger2_to_openapi3(postgrest_swagger) if postgrest_swagger else {"paths": {}, "components": {}}
    pg_components = pgrst["components"]
    schemas: Doc = {"Error": ERROR_SCHEMA}
    schemas.update(pg_components.get("schemas", {}))
    for name, schema in ext_doc.get("components", {}).get("schemas", {}).items():
        if name in schemas:
            raise ValueError(f"schema {name!r} is defined by both ext and PostgREST")
        schemas[name] = schema

    paths: Doc = {}
    for source in (pgrst["paths"], seed_paths(pgrst) if postgrest_swagger else {}):
        for path, item in source.items():
            for op in item.values():
                op.setdefault("responses", {}).setdefault("default", ERROR_RESPONSE)
            paths[path] = item
    if "/" in paths and "get" in paths["/"]:
        paths["/"]["get"]["summary"] = "PostgREST's own description (Swagger 2.0); /openapi.json describes it all"
    for path, item in _ext_paths(ext_doc, pg_components.get("schemas", {})).items():
        paths[path] = {**paths.get(path, {}), **item}

    described = {t["name"]: t.get("description", "") for t in pgrst.get("tags", [])}
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
                 "description": "".join(info_bits)},
        "servers": [{"url": "/", "description": "this origin (the proxy)"}],
        "security": [{BEARER: []}],
        "tags": tags,
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": schemas,
            "parameters": pg_components.get("parameters", {}),
            "requestBodies": pg_components.get("requestBodies", {}),
            "securitySchemes": SECURITY_SCHEMES,
        },
    }
    _unreferenced(schemas, doc, ("HTTPValidationError", "ValidationError"))
    return doc
