"""The API reference: GET /openapi.json (ext's and PostgREST's endpoints in one OpenAPI 3
document, see ext/openapi.py) and GET /docs (Swagger UI rendering it).

Swagger UI's files come from the PyPI package `fastapi-offline` (a maintained vendoring of
swagger-ui-dist 5.x) and are served from here, never from a CDN: the page works on a
machine without internet access and loads no third-party code. (`swagger-ui-bundle` on
PyPI ships Swagger UI 4.15, which cannot render OpenAPI 3.1, what FastAPI emits.)

PostgREST's Swagger is fetched from its API server, the columns' nullability, defaults,
privileges and checks from the database's catalog (openapi.CATALOG_SQL), and the result is
reused for `openapi_cache_s`: a schema reload (`make migrate`) shows up within that time, and
a page load costs no PostgREST request. When PostgREST does not answer, the last good
document is served, or ext's part alone with a note saying so.

GET / is the origin's front door: a person (a browser's Accept: text/html) is sent to /docs,
anything else gets a small JSON index of where things are.
"""

from __future__ import annotations

import html
import json
import logging
import time
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any, cast

import httpx
from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from psycopg_pool import AsyncConnectionPool

from ext import openapi
from ext.deps import PoolDep, SettingsDep
from ext.errors import ApiError

log = logging.getLogger("ext.docs")
router = APIRouter(include_in_schema=False)

ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon.png": "image/png",
}


def _assets_dir() -> Path:
    return Path(str(resources.files("fastapi_offline") / "static"))


def _assets_version() -> str:
    try:
        return metadata.version("fastapi-offline")
    except metadata.PackageNotFoundError:
        return "0"


@dataclass
class _Cached:
    body: bytes
    fetched_at: float
    complete: bool


async def _fetch_postgrest(url: str, timeout: float) -> dict[str, Any]:
    """PostgREST's own description from its root: `url` is http(s)://host:port or unix:<socket>."""
    transport = httpx.AsyncHTTPTransport(uds=url.removeprefix("unix:")) if url.startswith("unix:") else None
    base = "http://postgrest" if transport is not None else url.rstrip("/")
    async with httpx.AsyncClient(timeout=timeout, transport=transport) as client:
        r = await client.get(base + "/", headers={"Accept": "application/openapi+json"})
        r.raise_for_status()
        doc = r.json()
    if not isinstance(doc, dict) or doc.get("swagger") != "2.0":
        raise ValueError("PostgREST did not answer a Swagger 2.0 document")
    return doc


async def _fetch_catalog(pool: AsyncConnectionPool, timeout: float) -> openapi.Catalog | None:
    try:
        async with pool.connection(timeout=timeout) as conn:
            cur = await conn.execute(openapi.CATALOG_SQL)  # catalogs only: no role, no RLS involved
            return openapi.catalog_from_rows(cast(list[dict[str, Any]], await cur.fetchall()))  # dict_row
    except Exception as e:  # the document still serves, without nullability and required fields
        log.warning("the database's catalog unavailable for the API description: %s", e)
        return None


def _ext_constraints(settings: SettingsDep) -> dict[str, dict[str, dict[str, Any]]]:
    """What ext's handlers check beyond their pydantic models, for the document."""
    from ext import emails

    password = {"minLength": settings.password_min_length, "maxLength": settings.password_max_length}
    # What ext/emails.py accepts, as far as a pattern can say it (documented conservatively: printable
    # ASCII but the space and @, around one @; the server also takes other letters)
    part = f"[!-?A-~]{{1,{emails.MAX_PART_LENGTH}}}"
    email = f"^{part}@{part}$"
    lease = {"minimum": settings.pipeline_lease_min_s, "maximum": settings.pipeline_lease_max_s}
    return {
        "SignupBody": {"email": {"pattern": email}, "password": password},
        "LoginBody": {"email": {"pattern": email}},  # what is not an address is refused before the password
        # auth.py's codes: tpv_ and 32 random bytes in base64url
        "VerifyEmailBody": {"token": {"pattern": "^tpv_[A-Za-z0-9_-]{43}$"}},
        "NewKey": {"expires_at": {"description": "Later than now (422 naming expires_at otherwise); "
                                                 "RFC 3339 with a time zone. Never expires when left out."}},
        # pipeline.py checks the ranges against these settings
        "Claim": {"limit": {"maximum": settings.pipeline_claim_max_jobs}, "lease_s": lease,
                  "wait_s": {"maximum": settings.pipeline_wait_max_s}},
        "Extend": {"lease_s": lease},
        "Requeue": {"": {"if": {"required": ["session_id"], "properties": {"session_id": {"type": "string"}}},
                         "else": {"required": ["suite_id"], "properties": {"suite_id": {"type": "string"}}},
                         "description": "session_id, suite_id or both (the session within that suite)."}},
    }


def _ext_headers(settings: SettingsDep) -> dict[tuple[str, str], list[dict[str, Any]]]:
    return openapi.tus_parameters(settings.max_bundle_bytes, settings.max_metadata_bytes)


async def merged_document(request: Request, settings: SettingsDep, pool: AsyncConnectionPool) -> bytes:
    state = request.app.state
    cached: _Cached | None = getattr(state, "openapi_cache", None)
    now = time.monotonic()
    if cached and cached.complete and now - cached.fetched_at < settings.openapi_cache_s:
        return cached.body
    ext_doc = request.app.openapi()
    try:
        swagger = await _fetch_postgrest(settings.postgrest_api_url, settings.ready_timeout_s)
    except (httpx.HTTPError, ValueError) as e:
        log.warning("PostgREST's API description unavailable: %s", e)
        if cached and cached.complete:
            return cached.body  # stale but whole beats fresh but half
        doc = openapi.merge(ext_doc, None, note="PostgREST's endpoints are missing: it did not answer just now. "
                                                "Reload in a moment.")
        return json.dumps(doc).encode()
    catalog = await _fetch_catalog(pool, settings.ready_timeout_s)
    body = json.dumps(openapi.merge(ext_doc, swagger, catalog, ext_constraints=_ext_constraints(settings),
                                    ext_headers=_ext_headers(settings))).encode()
    state.openapi_cache = _Cached(body, now, catalog is not None)
    return body


@router.get("/openapi.json")
async def openapi_json(request: Request, settings: SettingsDep, pool: PoolDep) -> Response:
    body = await merged_document(request, settings, pool)
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-cache"})


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" type="image/png" href="/docs/favicon.png?v={v}">
<link rel="stylesheet" href="/docs/swagger-ui.css?v={v}">
<style>body {{ margin: 0; }} .swagger-ui .topbar {{ display: none; }}</style>
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js?v={v}"></script>
<script>
window.ui = SwaggerUIBundle({{
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
  deepLinking: true,
  docExpansion: "list",
  defaultModelsExpandDepth: 0,
  persistAuthorization: true,
  displayRequestDuration: true,
  filter: true,
  tryItOutEnabled: false,
  validatorUrl: null
}});
</script>
</body>
</html>
"""


@router.get("/docs")
async def docs_page() -> HTMLResponse:
    page = PAGE.format(title=html.escape("Tracepipe API reference"), v=html.escape(_assets_version()))
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


@router.get("/docs/{name}")
async def docs_asset(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError(404, "TP404", "not found", name)
    return FileResponse(_assets_dir() / name, media_type=ASSETS[name],
                        headers={"Cache-Control": "public, max-age=86400"})


INDEX = {
    "name": "Tracepipe API",
    "links": {
        "docs": "/docs",
        "openapi": "/openapi.json",
        "jwks": "/.well-known/jwks.json",
        "health": "/health",
    },
    "hint": "The reference is at /docs (for people) and /openapi.json (OpenAPI 3.1, for tools).",
}


def _wants_html(accept: str) -> bool:
    """A browser's Accept names text/html before (or instead of) JSON; a tool's does not."""
    kinds = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    if "text/html" not in kinds:
        return False
    return "application/json" not in kinds or kinds.index("text/html") < kinds.index("application/json")


@router.api_route("/", methods=["GET", "HEAD"])
async def root(request: Request, settings: SettingsDep, pool: PoolDep) -> Response:
    accept = request.headers.get("accept", "")
    if _wants_html(accept):
        return RedirectResponse("/docs", status_code=303)
    if "application/openapi+json" in accept.lower():  # what PostgREST's root answered such a client
        return await openapi_json(request, settings, pool)
    return JSONResponse(INDEX, headers={"Cache-Control": "no-cache", "Link": '</docs>; rel="service-doc", '
                                        '</openapi.json>; rel="service-desc"'})
