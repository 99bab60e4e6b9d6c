"""A typed Python client for Tracepipe's HTTP API (DESIGN.md §3), for external consumers.

    from tracepipe.client import Client

    with Client("http://127.0.0.1:8080", api_key="tp_…") as tp:
        suite = tp.create_suite("Checkout", "checkout")
        session = tp.upload_session("trace.zip", progress=lambda sent, total: print(sent, total))
        for line in tp.iter_messages(example_id):
            ...

Why it exists rather than raw httpx: the parts every consumer gets subtly wrong are done
once here — an access token that is renewed shortly *before* it expires (so a long export
never fails half way on a 401), uploads that are retried on connection errors and 5xx
with one `Idempotency-Key` (so a retry can never create a second session), downloads that
resume with `Range` and are checked against the stored sha256, JSONL streamed line by line
in constant memory, and one exception type (`TracepipeError`) carrying the API's
`{code, message, details, hint}` body whatever component answered.

Rows are TypedDicts: they are the JSON the API returns, so columns added later still
arrive (at run time) without a client release, while type checkers know the documented
fields. Only httpx is needed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast

import httpx

if TYPE_CHECKING:
    from tracepipe.worker import Job

__all__ = [
    "Action",
    "ActionToolMap",
    "ApiKey",
    "Client",
    "CreatedApiKey",
    "Example",
    "ExportResult",
    "McpServer",
    "Progress",
    "Session",
    "Suite",
    "SuiteMember",
    "Tool",
    "TracepipeError",
]

Progress = Callable[[int, int], None]
"""Called with (bytes transferred so far, total bytes or -1 when unknown)."""

CHUNK_BYTES = 1024 * 1024
OBJECT = "application/vnd.pgrst.object+json"
CREATE_HEADERS = {"Prefer": "return=representation", "Accept": OBJECT}
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_WAIT_S = 30.0  # a longer Retry-After (a throttled key: up to 15 minutes) is answered, not waited out
TUS_THRESHOLD_BYTES = 64 * 1024 * 1024  # bundles this large go through tus (resumable, DESIGN.md §11)
TUS_CHUNK_BYTES = 8 * 1024 * 1024  # bytes per tus PATCH: what a dropped connection costs at most
TUS = {"Tus-Resumable": "1.0.0"}


def default_resume_dir() -> Path:
    """Where resume files of tus uploads live: $XDG_CACHE_HOME/tracepipe/uploads (~/.cache/…)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tracepipe" / "uploads"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _file_range(path: Path, offset: int, size: int) -> Iterator[bytes]:
    """`size` bytes of the file from `offset`, streamed in CHUNK_BYTES pieces."""
    with path.open("rb") as f:
        f.seek(offset)
        left = size
        while left > 0 and (chunk := f.read(min(CHUNK_BYTES, left))):
            left -= len(chunk)
            yield chunk

# A refresh whose answer was lost is answered again (the same pair) only within ext's grace
# (refresh_grace_s, 30 s by default): its retries stop before that, a later one would be a reuse.
REFRESH_RETRY_WITHIN_S = 20.0


# --- rows -------------------------------------------------------------------------------------
# Timestamps stay RFC 3339 strings and ids uuid strings: what the API sends, lossless.

class Suite(TypedDict):
    id: str
    name: str
    slug: str
    description: str | None
    created_by: str | None
    created_at: str
    updated_at: str


class SuiteMember(TypedDict):
    id: str
    suite_id: str
    user_id: str
    role: Literal["viewer", "editor", "owner"]
    created_at: str
    updated_at: str


class Action(TypedDict):
    id: str
    suite_id: str
    name: str
    description: str | None
    input_schema: dict[str, Any]
    created_at: str
    updated_at: str


class McpServer(TypedDict):
    id: str
    name: str
    url: str
    transport: Literal["stdio", "sse", "streamable-http"]
    description: str | None
    created_by: str | None
    created_at: str
    updated_at: str


class Tool(TypedDict):
    id: str
    mcp_server_id: str
    name: str
    description: str | None
    input_schema: dict[str, Any]
    created_at: str
    updated_at: str


class ActionToolMap(TypedDict):
    id: str
    suite_id: str
    action_id: str
    mcp_server_id: str
    tool_id: str
    argument_mapping: dict[str, Any]
    created_at: str
    updated_at: str


class Session(TypedDict):
    id: str
    user_id: str
    suite_id: str | None
    size_bytes: int
    sha256: str
    started_at: str | None
    ended_at: str | None
    event_count: int
    network_count: int
    screenshot_count: int
    files: list[dict[str, Any]]
    metadata: dict[str, Any]
    created_at: str
    updated_at: str


class Example(TypedDict):
    id: str
    session_id: str | None
    suite_id: str
    model: str
    message_count: int
    size_bytes: int
    sha256: str
    metadata: dict[str, Any]
    created_at: str
    job_id: str | None  # the pipeline job that registered it


class ApiKey(TypedDict):
    id: str
    name: str
    prefix: str
    suites: list[str] | None
    access: Literal["read", "write"]
    expires_at: str | None
    last_used_at: str | None
    revoked_at: str | None
    created_at: str


class CreatedApiKey(ApiKey):
    key: str
    """The secret, shown this once."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    examples: int
    bytes: int
    pages: int



# --- errors -----------------------------------------------------------------------------------

class TracepipeError(Exception):
    """Every failure the client reports: the API's error body plus the HTTP status.

    `status` is 0 when no HTTP answer arrived (connection refused or cut, after the retries
    the call allows); `code` is then "TPNET". `request_id` is the proxy's X-Request-Id, the
    key to the request in every component's log.
    """

    def __init__(self, status: int, code: str, message: str, details: Any = None, hint: str | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" ({details})" if details else ""))
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.hint = hint
        self.request_id = request_id

    @classmethod
    def from_response(cls, r: httpx.Response) -> TracepipeError:
        """Reads the body of a failed response (which must have been read)."""
        rid = r.headers.get("x-request-id")
        try:
            body = r.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "message" in body:
            return cls(r.status_code, str(body.get("code") or f"HTTP{r.status_code}"), str(body["message"]),
                       body.get("details"), body.get("hint"), rid)
        return cls(r.status_code, f"HTTP{r.status_code}", r.reason_phrase or "error", r.text[:500] or None,
                   None, rid)


def _raise_for(r: httpx.Response) -> None:
    if r.is_success:
        return
    r.read()
    raise TracepipeError.from_response(r)


def _network_error(e: httpx.TransportError, what: str) -> TracepipeError:
    err = TracepipeError(0, "TPNET", f"{what}: {type(e).__name__}: {e}", None,
                         "Check that the Tracepipe URL is right and the stack is up.")
    err.__cause__ = e
    return err


# --- the client -------------------------------------------------------------------------------

class Client:
    """One Tracepipe origin and one identity.

    Credentials, by preference: `api_key` (exchanged at POST /auth/token for a short-lived
    JWT, re-exchanged shortly before it expires), or `login(email, password)` (storefront
    session: the refresh token is rotated at POST /auth/refresh shortly before the access
    token expires), or a fixed `token` (used as is, never renewed).

    `clock` is a monotonic clock in seconds; token expiry is tracked on it rather than on
    the JWT's `exp`, so a machine whose wall clock is off still renews in time. Tests pass
    their own to make expiry happen without waiting. `refresh_margin_s` is how long before
    expiry a token is renewed (capped at a third of its lifetime for very short tokens).
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, token: str | None = None,
                 timeout: float = 60.0, retries: int = 4, backoff_s: float = 0.5,
                 refresh_margin_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 transport: httpx.BaseTransport | None = None, headers: Mapping[str, str] | None = None,
                 tus_threshold: int = TUS_THRESHOLD_BYTES, tus_chunk: int = TUS_CHUNK_BYTES,
                 resume_dir: str | os.PathLike[str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.tus_threshold = tus_threshold
        self.tus_chunk = tus_chunk
        self.resume_dir = Path(resume_dir) if resume_dir else default_resume_dir()
        self.retries = retries
        self.backoff_s = backoff_s
        self.refresh_margin_s = refresh_margin_s
        self.clock = clock
        self._api_key = api_key
        self._refresh_token: str | None = None
        self._token = token
        self._expires_at = float("inf") if token else float("-inf")
        self._lock = threading.Lock()
        self._http = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(timeout, connect=10.0),
                                  transport=transport, headers=dict(headers or {}))

    # -- lifecycle
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- identity
    def login(self, email: str, password: str) -> None:
        """Storefront login: the client then holds a rotating refresh token."""
        pair = self._auth_call("/auth/login", json={"email": email, "password": password})
        self._api_key = None
        self._store(pair)

    def signup(self, email: str, password: str, display_name: str | None = None) -> dict[str, Any]:
        """Creates an account and signs in as it (like `login`); answers the new account
        ({id, email, display_name}). An existing email is TracepipeError 409."""
        body = {"email": email, "password": password, "display_name": display_name}
        r = self._once(lambda: self._http.post("/auth/signup", json={k: v for k, v in body.items()
                                                                      if v is not None}), "/auth/signup")
        _raise_for(r)
        pair = dict(r.json())
        self._api_key = None
        self._store(pair)
        return {k: pair.get(k) for k in ("id", "email", "display_name")}

    def logout(self) -> None:
        """Ends this login server side (the refresh token family too) and forgets the tokens."""
        body = {"refresh_token": self._refresh_token} if self._refresh_token else None
        r = self._send("POST", "/auth/logout", json=body)
        _raise_for(r)
        self._token, self._refresh_token, self._expires_at = None, None, float("-inf")

    @property
    def token(self) -> str:
        """A valid access token, renewed first when it is about to expire."""
        with self._lock:
            if self._token is None or self.clock() >= self._expires_at:
                self._renew()
            assert self._token is not None
            return self._token

    @property
    def token_expires_in(self) -> float:
        """Seconds (on `clock`) until the current token is renewed; negative when it is due."""
        return self._expires_at - self.clock()

    def _renew(self) -> None:
        if self._api_key:
            self._store(self._auth_call("/auth/token", headers={"Authorization": f"ApiKey {self._api_key}"}))
        elif self._refresh_token:
            self._store(self._auth_call("/auth/refresh", json={"refresh_token": self._refresh_token}))
        elif self._token is None:
            raise TracepipeError(401, "TP401", "no credentials", None,
                                 "Pass api_key= or token=, or call login(email, password).")
        else:  # a fixed token: nothing to renew it with
            self._expires_at = float("inf")

    def _store(self, body: dict[str, Any]) -> None:
        lifetime = float(body.get("expires_in") or 0)
        margin = min(self.refresh_margin_s, lifetime / 3)
        self._token = str(body["access_token"])
        self._expires_at = self.clock() + lifetime - margin
        if body.get("refresh_token"):
            self._refresh_token = str(body["refresh_token"])

    def _auth_call(self, path: str, *, json: Any = None, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Auth endpoints are safe to retry on 429/5xx/connection errors: a failed exchange
        changes nothing, and a refresh rotated server side whose answer was lost is answered
        again with the same pair within ext's grace (so its retries end inside the grace)."""
        within = REFRESH_RETRY_WITHIN_S if path == "/auth/refresh" else None
        r = self._retrying(lambda: self._http.post(path, json=json, headers=dict(headers or {})), path, within)
        _raise_for(r)
        return dict(r.json())

    # -- plumbing
    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **(extra or {})}

    def _send(self, method: str, path: str, *, params: Mapping[str, Any] | None = None, json: Any = None,
              headers: Mapping[str, str] | None = None, retry: bool = False) -> httpx.Response:
        """One authenticated request. A 401 with a token this client obtained itself gets one
        renewal and one more try (the key may have been rotated server side, or the clock
        jumped); `retry` also retries connection errors and 5xx (reads and idempotent calls)."""
        clean = {k: v for k, v in (params or {}).items() if v is not None}

        def once() -> httpx.Response:
            return self._http.request(method, path, params=clean, json=json, headers=self._headers(headers))

        r = self._retrying(once, path) if retry else self._once(once, path)
        if r.status_code == 401 and (self._api_key or self._refresh_token):
            with self._lock:
                self._expires_at = float("-inf")
            r = self._retrying(once, path) if retry else self._once(once, path)
        return r

    @staticmethod
    def _once(call: Callable[[], httpx.Response], what: str) -> httpx.Response:
        try:
            return call()
        except httpx.TransportError as e:
            raise _network_error(e, what) from e

    def _retrying(self, call: Callable[[], httpx.Response], what: str, within_s: float | None = None,
                  ) -> httpx.Response:
        """Calls `call` until it answers below 500 (and not 429), at most 1 + retries times,
        backing off exponentially (or as Retry-After says). Connection errors count too. An
        answer asking to wait longer than MAX_RETRY_WAIT_S is returned at once; with
        `within_s`, so is any whose next try would start later than that after the first."""
        started = time.monotonic()
        for attempt in range(self.retries + 1):
            try:
                r = call()
            except httpx.TransportError as e:
                delay = self._delay(attempt, None)
                if attempt == self.retries or self._past(started, delay, within_s):
                    raise _network_error(e, what) from e
                time.sleep(delay)
                continue
            retry_after = r.headers.get("retry-after")
            too_long = retry_after is not None and retry_after.isdigit() and float(retry_after) > MAX_RETRY_WAIT_S
            delay = self._delay(attempt, retry_after)
            if (attempt == self.retries or r.status_code not in RETRY_STATUSES or too_long
                    or self._past(started, delay, within_s)):
                return r
            r.close()
            time.sleep(delay)
        raise AssertionError("unreachable")

    @staticmethod
    def _past(started: float, delay: float, within_s: float | None) -> bool:
        return within_s is not None and time.monotonic() - started + delay > within_s

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = self.backoff_s * (2 ** attempt)
        if retry_after and retry_after.isdigit():
            delay = max(delay, float(retry_after))
        return min(delay, MAX_RETRY_WAIT_S)

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        time.sleep(self._delay(attempt, retry_after))

    def _json(self, method: str, path: str, *, params: Mapping[str, Any] | None = None, json: Any = None,
              headers: Mapping[str, str] | None = None) -> Any:
        r = self._send(method, path, params=params, json=json, headers=headers, retry=method in ("GET", "DELETE"))
        _raise_for(r)
        return r.json() if r.content else None

    def _create(self, path: str, body: Mapping[str, Any]) -> Any:
        return self._json("POST", path, json={k: v for k, v in body.items() if v is not None},
                          headers=CREATE_HEADERS)

    # -- me and API keys
    def me(self) -> dict[str, Any]:
        """The caller's profile and suite memberships (GET /users/me)."""
        return dict(self._json("GET", "/users/me"))

    def create_api_key(self, name: str, *, suites: Iterable[str] | None = None,
                       access: Literal["read", "write"] = "write", expires_at: str | None = None) -> CreatedApiKey:
        """Needs a storefront login (not an API-key token); the secret is in `key`, once."""
        body = {"name": name, "suites": list(suites) if suites is not None else None, "access": access,
                "expires_at": expires_at}
        return cast(CreatedApiKey, self._json("POST", "/api-keys", json={k: v for k, v in body.items()
                                                                         if v is not None}))

    def list_api_keys(self) -> list[ApiKey]:
        return cast(list[ApiKey], self._json("GET", "/api-keys"))

    def revoke_api_key(self, key_id: str) -> ApiKey:
        return cast(ApiKey, self._json("DELETE", f"/api-keys/{key_id}"))

    # -- suites
    def list_suites(self, filters: Mapping[str, str] | None = None) -> list[Suite]:
        """`filters` are PostgREST's: {"slug": "eq.checkout", "order": "name", "limit": "10"}."""
        return cast(list[Suite], self._json("GET", "/suites", params=filters))

    def get_suite(self, suite_id: str) -> Suite:
        return cast(Suite, self._json("GET", f"/suites/{suite_id}"))

    def create_suite(self, name: str, slug: str, description: str | None = None) -> Suite:
        """The caller becomes the suite's owner."""
        return cast(Suite, self._create("/suites", {"name": name, "slug": slug, "description": description}))

    def update_suite(self, suite_id: str, **changes: Any) -> Suite:
        return cast(Suite, self._json("PATCH", f"/suites/{suite_id}", json=changes))

    def delete_suite(self, suite_id: str) -> Suite:
        return cast(Suite, self._json("DELETE", f"/suites/{suite_id}"))

    # -- members
    def list_members(self, suite_id: str) -> list[SuiteMember]:
        return cast(list[SuiteMember], self._json("GET", f"/suites/{suite_id}/members"))

    def add_member(self, suite_id: str, user_id: str, role: Literal["viewer", "editor", "owner"]) -> SuiteMember:
        """Invites a user by id: the membership counts once they accept it."""
        return cast(SuiteMember, self._create(f"/suites/{suite_id}/members", {"user_id": user_id, "role": role}))

    def invite(self, suite_id: str, *, email: str, role: Literal["viewer", "editor", "owner"]) -> SuiteMember:
        """Invites an email: it reaches the account that has verified that address."""
        return cast(SuiteMember, self._create(f"/suites/{suite_id}/members", {"email": email, "role": role}))

    def invitations(self) -> list[dict[str, Any]]:
        """The caller's pending invitations (from GET /users/me)."""
        return [m for m in self.me().get("memberships", []) if not m.get("accepted", True)]

    def accept_invitation(self, suite_id: str) -> SuiteMember:
        me = self.me()
        rows = self._json("PATCH", f"/suites/{suite_id}/members", params={"user_id": f"eq.{me['id']}"},
                          json={"accepted": True}, headers={"Prefer": "return=representation"})
        if not rows:
            raise TracepipeError(404, "TP404", "no invitation to this suite", None, None)
        return cast(SuiteMember, rows[0])

    def update_member(self, suite_id: str, user_id: str, role: Literal["viewer", "editor", "owner"]) -> SuiteMember:
        return cast(SuiteMember, self._json("PATCH", f"/suites/{suite_id}/members/{user_id}", json={"role": role}))

    def remove_member(self, suite_id: str, user_id: str) -> SuiteMember:
        return cast(SuiteMember, self._json("DELETE", f"/suites/{suite_id}/members/{user_id}"))

    # -- actions
    def list_actions(self, suite_id: str, filters: Mapping[str, str] | None = None) -> list[Action]:
        return cast(list[Action], self._json("GET", f"/suites/{suite_id}/actions", params=filters))

    def get_action(self, suite_id: str, action_id: str) -> Action:
        return cast(Action, self._json("GET", f"/suites/{suite_id}/actions/{action_id}"))

    def create_action(self, suite_id: str, name: str, *, description: str | None = None,
                      input_schema: Mapping[str, Any] | None = None) -> Action:
        return cast(Action, self._create(f"/suites/{suite_id}/actions", {
            "name": name, "description": description,
            "input_schema": dict(input_schema) if input_schema is not None else None}))

    def update_action(self, suite_id: str, action_id: str, **changes: Any) -> Action:
        return cast(Action, self._json("PATCH", f"/suites/{suite_id}/actions/{action_id}", json=changes))

    def delete_action(self, suite_id: str, action_id: str) -> Action:
        return cast(Action, self._json("DELETE", f"/suites/{suite_id}/actions/{action_id}"))

    # -- MCP servers and tools
    def list_mcp_servers(self, filters: Mapping[str, str] | None = None) -> list[McpServer]:
        return cast(list[McpServer], self._json("GET", "/mcp-servers", params=filters))

    def get_mcp_server(self, server_id: str) -> McpServer:
        return cast(McpServer, self._json("GET", f"/mcp-servers/{server_id}"))

    def create_mcp_server(self, name: str, url: str, transport: Literal["stdio", "sse", "streamable-http"],
                          description: str | None = None) -> McpServer:
        return cast(McpServer, self._create("/mcp-servers", {"name": name, "url": url, "transport": transport,
                                                             "description": description}))

    def update_mcp_server(self, server_id: str, **changes: Any) -> McpServer:
        return cast(McpServer, self._json("PATCH", f"/mcp-servers/{server_id}", json=changes))

    def delete_mcp_server(self, server_id: str) -> McpServer:
        return cast(McpServer, self._json("DELETE", f"/mcp-servers/{server_id}"))

    def list_tools(self, server_id: str, filters: Mapping[str, str] | None = None) -> list[Tool]:
        return cast(list[Tool], self._json("GET", f"/mcp-servers/{server_id}/tools", params=filters))

    def get_tool(self, server_id: str, tool_id: str) -> Tool:
        return cast(Tool, self._json("GET", f"/mcp-servers/{server_id}/tools/{tool_id}"))

    def create_tool(self, server_id: str, name: str, *, description: str | None = None,
                    input_schema: Mapping[str, Any] | None = None) -> Tool:
        return cast(Tool, self._create(f"/mcp-servers/{server_id}/tools", {
            "name": name, "description": description,
            "input_schema": dict(input_schema) if input_schema is not None else None}))

    def update_tool(self, server_id: str, tool_id: str, **changes: Any) -> Tool:
        return cast(Tool, self._json("PATCH", f"/mcp-servers/{server_id}/tools/{tool_id}", json=changes))

    def delete_tool(self, server_id: str, tool_id: str) -> Tool:
        return cast(Tool, self._json("DELETE", f"/mcp-servers/{server_id}/tools/{tool_id}"))

    # -- action-tool maps
    def list_action_tool_maps(self, suite_id: str | None = None,
                              filters: Mapping[str, str] | None = None) -> list[ActionToolMap]:
        params = {**(filters or {}), **({"suite_id": f"eq.{suite_id}"} if suite_id else {})}
        return cast(list[ActionToolMap], self._json("GET", "/action-tool-maps", params=params))

    def get_action_tool_map(self, map_id: str) -> ActionToolMap:
        return cast(ActionToolMap, self._json("GET", f"/action-tool-maps/{map_id}"))

    def create_action_tool_map(self, suite_id: str, action_id: str, mcp_server_id: str, tool_id: str,
                               argument_mapping: Mapping[str, Any] | None = None) -> ActionToolMap:
        """Binds a suite's action to an MCP server's tool (the action must belong to the suite)."""
        return cast(ActionToolMap, self._create("/action-tool-maps", {
            "suite_id": suite_id, "action_id": action_id, "mcp_server_id": mcp_server_id, "tool_id": tool_id,
            "argument_mapping": dict(argument_mapping) if argument_mapping is not None else None}))

    def update_action_tool_map(self, map_id: str, **changes: Any) -> ActionToolMap:
        return cast(ActionToolMap, self._json("PATCH", f"/action-tool-maps/{map_id}", json=changes))

    def delete_action_tool_map(self, map_id: str) -> ActionToolMap:
        return cast(ActionToolMap, self._json("DELETE", f"/action-tool-maps/{map_id}"))

    # -- sessions
    def upload_session(self, path: str | os.PathLike[str], *, idempotency_key: str | None = None,
                       progress: Progress | None = None) -> Session:
        """Uploads a bundle file, streamed from disk (never whole in memory).

        Connection errors and 5xx are retried (up to `retries` times) with the same
        Idempotency-Key — a fresh uuid unless you pass one, e.g. to make a retry across
        process restarts safe — so the server answers a retry with the first upload's
        session instead of creating another. `progress(sent, total)` is called as bytes
        leave; a retried attempt counts again from 0. Files of `tus_threshold` bytes and
        more go through `upload_session_resumable` instead (the upload's URL, not a key,
        makes its retries safe).
        """
        if Path(path).stat().st_size >= self.tus_threshold:
            return self.upload_session_resumable(path, progress=progress)
        key = idempotency_key or str(uuid.uuid4())
        r = self._upload("/sessions", Path(path), "application/zip", {}, key, progress)
        return cast(Session, r.json())

    def upload_session_resumable(self, path: str | os.PathLike[str], *,
                                 progress: Progress | None = None) -> Session:
        """Uploads a bundle through tus (POST /uploads, then PATCHes of `tus_chunk` bytes),
        what `upload_session` does for files of `tus_threshold` bytes and more.

        The upload's URL is kept in a small resume file in `resume_dir` (a user cache dir),
        keyed by the file's sha256 and size: after a crash, Ctrl-C or a lost connection, the
        next call for the same file asks the server for its offset (HEAD) and sends only the
        rest. An upload the server has already committed answers with its session. The
        session's sha256 is checked against the file's."""
        source = Path(path)
        total = source.stat().st_size
        digest = _file_sha256(source)
        resume = self.resume_dir / f"{digest}-{total}.json"
        url, offset = self._tus_resume(resume)
        if url is None:
            url = self._tus_create(source.name, total)
            self.resume_dir.mkdir(parents=True, exist_ok=True)
            resume.write_text(json.dumps({"origin": self.base_url, "url": url, "file": str(source.resolve())}))
            offset = 0
        session_id = self._tus_send(url, source, offset, total, progress)
        resume.unlink(missing_ok=True)
        session = self.get_session(session_id)
        if session["sha256"] != digest:
            raise TracepipeError(0, "TPINTEGRITY", "the stored bundle's sha256 differs from the file's",
                                 {"session_id": session_id, "stored": session["sha256"], "file": digest})
        return session

    def _tus_resume(self, resume: Path) -> tuple[str | None, int]:
        """The URL and server offset of an upload a resume file remembers, or (None, 0)."""
        try:
            record = json.loads(resume.read_text())
        except (OSError, ValueError):
            return None, 0
        if record.get("origin") != self.base_url:
            return None, 0
        r = self._send("HEAD", record["url"], headers=TUS, retry=True)
        if r.status_code in (404, 410):  # expired, terminated or failed: start again
            resume.unlink(missing_ok=True)
            return None, 0
        _raise_for(r)
        return record["url"], int(r.headers["upload-offset"])

    def _tus_create(self, filename: str, total: int) -> str:
        name = base64.b64encode(filename.encode()).decode()
        r = self._send("POST", "/uploads", headers={**TUS, "Upload-Length": str(total),
                                                   "Upload-Metadata": f"filename {name}"}, retry=True)
        _raise_for(r)
        return str(r.headers["location"])

    def _tus_send(self, url: str, source: Path, offset: int, total: int, progress: Progress | None) -> str:
        """PATCHes from `offset` to the end; a failed PATCH (connection, 5xx, 409) is followed
        by a HEAD for the server's offset and sent again from there. The session id."""
        failures = 0
        if progress:
            progress(offset, total)
        while True:
            size = min(self.tus_chunk, total - offset)
            headers = {**TUS, "Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset),
                       "Content-Length": str(size)}
            try:
                r = self._http.patch(url, content=_file_range(source, offset, size),
                                     headers=self._headers(headers))
            except httpx.TransportError as e:
                r = None
                error: TracepipeError = _network_error(e, f"PATCH {url}")
            if r is not None and r.status_code == 204:
                failures = 0
                offset = int(r.headers["upload-offset"])
                if progress:
                    progress(offset, total)
                if offset >= total:
                    return str(r.headers["upload-session-id"])
                continue
            if r is not None and r.status_code not in (*RETRY_STATUSES, 401, 409):
                _raise_for(r)
            if r is not None:
                error = TracepipeError.from_response(r)
                if r.status_code == 401 and (self._api_key or self._refresh_token):
                    with self._lock:
                        self._expires_at = float("-inf")
            if failures >= self.retries:
                raise error
            self._sleep(failures, r.headers.get("retry-after") if r is not None else None)
            failures += 1
            head = self._send("HEAD", url, headers=TUS, retry=True)
            _raise_for(head)
            offset = int(head.headers["upload-offset"])

    def get_session(self, session_id: str) -> Session:
        return cast(Session, self._json("GET", f"/sessions/{session_id}"))

    def list_sessions(self, filters: Mapping[str, str] | None = None) -> list[Session]:
        return cast(list[Session], self._json("GET", "/sessions", params=filters))

    def delete_session(self, session_id: str) -> Session:
        """Deletes the session row, its bundle and its examples' objects (the uploader only)."""
        return cast(Session, self._json("DELETE", f"/sessions/{session_id}"))

    def download_session(self, session_id: str, dest: str | os.PathLike[str], *,
                         progress: Progress | None = None) -> Path:
        """Streams the stored bundle to `dest`, byte-identical.

        The bytes go to `dest.part`, and the bundle's ETag (its sha256) to `dest.part.etag`
        as soon as the first answer names it. A dropped connection resumes where it stopped,
        and so does the next call after an interrupted one (Ctrl-C, a crash): it asks for the
        rest with `Range` and `If-Range: <that ETag>`, so a bundle that changed meanwhile is
        sent whole (200) and the part is started over. The whole file is checked against the
        sha256 before it is moved into place: `dest` never holds a partial or corrupt bundle.
        A part that fails the check, or a refusal (404, 403), removes the part.
        """
        target = Path(dest)
        part = target.with_name(target.name + ".part")
        etag_file = target.with_name(target.name + ".part.etag")
        digest = hashlib.sha256()
        written = 0
        etag: str | None = None
        if part.exists() and etag_file.exists():  # an earlier call was interrupted: go on from its part
            etag = etag_file.read_text().strip() or None
            with open(part, "rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    digest.update(chunk)
                    written += len(chunk)
        total = -1
        keep = True  # an interruption keeps the part for the next call
        try:
            with open(part, "ab" if etag and written else "wb") as out:
                if not (etag and written):
                    digest, written = hashlib.sha256(), 0
                for attempt in range(self.retries + 1):
                    headers = {"Range": f"bytes={written}-", "If-Range": etag} if etag and written else {}
                    try:
                        with self._stream("GET", f"/sessions/{session_id}/bundle",
                                          headers={"Accept-Encoding": "identity", **headers}) as r:
                            if r.status_code == 416 and written:  # the part holds every byte already
                                total = written
                                break
                            if r.status_code == 200 and written:  # the object changed or Range was ignored
                                out.seek(0)
                                out.truncate()
                                digest, written = hashlib.sha256(), 0
                            if r.status_code in RETRY_STATUSES and attempt < self.retries:
                                self._sleep(attempt, r.headers.get("retry-after"))
                                continue
                            try:
                                _raise_for(r)
                            except TracepipeError:
                                keep = False
                                raise
                            if r.status_code == 200 or etag is None:
                                etag = r.headers.get("etag")
                                etag_file.write_text(etag or "")
                            length = int(r.headers.get("content-length", -1))
                            if total < 0 and length >= 0:
                                total = written + length
                            if progress:
                                progress(written, total)
                            for chunk in r.iter_bytes(CHUNK_BYTES):
                                out.write(chunk)
                                digest.update(chunk)
                                written += len(chunk)
                                if progress:
                                    progress(written, total)
                        break
                    except httpx.TransportError as e:
                        if attempt == self.retries:
                            raise _network_error(e, f"GET /sessions/{session_id}/bundle") from e
                        self._sleep(attempt, None)
            expected = (etag or "").strip('"')
            if expected and len(expected) == 64 and digest.hexdigest() != expected:
                keep = False
                raise TracepipeError(0, "TPCHECKSUM", "downloaded bundle does not match its sha256",
                                     {"expected": expected, "got": digest.hexdigest()}, "Download it again.")
            part.replace(target)
            keep = False
        finally:
            if not keep:
                part.unlink(missing_ok=True)
                etag_file.unlink(missing_ok=True)
        return target

    # -- examples
    def register_example(self, suite_id: str, model: str, jsonl: str | os.PathLike[str] | bytes, *,
                         session_id: str | None = None, metadata: Mapping[str, Any] | None = None,
                         idempotency_key: str | None = None, progress: Progress | None = None,
                         job_id: str | None = None) -> Example:
        """Registers an example: `jsonl` is a file path (streamed) or the bytes themselves.
        The server validates every line and names the first bad one (TracepipeError 422 with
        the line number in `details`); nothing is stored then. Retried like uploads."""
        params = {"suite_id": suite_id, "model": model, "session_id": session_id, "job_id": job_id,
                  "metadata": json.dumps(dict(metadata)) if metadata is not None else None}
        key = idempotency_key or str(uuid.uuid4())
        source = jsonl if isinstance(jsonl, bytes) else Path(jsonl)
        r = self._upload("/examples", source, "application/jsonl", params, key, progress)
        return cast(Example, r.json())

    def jobs(self, **options: Any) -> Iterator[Job]:
        """The pipeline's worker loop (a pipeline account's key): `for job in tp.jobs(): with job: ...`.
        Options and behaviour: `tracepipe.worker.jobs`."""
        from tracepipe.worker import jobs

        return jobs(self, **options)

    def get_example(self, example_id: str) -> Example:
        return cast(Example, self._json("GET", f"/examples/{example_id}"))

    def list_examples(self, filters: Mapping[str, str] | None = None) -> list[Example]:
        """`filters` are PostgREST's: {"suite_id": "eq.<id>", "model": "eq.gpt-x", "order": "created_at"}."""
        return cast(list[Example], self._json("GET", "/examples", params=filters))

    def iter_message_lines(self, example_id: str) -> Iterator[bytes]:
        """The example's JSONL as stored, one line at a time (with its b"\\n"), in constant
        memory: only the current chunk and a partial line are held. Close the generator (or
        let it finish) to release the connection."""
        with self._stream("GET", f"/examples/{example_id}/messages") as r:
            _raise_for(r)
            partial: list[bytes] = []  # pieces of a line that spans chunks (joined once: linear)
            for chunk in r.iter_bytes():
                start = 0
                while (end := chunk.find(b"\n", start)) >= 0:
                    if partial:
                        partial.append(chunk[start:end + 1])
                        yield b"".join(partial)
                        partial = []
                    else:
                        yield chunk[start:end + 1]
                    start = end + 1
                if start < len(chunk):
                    partial.append(chunk[start:])
            if partial:
                yield b"".join(partial)

    def iter_messages(self, example_id: str) -> Iterator[dict[str, Any]]:
        """The example's records ({"messages": [...], ...}), parsed line by line."""
        for line in self.iter_message_lines(example_id):
            if line.strip():
                yield cast(dict[str, Any], json.loads(line))

    def export_examples(self, dest: str | os.PathLike[str], *, suite_id: str | None = None,
                        model: str | None = None, session_id: str | None = None,
                        split: Literal["train", "validation"] | None = None,
                        validation_percent: int | None = None, page_size: int | None = None,
                        progress: Progress | None = None) -> ExportResult:
        """Writes every visible example matching the filters to `dest` as one fine-tuning
        JSONL file, following X-Next-Cursor page by page (stable order, so nothing is missed
        or repeated while others register examples). `split` picks the deterministic
        train/validation part. Written to a .part file, moved into place when complete."""
        target = Path(dest)
        part = target.with_name(target.name + ".part")
        params: dict[str, Any] = {"suite_id": suite_id, "model": model, "session_id": session_id,
                                  "split": split, "validation_percent": validation_percent, "limit": page_size}
        cursor: str | None = None
        examples = written = pages = 0
        try:
            with open(part, "wb") as out:
                while True:
                    page_params = {**params, "cursor": cursor}
                    start = out.tell()
                    count = 0
                    for attempt in range(self.retries + 1):
                        out.seek(start)
                        out.truncate()
                        try:
                            with self._stream("GET", "/examples/export", params=page_params) as r:
                                if r.status_code in RETRY_STATUSES and attempt < self.retries:
                                    self._sleep(attempt, r.headers.get("retry-after"))
                                    continue
                                _raise_for(r)
                                for chunk in r.iter_bytes(CHUNK_BYTES):
                                    out.write(chunk)
                                    if progress:
                                        progress(written + out.tell() - start, -1)
                                count = int(r.headers.get("x-export-count", 0))
                                cursor = r.headers.get("x-next-cursor")
                            break
                        except httpx.TransportError as e:  # a page is retried whole
                            if attempt == self.retries:
                                raise _network_error(e, "GET /examples/export") from e
                            self._sleep(attempt, None)
                    pages += 1
                    examples += count
                    written = out.tell()
                    if not cursor:
                        break
            part.replace(target)
        finally:
            part.unlink(missing_ok=True)
        return ExportResult(target, examples, written, pages)

    # -- streaming helpers
    @contextmanager
    def _stream(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                headers: Mapping[str, str] | None = None) -> Iterator[httpx.Response]:
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        with self._http.stream(method, path, params=clean, headers=self._headers(headers)) as r:
            if r.status_code == 401 and (self._api_key or self._refresh_token):
                r.close()
                with self._lock:
                    self._expires_at = float("-inf")
                with self._http.stream(method, path, params=clean, headers=self._headers(headers)) as again:
                    yield again
                return
            yield r

    def _upload(self, path: str, source: Path | bytes, content_type: str, params: Mapping[str, Any], key: str,
                progress: Progress | None) -> httpx.Response:
        """POSTs a raw body streamed from a file (or given bytes) with an Idempotency-Key,
        retried on connection errors and 5xx; each attempt re-reads the source from the start."""
        total = len(source) if isinstance(source, bytes) else source.stat().st_size
        clean = {k: v for k, v in params.items() if v is not None}

        def chunks() -> Iterator[bytes]:
            if isinstance(source, bytes):
                for i in range(0, len(source), CHUNK_BYTES):
                    yield source[i:i + CHUNK_BYTES]
                return
            with open(source, "rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    yield chunk

        def body() -> Iterator[bytes]:
            sent = 0
            if progress:
                progress(0, total)
            for chunk in chunks():
                yield chunk
                sent += len(chunk)
                if progress:
                    progress(sent, total)

        def once() -> httpx.Response:
            headers = {"Content-Type": content_type, "Content-Length": str(total), "Idempotency-Key": key}
            r = self._http.post(path, params=clean, content=body(), headers=self._headers(headers))
            if r.status_code == 401 and (self._api_key or self._refresh_token):
                with self._lock:
                    self._expires_at = float("-inf")
                r = self._http.post(path, params=clean, content=body(), headers=self._headers(headers))
            return r

        r = self._retrying(once, f"POST {path}")
        _raise_for(r)
        return r
