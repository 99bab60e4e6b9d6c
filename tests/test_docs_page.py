"""The API reference through the proxy: GET /openapi.json is one valid OpenAPI 3 document with
ext's and PostgREST's endpoints (native and seed paths) and both auth schemes; GET /docs is
Swagger UI served from the stack itself, and a real browser (headless Chromium, Debian's
`chromium`, installed by scripts/bootstrap.sh) renders the endpoint list from it with every
host but the stack unreachable."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from ext import openapi

SEED_PATHS = {
    "/suites/{suite_id}", "/suites/{suite_id}/actions", "/suites/{suite_id}/actions/{action_id}",
    "/suites/{suite_id}/members", "/suites/{suite_id}/members/{user_id}", "/mcp-servers",
    "/mcp-servers/{mcp_server_id}", "/mcp-servers/{mcp_server_id}/tools",
    "/mcp-servers/{mcp_server_id}/tools/{tool_id}", "/action-tool-maps", "/action-tool-maps/{map_id}",
    "/sessions/{session_id}", "/examples/{example_id}", "/users/me", "/api-keys", "/api-keys/{key_id}",
}
EXT_PATHS = {"/auth/token", "/auth/login", "/auth/signup", "/auth/refresh", "/auth/logout", "/sessions",
             "/sessions/{session_id}/bundle", "/examples/{example_id}/messages", "/examples/export",
             "/.well-known/jwks.json", "/health", "/ready"}
NATIVE_PATHS = {"/suites", "/actions", "/suite_members", "/tools", "/sessions", "/examples"}
# PostgREST's snake paths that a kebab seed path replaces in the document (one path per resource)
ALIASED_PATHS = {"/api_keys", "/mcp_servers", "/action_tool_maps"}


@pytest.fixture(scope="module")
def doc(anon: httpx.Client) -> dict[str, Any]:
    r = anon.get("/openapi.json")
    assert r.status_code == 200, r.text[:500]
    assert r.headers["content-type"].startswith("application/json")
    return dict(r.json())


def test_openapi_json_is_one_valid_openapi3_document(doc: dict[str, Any]) -> None:
    validate(doc)  # raises on any violation of the OpenAPI 3.1 schema (refs resolved)
    assert doc["openapi"].startswith("3.")
    assert "PostgREST" in doc["info"]["version"]
    assert "missing" not in doc["info"]["description"]  # PostgREST answered: no fallback note
    paths = set(doc["paths"])
    missing = (EXT_PATHS | NATIVE_PATHS | SEED_PATHS) - paths
    assert not missing, missing
    assert not ALIASED_PATHS & paths


def test_auth_schemes_are_documented(doc: dict[str, Any]) -> None:
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer",
                                     "bearerFormat": "JWT"}
    assert schemes["ApiKey"]["type"] == "apiKey"
    assert (schemes["ApiKey"]["in"], schemes["ApiKey"]["name"]) == ("header", "Authorization")
    assert "ApiKey tp_" in schemes["ApiKey"]["description"]
    paths = doc["paths"]
    assert doc["security"] == [{"bearerAuth": []}]  # the default: every path not listed below
    assert paths["/auth/token"]["post"]["security"] == [{"ApiKey": []}]
    for public in ("/auth/login", "/auth/signup", "/auth/refresh"):
        assert paths[public]["post"]["security"] == [], public
    assert "security" not in paths["/suites"]["get"]  # bearer, from the default
    # The Authorization header is the schemes' business, not a parameter.
    assert not [p for p in paths["/auth/token"]["post"].get("parameters", []) if p["name"].lower() == "authorization"]


def test_each_method_is_documented_by_the_component_the_proxy_sends_it_to(doc: dict[str, Any]) -> None:
    paths = doc["paths"]
    # POST /sessions goes to ext (a zip upload answering the session row); GET to PostgREST.
    upload = paths["/sessions"]["post"]
    assert "application/zip" in upload["requestBody"]["content"]
    assert upload["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/sessions"}
    assert "suite_id" in [p["name"] for p in paths["/sessions"]["get"]["parameters"]]
    # DELETE /sessions/{id} is ext's (it also removes the objects); GET is PostgREST's one row.
    assert paths["/sessions/{session_id}"]["delete"]["operationId"].startswith("delete_session")
    assert paths["/sessions/{session_id}"]["get"]["operationId"] == "get_session"
    # A seed path carries its parent in the path, not as a row filter, and answers one object.
    nested = paths["/suites/{suite_id}/actions/{action_id}"]
    names = [p.get("name") for p in nested["get"]["parameters"]]
    assert names[:2] == ["suite_id", "action_id"]
    assert [p["name"] for p in nested["get"]["parameters"] if p["in"] != "path"] == []
    assert nested["get"]["responses"]["200"]["content"]["application/vnd.pgrst.object+json"]["schema"] == {
        "$ref": "#/components/schemas/actions"}
    assert "404" in nested["get"]["responses"]
    listing = paths["/suites/{suite_id}/actions"]
    assert {"get", "post"} <= set(listing)
    filters = [p["name"] for p in listing["get"]["parameters"] if p["in"] == "query"]
    assert "suite_id" not in filters and "name" in filters
    # Columns come from PostgREST's live schema, comments included.
    suites = doc["components"]["schemas"]["suites"]
    assert {"id", "name", "slug", "description", "created_by"} <= set(suites["properties"])
    # One error body everywhere.
    assert doc["components"]["schemas"]["Error"]["required"] == ["code", "message", "details", "hint"]
    assert paths["/suites"]["get"]["responses"]["default"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"}


def test_every_documented_fixed_path_is_routed(doc: dict[str, Any], anon: httpx.Client) -> None:
    """The reference does not promise paths the proxy does not have: each GET without path
    parameters reaches its component (anything but a routing 404/405)."""
    for path, item in doc["paths"].items():
        if "{" in path or "get" not in item or any(p.get("required") for p in item["get"].get("parameters", [])):
            continue
        r = anon.get(path)
        assert r.status_code not in (404, 405), (path, r.status_code, r.text[:200])


def test_root_sends_people_to_the_docs_and_tools_to_an_index(anon: httpx.Client) -> None:
    """GET / (the URL `make up` prints) was 50 KB of PostgREST's Swagger 2.0."""
    browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    r = anon.get("/", headers={"Accept": browser})
    assert r.status_code in (302, 303) and r.headers["location"] == "/docs", (r.status_code, r.headers)
    r = anon.get("/", headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    index = r.json()
    assert index["links"]["docs"] == "/docs" and index["links"]["openapi"] == "/openapi.json"
    assert index["links"]["jwks"] == "/.well-known/jwks.json"
    assert len(r.content) < 2000
    for link in index["links"].values():
        assert anon.get(link).status_code == 200, link
    assert anon.get("/").json() == index  # curl's */*: the index too
    assert anon.head("/", headers={"Accept": "application/json"}).status_code == 200
    # a tool that asks the root for OpenAPI (as PostgREST's clients do) gets the whole document
    r = anon.get("/", headers={"Accept": "application/openapi+json"})
    assert r.status_code == 200 and r.json()["openapi"].startswith("3.") and "/suites" in r.json()["paths"]


def test_cors_exposes_the_headers_clients_read(anon: httpx.Client) -> None:
    r = anon.get("/health", headers={"Origin": "http://localhost:3000"})
    exposed = {h.strip().lower() for h in r.headers.get("access-control-expose-headers", "").split(",")}
    assert {"x-next-cursor", "content-range", "etag", "upload-offset", "location"} <= exposed, exposed


def test_fallback_without_postgrest_is_still_valid() -> None:
    """PostgREST down: ext's part alone, saying so (the router serves this, uncached)."""
    from ext.main import create_app

    alone = openapi.merge(create_app().openapi(), None, note="PostgREST's endpoints are missing.")
    validate(alone)
    assert "/auth/token" in alone["paths"] and "/suites" not in alone["paths"]
    assert "missing" in alone["info"]["description"]


def test_docs_page_and_assets_are_served_locally(anon: httpx.Client) -> None:
    r = anon.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    refs = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert len(refs) >= 3, refs
    for ref in refs:
        assert ref.startswith("/") and not ref.startswith("//"), ref  # same origin, no CDN
        asset = anon.get(ref)
        assert asset.status_code == 200 and len(asset.content) > 1000, (ref, asset.status_code)
    assert "http://" not in r.text and "https://" not in r.text
    bundle = anon.get("/docs/swagger-ui-bundle.js")
    assert bundle.headers["content-type"].startswith("text/javascript")
    assert re.search(rb'PACKAGE_VERSION:"5\.', bundle.content), "Swagger UI 5.x renders OpenAPI 3.1"
    assert anon.get("/docs/nothing.js").status_code == 404


# --- a real browser ---------------------------------------------------------------------------------------

def chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
    """Headless Chromium, as the brief of the page says, with every host but loopback made
    unresolvable: whatever renders came from the stack, not from a CDN."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("Debian's chromium is needed (scripts/bootstrap.sh installs it)")
    argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--window-size=1280,2000", "--virtual-time-budget=10000",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost", *extra, url]
    result = subprocess.run(argv, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return result


def read_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB pixels) of an 8-bit, non-interlaced RGB or RGBA PNG —
    what Chromium writes; enough to look at a screenshot without an imaging library."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    assert header is not None
    width, height, depth, color_type, _, _, interlace = header
    assert depth == 8 and color_type in (2, 6) and interlace == 0, header
    bpp = 3 if color_type == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):  # undo each row's filter (PNG spec §9): None, Sub, Up, Average, Paeth
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif kind == 2:
            for i in range(stride):
                line[i] = (line[i] + prev[i]) & 255
        elif kind == 3:
            for i in range(stride):
                line[i] = (line[i] + ((line[i - bpp] if i >= bpp else 0) + prev[i]) // 2) & 255
        elif kind == 4:
            for i in range(stride):
                a, b = (line[i - bpp], prev[i]) if i >= bpp else (0, prev[i])
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line) if bpp == 3 else bytes(v for j, v in enumerate(line) if j % 4 != 3))
        prev = line
    return width, height, rows


def test_docs_page_renders_the_endpoint_list_in_chromium(base_url: str, tmp_path: Path) -> None:
    url = f"{base_url}/docs"
    dom = chromium(url, tmp_path / "profile-dom", "--dump-dom").stdout.decode()
    # Swagger UI turned the document into operation blocks: ext's and PostgREST's, side by side.
    assert 'class="swagger-ui' in dom
    blocks = re.findall(r'<div class="opblock opblock-(\w+)[^"]*" id="([^"]+)"', dom)
    assert len(blocks) > 60, blocks[:5]
    paths = set(re.findall(r'data-path="([^"]+)"', dom))
    assert {"/suites", "/auth/token", "/sessions", "/suites/{suite_id}/actions/{action_id}",
            "/examples/{example_id}/messages"} <= paths
    assert ("post", "operations-auth-token_auth_token_post") in blocks
    assert ("get", "operations-suites-list_suites") in blocks
    assert "Tracepipe API" in dom and "Authorize" in dom  # the info block and the security schemes

    shot = tmp_path / "docs.png"
    chromium(url, tmp_path / "profile-shot", f"--screenshot={shot}")
    data = shot.read_bytes()
    assert len(data) > 50_000, len(data)  # a blank 1280×2000 page compresses to a few KB
    width, height, rows = read_png(data)
    assert (width, height) == (1280, 2000)
    colors = Counter(row[i:i + 3] for row in rows for i in range(0, len(row), 12))  # every 4th pixel
    assert len(colors) > 50, colors.most_common(5)
    assert colors.most_common(1)[0][1] < 0.8 * sum(colors.values()), colors.most_common(3)  # not one color
    # Swagger UI paints GET badges #61affe and POST badges #49cc90: the endpoint list is on screen.
    assert colors[bytes((0x61, 0xAF, 0xFE))] > 100 and colors[bytes((0x49, 0xCC, 0x90))] > 100, \
        colors.most_common(10)
