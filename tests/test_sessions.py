"""Session ingestion end to end through the proxy (DESIGN.md §3, §5; issue 3): real bundles
uploaded raw and as multipart, all-or-nothing on every bad input (no row, no object, no open
multipart upload), byte-identical downloads with Range/ETag, member files, visibility,
deletion, idempotency, client disconnects, a 200 MiB bundle under a memory bound, and the
orphan sweep. The object store is inspected directly with boto3; the database as superuser."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import select
import socket
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import httpx
import psycopg
import pytest
from botocore.config import Config

from ext.config import ExtSettings
from tests import bundles
from tests.conftest import User, add_member, assert_error_body, create_key, create_suite, key_client, run_cli
from tracepipe import credentials
from tracepipe.stack import Stack

ZIP = {"Content-Type": "application/zip"}
MiB = 1024 * 1024
EXT = ExtSettings()  # ext's limits: its defaults, or TP_EXT_* from the environment it inherits
RSS_BOUND = 150 * MiB


# --- looking behind the API: the bucket and the table ---------------------------------------------
@dataclass
class Bucket:
    s3: Any
    name: str

    def keys(self, prefix: str = "sessions/") -> set[str]:
        keys: set[str] = set()
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
            keys |= {o["Key"] for o in page.get("Contents", [])}
        return keys

    def open_uploads(self, prefix: str = "sessions/") -> list[dict[str, Any]]:
        """Every open multipart upload under prefix, every page (a page holds 1,000)."""
        out: list[dict[str, Any]] = []
        kwargs: dict[str, str] = {}
        while True:
            page = self.s3.list_multipart_uploads(Bucket=self.name, Prefix=prefix, **kwargs)
            out += page.get("Uploads", [])
            if not page.get("IsTruncated"):
                return out
            kwargs = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def read(self, key: str) -> bytes:
        return bytes(self.s3.get_object(Bucket=self.name, Key=key)["Body"].read())

    def exists(self, key: str) -> bool:
        try:
            self.s3.head_object(Bucket=self.name, Key=key)
            return True
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise


def make_bucket(stack: Stack) -> Bucket:
    secrets = credentials.load_or_create(stack.state)
    s3 = boto3.client("s3", endpoint_url=stack.s.s3_endpoint, aws_access_key_id=secrets.s3_access_key,
                      aws_secret_access_key=secrets.s3_secret_key, region_name=stack.s.s3_region,
                      config=Config(retries={"max_attempts": 2}, connect_timeout=3, read_timeout=30,
                                    s3={"addressing_style": "path"}))
    return Bucket(s3, stack.s.bucket)


@pytest.fixture(scope="module")
def bucket(stack: Stack) -> Bucket:
    return make_bucket(stack)


@dataclass(frozen=True)
class Snapshot:
    rows: int
    idempotency_records: int
    keys: frozenset[str]
    # open multipart uploads (their keys: SeaweedFS lists an upload under another id after a
    # restart): tus uploads of other tests stay open until they expire
    uploads: frozenset[str] = frozenset()


def snapshot(su: psycopg.Connection[dict[str, Any]], bucket: Bucket) -> Snapshot:
    row = su.execute("select (select count(*) from app.sessions) as rows,"
                     " (select count(*) from app.idempotency_keys) as records").fetchone()
    assert row is not None
    return Snapshot(row["rows"], row["records"], frozenset(bucket.keys()),
                    frozenset(u["Key"] for u in bucket.open_uploads()))


def leftovers(su: psycopg.Connection[dict[str, Any]], bucket: Bucket, before: Snapshot) -> list[str]:
    """What a failed upload left behind compared with `before` (empty when nothing)."""
    now = snapshot(su, bucket)
    found = []
    if now.rows != before.rows:
        found.append(f"session rows {before.rows} -> {now.rows}")
    if now.idempotency_records != before.idempotency_records:
        found.append(f"idempotency records {before.idempotency_records} -> {now.idempotency_records}")
    if now.keys - before.keys:
        found.append(f"new objects {sorted(now.keys - before.keys)}")
    # tus uploads (app.tus_uploads) keep their multipart upload open by design until they
    # expire; SeaweedFS may list more of them after a restart than before it
    tus_keys = {f"sessions/{r['session_id']}/bundle.zip"
                for r in su.execute("select session_id from app.tus_uploads").fetchall()}
    if uploads := [u for u in bucket.open_uploads() if u["Key"] not in before.uploads | tus_keys]:
        found.append(f"open multipart uploads {[u['Key'] for u in uploads]}")
    return found


def assert_nothing_left(su: psycopg.Connection[dict[str, Any]], bucket: Bucket, before: Snapshot,
                        within: float = 0.0) -> None:
    """No new row, no new object under sessions/, no open multipart upload; polls up to
    `within` seconds for cleanups that happen after the response (disconnects, outages)."""
    deadline = time.monotonic() + within
    while (found := leftovers(su, bucket, before)) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not found, found


# --- requests httpx cannot make: a declared length, a body that stops half way -----------------
class RawPost:
    """POST over a plain socket: send the headers, then as much of the body as wanted."""

    def __init__(self, stack: Stack, token: str, length: int, content_type: str = "application/zip",
                 path: str = "/sessions") -> None:
        self.sock = socket.create_connection((stack.s.host, stack.s.proxy_port), timeout=30)
        self.sent = 0
        self.length = length
        head = (f"POST {path} HTTP/1.1\r\nHost: {stack.s.host}:{stack.s.proxy_port}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {length}\r\n\r\n")
        self.sock.sendall(head.encode())
        self._chunk = os.urandom(MiB)

    def send(self, n: int, stop_when_answered: bool = False) -> int:
        """Sends up to `n` more random body bytes; with `stop_when_answered`, stops as soon
        as the server answers or stops reading. Returns the bytes sent by this call."""
        done = 0
        self.sock.settimeout(5)
        try:
            while done < n:
                if stop_when_answered and select.select([self.sock], [], [], 0)[0]:
                    break
                piece = self._chunk[: min(n - done, len(self._chunk))]
                self.sock.sendall(piece)
                done += len(piece)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        self.sent += done
        return done

    def answer(self, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
        self.sock.settimeout(timeout)
        resp = http.client.HTTPResponse(self.sock)
        resp.begin()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()

    def close(self) -> None:
        self.sock.close()


def error_of(body: bytes) -> dict[str, Any]:
    parsed = json.loads(body)
    assert {"code", "message", "details", "hint"} <= set(parsed), parsed
    return dict(parsed)


# --- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uploader(make_user: Callable[..., User]) -> User:
    return make_user()


@pytest.fixture(scope="module")
def stranger(make_user: Callable[..., User]) -> User:
    return make_user()


def upload(client: httpx.Client, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return client.post("/sessions", content=body, headers={**ZIP, **(headers or {})})


def upload_ok(client: httpx.Client, body: bytes, headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = upload(client, body, headers)
    assert r.status_code == 201, r.text
    return dict(r.json())


@pytest.fixture(scope="module")
def recorded(uploader: User) -> tuple[bytes, dict[str, Any]]:
    """One real bundle (3,000 events, a HAR of 25 entries, 3 PNGs) and its session row."""
    body = bundles.bundle(manifest_data=bundles.manifest(metadata={"task": "checkout"}), n_events=3000,
                          har_entries=25, screenshots=3)
    return body, upload_ok(uploader.client, body)


# --- successful uploads -----------------------------------------------------------------------------
def test_raw_upload_records_the_bundle(recorded: tuple[bytes, dict[str, Any]], uploader: User,
                                       bucket: Bucket) -> None:
    body, row = recorded
    assert uuid.UUID(row["id"])
    assert row["user_id"] == uploader.id and row["suite_id"] is None
    assert row["size_bytes"] == len(body)
    assert row["sha256"] == hashlib.sha256(body).hexdigest()
    assert datetime.fromisoformat(row["started_at"]) == datetime.fromisoformat("2026-11-01T10:00:00+00:00")
    assert datetime.fromisoformat(row["ended_at"]) == datetime.fromisoformat("2026-11-01T10:05:00+00:00")
    assert (row["event_count"], row["network_count"], row["screenshot_count"]) == (3000, 25, 3)
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        expected = {i.filename: (i.file_size, i.compress_size, f"{i.CRC:08x}") for i in zf.infolist()}
    assert {f["name"]: (f["size"], f["compressed_size"], f["crc"]) for f in row["files"]} == expected
    assert row["metadata"]["task"] == "checkout"
    assert row["metadata"]["client"] == bundles.manifest()["client"]
    assert row["metadata"]["format_version"] == 1
    # The object under the documented key holds exactly the uploaded bytes.
    assert bucket.read(f"sessions/{row['id']}/bundle.zip") == body
    # The same row through PostgREST, single object and in the uploader's list.
    got = uploader.client.get(f"/sessions/{row['id']}")
    assert got.status_code == 200, got.text
    assert got.json() == row
    listed = uploader.client.get("/sessions", params={"id": f"eq.{row['id']}"})
    assert [s["id"] for s in listed.json()] == [row["id"]]


def test_upload_answers_location(uploader: User) -> None:
    r = upload(uploader.client, bundles.bundle(n_events=10, har_entries=1, screenshots=0))
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/sessions/{r.json()['id']}"
    assert r.json()["screenshot_count"] == 0


def test_network_jsonl_is_counted(uploader: User) -> None:
    lines = b"".join(json.dumps({"t": i, "url": f"https://shop.example/{i}"}).encode() + b"\n" for i in range(40))
    body = bundles.bundle(n_events=100, skip=("network.har",), extra={"network.jsonl": lines}, screenshots=0)
    row = upload_ok(uploader.client, body)
    assert (row["event_count"], row["network_count"]) == (100, 40)


def test_multipart_upload_with_metadata(uploader: User, bucket: Bucket) -> None:
    body = bundles.bundle(n_events=500, har_entries=7, screenshots=2)
    r = uploader.client.post("/sessions", files={"bundle": ("trace.zip", body, "application/zip")},
                             data={"metadata": json.dumps({"label": "nightly", "run": 7})})
    assert r.status_code == 201, r.text
    row = r.json()
    assert row["size_bytes"] == len(body) and row["sha256"] == hashlib.sha256(body).hexdigest()
    assert (row["event_count"], row["network_count"], row["screenshot_count"]) == (500, 7, 2)
    assert row["metadata"]["label"] == "nightly" and row["metadata"]["run"] == 7
    assert row["metadata"]["client"]["name"] == "tracepipe-recorder"
    assert bucket.read(f"sessions/{row['id']}/bundle.zip") == body


def test_tagging_a_suite_needs_membership(make_user: Callable[..., User], su: psycopg.Connection[dict[str, Any]],
                                          bucket: Bucket) -> None:
    owner, viewer, outsider = make_user(), make_user(), make_user()
    suite = create_suite(owner)
    add_member(owner, suite["id"], viewer, "viewer")
    tagged = bundles.bundle(manifest_data=bundles.manifest(suite_id=suite["id"]), n_events=50, screenshots=1)

    for member in (owner, viewer):
        row = upload_ok(member.client, tagged)
        assert row["suite_id"] == suite["id"] and row["user_id"] == member.id

    before = snapshot(su, bucket)
    r = upload(outsider.client, tagged)
    assert r.status_code == 403, r.text
    assert assert_error_body(r)["code"] == "42501"
    assert_nothing_left(su, bucket, before)
    # An unknown suite is refused the same way (no existence leak).
    other = bundles.bundle(manifest_data=bundles.manifest(suite_id=str(uuid.uuid4())), n_events=5, screenshots=0)
    r = upload(viewer.client, other)
    assert r.status_code == 403, r.text
    assert_nothing_left(su, bucket, before)


def test_a_read_only_key_cannot_upload(uploader: User, base_url: str, su: psycopg.Connection[dict[str, Any]],
                                       bucket: Bucket) -> None:
    key = create_key(uploader, access="read")
    with key_client(base_url, key["key"]) as client:
        before = snapshot(su, bucket)
        r = upload(client, bundles.bundle(n_events=5, screenshots=0))
        assert r.status_code == 403, r.text
        assert_error_body(r)
        assert_nothing_left(su, bucket, before)


# --- download ----------------------------------------------------------------------------------------
def test_download_is_byte_identical_with_etag_and_length(recorded: tuple[bytes, dict[str, Any]],
                                                         uploader: User) -> None:
    body, row = recorded
    r = uploader.client.get(f"/sessions/{row['id']}/bundle")
    assert r.status_code == 200, r.text
    assert r.content == body
    assert r.headers["etag"] == f'"{row["sha256"]}"'
    assert r.headers["content-length"] == str(len(body))
    assert r.headers["content-type"] == "application/zip"
    assert r.headers["accept-ranges"] == "bytes"


@pytest.mark.parametrize(("spec", "piece"), [
    ("bytes=0-99", slice(0, 100)),
    ("bytes=100-", slice(100, None)),
    ("bytes=-500", slice(-500, None)),
    ("bytes=1000-1999", slice(1000, 2000)),
    ("bytes=5-999999999", slice(5, None)),
])
def test_range_requests(recorded: tuple[bytes, dict[str, Any]], uploader: User, spec: str, piece: slice) -> None:
    body, row = recorded
    r = uploader.client.get(f"/sessions/{row['id']}/bundle", headers={"Range": spec})
    assert r.status_code == 206, r.text
    expected = body[piece]
    assert r.content == expected
    start = piece.start if piece.start >= 0 else len(body) + piece.start
    assert r.headers["content-range"] == f"bytes {start}-{start + len(expected) - 1}/{len(body)}"
    assert r.headers["content-length"] == str(len(expected))
    assert r.headers["etag"] == f'"{row["sha256"]}"'


def test_unsatisfiable_range_is_416(recorded: tuple[bytes, dict[str, Any]], uploader: User) -> None:
    body, row = recorded
    r = uploader.client.get(f"/sessions/{row['id']}/bundle", headers={"Range": f"bytes={len(body)}-"})
    assert r.status_code == 416, r.text
    assert r.headers["content-range"] == f"bytes */{len(body)}"
    assert_error_body(r)


def test_if_none_match(recorded: tuple[bytes, dict[str, Any]], uploader: User) -> None:
    body, row = recorded
    etag = f'"{row["sha256"]}"'
    r = uploader.client.get(f"/sessions/{row['id']}/bundle", headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b""
    assert r.headers["etag"] == etag
    r = uploader.client.get(f"/sessions/{row['id']}/bundle", headers={"If-None-Match": '"something-else"'})
    assert r.status_code == 200 and r.content == body


@pytest.mark.parametrize(("name", "media_type"), [
    ("screenshots/0000.png", "image/png"),
    ("screenshots/0002.png", "image/png"),
    ("events.jsonl", "application/jsonl"),
    ("network.har", "application/json"),
    ("manifest.json", "application/json"),
])
def test_member_files(recorded: tuple[bytes, dict[str, Any]], uploader: User, name: str, media_type: str) -> None:
    body, row = recorded
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        expected = zf.read(name)
    r = uploader.client.get(f"/sessions/{row['id']}/files/{name}")
    assert r.status_code == 200, r.text
    assert r.content == expected
    assert r.headers["content-type"].split(";")[0] == media_type
    assert r.headers["content-length"] == str(len(expected))
    if name.startswith("screenshots/"):
        assert expected == bundles.png(seed=int(name[-8:-4]))


def test_missing_member_is_404(recorded: tuple[bytes, dict[str, Any]], uploader: User) -> None:
    r = uploader.client.get(f"/sessions/{recorded[1]['id']}/files/screenshots/9999.png")
    assert r.status_code == 404
    assert_error_body(r)


# --- visibility and deletion -------------------------------------------------------------------------
def test_invisible_sessions_are_404(recorded: tuple[bytes, dict[str, Any]], stranger: User, anon: httpx.Client,
                                    uploader: User, bucket: Bucket) -> None:
    sid = recorded[1]["id"]
    for path in (f"/sessions/{sid}", f"/sessions/{sid}/bundle", f"/sessions/{sid}/files/events.jsonl"):
        r = stranger.client.get(path)
        assert r.status_code == 404, (path, r.status_code, r.text)
        assert_error_body(r)
        r = anon.get(path)
        assert r.status_code == 401, (path, r.status_code, r.text)
        assert_error_body(r)
    assert stranger.client.get("/sessions", params={"id": f"eq.{sid}"}).json() == []
    r = stranger.client.delete(f"/sessions/{sid}")
    assert r.status_code == 404, r.text
    assert_error_body(r)
    for path in (f"/sessions/{uuid.uuid4()}/bundle", f"/sessions/{uuid.uuid4()}/files/events.jsonl"):
        r = uploader.client.get(path)
        assert r.status_code == 404, (path, r.status_code, r.text)
        assert_error_body(r)
    r = uploader.client.get("/sessions/not-a-uuid/bundle")  # a malformed id names the parameter (DESIGN §9)
    assert r.status_code == 400 and "id" in assert_error_body(r)["details"], r.text
    r = uploader.client.delete(f"/sessions/{uuid.uuid4()}")
    assert r.status_code == 404
    # Still there for its uploader.
    assert uploader.client.get(f"/sessions/{sid}").status_code == 200
    assert bucket.exists(f"sessions/{sid}/bundle.zip")


def test_suite_members_read_but_only_the_uploader_deletes(make_user: Callable[..., User],
                                                          su: psycopg.Connection[dict[str, Any]],
                                                          bucket: Bucket) -> None:
    owner, editor = make_user(), make_user()
    suite = create_suite(owner)
    add_member(owner, suite["id"], editor, "editor")
    body = bundles.bundle(manifest_data=bundles.manifest(suite_id=suite["id"]), n_events=20, screenshots=1)
    row = upload_ok(editor.client, body)
    key = f"sessions/{row['id']}/bundle.zip"

    # The suite's owner sees the session its editor uploaded...
    assert owner.client.get(f"/sessions/{row['id']}").json()["id"] == row["id"]
    assert owner.client.get(f"/sessions/{row['id']}/bundle").content == body
    # ...but may not delete it: 403, and the row and the object stay.
    r = owner.client.delete(f"/sessions/{row['id']}")
    assert r.status_code == 403, r.text
    assert_error_body(r)
    assert su.execute("select 1 from app.sessions where id = %s", [row["id"]]).fetchone() is not None
    assert bucket.exists(key)

    # The uploader deletes it: the row, its object, and its outbox record are gone.
    r = editor.client.delete(f"/sessions/{row['id']}")
    assert r.status_code == 200, r.text
    assert r.json()["id"] == row["id"]
    assert su.execute("select 1 from app.sessions where id = %s", [row["id"]]).fetchone() is None
    assert not bucket.exists(key)
    assert not bucket.keys(f"sessions/{row['id']}/")
    assert su.execute("select 1 from app.object_deletions where prefix = %s",
                      [f"sessions/{row['id']}/"]).fetchone() is None
    assert editor.client.get(f"/sessions/{row['id']}/bundle").status_code == 404
    assert editor.client.get(f"/sessions/{row['id']}").status_code == 404
    assert editor.client.delete(f"/sessions/{row['id']}").status_code == 404


# --- bad input: the documented status and error body, and nothing left behind -------------------------
def _with_line(n_events: int, number: int, line: bytes) -> bytes:
    lines = bundles.events(n_events).splitlines(keepends=True)
    lines[number - 1] = line + b"\n"
    return bundles.bundle(manifest_data=None, n_events=0, screenshots=0,
                          extra={"events.jsonl": b"".join(lines)})


def _corrupt_stored_member() -> bytes:
    """events.jsonl stored (not deflated) with one digit changed: still valid JSON lines,
    but its CRC no longer matches."""
    data = bundles.bundle(n_events=300, screenshots=0, compression=zipfile.ZIP_STORED)
    at = data.index(b'"t": 1230')
    return data[:at + 6] + b"7" + data[at + 7:]


def _truncated() -> bytes:
    data = bundles.bundle()
    return data[: len(data) // 2]


def _too_many_members() -> bytes:
    entries = bundles.members(screenshots=0)
    entries += [(f"screenshots/{i:05d}.png", b"") for i in range(EXT.max_bundle_members + 1 - len(entries))]
    return bundles.zip_of(entries, zipfile.ZIP_STORED)


def _declares_too_much() -> bytes:
    """Screenshots whose central directory claims 3.75 GiB each (at a ratio under the limit),
    together more than the expanded-size limit: refused before anything is read."""
    declared = 0xF0000000
    count = EXT.max_bundle_expanded_bytes // declared + 1
    data = bundles.zip_of(bundles.members(screenshots=count))
    for i in range(count):
        data = bundles.patch_central_directory(data, f"screenshots/{i:04d}.png",
                                               compressed=int(declared / EXT.max_compression_ratio) + MiB,
                                               uncompressed=declared)
    return data


def _manifest(**fields: Any) -> bytes:
    return bundles.bundle(manifest_data=bundles.manifest(**fields), n_events=20, screenshots=0)


@dataclass(frozen=True)
class Bad:
    build: Callable[[], bytes]
    status: int
    message: str  # a piece of the error message
    details: Any = None  # when set: a piece of the details (dict subset or substring)
    content_type: str = "application/zip"


BAD_INPUTS: dict[str, Bad] = {
    "empty body": Bad(lambda: b"", 400, "empty body"),
    "not a zip": Bad(lambda: b"this is a text file, not a zip archive\n" * 50, 400, "not a zip archive"),
    "truncated zip": Bad(_truncated, 400, "not a zip archive"),
    "zip header only": Bad(lambda: b"PK\x03\x04" + bytes(200), 400, "not a zip archive"),
    "corrupt member (bad CRC)": Bad(_corrupt_stored_member, 400, "corrupt"),
    "member longer than its declared size": Bad(
        lambda: bundles.patch_central_directory(bundles.bundle(n_events=2000, screenshots=0), "events.jsonl",
                                                uncompressed=100), 400, "corrupt"),
    "missing manifest": Bad(lambda: bundles.bundle(skip=("manifest.json",)), 422, "manifest.json is missing",
                            "manifest.json"),
    "manifest not JSON": Bad(lambda: bundles.bundle(extra={"manifest.json": b"{format_version: 1"}), 422,
                             "manifest.json is not valid JSON"),
    "manifest without started_at": Bad(lambda: _manifest(started_at=None), 422, "started_at",
                                       {"field": "started_at"}),
    "manifest without client": Bad(lambda: _manifest(client=None), 422, "client", {"field": "client"}),
    "manifest client.name not a string": Bad(lambda: _manifest(client={"name": 42, "version": "1"}), 422,
                                             "client.name", {"field": "client.name"}),
    "manifest client without version": Bad(lambda: _manifest(client={"name": "rec"}), 422, "client.version",
                                           {"field": "client.version"}),
    "manifest unknown format_version": Bad(lambda: _manifest(format_version=2), 422, "format_version",
                                           {"field": "format_version"}),
    "manifest started_at not a date-time": Bad(lambda: _manifest(started_at="yesterday"), 422, "started_at",
                                               {"field": "started_at"}),
    "manifest suite_id not a uuid": Bad(lambda: _manifest(suite_id="checkout"), 422, "suite_id",
                                        {"field": "suite_id"}),
    "manifest ends before it starts": Bad(lambda: _manifest(ended_at="2026-11-01T09:00:00Z"), 422, "ended_at"),
    "missing events.jsonl": Bad(lambda: bundles.bundle(skip=("events.jsonl",)), 422, "events.jsonl is missing"),
    "member name with ..": Bad(lambda: bundles.zip_of([*bundles.members(), ("../escape.png", bundles.png())]),
                               422, "unsafe member path", "../escape.png"),
    "member name with .. inside": Bad(
        lambda: bundles.zip_of([*bundles.members(), ("screenshots/../../etc/cron.d/x.png", bundles.png())]),
        422, "unsafe member path"),
    "absolute member name": Bad(lambda: bundles.zip_of([*bundles.members(), ("/etc/passwd", b"root:x:0:0")]),
                                422, "unsafe member path", "/etc/passwd"),
    "drive letter member name": Bad(lambda: bundles.zip_of([*bundles.members(), ("C:/evil.png", bundles.png())]),
                                    422, "unsafe member path"),
    "backslash in member name": Bad(
        lambda: bundles.zip_of([*bundles.members(), ("screenshots\\..\\evil.png", bundles.png())]),
        422, "unsafe member path"),
    "NUL in member name": Bad(
        lambda: bundles.zip_of([*bundles.members(), ("screenshots/9999.png\x00/../../evil.sh", bundles.png())]),
        422, "unsafe member path"),
    "duplicate member": Bad(lambda: bundles.zip_of([*bundles.members(), ("screenshots/0000.png", bundles.png())]),
                            422, "duplicate member"),
    "unexpected member": Bad(lambda: bundles.zip_of([*bundles.members(), ("notes.txt", b"hello")]), 422,
                             "unexpected member", "notes.txt"),
    "screenshot that is not a PNG": Bad(
        lambda: bundles.zip_of([*bundles.members(screenshots=0), ("screenshots/0000.png", b"GIF89a" + bytes(64))]),
        422, "not the image"),
    "too many members": Bad(_too_many_members, 413, "too many members"),
    "zip bomb (compression ratio)": Bad(bundles.bomb, 413, "compression ratio"),
    "expanded size over the limit": Bad(_declares_too_much, 413, "expands beyond the size limit"),
    "events.jsonl line not JSON": Bad(lambda: _with_line(3000, 1234, b'{"t": 1, "type": '), 422, "line 1234",
                                      {"file": "events.jsonl", "line": 1234}),
    "events.jsonl line without type": Bad(lambda: _with_line(3000, 2999, b'{"t": 1}'), 422, "line 2999",
                                          {"file": "events.jsonl", "line": 2999}),
    "events.jsonl line not an object": Bad(lambda: _with_line(50, 7, b"[1, 2]"), 422, "line 7",
                                           {"file": "events.jsonl", "line": 7}),
    "network.har not JSON": Bad(lambda: bundles.bundle(extra={"network.har": b'{"log": {"entries": [{'}), 422,
                                "network.har"),
    "wrong content type (text/plain)": Bad(bundles.bundle, 415, "unsupported content type",
                                           content_type="text/plain"),
    "wrong content type (JSON)": Bad(bundles.bundle, 415, "unsupported content type",
                                     content_type="application/json"),
}


def _matches(details: Any, expected: Any) -> bool:
    if isinstance(expected, dict):
        return isinstance(details, dict) and all(details.get(k) == v for k, v in expected.items())
    return expected in json.dumps(details)


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_is_refused_and_leaves_nothing(case: str, uploader: User, su: psycopg.Connection[dict[str, Any]],
                                                bucket: Bucket) -> None:
    bad = BAD_INPUTS[case]
    body = bad.build()
    before = snapshot(su, bucket)
    r = uploader.client.post("/sessions", content=body, headers={"Content-Type": bad.content_type})
    assert r.status_code == bad.status, (r.status_code, r.text[:500])
    err = assert_error_body(r)
    assert bad.message in err["message"], err
    if bad.details is not None:
        assert _matches(err["details"], bad.details), err
    assert_nothing_left(su, bucket, before)


def test_no_content_type_is_415(uploader: User, su: psycopg.Connection[dict[str, Any]], bucket: Bucket) -> None:
    before = snapshot(su, bucket)
    r = uploader.client.post("/sessions", content=bundles.bundle())
    assert r.status_code == 415, r.text
    assert_error_body(r)
    assert_nothing_left(su, bucket, before)


@pytest.mark.parametrize(("files", "data", "status", "message"), [
    ({"other": ("x.zip", b"zip", "application/zip")}, None, 422, "unexpected form field"),
    (None, {"metadata": "{}"}, 422, "bundle is missing"),
    ({"bundle": ("x.zip", b"", "application/zip")}, None, 400, "is empty"),
    ({"bundle": ("x.zip", bundles.bundle(), "application/zip")}, {"metadata": "{not json"}, 422, "not valid JSON"),
    ({"bundle": ("x.zip", bundles.bundle(), "application/zip")}, {"metadata": "[1, 2]"}, 422, "JSON object"),
    ({"bundle": ("x.zip", b"not a zip at all", "application/zip")}, None, 400, "not a zip archive"),
], ids=["unexpected field", "no bundle field", "empty bundle", "metadata not JSON", "metadata not an object",
        "bundle not a zip"])
def test_bad_multipart_is_refused_and_leaves_nothing(files: Any, data: Any, status: int, message: str,
                                                     uploader: User, su: psycopg.Connection[dict[str, Any]],
                                                     bucket: Bucket) -> None:
    before = snapshot(su, bucket)
    if files is None:  # a form without any file part
        r = uploader.client.post("/sessions", files={"metadata": (None, data["metadata"])})
    else:
        r = uploader.client.post("/sessions", files=files, data=data)
    assert r.status_code == status, r.text
    assert message in assert_error_body(r)["message"]
    assert_nothing_left(su, bucket, before)


def _unterminated_multipart() -> bytes:
    """A complete, valid bundle in a form whose closing boundary never comes."""
    return (b'--xyz\r\nContent-Disposition: form-data; name="bundle"; filename="b.zip"\r\n'
            b"Content-Type: application/zip\r\n\r\n" + bundles.bundle(n_events=10, screenshots=0))


@pytest.mark.parametrize(("body", "content_type"), [
    (b"--xyz\r\nnot a part header at all", "multipart/form-data; boundary=xyz"),
    (_unterminated_multipart(), "multipart/form-data; boundary=xyz"),
    (b"whatever", "multipart/form-data"),
], ids=["bad part header", "no closing boundary", "no boundary parameter"])
def test_malformed_multipart_is_400(body: bytes, content_type: str, uploader: User,
                                    su: psycopg.Connection[dict[str, Any]], bucket: Bucket) -> None:
    before = snapshot(su, bucket)
    r = uploader.client.post("/sessions", content=body, headers={"Content-Type": content_type})
    assert r.status_code == 400, r.text
    assert "multipart body" in assert_error_body(r)["message"]
    assert_nothing_left(su, bucket, before)


def proxy_limit(stack: Stack) -> int:
    """nginx's client_max_body_size for POST /sessions (TP_MAX_UPLOAD_BODY, e.g. 5g) in bytes."""
    limit = stack.s.max_upload_body.lower()
    units = {"k": 1024, "m": MiB, "g": 1024**3}
    return int(limit[:-1]) * units[limit[-1]] if limit[-1] in units else int(limit)


def test_body_over_the_proxy_limit_is_413_without_sending_it(stack: Stack, uploader: User,
                                                             su: psycopg.Connection[dict[str, Any]],
                                                             bucket: Bucket) -> None:
    """nginx refuses a declared Content-Length above TP_MAX_UPLOAD_BODY before the body."""
    before = snapshot(su, bucket)
    raw = RawPost(stack, uploader.token, proxy_limit(stack) + 1)
    try:
        raw.send(64 * 1024, stop_when_answered=True)
        status, headers, body = raw.answer()
    finally:
        raw.close()
    assert status == 413, body
    assert headers["content-type"].startswith("application/json")
    assert error_of(body)["code"] == "TP413"
    assert_nothing_left(su, bucket, before)


def test_body_over_the_ext_limit_is_413_without_sending_it(stack: Stack, uploader: User,
                                                           su: psycopg.Connection[dict[str, Any]],
                                                           bucket: Bucket) -> None:
    """Below the proxy's limit, ext refuses a declared length above TP_EXT_MAX_BUNDLE_BYTES
    before reading the body."""
    assert proxy_limit(stack) > EXT.max_bundle_bytes, "the proxy's limit must be above ext's for this test"
    before = snapshot(su, bucket)
    raw = RawPost(stack, uploader.token, EXT.max_bundle_bytes + 1)
    try:
        raw.send(MiB, stop_when_answered=True)
        status, _, body = raw.answer()
    finally:
        raw.close()
    assert status == 413, body
    err = error_of(body)
    assert err["code"] == "TP413" and str(EXT.max_bundle_bytes) in str(err["details"]), err
    assert_nothing_left(su, bucket, before)


# --- idempotency ---------------------------------------------------------------------------------------
def test_idempotent_retry_returns_the_first_result(make_user: Callable[..., User],
                                                   su: psycopg.Connection[dict[str, Any]], bucket: Bucket) -> None:
    alice, bob = make_user(), make_user()
    key = {"Idempotency-Key": f"upload-{uuid.uuid4()}"}
    body = bundles.bundle(n_events=123, screenshots=1)

    first = upload(alice.client, body, key)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    after_first = snapshot(su, bucket)

    retry = upload(alice.client, body, key)
    assert retry.status_code == 201, retry.text
    assert retry.headers.get("idempotent-replayed") == "true"
    assert retry.json() == first.json()
    assert su.execute("select count(*) as n from app.sessions where user_id = %s",
                      [alice.id]).fetchone() == {"n": 1}
    assert_nothing_left(su, bucket, after_first)

    # The same key with a different body: 409, nothing stored.
    conflict = upload(alice.client, bundles.bundle(n_events=124, screenshots=1), key)
    assert conflict.status_code == 409, conflict.text
    assert assert_error_body(conflict)["code"] == "TP409"
    # The same bundle with other metadata is another request too.
    other_meta = alice.client.post("/sessions", headers=key, files={"bundle": ("b.zip", body, "application/zip")},
                                   data={"metadata": json.dumps({"label": "different"})})
    assert other_meta.status_code == 409, other_meta.text
    assert_nothing_left(su, bucket, after_first)

    # Keys are per caller: Bob's upload with Alice's key is his own session.
    bobs = upload(bob.client, body, key)
    assert bobs.status_code == 201, bobs.text
    assert bobs.json()["id"] != first.json()["id"] and bobs.json()["user_id"] == bob.id
    assert "idempotent-replayed" not in bobs.headers


def test_a_failed_upload_does_not_burn_its_idempotency_key(uploader: User, su: psycopg.Connection[dict[str, Any]],
                                                           bucket: Bucket) -> None:
    key = {"Idempotency-Key": f"upload-{uuid.uuid4()}"}
    before = snapshot(su, bucket)
    bad = upload(uploader.client, bundles.bundle(skip=("manifest.json",)), key)
    assert bad.status_code == 422
    assert_nothing_left(su, bucket, before)
    good = upload(uploader.client, bundles.bundle(n_events=9, screenshots=0), key)
    assert good.status_code == 201, good.text
    assert "idempotent-replayed" not in good.headers


def test_invalid_idempotency_key_is_400(uploader: User) -> None:
    r = upload(uploader.client, bundles.bundle(), {"Idempotency-Key": "x" * 300})
    assert r.status_code == 400, r.text
    assert_error_body(r)


# --- client disconnect ------------------------------------------------------------------------------
def wait_for(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_client_disconnect_mid_upload_leaves_nothing(stack: Stack, uploader: User,
                                                     su: psycopg.Connection[dict[str, Any]], bucket: Bucket) -> None:
    before = snapshot(su, bucket)
    raw = RawPost(stack, uploader.token, 96 * MiB)
    try:
        raw.send(40 * MiB)
        # The body really is streaming into a multipart upload (so the check below means something).
        wait_for("a multipart upload to open", bucket.open_uploads, 15)
    finally:
        raw.close()
    assert_nothing_left(su, bucket, before, within=15)
    # ext is fine afterwards.
    assert upload(uploader.client, bundles.bundle(n_events=3, screenshots=0)).status_code == 201


# --- a large bundle under a memory bound ------------------------------------------------------------
def ext_workers(stack: Stack) -> list[int]:
    """Pids of ext's live uvicorn worker processes (children of the process the stack
    started; a worker killed earlier may linger as a zombie, without memory: skipped)."""
    parent = stack.pid_of("ext")
    assert parent is not None
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            except (OSError, ValueError):
                continue
            if int(ppid) == parent and state not in ("Z", "X"):
                children.append(int(entry.name))
    assert children, "ext runs no worker process"
    return children


def status_kib(pid: int, field: str) -> int:
    """A memory figure of /proc/<pid>/status in bytes; 0 once the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Samples VmRSS of the given processes every 50 ms in a thread; where the kernel lets us,
    also resets their VmHWM first (clear_refs 5) so VmHWM covers exactly this window."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.sampled = dict.fromkeys(pids, 0)
        self.start = {pid: status_kib(pid, "VmRSS") for pid in pids}
        self.hwm_reset = True
        for pid in pids:
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                self.hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.pids:
                self.sampled[pid] = max(self.sampled[pid], status_kib(pid, "VmRSS"))
            self._stop.wait(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.hwm = {pid: status_kib(pid, "VmHWM") for pid in self.pids}

    @property
    def peak(self) -> int:
        return max([*self.sampled.values(), *(self.hwm.values() if self.hwm_reset else [])])

    @property
    def grown(self) -> int:
        """The most any one process grew in the window: what the transfer itself added."""
        return max(max(self.sampled[p], self.hwm[p] if self.hwm_reset else 0) - self.start[p] for p in self.pids)

    def report(self) -> str:
        return ", ".join(f"pid {p}: {self.start[p] / MiB:.0f} MiB before, peak sampled {self.sampled[p] / MiB:.0f}"
                         f" MiB, VmHWM {self.hwm[p] / MiB:.0f} MiB" for p in self.pids) \
            + ("" if self.hwm_reset else " (VmHWM not reset)")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def large_bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("large") / "bundle.zip"
    bundles.write_large_bundle(str(path), screenshots=52, screenshot_bytes=4 * MiB)
    yield path
    path.unlink()


@pytest.mark.slow
def test_large_bundle_streams_in_bounded_memory(stack: Stack, uploader: User, large_bundle: Path,
                                                bucket: Bucket, capsys: pytest.CaptureFixture[str]) -> None:
    size = large_bundle.stat().st_size
    assert size >= 200 * MiB
    digest = sha256_of(large_bundle)
    workers = ext_workers(stack)

    with PeakRss(workers) as upload_rss, large_bundle.open("rb") as f:
        r = uploader.client.post("/sessions", content=f, headers={**ZIP, "Content-Length": str(size)},
                                 timeout=300)
    assert r.status_code == 201, r.text
    row = r.json()
    assert row["size_bytes"] == size and row["sha256"] == digest
    assert row["screenshot_count"] == 52 and row["event_count"] == 5000 and row["network_count"] == 50
    assert not bucket.open_uploads(f"sessions/{row['id']}/")  # this upload's (other tests leave tus ones open)

    h = hashlib.sha256()
    received = 0
    with PeakRss(workers) as download_rss, \
            uploader.client.stream("GET", f"/sessions/{row['id']}/bundle", timeout=300) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-length"] == str(size)
        for chunk in resp.iter_bytes(MiB):
            h.update(chunk)
            received += len(chunk)
    assert received == size and h.hexdigest() == digest

    # One screenshot out of the middle, by ranged reads of the stored zip.
    with zipfile.ZipFile(large_bundle) as zf:
        expected = hashlib.sha256(zf.read("screenshots/0026.png")).hexdigest()
    member = uploader.client.get(f"/sessions/{row['id']}/files/screenshots/0026.png", timeout=120)
    assert member.status_code == 200 and hashlib.sha256(member.content).hexdigest() == expected

    with capsys.disabled():
        print(f"\n[200 MiB bundle, {size / MiB:.0f} MiB] ext peak RSS during upload: {upload_rss.report()};"
              f" during download: {download_rss.report()}")
    assert upload_rss.peak < RSS_BOUND, upload_rss.report()
    assert download_rss.peak < RSS_BOUND, download_rss.report()


# --- the orphan sweep ---------------------------------------------------------------------------------
def test_sweep_removes_orphans_older_than_the_grace(stack_env: dict[str, str], uploader: User, bucket: Bucket,
                                                    recorded: tuple[bytes, dict[str, Any]]) -> None:
    kept = f"sessions/{recorded[1]['id']}/bundle.zip"
    orphan = f"sessions/{uuid.uuid4()}/bundle.zip"
    bucket.s3.put_object(Bucket=bucket.name, Key=orphan, Body=b"left behind by a crash")
    stale = bucket.s3.create_multipart_upload(Bucket=bucket.name, Key=f"sessions/{uuid.uuid4()}/bundle.zip")

    # With the default grace (an hour) a fresh orphan is left alone.
    result = run_cli(stack_env, "sweep")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["orphans_removed"] == 0 and report["uploads_aborted"] == 0, report
    assert bucket.exists(orphan)

    time.sleep(1.1)  # object times have a resolution of a second
    result = run_cli(stack_env, "sweep", "--grace-seconds", "0")
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    report = json.loads(lines[0])
    assert report["orphans_removed"] >= 1 and report["uploads_aborted"] >= 1, report
    assert not bucket.exists(orphan)
    assert stale["UploadId"] not in [u["UploadId"] for u in bucket.open_uploads()]
    assert bucket.exists(kept)
    assert uploader.client.get(f"/sessions/{recorded[1]['id']}/bundle").content == recorded[0]


def test_sweep_refuses_a_negative_grace(stack_env: dict[str, str]) -> None:
    result = run_cli(stack_env, "sweep", "--grace-seconds", "-1", check=False)
    assert result.returncode == 1 and "grace" in result.stderr
