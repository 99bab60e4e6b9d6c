"""Hostile input to the bundle and example parsers (issue 13, items 1, 2, 7, 11), through the
proxy against the real stack: each hostile upload answers 413/422 (400 for a corrupt
archive) in the {code, message, details, hint} body naming the member, line and limit,
leaves nothing (no row, no object, no open multipart upload) and ends no ext worker (the
uvicorn workers' pids are the same after it). The ext workers' peak RSS during each
upload is sampled and printed (run with -s to see the figures)."""

from __future__ import annotations

import base64
import io
import json
import random
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from ext import bundles as ext_bundles
from ext.config import ExtSettings
from ext.errors import ApiError
from ext.jsonl import JsonBounds, JsonLimitError
from tests import bundles
from tests.conftest import User, add_member, assert_error_body, create_suite
from tests.test_sessions import RSS_BOUND, Bucket, PeakRss, assert_nothing_left, ext_workers, make_bucket, snapshot
from tracepipe.stack import Stack

EXT = ExtSettings()
MiB = 1024 * 1024
DEEP = 200_000  # the reproduction: 1.3 KB deflated
# What one hostile upload may add to a worker's RSS: the body's parts in flight (2 × 8 MiB),
# a ranged read (8 MiB) and the longest token yajl may buffer (max_json_token_bytes).
HOSTILE_RSS_GROWTH = 64 * MiB


def growth(rss: PeakRss) -> int:
    """The largest rise of one process's RSS during the window."""
    return max(max(rss.sampled[p], rss.hwm[p] if rss.hwm_reset else 0) - rss.start[p] for p in rss.pids)


@pytest.fixture(scope="module")
def uploader(make_user: Callable[..., User]) -> User:
    return make_user()


@pytest.fixture(scope="module")
def bucket(stack: Stack) -> Bucket:
    return make_bucket(stack)


@dataclass(frozen=True)
class Hostile:
    build: Callable[[], bytes]
    status: int
    message: str  # a piece of the error message
    details: dict[str, Any]  # a subset of the error details


def _line(number: int, line: bytes, n: int = 10) -> bytes:
    lines = bundles.events(n).splitlines(keepends=True)
    lines[number - 1] = line + b"\n"
    return bundles.bundle(n_events=0, screenshots=0, extra={"events.jsonl": b"".join(lines)})


def _long_string_har() -> bytes:
    """A HAR with one string one byte over max_json_token_bytes, stored (no ratio refusal)."""
    text = b"x" * (EXT.max_json_token_bytes + 1)
    return bundles.bundle(screenshots=0, compression=zipfile.ZIP_STORED,
                          extra={"network.har": b'{"log":{"entries":[{"comment":"' + text + b'"}]}}'})


def _undeclared_members() -> bytes:
    """More members than allowed in the central directory, while the end record declares 6."""
    return bundles.declare_entries(bundles.many_members(EXT.max_bundle_members + 5), 6)


def _huge_directory() -> bytes:
    """Few members with long names: a central directory over max_central_directory_bytes."""
    name = "screenshots/" + "n" * 4000
    count = EXT.max_central_directory_bytes // 4000 + 10
    return bundles.zip_of([*bundles.members(), *((f"{name}{i:05d}.png", b"") for i in range(count))],
                          zipfile.ZIP_STORED)


def _nested_zip() -> bytes:
    return bundles.zip_of([*bundles.members(screenshots=0), ("screenshots/0000.png", bundles.bundle())])


HOSTILE: dict[str, Hostile] = {
    # item 1: depth
    "network.har nested 200,000 deep": Hostile(
        lambda: bundles.bundle(extra={"network.har": bundles.deep_json(DEEP)}), 422, "network.har",
        {"file": "network.har", "limit": "max_json_depth", "max": EXT.max_json_depth}),
    "manifest.json nested 200,000 deep": Hostile(
        lambda: bundles.bundle(extra={"manifest.json": bundles.deep_json(DEEP, b'{"metadata":{"a":', b"}}")}),
        422, "manifest.json", {"file": "manifest.json", "limit": "max_json_depth"}),
    "events.jsonl line nested 200,000 deep": Hostile(
        lambda: _line(5, bundles.deep_json(DEEP, b'{"t":1,"type":"x","a":', b"}")), 422, "events.jsonl: line 5",
        {"file": "events.jsonl", "line": 5, "limit": "max_json_depth"}),
    "network.har string over the token limit": Hostile(
        _long_string_har, 413, "network.har", {"file": "network.har", "limit": "max_json_token_bytes"}),
    # item 2: the end record, before the central directory
    "100,000 members (9 MB)": Hostile(
        lambda: bundles.many_members(100_000), 413, "too many members",
        {"limit": "max_bundle_members", "declared": 100_000}),
    "more members than the end record declares": Hostile(
        _undeclared_members, 413, "too many members", {"limit": "max_bundle_members"}),
    "end record declares fewer members than the directory holds": Hostile(
        lambda: bundles.declare_entries(bundles.bundle(), 2), 422, "disagree on the member count", {"declared": 2}),
    "central directory over its size limit": Hostile(
        _huge_directory, 413, "central directory is too large", {"limit": "max_central_directory_bytes"}),
    # item 7: smuggling
    "directory entry carrying bytes": Hostile(
        lambda: bundles.directory_carrying(b"hidden payload"), 422, "directory entry carries bytes",
        {"member": "screenshots/"}),
    "directory entry other than screenshots/": Hostile(
        lambda: bundles.directory_carrying(b"", "stash/"), 422, "unexpected directory entry", {"member": "stash/"}),
    "bytes before the first local header": Hostile(
        lambda: b"#!/bin/sh\nexit 0\n" + bundles.bundle(), 422, "bytes before the first member", {}),
    "bytes after the end record": Hostile(
        lambda: bundles.bundle() + b"smuggled", 422, "bytes after the end", {"trailing_bytes": 8}),
    "zip comment over the limit": Hostile(
        lambda: bundles.with_comment(bundles.bundle(), b"c" * (EXT.max_zip_comment_bytes + 1)), 422,
        "comment is too long", {"limit": "max_zip_comment_bytes"}),
    "case variant Screenshots/A.PNG": Hostile(
        lambda: bundles.zip_of([*bundles.members(), ("Screenshots/A.PNG", bundles.png())]), 422, "in case",
        {"member": "Screenshots/A.PNG"}),
    "case variant Manifest.json (instead of manifest.json)": Hostile(
        lambda: bundles.zip_of([(("Manifest.json" if n == "manifest.json" else n), d) for n, d in bundles.members()]),
        422, "in case", {"member": "Manifest.json"}),
    "two names differing only in case": Hostile(
        lambda: bundles.zip_of([*bundles.members(screenshots=0), ("screenshots/A.png", bundles.png()),
                                ("screenshots/a.png", bundles.png())]), 422, "only in case",
        {"member": "screenshots/a.png"}),
    "zip inside screenshots": Hostile(_nested_zip, 422, "nested archive", {"member": "screenshots/0000.png"}),
    "gzip as network.har": Hostile(
        lambda: bundles.bundle(extra={"network.har": b"\x1f\x8b\x08\x00" + bytes(64)}), 422, "nested archive",
        {"member": "network.har"}),
    "bytes between two members": Hostile(
        lambda: bundles.raw_zip([(n, d, b"hidden" if n == "events.jsonl" else b"") for n, d in bundles.members()]),
        422, "bytes between the members", {"member": "network.har"}),
    "bytes between the last member and the central directory": Hostile(
        lambda: bundles.raw_zip([(n, d, b"hidden" if n == "screenshots/0000.png" else b"")
                                 for n, d in bundles.members()]), 422, "bytes between the last member", {}),
    "bytes after a member's deflate stream, inside its compressed size": Hostile(
        lambda: bundles.raw_zip([(n, d, b"IN:hidden" if n == "events.jsonl" else b"") for n, d in bundles.members()]),
        422, "after the end of a member's compressed data", {"member": "events.jsonl"}),
    "zip appended to a PNG (polyglot)": Hostile(
        lambda: bundles.bundle(screenshots=0,
                               extra={"screenshots/p.png": bundles.png() + bundles.zip_of([("x", b"y")])}),
        422, "bytes after the end of the image", {"member": "screenshots/p.png"}),
    "bytes after a JPEG's end marker": Hostile(
        lambda: bundles.bundle(screenshots=0, extra={
            "screenshots/p.jpg": b"\xff\xd8\xff\xe0" + bytes(100) + b"\xff\xd9" + b"PK\x05\x06" + bytes(18)}),
        422, "bytes after the end of the image", {"member": "screenshots/p.jpg"}),
    # item 11: names and CRCs
    "newline in a member name": Hostile(
        lambda: bundles.zip_of([*bundles.members(screenshots=0), ("screenshots/a.png\n", bundles.png())]), 422,
        "control character", {}),
    "bidi override in a member name": Hostile(
        lambda: bundles.zip_of([*bundles.members(screenshots=0), ("screenshots/a\u202egnp.png", bundles.png())]),
        422, "control character", {}),
    "screenshot with a bad CRC": Hostile(
        lambda: bundles.corrupt_member("screenshots/0000.png", bundles.png(64, 64, noise=True)), 400, "corrupt",
        {"member": "screenshots/0000.png"}),
    "network.har with a bad CRC": Hostile(
        lambda: bundles.corrupt_member("network.har", bundles.har(30)), 400, "corrupt", {"member": "network.har"}),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_bundle_is_refused_leaves_nothing_and_ends_no_worker(
        case: str, stack: Stack, uploader: User, su: psycopg.Connection[dict[str, Any]], bucket: Bucket) -> None:
    hostile = HOSTILE[case]
    body = hostile.build()
    before = snapshot(su, bucket)
    workers = ext_workers(stack)
    with PeakRss(workers) as rss:
        r = uploader.client.post("/sessions", content=body, headers={"Content-Type": "application/zip"})
    print(f"\n[{case}: {len(body)} bytes] HTTP {r.status_code}; ext workers: {rss.report()}")
    assert r.status_code == hostile.status, (r.status_code, r.text[:500])
    err = assert_error_body(r)
    assert hostile.message in err["message"], err
    assert isinstance(err["details"], dict) and hostile.details.items() <= err["details"].items(), err
    if "limit" in hostile.details:
        assert err["hint"] and f"TP_EXT_{hostile.details['limit'].upper()}" in err["hint"], err
    assert ext_workers(stack) == workers, "an ext worker died during the upload"
    assert_nothing_left(su, bucket, before)
    assert rss.peak < RSS_BOUND + HOSTILE_RSS_GROWTH and growth(rss) < HOSTILE_RSS_GROWTH, rss.report()


def _with_data_descriptors() -> bytes:
    class Pipe(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b: Any) -> int:
            self.data += b
            return len(b)

    pipe = Pipe()
    with zipfile.ZipFile(pipe, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in bundles.members(screenshots=2):
            with zf.open(name, "w") as f:
                f.write(data)
    return bytes(pipe.data)


@pytest.mark.parametrize("build", [
    lambda: bundles.directory_carrying(b""),  # the screenshots/ entry zip tools write: empty
    lambda: bundles.with_comment(bundles.bundle(), b"recorded by tracepipe-recorder 1.4.2"),  # a short comment
    lambda: bundles.bundle(har_data=bundles.deep_json(EXT.max_json_depth - 3)),  # exactly at the depth limit
    lambda: bundles.bundle(extra={"network.har": b'{"log":{"entries":[{"comment":"' + b"\\\"x" * 300_000
                                                 + b'"}, {"a": [1, 2]}]}}'}),  # escapes, within the token limit
    lambda: bundles.raw_zip([(n, d, b"") for n, d in bundles.members(screenshots=2)]),  # written by another tool
    _with_data_descriptors,  # written to a pipe: each member followed by its data descriptor
    lambda: bundles.bundle(screenshots=0, extra={  # a JPEG and a WebP that end where they say
        "screenshots/a.jpg": b"\xff\xd8\xff\xe0" + bytes(100) + b"\xff\xd9",
        "screenshots/b.webp": b"RIFF" + (24).to_bytes(4, "little") + b"WEBP" + bytes(20)}),
], ids=["empty screenshots/ directory", "short comment", "HAR at the depth limit", "HAR with a 900 KB string",
        "hand-written zip", "data descriptors", "JPEG and WebP"])
def test_what_is_allowed_is_accepted(build: Callable[[], bytes], uploader: User) -> None:
    r = uploader.client.post("/sessions", content=build(), headers={"Content-Type": "application/zip"})
    assert r.status_code == 201, r.text[:500]


def test_zip64_bundle_is_accepted(uploader: User) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in bundles.members(screenshots=2):
            with zf.open(name, "w", force_zip64=True) as f:
                f.write(data)
    r = uploader.client.post("/sessions", content=buf.getvalue(), headers={"Content-Type": "application/zip"})
    assert r.status_code == 201, r.text[:500]
    assert r.json()["network_count"] == 5


def test_har_entries_are_counted_only_under_log(uploader: User) -> None:
    har = json.dumps({"log": {"entries": [{"a": 1}, [2], 3], "pages": [{"entries": [1, 2, 3, 4]}]},
                      "entries": [5, 6]}).encode()
    r = uploader.client.post("/sessions", content=bundles.bundle(har_data=har),
                             headers={"Content-Type": "application/zip"})
    assert r.status_code == 201, r.text[:500]
    assert r.json()["network_count"] == 3


def test_validation_over_its_time_budget_is_413() -> None:
    """The budget is a setting the stack does not lower; the validator itself is called on
    a real archive with none left."""
    limits = ext_bundles.Limits.of(EXT.model_copy(update={"bundle_validation_timeout_s": 0.0}))
    with pytest.raises(ApiError) as caught:
        ext_bundles.validate(io.BytesIO(bundles.bundle()), limits)
    assert caught.value.status == 413
    assert caught.value.details["limit"] == "bundle_validation_timeout_s"


def test_json_bounds_do_not_depend_on_how_the_stream_is_cut() -> None:
    rng = random.Random(13)
    doc = json.dumps({"log": {"entries": [{"s": "a\\\"[{" * 50, "n": [1.5e3, -2, True, None], "d": [[[[]]]]}] * 40}})
    raw = doc.encode()
    for _ in range(50):
        bounds = JsonBounds(8, 1000)  # root, log, entries, an entry, then [[[[]]]]: 8 levels
        at = 0
        while at < len(raw):
            step = rng.randint(1, 9)
            bounds.feed(raw[at:at + step])
            at += step
        assert bounds.depth == 0
    with pytest.raises(JsonLimitError):
        bounds = JsonBounds(7, 1000)
        for i in range(len(raw)):
            bounds.feed(raw[i:i + 1])


# --- examples: lines and the export cursor ---------------------------------------------------------
@pytest.fixture(scope="module")
def team(make_user: Callable[..., User]) -> dict[str, Any]:
    owner, editor = make_user(), make_user()
    suite = create_suite(owner)
    add_member(owner, suite["id"], editor, "editor")
    return {"editor": editor, "suite": suite}


def _example_objects(bucket: Bucket) -> set[str]:
    return bucket.keys("examples/")


def test_example_line_nested_deep_is_422_naming_the_line(team: dict[str, Any], bucket: Bucket, stack: Stack,
                                                         su: psycopg.Connection[dict[str, Any]]) -> None:
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    deep = bundles.deep_json(DEEP, b'{"messages":[{"role":"user","content":"hi"}],"meta":', b"}")
    before_rows = su.execute("select count(*) as n from app.examples").fetchone()
    before_keys = _example_objects(bucket)
    workers = ext_workers(stack)
    r = team["editor"].client.post("/examples", params={"suite_id": team["suite"]["id"], "model": "m"},
                                   content=good + b"\n" + good + b"\n" + deep + b"\n",
                                   headers={"Content-Type": "application/jsonl"})
    assert r.status_code == 422, r.text[:500]
    err = assert_error_body(r)
    assert "line 3" in err["message"], err
    assert err["details"]["line"] == 3 and err["details"]["limit"] == "max_json_depth", err
    assert su.execute("select count(*) as n from app.examples").fetchone() == before_rows
    assert _example_objects(bucket) == before_keys
    assert bucket.open_uploads("examples/") == []
    assert ext_workers(stack) == workers, "an ext worker died during the registration"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [
    _b64(b'{"i": 5}'),
    _b64(b'{"c": "2026-11-01T10:00:00+00:00", "i": 5}'),
    _b64(b'{"c": 5, "i": "6f1c3c1e-8b2a-4a53-9d3b-6a8e1f1e2d3c"}'),
    _b64(b'{"c": "2026-11-01T10:00:00+00:00", "i": ["6f1c3c1e-8b2a-4a53-9d3b-6a8e1f1e2d3c"]}'),
    _b64(b'{"c": "2026-11-01T10:00:00+00:00", "i": {"x": 1}}'),
    _b64(b'["2026-11-01T10:00:00+00:00", "6f1c3c1e-8b2a-4a53-9d3b-6a8e1f1e2d3c"]'),
    _b64(b'"just a string"'),
    _b64(b"[" * 5000 + b"]" * 5000),
    _b64(b'{"c": "2026-11-01T10:00:00+00:00", "i": "not-a-uuid"}'),
    _b64(b'{"c": "2026-11-01T10:00:00", "i": "6f1c3c1e-8b2a-4a53-9d3b-6a8e1f1e2d3c"}'),
    _b64(b"\xff\xfe\x00garbage"),
    "A" * 6000,
    "!!",
], ids=["i a number, no c", "i a number", "c a number", "i a list", "i an object", "a list", "a string",
        "nested 5000 deep", "i not a uuid", "c without a time zone", "not JSON", "huge", "not base64"])
def test_malformed_export_cursor_is_400_naming_the_parameter(cursor: str, team: dict[str, Any]) -> None:
    r = team["editor"].client.get("/examples/export", params={"suite_id": team["suite"]["id"], "cursor": cursor})
    assert r.status_code == 400, r.text[:500]
    err = assert_error_body(r)
    assert "cursor" in err["message"] and err["details"]["parameter"] == "cursor", err


def test_a_real_cursor_still_pages(team: dict[str, Any]) -> None:
    line = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode() + b"\n"
    for _ in range(3):
        r = team["editor"].client.post("/examples", params={"suite_id": team["suite"]["id"], "model": "cursor"},
                                       content=line, headers={"Content-Type": "application/jsonl"})
        assert r.status_code == 201, r.text
    first = team["editor"].client.get("/examples/export", params={"model": "cursor", "limit": 2})
    assert first.status_code == 200 and first.headers["x-export-count"] == "2"
    rest = team["editor"].client.get("/examples/export",
                                     params={"model": "cursor", "limit": 2, "cursor": first.headers["x-next-cursor"]})
    assert rest.status_code == 200, rest.text
    assert rest.headers["x-export-count"] == "1"
