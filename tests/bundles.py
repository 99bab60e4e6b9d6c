"""Real session bundles for the tests: a manifest, thousands of events, a HAR, real PNGs."""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from typing import Any


def png(width: int = 8, height: int = 8, seed: int = 0) -> bytes:
    """A valid PNG image (RGB), different per seed."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + bytes((x * 31 + y * 17 + seed) % 256 for x in range(width * 3)) for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def manifest(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "format_version": 1,
        "started_at": "2026-11-01T10:00:00Z",
        "ended_at": "2026-11-01T10:05:00Z",
        "client": {"name": "tracepipe-recorder", "version": "1.4.2", "os": "linux"},
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def events(n: int) -> bytes:
    kinds = ("click", "keydown", "scroll", "navigate")
    return b"".join(json.dumps({"t": i * 10, "type": kinds[i % 4], "x": i % 800, "y": i % 600}).encode() + b"\n"
                    for i in range(n))


def har(entries: int) -> bytes:
    return json.dumps({"log": {"version": "1.2", "creator": {"name": "test", "version": "1"}, "entries": [
        {"startedDateTime": "2026-11-01T10:00:01Z", "time": 12,
         "request": {"method": "GET", "url": f"https://shop.example/item/{i}", "headers": []},
         "response": {"status": 200, "headers": [], "content": {"size": 10, "mimeType": "text/html"}}}
        for i in range(entries)]}}).encode()


def bundle(*, manifest_data: dict[str, Any] | None = None, n_events: int = 2000, har_entries: int = 25,
           screenshots: int = 3, extra: dict[str, bytes] | None = None, skip: tuple[str, ...] = (),
           compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    members: dict[str, bytes] = {
        "manifest.json": json.dumps(manifest_data if manifest_data is not None else manifest()).encode(),
        "events.jsonl": events(n_events),
        "network.har": har(har_entries),
    }
    for i in range(screenshots):
        members[f"screenshots/{i:04d}.png"] = png(seed=i)
    members.update(extra or {})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            if name not in skip:
                zf.writestr(name, data)
    return buf.getvalue()
