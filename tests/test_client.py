"""tracepipe.client against the real stack through the proxy: key and password logins with
renewal before expiry (on a test clock, no waiting), capability CRUD, uploads with progress
and Idempotency-Key retries (a lost answer, a 503), byte-exact downloads and JSONL streams
in bounded memory, export with cursor pages and split, and one error type."""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.bundles import bundle, write_large_bundle
from tests.conftest import User, create_key, unique
from tracepipe.client import CHUNK_BYTES, Client, TracepipeError


class FakeClock:
    """The client's monotonic clock, moved by hand: token expiry without waiting for it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recording(httpx.BaseTransport):
    """The real transport, recording each request; `fail` may replace or spoil an answer."""

    def __init__(self, fail: Callable[[httpx.Request, Callable[[], httpx.Response]], httpx.Response] | None = None,
                 ) -> None:
        self.inner = httpx.HTTPTransport()
        self.calls: list[tuple[str, str]] = []
        self.fail = fail

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls.append((request.method, request.url.path))
        if self.fail is not None:
            return self.fail(request, lambda: self.inner.handle_request(request))
        return self.inner.handle_request(request)

    def count(self, method: str, path: str) -> int:
        return self.calls.count((method, path))

    def close(self) -> None:
        self.inner.close()


def record(i: int, pad: int = 0) -> bytes:
    """One training record; `pad` hex characters of noise make it as incompressible as real text."""
    return json.dumps({"messages": [
        {"role": "system", "content": "You are a shopping assistant."},
        {"role": "user", "content": f"héllo wörld ✓ 日本語 #{i} " + random.Random(i).randbytes(pad // 2).hex()},
        {"role": "assistant", "content": f"Nothing found for #{i}."},
    ]}, ensure_ascii=False).encode() + b"\n"


def jsonl(n: int, start: int = 0, pad: int = 0) -> bytes:
    return b"".join(record(i, pad) for i in range(start, start + n))


@pytest.fixture
def owner(make_user: Callable[..., User]) -> User:
    return make_user()


@pytest.fixture
def tp(base_url: str, owner: User) -> Iterator[Client]:
    """A client on an API key of a fresh user (write access, every suite)."""
    with Client(base_url, api_key=create_key(owner)["key"], backoff_s=0.01) as client:
        yield client


# --- identity -------------------------------------------------------------------------------------------------

def test_api_key_login_renews_the_token_shortly_before_expiry(base_url: str, owner: User) -> None:
    clock, wire = FakeClock(), Recording()
    with Client(base_url, api_key=create_key(owner)["key"], clock=clock, transport=wire,
                refresh_margin_s=60) as tp:
        assert tp.me()["id"] == owner.id
        first = tp.token
        assert wire.count("POST", "/auth/token") == 1
        lifetime = tp.token_expires_in + 60  # the server's expires_in (TP_KEY_TOKEN_TTL_S)
        assert 600 <= lifetime <= 24 * 3600, lifetime

        clock.advance(tp.token_expires_in - 1)  # a second before the margin: the same token
        assert tp.me()["id"] == owner.id
        assert wire.count("POST", "/auth/token") == 1 and tp.token == first

        clock.advance(2)  # inside the margin (the JWT still has ~a minute): renewed first
        assert tp.me()["id"] == owner.id
        assert wire.count("POST", "/auth/token") == 2
        assert tp.token != first
        assert tp.token_expires_in > lifetime - 61
    wire.close()


def test_a_refresh_whose_answer_is_lost_is_retried_with_the_same_token(base_url: str, owner: User) -> None:
    """The server rotates the refresh token, the answer is lost on the way (the connection
    cuts after the request was served), the client retries with the token it holds: within
    ext's grace that retry gets the same new pair, and the login goes on."""
    lost: list[str] = []

    def lose_first_refresh(request: httpx.Request, send: Callable[[], httpx.Response]) -> httpx.Response:
        r = send()
        if request.url.path == "/auth/refresh" and not lost:
            r.read()
            lost.append(r.json()["refresh_token"])
            raise httpx.ReadError("connection reset after the refresh was served", request=request)
        return r

    clock, wire = FakeClock(), Recording(lose_first_refresh)
    with Client(base_url, clock=clock, transport=wire, backoff_s=0.01) as tp:
        tp.login(owner.email, owner.password)
        clock.advance(tp.token_expires_in + 1)
        assert tp.me()["id"] == owner.id  # renewed through the retry
        assert wire.count("POST", "/auth/refresh") == 2 and lost
        assert tp._refresh_token == lost[0]  # the pair the lost answer carried
        clock.advance(tp.token_expires_in + 1)
        assert tp.me()["id"] == owner.id  # and it rotates on as usual
        assert wire.count("POST", "/auth/refresh") == 3


def test_password_login_rotates_the_refresh_token_before_expiry(base_url: str, owner: User) -> None:
    clock, wire = FakeClock(), Recording()
    with Client(base_url, clock=clock, transport=wire) as tp:
        tp.login(owner.email, owner.password)
        assert tp.me()["email"] == owner.email
        first_refresh = tp._refresh_token
        clock.advance(tp.token_expires_in + 1)
        assert tp.me()["id"] == owner.id
        assert wire.count("POST", "/auth/refresh") == 1 and wire.count("POST", "/auth/login") == 1
        assert tp._refresh_token and tp._refresh_token != first_refresh  # rotated
        created = tp.create_api_key(unique("from-client"), access="read")
        assert created["key"].startswith("tp_") and created["access"] == "read"
        assert created["id"] in {k["id"] for k in tp.list_api_keys()}
        tp.logout()
        with pytest.raises(TracepipeError) as e:
            tp.me()
        assert e.value.status == 401
    wire.close()


def test_a_revoked_key_fails_with_the_api_error(base_url: str, owner: User) -> None:
    key = create_key(owner)
    with Client(base_url, api_key=key["key"]) as tp:
        assert tp.list_suites() == []
        assert owner.client.delete(f"/api-keys/{key['id']}").status_code == 200
        # The held JWT is refused at once; the client renews once, and the exchange says why.
        with pytest.raises(TracepipeError) as e:
            tp.list_suites()
    assert (e.value.status, e.value.code) == (401, "TP401")
    assert "revoked" in e.value.message
    assert e.value.request_id


# --- capability CRUD --------------------------------------------------------------------------------------------

def test_capability_crud_round_trip(tp: Client, owner: User, make_user: Callable[..., User]) -> None:
    slug = unique("suite")
    suite = tp.create_suite("Checkout", slug, "the checkout flow")
    assert (suite["name"], suite["slug"], suite["created_by"]) == ("Checkout", slug, owner.id)
    assert tp.get_suite(suite["id"]) == suite
    renamed = tp.update_suite(suite["id"], name="Checkout v2")
    assert renamed["name"] == "Checkout v2" and renamed["id"] == suite["id"]
    assert [s["id"] for s in tp.list_suites({"slug": f"eq.{slug}"})] == [suite["id"]]

    friend = make_user()
    member = tp.add_member(suite["id"], friend.id, "viewer")
    assert (member["user_id"], member["role"]) == (friend.id, "viewer")
    assert tp.update_member(suite["id"], friend.id, "editor")["role"] == "editor"
    assert {(m["user_id"], m["role"]) for m in tp.list_members(suite["id"])} == {(owner.id, "owner"),
                                                                                 (friend.id, "editor")}
    assert tp.remove_member(suite["id"], friend.id)["user_id"] == friend.id

    action = tp.create_action(suite["id"], "search", description="find products",
                              input_schema={"type": "object", "properties": {"q": {"type": "string"}}})
    assert action["suite_id"] == suite["id"] and action["input_schema"]["properties"]["q"]["type"] == "string"
    assert tp.get_action(suite["id"], action["id"]) == action
    assert tp.update_action(suite["id"], action["id"], description="find things")["description"] == "find things"
    assert [a["name"] for a in tp.list_actions(suite["id"])] == ["search"]

    server = tp.create_mcp_server(unique("shop-mcp"), "https://mcp.example/shop", "streamable-http")
    assert tp.get_mcp_server(server["id"])["transport"] == "streamable-http"
    assert tp.update_mcp_server(server["id"], description="the shop")["description"] == "the shop"
    assert server["id"] in {s["id"] for s in tp.list_mcp_servers({"name": f"eq.{server['name']}"})}
    tool = tp.create_tool(server["id"], "product_search", input_schema={"type": "object"})
    assert tp.get_tool(server["id"], tool["id"])["mcp_server_id"] == server["id"]
    assert tp.update_tool(server["id"], tool["id"], description="v2")["description"] == "v2"
    assert [t["id"] for t in tp.list_tools(server["id"])] == [tool["id"]]

    binding = tp.create_action_tool_map(suite["id"], action["id"], server["id"], tool["id"], {"q": "$.query"})
    assert binding["argument_mapping"] == {"q": "$.query"}
    assert tp.get_action_tool_map(binding["id"]) == binding
    changed = tp.update_action_tool_map(binding["id"], argument_mapping={"q": "$.text"})
    assert changed["argument_mapping"] == {"q": "$.text"}
    assert [b["id"] for b in tp.list_action_tool_maps(suite["id"])] == [binding["id"]]

    assert tp.delete_action_tool_map(binding["id"])["id"] == binding["id"]
    assert tp.list_action_tool_maps(suite["id"]) == []
    assert tp.delete_tool(server["id"], tool["id"])["id"] == tool["id"]
    assert tp.delete_mcp_server(server["id"])["id"] == server["id"]
    assert tp.delete_action(suite["id"], action["id"])["id"] == action["id"]
    assert tp.delete_suite(suite["id"])["id"] == suite["id"]
    with pytest.raises(TracepipeError) as e:
        tp.get_suite(suite["id"])
    assert (e.value.status, e.value.code) == (404, "PGRST116")


# --- sessions ---------------------------------------------------------------------------------------------------

def test_upload_reports_progress_and_download_is_byte_identical(tp: Client, tmp_path: Path) -> None:
    source = tmp_path / "bundle.zip"
    total = write_large_bundle(str(source), screenshots=3, screenshot_bytes=1024 * 1024)
    calls: list[tuple[int, int]] = []
    session = tp.upload_session(source, progress=lambda sent, of: calls.append((sent, of)))
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert len(calls) == math.ceil(total / CHUNK_BYTES) + 1
    assert [s for s, _ in calls] == sorted(s for s, _ in calls)
    assert session["size_bytes"] == total
    assert session["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert session["screenshot_count"] == 3
    stored = tp.get_session(session["id"])
    assert (stored["id"], stored["sha256"], stored["size_bytes"]) == (session["id"], session["sha256"], total)

    got: list[tuple[int, int]] = []
    target = tp.download_session(session["id"], tmp_path / "back.zip", progress=lambda n, of: got.append((n, of)))
    assert target.read_bytes() == source.read_bytes()
    assert got[-1] == (total, total)
    assert not (tmp_path / "back.zip.part").exists()


def test_retry_after_a_lost_answer_returns_the_first_session(base_url: str, owner: User, tmp_path: Path) -> None:
    """The server commits the upload, the answer is lost on the way back: the client's retry
    carries the same Idempotency-Key and gets the first session, not a second one."""
    first: list[dict[str, Any]] = []
    keys: list[str] = []

    def lose_first_answer(request: httpx.Request, send: Callable[[], httpx.Response]) -> httpx.Response:
        upload = (request.method, request.url.path) == ("POST", "/sessions")
        if upload:
            keys.append(request.headers["idempotency-key"])
        response = send()
        if upload and not first:
            response.read()
            first.append(response.json())
            raise httpx.ReadError("connection reset by peer", request=request)
        return response

    wire = Recording(lose_first_answer)
    source = tmp_path / "b.zip"
    source.write_bytes(bundle(n_events=100, screenshots=1))
    with Client(base_url, api_key=create_key(owner)["key"], transport=wire, backoff_s=0.01) as tp:
        session = tp.upload_session(source)
        assert first and session["id"] == first[0]["id"]
        assert wire.count("POST", "/sessions") == 2 and len(set(keys)) == 1
        assert [s["id"] for s in tp.list_sessions()] == [session["id"]]

        # The same key again (e.g. a retry after a process restart): the same session.
        again = tp.upload_session(source, idempotency_key=keys[0])
        assert again["id"] == session["id"]
        # The same key for different content is refused, not silently replayed.
        other = tmp_path / "other.zip"
        other.write_bytes(bundle(n_events=101, screenshots=1))
        with pytest.raises(TracepipeError) as e:
            tp.upload_session(other, idempotency_key=keys[0])
        assert (e.value.status, e.value.code) == (409, "TP409")
        assert len(tp.list_sessions()) == 1
    wire.close()


def test_a_503_is_retried(base_url: str, owner: User, tmp_path: Path) -> None:
    def busy_once(request: httpx.Request, send: Callable[[], httpx.Response]) -> httpx.Response:
        if (request.method, request.url.path) == ("POST", "/sessions") and wire.count("POST", "/sessions") == 1:
            for _ in request.stream:  # type: ignore[union-attr]  # the body goes out, the answer is lost
                pass
            return httpx.Response(503, json={"code": "TP503", "message": "busy", "details": None, "hint": None},
                                  headers={"Retry-After": "0"})
        return send()

    wire = Recording(busy_once)
    source = tmp_path / "b.zip"
    source.write_bytes(bundle(n_events=50, screenshots=1))
    with Client(base_url, api_key=create_key(owner)["key"], transport=wire, backoff_s=0.01) as tp:
        session = tp.upload_session(source)
        assert wire.count("POST", "/sessions") == 2
        assert [s["id"] for s in tp.list_sessions()] == [session["id"]]
    wire.close()


# --- examples ---------------------------------------------------------------------------------------------------

def test_streaming_iteration_is_byte_exact_in_bounded_memory(tp: Client, tmp_path: Path) -> None:
    suite = tp.create_suite("Examples", unique("ex"))
    # Lines of ~5 KiB and a body of ~12 MiB: many lines cross the 1 MiB chunk boundaries.
    body = jsonl(2400, pad=5000)
    source = tmp_path / "messages.jsonl"
    source.write_bytes(body)
    sent: list[tuple[int, int]] = []
    example = tp.register_example(suite["id"], "gpt-test", source, metadata={"run": 7},
                                  progress=lambda n, of: sent.append((n, of)))
    assert (example["message_count"], example["size_bytes"]) == (2400, len(body))
    assert example["sha256"] == hashlib.sha256(body).hexdigest() and example["metadata"]["run"] == 7
    assert sent[-1] == (len(body), len(body))

    lines = body.split(b"\n")
    tracemalloc.start()
    try:
        digest, count = hashlib.sha256(), 0
        for i, line in enumerate(tp.iter_message_lines(example["id"])):
            assert line == lines[i] + b"\n", i
            digest.update(line)
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 2400 and digest.hexdigest() == example["sha256"]
    assert peak < 4 * 1024 * 1024, peak  # the body is 12 MiB: never held whole

    records = tp.iter_messages(example["id"])
    assert next(records) == json.loads(lines[0])
    records.close()  # stopping early releases the connection
    assert list(tp.iter_messages(example["id"])) == [json.loads(x) for x in body.splitlines()]
    assert tp.get_example(example["id"])["id"] == example["id"]


def test_export_to_a_file_follows_the_cursor_and_splits(tp: Client, tmp_path: Path) -> None:
    suite = tp.create_suite("Export", unique("export"))
    model = unique("model")
    bodies = [jsonl(2, start=10 * i) for i in range(5)]
    for body in bodies:
        tp.register_example(suite["id"], model, body)
    assert len(tp.list_examples({"suite_id": f"eq.{suite['id']}"})) == 5

    result = tp.export_examples(tmp_path / "all.jsonl", suite_id=suite["id"], model=model, page_size=2)
    assert (result.examples, result.pages, result.bytes) == (5, 3, sum(len(b) for b in bodies))
    assert result.path.read_bytes() == b"".join(bodies)  # registration order, nothing missed or repeated
    assert not (tmp_path / "all.jsonl.part").exists()

    train = tp.export_examples(tmp_path / "train.jsonl", suite_id=suite["id"], split="train",
                               validation_percent=40)
    validation = tp.export_examples(tmp_path / "validation.jsonl", suite_id=suite["id"], split="validation",
                                    validation_percent=40)
    assert train.examples + validation.examples == 5
    both = train.path.read_bytes().splitlines() + validation.path.read_bytes().splitlines()
    assert sorted(both) == sorted(b"".join(bodies).splitlines())


# --- errors -------------------------------------------------------------------------------------------------------

def test_errors_carry_the_api_body_and_status(tp: Client, base_url: str) -> None:
    with pytest.raises(TracepipeError) as e:
        tp.get_suite(str(uuid.uuid4()))
    assert (e.value.status, e.value.code) == (404, "PGRST116")
    assert e.value.message and e.value.request_id

    with pytest.raises(TracepipeError) as e:
        tp.create_suite("Bad", "NOT a slug")
    assert e.value.status == 422 and e.value.code == "TP422" and "slug" in e.value.message

    suite = tp.create_suite("Errors", unique("err"))
    with pytest.raises(TracepipeError) as e:
        tp.register_example(suite["id"], "m", jsonl(2) + b'{"messages": "not a list"}\n')
    assert e.value.status == 422 and e.value.code.startswith("TP")
    assert "3" in json.dumps(e.value.details) + e.value.message  # the first bad line is named

    with Client(base_url) as nobody, pytest.raises(TracepipeError) as e:
        nobody.list_suites()
    assert (e.value.status, e.value.code) == (401, "TP401") and e.value.hint

    with Client("http://127.0.0.1:9", api_key="tp_x", retries=1, backoff_s=0.01) as offline, \
            pytest.raises(TracepipeError) as e:
        offline.list_suites()
    assert (e.value.status, e.value.code) == (0, "TPNET")
    assert isinstance(e.value.__cause__, httpx.TransportError)


def test_a_key_throttled_for_failures_on_its_prefix_still_works(base_url: str, owner: User) -> None:
    """ext slows down a source after 20 failures on a key prefix (429, Retry-After of a few
    seconds): the client waits that out and reports the wrong key's 401, while the right
    key, from the same source, is served at once (its secret cannot be guessed)."""
    key = create_key(owner)["key"]
    wrong = key[:-8] + ("1" * 8 if key[-8:] != "1" * 8 else "2" * 8)
    statuses = []
    for _ in range(23):
        statuses.append(httpx.post(f"{base_url}/auth/token", headers={"Authorization": f"ApiKey {wrong}"}).status_code)
        time.sleep(0.06)  # under the proxy's per-IP rate: this is ext's per-prefix throttle
    assert statuses[:20] == [401] * 20 and 429 in statuses[20:], statuses
    with Client(base_url, api_key=wrong, backoff_s=0.01) as tp, pytest.raises(TracepipeError) as raised:
        tp.list_suites()
    assert raised.value.status == 401 and raised.value.code == "TP401", raised.value
    with Client(base_url, api_key=key) as tp:
        assert isinstance(tp.list_suites(), list)
