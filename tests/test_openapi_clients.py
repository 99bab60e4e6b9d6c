"""Tools nobody on the project wrote, run on the live stack's GET /openapi.json (issue 14):

- openapi-python-client (PyPI) generates a client into a temporary directory; the test imports
  it and lists, creates (with only the required fields), updates, filters and deletes suites,
  actions, MCP servers, tools and bindings through the proxy;
- openapi-typescript + openapi-fetch (npm, tests/js/, installed with `npm ci` when absent):
  the generated types compile under `tsc --strict` for the same calls (tests/js/client.ts),
  calls the document forbids do not (tests/js/negative.ts), and node runs client.ts against
  the stack;
- Redocly CLI lints the document: no errors, no operation without an operationId;
- schemathesis sends schema-valid requests (positive generation only) to every operation and
  finds none rejected (a 4xx other than 401/403/404/409/429/416: what the data, not the
  request, decides). The few refusals JSON Schema cannot rule out (a filter required for a
  collection write, an expiry in the past, a code never issued, a reference to no row, bytes
  that are no bundle) are listed in REFUSALS/SAFE_WRITE/OPAQUE with their reasons, each matched
  on its status, code, field and message and declared in the document; any other fails.

Creating with only the required fields relies on the database deriving a suite's slug, an MCP
server's transport and a binding's mcp_server_id (DESIGN.md §9).
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.conftest import User, assert_error_body, create_key, create_suite, unique
from tracepipe.settings import REPO_ROOT

JS = REPO_ROOT / "tests" / "js"
# ext's byte streams (zip, JSONL, files): openapi-python-client has no model for those media
# types and says so; every other operation must come through whole.
STREAMS = {"POST /examples", "GET /examples/export", "GET /examples/{example_id}/messages", "POST /sessions",
           "GET /sessions/{session_id}/bundle", "GET /sessions/{session_id}/files/{path}",
           "PATCH /uploads/{upload_id}"}  # tus bytes (application/offset+octet-stream): tus clients send them


@pytest.fixture(scope="module")
def document(anon: httpx.Client) -> dict[str, Any]:
    r = anon.get("/openapi.json")
    assert r.status_code == 200, r.text[:300]
    return dict(r.json())


@pytest.fixture(scope="module")
def document_file(document: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("openapi") / "openapi.json"
    path.write_text(json.dumps(document))
    return path


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, item in document["paths"].items() for method, op in item.items()]


# --- openapi-python-client -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def generated(document: dict[str, Any], document_file: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    out = tmp_path_factory.mktemp("python-client")
    tool = Path(sys.executable).parent / "openapi-python-client"
    result = subprocess.run([str(tool), "generate", "--path", str(document_file), "--meta", "none",
                             "--output-path", str(out / "tp_api_client")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    warned = set(re.findall(r"WARNING parsing (\w+ \S+) within", result.stdout))
    assert warned <= STREAMS, (warned - STREAMS, result.stdout[-3000:])
    assert "Unable to" not in result.stdout, result.stdout[-3000:]  # no schema dropped
    # one function per operation: none lost to a name clash (/api-keys and /api_keys were)
    modules = [p for p in (out / "tp_api_client" / "api").rglob("*.py") if p.name != "__init__.py"]
    skipped = len(re.findall(r"WARNING parsing \w+ \S+ within \w+\. Endpoint will not be generated",
                             result.stdout + result.stderr))
    assert len(modules) == len(operations(document)) - skipped, (len(modules), len(operations(document)), skipped)
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("tp_api_client")
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == "tp_api_client" or m.startswith("tp_api_client.")]:
            del sys.modules[name]


def api(package: ModuleType, tag: str, operation_id: str) -> Any:
    return importlib.import_module(f"{package.__name__}.api.{tag}.{operation_id}")


def model(package: ModuleType, name: str) -> Any:
    return getattr(importlib.import_module(f"{package.__name__}.models"), name)


@pytest.fixture
def client(generated: ModuleType, base_url: str, make_user: Callable[..., User]) -> Iterator[Any]:
    user = make_user()
    with generated.AuthenticatedClient(base_url=base_url, token=user.token, raise_on_unexpected_status=True) as c:
        yield c


def created(response: Any) -> Any:
    assert response.status_code == 201, (response.status_code, response.content[:500])
    rows = response.parsed
    assert isinstance(rows, list) and len(rows) == 1, rows
    return rows[0]


def test_python_client_lists_creates_updates_filters_and_deletes_every_capability_resource(
        generated: ModuleType, client: Any) -> None:
    g, m = generated, (lambda name: model(generated, name))
    # suites (slug given: the derived one is the next test's business)
    slug = unique("py-suite")
    suite = created(api(g, "suites", "create_suites").sync_detailed(
        client=client, body=m("SuitesInsert")(name="Py Suite", slug=slug)))
    assert isinstance(suite, m("Suites")) and suite.slug == slug
    listed = api(g, "suites", "list_suites").sync(client=client, id=f"eq.{suite.id}",
                                                   prefer=m("ListSuitesPrefer")("count=exact"))
    assert [s.id for s in listed] == [suite.id]
    changed = api(g, "suites", "update_suite").sync(client=client, suite_id=suite.id,
                                                     body=m("SuitesUpdate")(description="changed"))
    assert changed.description == "changed" and changed.id == suite.id
    # actions under the suite: only the name
    action = created(api(g, "actions", "create_suites_actions").sync_detailed(
        client=client, suite_id=suite.id, body=m("ActionsInsertUnderSuite")(name="lookup")))
    assert action.suite_id == suite.id
    found = api(g, "actions", "list_suites_actions").sync(client=client, suite_id=suite.id, name="eq.lookup")
    assert [a.id for a in found] == [action.id]
    action = api(g, "actions", "update_suites_action").sync(client=client, suite_id=suite.id, action_id=action.id,
                                                            body=m("ActionsUpdate")(description="looks up"))
    assert action.description == "looks up"
    # an MCP server and a tool of it
    server = created(api(g, "mcp_servers", "create_mcp_servers").sync_detailed(
        client=client, body=m("McpServersInsert")(name=unique("py-server"), url="https://mcp.example.test/py",
                                                  transport=m("McpServersInsertTransport")("streamable-http"))))
    tool = created(api(g, "tools", "create_mcp_servers_tools").sync_detailed(
        client=client, mcp_server_id=server.id, body=m("ToolsInsertUnderMcpServer")(name="search")))
    tools = api(g, "tools", "list_mcp_servers_tools").sync(client=client, mcp_server_id=server.id,
                                                          name="ilike.sea*")
    assert [t.id for t in tools] == [tool.id]
    # a binding
    binding = created(api(g, "action_tool_maps", "create_action_tool_maps").sync_detailed(
        client=client, body=m("ActionToolMapsInsert")(suite_id=suite.id, action_id=action.id, tool_id=tool.id,
                                                      mcp_server_id=server.id)))
    bindings = api(g, "action_tool_maps", "list_action_tool_maps").sync(client=client, suite_id=f"eq.{suite.id}")
    assert [b.id for b in bindings] == [binding.id]
    mapping = m("ActionToolMapsUpdateArgumentMapping").from_dict({"q": "$.query"})
    binding = api(g, "action_tool_maps", "update_action_tool_map").sync(
        client=client, map_id=binding.id, body=m("ActionToolMapsUpdate")(argument_mapping=mapping))
    assert binding.argument_mapping.to_dict() == {"q": "$.query"}
    # delete, innermost first; each /{id} DELETE answers the row, then it is gone
    assert api(g, "action_tool_maps", "delete_action_tool_map").sync(client=client, map_id=binding.id).id == binding.id
    assert api(g, "tools", "delete_mcp_servers_tool").sync(client=client, mcp_server_id=server.id,
                                                          tool_id=tool.id).id == tool.id
    assert api(g, "mcp_servers", "delete_mcp_server").sync(client=client, mcp_server_id=server.id).id == server.id
    assert api(g, "actions", "delete_suites_action").sync(client=client, suite_id=suite.id,
                                                         action_id=action.id).id == action.id
    assert api(g, "suites", "delete_suite").sync(client=client, suite_id=suite.id).id == suite.id
    gone = api(g, "suites", "get_suite").sync_detailed(client=client, suite_id=suite.id)
    assert gone.status_code == 404 and gone.parsed.code
    me = api(g, "users", "get_me").sync(client=client)
    assert isinstance(me, m("Me")) and me.memberships == []


def test_python_client_typed_errors_and_signup(generated: ModuleType, base_url: str) -> None:
    """Errors parse as the one Error model; signup's 201 as its own model."""
    with generated.Client(base_url=base_url) as anon:
        body = model(generated, "SignupBody")(email=f"{unique('gen')}@example.test",
                                              password="correct horse battery staple")
        signed = api(generated, "auth", "signup_auth_signup_post").sync(client=anon, body=body)
        assert isinstance(signed, model(generated, "Signup")) and signed.access_token and signed.expires_in > 0
    with generated.AuthenticatedClient(base_url=base_url, token=signed.access_token) as c:
        r = api(generated, "suites", "get_suite").sync_detailed(client=c,
                                                                suite_id="00000000-0000-0000-0000-000000000000")
        assert r.status_code == 404 and isinstance(r.parsed, model(generated, "Error"))


def test_python_client_creates_actions_and_tools_with_only_required_fields(generated: ModuleType, client: Any,
                                                                          make_user: Callable[..., User]) -> None:
    g, m = generated, (lambda name: model(generated, name))
    suite = created(api(g, "suites", "create_suites").sync_detailed(
        client=client, body=m("SuitesInsert")(name="Only required", slug=unique("req"))))
    action = created(api(g, "actions", "create_actions").sync_detailed(
        client=client, body=m("ActionsInsert")(suite_id=suite.id, name="bare")))
    assert action.input_schema.to_dict() == {} and action.description is None
    server = created(api(g, "mcp_servers", "create_mcp_servers").sync_detailed(
        client=client, body=m("McpServersInsert")(name=unique("req"), url="https://mcp.example.test/r",
                                                  transport=m("McpServersInsertTransport")("sse"))))
    tool = created(api(g, "tools", "create_tools").sync_detailed(
        client=client, body=m("ToolsInsert")(mcp_server_id=server.id, name="bare")))
    assert tool.input_schema.to_dict() == {}


def test_python_client_creates_a_suite_with_only_its_name(generated: ModuleType, client: Any) -> None:
    suite = created(api(generated, "suites", "create_suites").sync_detailed(
        client=client, body=model(generated, "SuitesInsert")(name=f"My Suite {unique('n')}")))
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", suite.slug), suite.slug


def test_python_client_creates_an_mcp_server_with_only_name_and_url(generated: ModuleType, client: Any) -> None:
    server = created(api(generated, "mcp_servers", "create_mcp_servers").sync_detailed(
        client=client, body=model(generated, "McpServersInsert")(name=unique("bare"), url="https://mcp.example.test")))
    assert server.transport.value == "streamable-http"


def test_python_client_binds_without_naming_the_tools_server(generated: ModuleType, client: Any,
                                                            base_url: str) -> None:
    g, m = generated, (lambda name: model(generated, name))
    suite = created(api(g, "suites", "create_suites").sync_detailed(
        client=client, body=m("SuitesInsert")(name="Bind", slug=unique("bind"))))
    action = created(api(g, "actions", "create_suites_actions").sync_detailed(
        client=client, suite_id=suite.id, body=m("ActionsInsertUnderSuite")(name="a")))
    server = created(api(g, "mcp_servers", "create_mcp_servers").sync_detailed(
        client=client, body=m("McpServersInsert")(name=unique("bind"), url="https://mcp.example.test/b",
                                                  transport=m("McpServersInsertTransport")("stdio"))))
    tool = created(api(g, "tools", "create_mcp_servers_tools").sync_detailed(
        client=client, mcp_server_id=server.id, body=m("ToolsInsertUnderMcpServer")(name="t")))
    binding = created(api(g, "action_tool_maps", "create_action_tool_maps").sync_detailed(
        client=client, body=m("ActionToolMapsInsert")(suite_id=suite.id, action_id=action.id, tool_id=tool.id)))
    assert binding.mcp_server_id == server.id


def test_document_gives_generators_what_they_need(document: dict[str, Any]) -> None:
    """The properties the generators rely on, checked in the document itself."""
    ids = Counter(op.get("operationId") for _, _, op in operations(document))
    assert None not in ids and all(n == 1 for n in ids.values()), ids.most_common(3)
    paths = set(document["paths"])
    assert not {"/api_keys", "/mcp_servers", "/action_tool_maps", "/"} & paths  # one path per resource
    schemas = document["components"]["schemas"]
    for _, path, op in operations(document):
        for media in op.get("requestBody", {}).get("content", {}):
            assert "pgrst" not in media and media in {"application/json", "multipart/form-data", "application/zip",
                                                      "application/jsonl",
                                                      "application/offset+octet-stream"}, (path, media)  # tus PATCH
    suites, insert, update = schemas["suites"], schemas["suites_insert"], schemas["suites_update"]
    assert set(suites["required"]) == set(suites["properties"])
    assert suites["properties"]["id"] == {**suites["properties"]["id"], "type": "string", "format": "uuid",
                                          "readOnly": True}
    assert suites["properties"]["created_at"]["format"] == "date-time"
    assert suites["properties"]["description"]["type"] == ["string", "null"]
    assert insert["required"] == ["name"] and insert["additionalProperties"] is False
    assert not {"id", "created_by", "created_at", "updated_at"} & set(insert["properties"])
    assert "required" not in update and "id" not in update["properties"]
    assert "transport" not in schemas["mcp_servers_insert"].get("required", [])
    assert schemas["mcp_servers_insert"]["properties"]["transport"]["enum"] == ["stdio", "sse", "streamable-http"]
    assert "mcp_server_id" not in schemas["action_tool_maps_insert"]["required"]
    listing = document["paths"]["/suites"]["get"]
    by_name = {p["name"]: p for p in listing["parameters"]}
    assert re.fullmatch(by_name["id"]["schema"]["pattern"], "eq.00000000-0000-0000-0000-000000000000")
    assert not re.fullmatch(by_name["id"]["schema"]["pattern"], "00000000-0000-0000-0000-000000000000")
    assert "count=exact" in by_name["Prefer"]["schema"]["enum"]
    post = document["paths"]["/suites"]["post"]
    assert post["responses"]["201"]["content"]["application/json"]["schema"]["items"] == {
        "$ref": "#/components/schemas/suites"}
    assert document["paths"]["/users/me"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Me"}
    assert document["paths"]["/auth/signup"]["post"]["responses"]["201"]["content"]["application/json"][
        "schema"] == {"$ref": "#/components/schemas/Signup"}
    assert post["responses"]["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}


def test_document_states_what_the_server_checks(document: dict[str, Any]) -> None:
    """The constraints schemathesis found refused but undocumented (issue 14): ids typed as uuids
    on ext's paths, invitations by user_id or email with a role of three, a transport required
    for non-http URLs, the pipeline's ranges, tus's headers, the shapes of login and codes."""
    schemas, paths = document["components"]["schemas"], document["paths"]
    for path, method, name in [("/sessions/{session_id}/bundle", "get", "session_id"),
                               ("/examples/{example_id}/messages", "get", "example_id"),
                               ("/pipeline/jobs/{job_id}/extend", "post", "job_id"),
                               ("/uploads/{upload_id}", "head", "upload_id"), ("/examples", "post", "suite_id")]:
        param = next(p for p in paths[path][method]["parameters"] if p["name"] == name)
        assert param["schema"]["format"] == "uuid" and param["schema"]["type"] == "string", (path, param)
    for name in ("suite_members_insert", "suite_members_insert_under_suite"):
        invite = schemas[name]
        assert invite["properties"]["role"]["enum"] == ["viewer", "editor", "owner"]
        assert invite["if"]["required"] == ["user_id"] and invite["else"]["required"] == ["email"]
        assert invite["properties"]["accepted"]["enum"] == [False]
    assert schemas["suite_members_update"]["properties"]["role"]["enum"] == ["viewer", "editor", "owner"]
    assert schemas["mcp_servers_insert"]["else"]["required"] == ["transport"]
    assert re.search(schemas["suites_insert"]["properties"]["name"]["pattern"], "a b")
    assert not re.search(schemas["suites_insert"]["properties"]["name"]["pattern"], "  ")
    claim, extend = schemas["Claim"]["properties"], schemas["Extend"]["properties"]
    assert claim["limit"]["maximum"] == 100 and extend["lease_s"] == {**extend["lease_s"], "minimum": 10,
                                                                      "maximum": 3600}
    assert schemas["Requeue"]["else"]["required"] == ["suite_id"]
    assert "pattern" in schemas["LoginBody"]["properties"]["email"]
    assert re.fullmatch(schemas["VerifyEmailBody"]["properties"]["token"]["pattern"], "tpv_" + "A" * 43)
    creation = {p["name"]: p for p in paths["/uploads"]["post"]["parameters"]}
    assert creation["Tus-Resumable"]["required"] and creation["Tus-Resumable"]["schema"]["enum"] == ["1.0.0"]
    pattern = creation["Upload-Metadata"]["schema"]["pattern"]
    for name in ("session.zip", "a", "ab", "abc"):
        assert re.fullmatch(pattern, "filename " + base64.b64encode(name.encode()).decode()), name
    assert not re.fullmatch(pattern, "filename " + base64.b64encode(b"\xff\xfe").decode())
    assert "resolution=" not in paths["/suites/{suite_id}/members"]["post"]["parameters"][-1]["schema"]["pattern"]
    assert "resolution=" in paths["/suites"]["post"]["parameters"][-1]["schema"]["pattern"]
    assert "422" in paths["/tools"]["post"]["responses"] and "400" in paths["/auth/verify-email"]["post"]["responses"]


def test_a_past_expiry_is_422_naming_expires_at(make_user: Callable[..., User]) -> None:
    """It was the database's 400 22023 with no field named (schemathesis found it)."""
    r = make_user().client.post("/api-keys", json={"name": "old", "expires_at": "2001-01-01T00:00:00Z"})
    assert r.status_code == 422, r.text
    body = assert_error_body(r)
    assert "expires_at" in body["message"] and "future" in body["message"], body


def test_tus_metadata_with_u0000_is_refused_naming_the_key(make_user: Callable[..., User]) -> None:
    """It was the database's raw 400 22P05 (jsonb holds no U+0000; schemathesis found it)."""
    value = base64.b64encode(b"a\x00b.zip").decode()
    r = make_user().client.post("/uploads", headers={"Tus-Resumable": "1.0.0", "Upload-Length": "10",
                                                     "Upload-Metadata": f"filename {value}"})
    assert r.status_code == 400, r.text
    body = assert_error_body(r)
    assert body["code"] == "TP400" and "U+0000" in body["message"] and body["details"] == {"key": "filename"}, body


# --- npm: openapi-typescript, openapi-fetch, Redocly ------------------------------------------------

@pytest.fixture(scope="module")
def node_modules() -> Path:
    """tests/js's packages, exactly as package-lock.json pins them (npm ci when absent or stale)."""
    if shutil.which("npm") is None:
        pytest.fail("npm is needed (scripts/bootstrap.sh installs it)")
    installed = JS / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < (JS / "package-lock.json").stat().st_mtime:
        r = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return JS / "node_modules"


def npx(node_modules: Path, tool: str, *args: str, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(node_modules / ".bin" / tool), *args], cwd=cwd or JS, capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def typescript_project(node_modules: Path, document_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/js's sources and the types generated from the live document, compiled with tsc --strict."""
    work = tmp_path_factory.mktemp("ts")
    for name in ("client.ts", "negative.ts", "tsconfig.json", "package.json"):
        shutil.copy(JS / name, work / name)
    (work / "node_modules").symlink_to(node_modules)
    r = npx(node_modules, "openapi-typescript", str(document_file), "-o", str(work / "api.ts"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = npx(node_modules, "tsc", "-p", str(work / "tsconfig.json"), "--strict", cwd=work)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    return work


def test_typescript_types_compile_strictly_and_refuse_what_the_document_forbids(typescript_project: Path) -> None:
    api_ts = (typescript_project / "api.ts").read_text()
    # separate row and body types, the row's columns not optional
    suites = re.search(r"\n        suites: \{(.*?)\n        \};", api_ts, re.S)
    assert suites and "readonly id: string;" in suites.group(1) and "name: string;" in suites.group(1), api_ts[:500]
    assert "suites_insert: {" in api_ts and "suites_update: {" in api_ts
    # negative.ts's @ts-expect-error lines each are a type error, or tsc above would have failed
    assert (typescript_project / "out" / "negative.js").exists() and (typescript_project / "out" / "client.js").exists()


def test_openapi_fetch_client_runs_against_the_stack(typescript_project: Path, base_url: str,
                                                     make_user: Callable[..., User]) -> None:
    user = make_user()
    env = {**os.environ, "TP_BASE_URL": base_url, "TP_TOKEN": user.token, "TP_TAG": unique("t")}
    r = subprocess.run(["node", str(typescript_project / "out" / "client.js")], capture_output=True, text=True,
                       timeout=300, env=env, cwd=typescript_project)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["listed"] == [seen["suite"]["id"]]
    assert seen["description"] == "changed by openapi-fetch"
    assert len(seen["actions"]) == 1 and len(seen["bindings"]) == 1
    assert seen["argument_mapping"] == {"q": "$.query"}
    assert seen["after_delete"] == 404 and seen["me"] == user.email


def test_redocly_lint_finds_no_error_and_no_missing_operation_id(node_modules: Path, document_file: Path) -> None:
    r = npx(node_modules, "redocly", "lint", str(document_file), "--format=json", "--max-problems", "10000")
    report = json.loads(r.stdout[r.stdout.index("{"):])
    problems = Counter((p["severity"], p["ruleId"]) for p in report["problems"])
    print("\nredocly:", report["totals"], dict(problems))
    assert report["totals"]["errors"] == 0, [p for p in report["problems"] if p["severity"] == "error"][:10]
    assert not [p for p in report["problems"] if p["ruleId"] == "operation-operationId"]
    assert r.returncode == 0, r.stderr[-2000:]


# --- schemathesis: schema-valid requests are accepted ---------------------------------------------------

EXAMPLES = int(os.environ.get("TP_OPENAPI_FUZZ_EXAMPLES", "5"))
# A 416 (offset past the last row, with a count) depends on how many rows there are, like a 404
# on an id that does not exist: the data decides, not the request's shape.
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "416", "429", "5xx"]


@dataclass(frozen=True)
class Refusal:
    """A 4xx the document lists for the operation, decided by the data or by a rule JSON Schema
    cannot state, not by the request's shape. It excuses a refusal only when the answer has this
    status and code, names this field or parameter (None: names none; ANY_NAME: whatever it names)
    and its message matches the regex `says`."""

    status: int
    code: str
    names: str | None
    says: str
    reason: str


ANY_NAME = "*"
# PATCH/DELETE on a PostgREST collection (every operation with filter parameters and no {id}).
SAFE_WRITE = Refusal(400, "TP400", None, "need a row filter",
                     "safe writes (DESIGN §9): a collection PATCH/DELETE without a row filter is refused; "
                     "OpenAPI cannot say 'at least one of these query parameters'")
# Every other excused refusal, by operation. Nothing else is: any other refusal fails the test.
REFUSALS: dict[str, tuple[Refusal, ...]] = {
    "POST /api-keys": (Refusal(422, "TP422", "expires_at", "in the future",
                               "expires_at must be later than now: JSON Schema cannot compare with the clock"),),
    "POST /auth/verify-email": (Refusal(400, "TP400", "token", "verification code",
                                        "a code of the documented shape that was never issued (or is used or "
                                        "expired): the data decides, as a wrong password's 401 does"),),
}
# What bundles.py's validation says (its messages name the part of the bundle at fault)
BUNDLE_RULES = r"bundle|zip|member|manifest|events\.jsonl|network\.|screenshot|image|compression"
# What a schema names but cannot generate: an upload's bytes must be a zip bundle or JSONL
# (`format: binary`), and export's cursor is opaque (only X-Next-Cursor values are valid).
OPAQUE: dict[str, tuple[Refusal, ...]] = {
    "POST /sessions": (Refusal(400, "TP400", None, "not a zip archive", "generated binary is not a zip bundle"),
                       Refusal(400, "TP400", "bundle", "is empty", "generated binary may be empty"),
                       *(Refusal(status, f"TP{status}", ANY_NAME, BUNDLE_RULES,
                                 "a generated zip breaks the bundle's rules (DESIGN §5: members, manifest, "
                                 "limits), which tests/test_sessions.py and test_hostile_input.py check")
                         for status in (400, 413, 422)),
                       Refusal(422, "TP422", "metadata", "form field metadata", "the metadata form field is a "
                                                                                 "JSON object as text")),
    "POST /examples": (Refusal(422, "TP422", None, "line 1: ", "generated binary is not JSONL of messages"),
                       Refusal(400, "TP400", "messages", "is empty", "generated binary may be empty"),
                       Refusal(422, "TP422", "metadata", "form field metadata", "the metadata form field is a "
                                                                                "JSON object as text")),
    "GET /examples/export": (Refusal(400, "TP400", "cursor", "invalid cursor parameter",
                                     "only X-Next-Cursor values are valid cursors (an id and a time that exist)"),),
}


def error_names(body: Any) -> str | None:
    """The field or parameter an error body names: {"field": …} or {"parameter": …} in details
    (JSON or a string of it), pydantic's loc, or a bare name."""
    details = body.get("details") if isinstance(body, dict) else None
    if isinstance(details, str):
        try:
            details = json.loads(details)
        except ValueError:
            return details if re.fullmatch(r"[\w-]+", details) else None
    if isinstance(details, list) and details and isinstance(details[0], dict) and details[0].get("loc"):
        return str(details[0]["loc"][-1])
    if isinstance(details, dict):
        found = details.get("field") or details.get("parameter") or details.get("header")
        return str(found) if found is not None else None
    return None


def excused(op: Any, response: Any, refusals: tuple[Refusal, ...]) -> Refusal | None:
    try:
        body = response.json()
    except ValueError:
        return None
    declared = op.definition.raw.get("responses", {})
    for r in refusals:
        if (response.status_code == r.status and str(r.status) in declared and isinstance(body, dict)
                and body.get("code") == r.code and r.names in (ANY_NAME, error_names(body))
                and re.search(r.says, str(body.get("message", "")))):
            return r
    return None


def fuzz_positive(op: Any, session: Any, authorization: Callable[[str], str], refusals: tuple[Refusal, ...],
                  known: dict[str, str], rejected: Counter[str], excuses: Counter[str],
                  samples: dict[str, str]) -> None:
    """EXAMPLES schema-valid requests for one operation; each one refused is counted. Ids named
    in `known` (the fuzzer's own suite and MCP server) replace drawn ones in the path and the
    body, so that writes under them get past "no such parent" (still uuids: still schema-valid)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error, positive_data_acceptance
    from schemathesis.core.failures import Failure, FailureGroup

    @given(case=op.as_strategy(generation_mode=GenerationMode.POSITIVE))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        for part in (case.path_parameters, case.body):
            if isinstance(part, dict):
                part.update({k: v for k, v in known.items() if k in part})
        response = case.call(headers={"Authorization": authorization(case.path)}, session=session, timeout=60)
        try:
            case.validate_response(response, checks=[not_a_server_error, positive_data_acceptance])
        except (Failure, FailureGroup):
            why = excused(op, response, refusals) if response.status_code < 500 else None
            if why is not None:
                excuses[f"{op.label}: {why.status} {why.code} {why.names}"] += 1
                return
            rejected[op.label] += 1
            samples.setdefault(op.label, f"{response.status_code} {response.text[:300]}\n    "
                                         f"{case.as_curl_command(headers={'Authorization': '…'})[:600]}")

    run()


def test_schemathesis_finds_no_schema_valid_request_rejected(base_url: str, make_user: Callable[..., User]) -> None:
    """Every operation but logout and tus's PATCH bytes (see the excludes) gets EXAMPLES positive
    requests; a refusal fails the test unless REFUSALS/SAFE_WRITE/OPAQUE excuse it exactly."""
    import requests
    import schemathesis

    fuzzer = make_user()
    suite = create_suite(fuzzer)
    rows = {"Prefer": "return=representation"}
    action = fuzzer.client.post(f"/suites/{suite['id']}/actions", json={"name": "fuzz-target"}, headers=rows)
    server = fuzzer.client.post("/mcp-servers", json={"name": unique("fuzz"), "url": "https://mcp.example.test/f"},
                                headers=rows)
    assert action.status_code == 201 and server.status_code == 201, (action.text, server.text)
    tool = fuzzer.client.post(f"/mcp-servers/{server.json()[0]['id']}/tools", json={"name": "fuzz-tool"},
                              headers=rows)
    assert tool.status_code == 201, tool.text
    known = {"suite_id": suite["id"], "action_id": action.json()[0]["id"], "mcp_server_id": server.json()[0]["id"],
             "tool_id": tool.json()[0]["id"]}
    key = create_key(fuzzer)["key"]
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", wait_for_schema=30)
    schema.config.checks.positive_data_acceptance.expected_statuses = ACCEPTED
    # logout would end the fuzzer's own token (test_fuzz.py says why)
    schema = schema.exclude(path="/auth/logout")
    # tus PATCH bodies (application/offset+octet-stream) are bytes of a bundle: schemathesis has no
    # serializer for them, and tests/test_tus.py sends them with the real tus clients
    schema = schema.exclude(path="/uploads/{upload_id}", method="PATCH")
    ops = [r.ok() for r in schema.get_all_operations()]
    ops.sort(key=lambda op: op.method.upper() == "DELETE")  # the fuzzer's suite and key live until then
    labels = {op.label for op in ops}
    assert set(REFUSALS) | set(OPAQUE) <= labels, (set(REFUSALS) | set(OPAQUE)) - labels  # none stale
    rejected: Counter[str] = Counter()
    excuses: Counter[str] = Counter()
    samples: dict[str, str] = {}

    def authorization(path: str) -> str:
        return f"ApiKey {key}" if path == "/auth/token" else f"Bearer {fuzzer.token}"

    def refusals(op: Any) -> tuple[Refusal, ...]:
        filtered = any(p.get("in") == "query" and "PostgREST filter" in p.get("description", "")
                       for p in op.definition.raw.get("parameters", []))
        collection_write = op.method.upper() in ("PATCH", "DELETE") and filtered
        return (*REFUSALS.get(op.label, ()), *OPAQUE.get(op.label, ()), *((SAFE_WRITE,) if collection_write else ()))

    with requests.Session() as session:
        for op in ops:
            fuzz_positive(op, session, authorization, refusals(op), known, rejected, excuses, samples)
    print(f"\nschemathesis: {len(ops)} operations × {EXAMPLES} positive examples; "
          f"{sum(rejected.values())} rejected over {len(rejected)} operations: {dict(rejected)}; "
          f"excused: {dict(excuses)}")
    assert not samples, f"{len(samples)} operations refuse schema-valid requests:\n" + "\n".join(
        f"{k}: {v}" for k, v in samples.items())
