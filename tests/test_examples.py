"""Examples end to end through the proxy: registration with line-by-line validation,
byte-exact streaming (Range, lines, gzip, ETag), export with a stable order and split,
permissions, and cascades from sessions (DESIGN.md §3, §4, §6)."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import httpx
import psycopg
import pytest

from tests.bundles import bundle
from tests.conftest import User, add_member, assert_error_body, create_key, create_suite, key_client
from tests.resources import PeakRss, established_to_port, process_tree
from tracepipe.credentials import StackSecrets
from tracepipe.stack import Stack

JSONL = {"Content-Type": "application/jsonl"}


def record(i: int, text: str = "héllo wörld ✓ 日本語") -> bytes:
    return json.dumps({"messages": [
        {"role": "system", "content": "You are a shopping assistant."},
        {"role": "user", "content": f"{text} #{i}"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": f"c{i}", "type": "function", "function": {"name": "search", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": f"c{i}", "content": "[]"},
        {"role": "assistant", "content": [{"type": "text", "text": "Nothing found."}]},
    ], "tools": [{"type": "function", "function": {"name": "search", "parameters": {}}}]},
        ensure_ascii=False).encode()


def jsonl(n: int, start: int = 0) -> bytes:
    return b"".join(record(i) + b"\n" for i in range(start, start + n))


@pytest.fixture(scope="module")
def s3(stack: Stack, secrets: StackSecrets) -> Any:
    return boto3.client("s3", endpoint_url=stack.s.s3_endpoint, aws_access_key_id=secrets.s3_access_key,
                        aws_secret_access_key=secrets.s3_secret_key, region_name=stack.s.s3_region)


def objects(s3: Any, stack: Stack, prefix: str = "examples/") -> set[str]:
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.s.bucket, Prefix=prefix):
        keys |= {o["Key"] for o in page.get("Contents", [])}
    return keys


@pytest.fixture(scope="module")
def team(make_user: Callable[..., User]) -> dict[str, Any]:
    owner, editor, viewer, stranger = make_user(), make_user(), make_user(), make_user()
    pipeline = make_user("tp_pipeline")
    suite = create_suite(owner)
    add_member(owner, suite["id"], editor, "editor")
    add_member(owner, suite["id"], viewer, "viewer")
    return {"owner": owner, "editor": editor, "viewer": viewer, "stranger": stranger, "pipeline": pipeline,
            "suite": suite}


def register(client: httpx.Client, suite_id: str, body: bytes, model: str = "gpt-test",
             **params: Any) -> httpx.Response:
    return client.post("/examples", params={"suite_id": suite_id, "model": model, **params}, content=body,
                       headers=JSONL)


def test_raw_registration_and_byte_exact_stream(team: dict[str, Any]) -> None:
    body = jsonl(7)
    r = register(team["pipeline"].client, team["suite"]["id"], body, metadata=json.dumps({"run": 3}))
    assert r.status_code == 201, r.text
    row = r.json()
    assert row["message_count"] == 7 and row["size_bytes"] == len(body)
    assert row["sha256"] == hashlib.sha256(body).hexdigest() and row["metadata"] == {"run": 3}
    assert r.headers["location"] == f"/examples/{row['id']}"
    got = team["viewer"].client.get(f"/examples/{row['id']}/messages", headers={"Accept-Encoding": "identity"})
    assert got.status_code == 200
    assert got.content == body
    assert got.headers["content-type"].startswith("application/jsonl")
    assert got.headers["content-length"] == str(len(body))
    assert got.headers["etag"] == f'"{row["sha256"]}"'
    meta = team["viewer"].client.get(f"/examples/{row['id']}")
    assert meta.status_code == 200 and meta.json()["id"] == row["id"]


def test_multipart_registration(team: dict[str, Any]) -> None:
    body = jsonl(3)
    meta = {"suite_id": team["suite"]["id"], "model": "claude-test", "metadata": {"source": "unit"}}
    r = team["editor"].client.post("/examples", data={"metadata": json.dumps(meta)},
                                   files={"messages": ("m.jsonl", body, "application/jsonl")})
    assert r.status_code == 201, r.text
    assert r.json()["model"] == "claude-test" and r.json()["message_count"] == 3
    assert team["editor"].client.get(f"/examples/{r.json()['id']}/messages").content == body


def test_range_lines_gzip_and_etag(team: dict[str, Any]) -> None:
    body = jsonl(10)
    row = register(team["pipeline"].client, team["suite"]["id"], body).json()
    c = team["viewer"].client
    path = f"/examples/{row['id']}/messages"
    part = c.get(path, headers={"Range": "bytes=5-104", "Accept-Encoding": "identity"})
    assert part.status_code == 206 and part.content == body[5:105]
    assert part.headers["content-range"] == f"bytes 5-104/{len(body)}"
    lines = c.get(path, params={"lines": "3-5"}, headers={"Accept-Encoding": "identity"})
    assert lines.content == b"".join(body.splitlines(keepends=True)[2:5])
    with c.stream("GET", path, headers={"Accept-Encoding": "gzip"}) as zipped:
        assert zipped.headers["content-encoding"] == "gzip"
        compressed = b"".join(zipped.iter_raw())
    assert len(compressed) < len(body) and gzip.decompress(compressed) == body
    assert c.get(path, headers={"If-None-Match": f'"{row["sha256"]}"', "Accept-Encoding": "identity"}
                 ).status_code == 304
    bad = c.get(path, params={"lines": "0-2"})
    assert bad.status_code == 400
    assert_error_body(bad)


BAD_BODIES: list[tuple[str, bytes, int, str]] = [
    ("not utf-8", jsonl(2) + b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n', 3, "UTF-8"),
    ("not json", jsonl(1) + b"{nope\n", 2, "not valid JSON"),
    ("not an object", b"[1, 2]\n", 1, "not a JSON object"),
    ("no messages", jsonl(4) + b'{"prompt": "x"}\n', 5, "messages"),
    ("empty messages", b'{"messages": []}\n', 1, "non-empty"),
    ("bad role", b'{"messages": [{"role": "robot", "content": "x"}]}\n', 1, "role"),
    ("missing content", b'{"messages": [{"role": "user"}]}\n', 1, "content"),
    ("tool_calls on user", b'{"messages": [{"role": "user", "content": "x", "tool_calls": [{}]}]}\n', 1, "tool_calls"),
    ("bad tool call", b'{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "1"}]}]}\n', 1,
     "function"),
    ("empty line inside", jsonl(2) + b"\n" + jsonl(1), 3, "empty line"),
]


@pytest.mark.parametrize(("what", "body", "line", "reason"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_the_first_bad_line_is_reported_and_nothing_is_stored(
        team: dict[str, Any], su: psycopg.Connection[dict[str, Any]], s3: Any, stack: Stack,
        what: str, body: bytes, line: int, reason: str) -> None:
    rows_before = su.execute("select count(*) as n from app.examples").fetchone()
    keys_before = objects(s3, stack)
    r = register(team["pipeline"].client, team["suite"]["id"], body)
    assert r.status_code == 422, (what, r.text)
    err = assert_error_body(r)
    assert err["details"]["line"] == line and reason in err["message"], err
    assert su.execute("select count(*) as n from app.examples").fetchone() == rows_before
    assert objects(s3, stack) == keys_before
    assert s3.list_multipart_uploads(Bucket=stack.s.bucket, Prefix="examples/").get("Uploads", []) == []


def test_bad_requests(team: dict[str, Any]) -> None:
    c, sid = team["pipeline"].client, team["suite"]["id"]
    cases = [
        (c.post("/examples", params={"suite_id": sid, "model": "m"}, content=b"", headers=JSONL), 400),
        (c.post("/examples", params={"suite_id": sid, "model": "m"}, content=jsonl(1),
                headers={"Content-Type": "text/plain"}), 415),
        (c.post("/examples", params={"model": "m"}, content=jsonl(1), headers=JSONL), 422),
        (c.post("/examples", params={"suite_id": "nope", "model": "m"}, content=jsonl(1), headers=JSONL), 422),
        (c.post("/examples", params={"suite_id": sid, "model": "m", "metadata": "{"}, content=jsonl(1),
                headers=JSONL), 422),
        (c.post("/examples", files={"metadata": (None, json.dumps({"suite_id": sid, "model": "m"}))}), 422),
        (c.post("/examples", params={"suite_id": "00000000-0000-0000-0000-000000000000", "model": "m"},
                content=jsonl(1), headers=JSONL), 422),
    ]
    for r, status in cases:
        assert r.status_code == status, r.text
        assert_error_body(r)


def test_permissions(team: dict[str, Any], base_url: str) -> None:
    sid = team["suite"]["id"]
    owner: User = team["owner"]
    other_suite = create_suite(owner)
    read_key = key_client(base_url, create_key(owner, access="read")["key"])
    key_in = key_client(base_url, create_key(owner, suites=[sid])["key"])
    key_out = key_client(base_url, create_key(owner, suites=[other_suite["id"]])["key"])
    example = register(team["pipeline"].client, sid, jsonl(1)).json()
    expected_register = {"pipeline": 201, "owner": 201, "editor": 201, "viewer": 403, "stranger": 403}
    for who, status in expected_register.items():
        r = register(team[who].client, sid, jsonl(1))
        assert r.status_code == status, (who, r.text)
    for client, status in ((read_key, 403), (key_in, 201), (key_out, 403)):
        assert register(client, sid, jsonl(1)).status_code == status
    expected_read = {"pipeline": 200, "owner": 200, "editor": 200, "viewer": 200, "stranger": 404}
    for who, status in expected_read.items():
        for path in (f"/examples/{example['id']}", f"/examples/{example['id']}/messages"):
            r = team[who].client.get(path)
            assert r.status_code == status, (who, path, r.text)
    for client, status in ((read_key, 200), (key_in, 200), (key_out, 404)):
        assert client.get(f"/examples/{example['id']}/messages").status_code == status
    listed = team["stranger"].client.get("/examples", params={"suite_id": f"eq.{sid}"})
    assert listed.status_code == 200 and listed.json() == []


def test_listing_filters_counts_and_embedding(team: dict[str, Any]) -> None:
    sid = team["suite"]["id"]
    for model in ("list-a", "list-a", "list-b"):
        register(team["pipeline"].client, sid, jsonl(1), model=model)
    c = team["viewer"].client
    r = c.get("/examples", params={"suite_id": f"eq.{sid}", "model": "eq.list-a", "order": "created_at.desc,id",
                                   "select": "id,model,created_at,suites(slug),sessions(id)"},
              headers={"Prefer": "count=exact"})
    assert r.status_code == 200, r.text
    assert r.headers["content-range"].endswith("/2")
    assert all(e["model"] == "list-a" and e["suites"]["slug"] == team["suite"]["slug"] for e in r.json())
    planned = c.get("/examples", params={"suite_id": f"eq.{sid}", "limit": 1}, headers={"Prefer": "count=planned"})
    assert planned.status_code in (200, 206) and "/" in planned.headers["content-range"]
    since = c.get("/examples", params={"suite_id": f"eq.{sid}", "created_at": "gte.2000-01-01T00:00:00Z"})
    assert len(since.json()) >= 3


def test_export_order_cursor_and_split(team: dict[str, Any], make_user: Callable[..., User]) -> None:
    owner = make_user()
    suite = create_suite(owner)
    ids = [register(owner.client, suite["id"], jsonl(2, start=i * 2), model="export").json()["id"] for i in range(12)]
    c = owner.client
    full = c.get("/examples/export", params={"suite_id": suite["id"], "model": "export"})
    assert full.status_code == 200, full.text
    assert full.headers["x-export-count"] == "12"
    assert full.content == b"".join(jsonl(2, start=i * 2) for i in range(12))  # creation order, byte-exact
    pages, cursor, seen = 0, None, b""
    while True:
        params = {"suite_id": suite["id"], "limit": 5, **({"cursor": cursor} if cursor else {})}
        page = c.get("/examples/export", params=params)
        seen += page.content
        pages += 1
        cursor = page.headers.get("x-next-cursor")
        if not cursor:
            break
    assert pages == 3 and seen == full.content
    train = c.get("/examples/export", params={"suite_id": suite["id"], "split": "train", "validation_percent": 30})
    valid = c.get("/examples/export", params={"suite_id": suite["id"], "split": "validation",
                                              "validation_percent": 30})
    assert int(train.headers["x-export-count"]) + int(valid.headers["x-export-count"]) == 12
    assert set(train.content.splitlines()) | set(valid.content.splitlines()) == set(full.content.splitlines())
    assert not set(train.content.splitlines()) & set(valid.content.splitlines())
    again = c.get("/examples/export", params={"suite_id": suite["id"], "split": "validation", "validation_percent": 30})
    assert again.content == valid.content  # deterministic
    stranger = make_user()
    assert stranger.client.get("/examples/export", params={"suite_id": suite["id"]}).headers["x-export-count"] == "0"
    assert c.get("/examples/export", params={"cursor": "!!"}).status_code == 400
    assert len(ids) == 12


def test_idempotent_registration(team: dict[str, Any], su: psycopg.Connection[dict[str, Any]]) -> None:
    key = {"Idempotency-Key": f"ex-{os.urandom(6).hex()}"}
    c, sid = team["pipeline"].client, team["suite"]["id"]
    first = c.post("/examples", params={"suite_id": sid, "model": "idem"}, content=jsonl(2), headers={**JSONL, **key})
    again = c.post("/examples", params={"suite_id": sid, "model": "idem"}, content=jsonl(2), headers={**JSONL, **key})
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    n = su.execute("select count(*) as n from app.examples where model = 'idem' and suite_id = %s", [sid]).fetchone()
    assert n == {"n": 1}
    other = c.post("/examples", params={"suite_id": sid, "model": "idem"}, content=jsonl(3), headers={**JSONL, **key})
    assert other.status_code == 409
    assert_error_body(other)


def test_deleting_a_session_removes_its_examples_and_objects(team: dict[str, Any], s3: Any, stack: Stack) -> None:
    owner: User = team["owner"]
    session = owner.client.post("/sessions", content=bundle(n_events=10, screenshots=1),
                                headers={"Content-Type": "application/zip"})
    assert session.status_code == 201, session.text
    sid = session.json()["id"]
    example = register(team["pipeline"].client, team["suite"]["id"], jsonl(2), session_id=sid).json()
    assert f"examples/{example['id']}/messages.jsonl" in objects(s3, stack)
    assert owner.client.delete(f"/sessions/{sid}").status_code == 200
    assert team["viewer"].client.get(f"/examples/{example['id']}").status_code == 404
    deadline = time.monotonic() + 15
    while f"examples/{example['id']}/messages.jsonl" in objects(s3, stack) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert f"examples/{example['id']}/messages.jsonl" not in objects(s3, stack)
    assert not objects(s3, stack, f"sessions/{sid}/")


def _big_jsonl(path: str, size: int) -> str:
    """Writes a JSONL file of about `size` bytes (non-ASCII included) and returns its sha256."""
    h = hashlib.sha256()
    line = record(0, "ünïcødé " * 200) + b"\n"
    with open(path, "wb") as f:
        written = 0
        while written < size:
            f.write(line)
            h.update(line)
            written += len(line)
    return h.hexdigest()


def _file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


def test_100_mib_round_trip_in_bounded_memory(team: dict[str, Any], stack: Stack, tmp_path: Any) -> None:
    path = str(tmp_path / "big.jsonl")
    digest = _big_jsonl(path, 100 * 1024 * 1024)
    ext_pid = stack.pid_of("ext")
    assert ext_pid is not None
    c = team["pipeline"].client
    with PeakRss(ext_pid) as upload_rss:
        r = c.post("/examples", params={"suite_id": team["suite"]["id"], "model": "big"},
                   content=_file_chunks(path), headers=JSONL, timeout=300)
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == digest
    h = hashlib.sha256()
    with PeakRss(ext_pid) as stream_rss, c.stream("GET", f"/examples/{r.json()['id']}/messages",
                                                  headers={"Accept-Encoding": "identity"}, timeout=300) as s:
        for chunk in s.iter_bytes(1 << 20):
            h.update(chunk)
    assert h.hexdigest() == digest
    # Constant memory whatever the size: 100 MiB through a worker adds at most 48 MiB to it. (An
    # absolute 150 MiB no longer separates the two: a worker that served the suite before sits
    # near 140 MiB with tus, the queue and the email tables loaded.)
    growth, limit = 48 * 1024 * 1024, 200 * 1024 * 1024
    for what, rss in (("upload", upload_rss), ("stream", stream_rss)):
        assert rss.peak - rss.start < growth, f"{what} grew ext by {(rss.peak - rss.start) / 2**20:.0f} MiB"
        assert rss.peak < limit, f"ext peak RSS during {what} {rss.peak / 2**20:.0f} MiB"
    print(f"ext peak RSS: upload {upload_rss.peak / 2**20:.0f} MiB, stream {stream_rss.peak / 2**20:.0f} MiB")


def test_client_disconnect_mid_stream_frees_the_s3_connection(team: dict[str, Any], stack: Stack,
                                                              tmp_path: Any) -> None:
    path = str(tmp_path / "mid.jsonl")
    _big_jsonl(path, 40 * 1024 * 1024)
    c = team["pipeline"].client
    row = c.post("/examples", params={"suite_id": team["suite"]["id"], "model": "disc"},
                 content=_file_chunks(path), headers=JSONL, timeout=300).json()
    ext_pid = stack.pid_of("ext")
    assert ext_pid is not None
    workers = process_tree(ext_pid)
    baseline = established_to_port(workers, stack.s.s3_port)
    conn = http.client.HTTPConnection(stack.s.host, stack.s.proxy_port, timeout=30)
    conn.request("GET", f"/examples/{row['id']}/messages", headers={"Authorization": c.headers["Authorization"]})
    response = conn.getresponse()
    assert response.status == 200
    response.read(256 * 1024)
    during = established_to_port(workers, stack.s.s3_port)
    conn.sock.close()  # type: ignore[union-attr]
    conn.close()
    deadline = time.monotonic() + 5
    while established_to_port(workers, stack.s.s3_port) > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    after = established_to_port(workers, stack.s.s3_port)
    assert after <= baseline, (baseline, during, after)
    assert c.get(f"/examples/{row['id']}/messages", params={"lines": "1-1"}).status_code == 200
