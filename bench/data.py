"""What the benchmarks read and write, created the way a client would (over HTTP through
the proxy), plus the large files: a session bundle and an example's JSONL."""

from __future__ import annotations

import base64
import http.client
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg

from tests.bundles import write_large_bundle

PASSWORD = "bench horse battery staple"
SUITES = 10
ACTIONS_PER_SUITE = 50


@dataclass
class Fixtures:
    email: str
    user_id: str
    suite_ids: list[str]
    api_key: str


def claims_of(token: str) -> dict[str, Any]:
    """The JWT's payload as PostgREST puts it into request.jwt.claims (already verified)."""
    payload = token.split(".")[1]
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return data


def create_fixtures(base_url: str) -> Fixtures:
    """One user owning SUITES suites of ACTIONS_PER_SUITE actions each, and a read API key."""
    email = f"bench-{uuid.uuid4().hex[:10]}@example.test"
    with httpx.Client(base_url=base_url, timeout=60) as c:
        r = c.post("/auth/signup", json={"email": email, "password": PASSWORD, "display_name": "Bench"})
        r.raise_for_status()
        body = r.json()
        auth = {"Authorization": f"Bearer {body['access_token']}"}
        suite_ids = []
        for i in range(SUITES):
            slug = f"bench-{uuid.uuid4().hex[:8]}-{i}"
            r = c.post("/suites", json={"name": slug, "slug": slug, "description": "benchmark suite"},
                       headers={**auth, "Prefer": "return=representation",
                                "Accept": "application/vnd.pgrst.object+json"})
            r.raise_for_status()
            suite_id = r.json()["id"]
            suite_ids.append(suite_id)
            actions = [{"name": f"action-{j:03d}", "description": f"Action {j} of the benchmark suite",
                        "input_schema": {"type": "object", "properties": {"query": {"type": "string"},
                                                                          "limit": {"type": "integer"}}}}
                       for j in range(ACTIONS_PER_SUITE)]
            r = c.post(f"/suites/{suite_id}/actions", json=actions, headers=auth)
            r.raise_for_status()
        r = c.post("/api-keys", json={"name": "bench", "access": "read"}, headers=auth)
        r.raise_for_status()
        key = r.json()["key"]
    return Fixtures(email, body["id"], suite_ids, key)


def login(base_url: str, email: str) -> str:
    """A fresh storefront access token (they live 15 minutes; a full run is longer)."""
    for _ in range(20):
        r = httpx.post(f"{base_url}/auth/login", json={"email": email, "password": PASSWORD}, timeout=30)
        if r.status_code != 429:
            r.raise_for_status()
            return str(r.json()["access_token"])
        time.sleep(1)
    raise RuntimeError("login kept answering 429")


def add_viewer(superuser_dsn: str, user_id: str, suite_slug: str) -> str:
    with psycopg.connect(superuser_dsn, autocommit=True) as conn:
        row = conn.execute("select id from app.suites where slug = %s", [suite_slug]).fetchone()
        assert row is not None, suite_slug
        conn.execute("insert into app.suite_members (suite_id, user_id, invitee, role, accepted, accepted_at)"
                     " values (%s, %s, %s, 'viewer', true, now())"
                     " on conflict do nothing", [row[0], user_id, user_id])
    return str(row[0])


def make_bundle(path: Path, size_mib: int) -> int:
    """A valid bundle of about size_mib MiB: incompressible screenshots, stored."""
    return write_large_bundle(str(path), screenshots=max(1, size_mib // 4), screenshot_bytes=4 * 1024 * 1024)


def make_jsonl(path: Path, size_mib: int) -> int:
    """A valid example of about size_mib MiB: lines of ~16 KiB (system, user, assistant)."""
    lines = []
    for i in range(64):
        text = " ".join(f"w{(i * 7919 + j * 104729) % 1000003:x}" for j in range(1800))
        lines.append(json.dumps({"messages": [
            {"role": "system", "content": "You are a careful shopping assistant."},
            {"role": "user", "content": f"Line {i}: find the cheapest item. {text[:6000]}"},
            {"role": "assistant", "content": text}]}).encode() + b"\n")
    target = size_mib * 1024 * 1024
    written = 0
    with open(path, "wb") as f:
        i = 0
        while written < target:
            line = lines[i % len(lines)]
            f.write(line)
            written += len(line)
            i += 1
    return written


def _conn(url: str) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=300, blocksize=1 << 20)
    return conn, parts.path + (f"?{parts.query}" if parts.query else "")


def post_file(url: str, path: Path, headers: dict[str, str]) -> tuple[int, bytes, float]:
    """POSTs the file as the raw body (read 1 MiB at a time); (status, body, seconds)."""
    conn, target = _conn(url)
    size = path.stat().st_size
    started = time.perf_counter()
    with open(path, "rb") as f:
        conn.request("POST", target, body=f, headers={**headers, "Content-Length": str(size)})
        r = conn.getresponse()
        body = r.read()
    seconds = time.perf_counter() - started
    conn.close()
    return r.status, body, seconds


def tus_file(url: str, path: Path, headers: dict[str, str], chunk: int) -> tuple[int, str, float]:
    """Uploads the file through tus (POST url, then PATCHes of `chunk` bytes on one keep-alive
    connection, each body read 1 MiB at a time); (final status, session id, seconds)."""
    conn, target = _conn(url)
    size = path.stat().st_size
    tus = {**headers, "Tus-Resumable": "1.0.0"}
    started = time.perf_counter()
    conn.request("POST", target, headers={**tus, "Upload-Length": str(size), "Upload-Metadata": "filename YS56aXA="})
    r = conn.getresponse()
    r.read()
    location = r.getheader("Location") or ""
    if r.status != 201:
        conn.close()
        return r.status, "", time.perf_counter() - started
    offset = 0
    with open(path, "rb") as f:
        while offset < size:
            n = min(chunk, size - offset)
            body = _FileRange(f, n)
            conn.request("PATCH", location, body=body, headers={
                **tus, "Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset),
                "Content-Length": str(n)})
            r = conn.getresponse()
            r.read()
            if r.status != 204:
                conn.close()
                return r.status, "", time.perf_counter() - started
            offset = int(r.getheader("Upload-Offset") or 0)
    seconds = time.perf_counter() - started
    conn.close()
    return r.status, r.getheader("Upload-Session-Id") or "", seconds


class _FileRange:
    """The next `n` bytes of an open file, as http.client reads a body (1 MiB at a time)."""

    def __init__(self, f: Any, n: int) -> None:
        self.f, self.left = f, n

    def read(self, size: int = -1) -> bytes:
        take = self.left if size is None or size < 0 else min(size, self.left)
        data: bytes = self.f.read(take)
        self.left -= len(data)
        return data


def get_stream(url: str, headers: dict[str, str], chunk: int = 1 << 20) -> tuple[int, int, float]:
    """GETs url reading the body in `chunk` pieces; (status, bytes, seconds)."""
    conn, target = _conn(url)
    started = time.perf_counter()
    conn.request("GET", target, headers=headers)
    r = conn.getresponse()
    total = 0
    while True:
        data = r.read(chunk)
        if not data:
            break
        total += len(data)
    seconds = time.perf_counter() - started
    conn.close()
    return r.status, total, seconds
