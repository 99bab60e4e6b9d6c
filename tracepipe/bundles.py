"""Valid session bundles (DESIGN.md §5), generated: a manifest, input events, a HAR and
real PNG screenshots, zipped.

One copy for everything that needs bundles without a recorder: `tracepipe demo` (a
realistic sample), the tests (`tests/bundles.py` adds the malformed ones) and the
benchmarks (`write_large_bundle`). Output is deterministic for the same arguments.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import zipfile
import zlib
from typing import Any

EVENT_KINDS = ("click", "keydown", "scroll", "navigate")


def png(width: int = 8, height: int = 8, seed: int = 0, *, noise: bool = False) -> bytes:
    """A valid PNG image (RGB), different per seed: a pattern that deflates well, or with
    `noise` random pixels that do not (the size of a real screenshot's PNG)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    if noise:
        rng = random.Random(seed)
        rows = b"".join(b"\x00" + rng.randbytes(width * 3) for _ in range(height))
    else:
        rows = b"".join(b"\x00" + bytes((x * 31 + y * 17 + seed) % 256 for x in range(width * 3))
                        for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def manifest(**overrides: Any) -> dict[str, Any]:
    """manifest.json's content; an override of None drops that field."""
    base: dict[str, Any] = {
        "format_version": 1,
        "started_at": "2026-11-01T10:00:00Z",
        "ended_at": "2026-11-01T10:05:00Z",
        "client": {"name": "tracepipe-recorder", "version": "1.4.2", "os": "linux"},
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def events(n: int, *, kinds: tuple[str, ...] = EVENT_KINDS, targets: tuple[str, ...] = ()) -> bytes:
    """events.jsonl: `n` input events 10 ms apart, cycling through `kinds`; with `targets`
    each event also names the element (a CSS selector) it hit."""
    def event(i: int) -> dict[str, Any]:
        e: dict[str, Any] = {"t": i * 10, "type": kinds[i % len(kinds)], "x": i % 800, "y": i % 600}
        if targets:
            e["target"] = targets[(i * 7) % len(targets)]
        return e

    return b"".join(json.dumps(event(i)).encode() + b"\n" for i in range(n))


def har(entries: int, *, host: str = "shop.example", paths: tuple[str, ...] = ("item",),
        started_at: str = "2026-11-01T10:00:01Z") -> bytes:
    """network.har: `entries` GET requests to https://{host}/{path}/{i}, all answered 200."""
    return json.dumps({"log": {"version": "1.2", "creator": {"name": "test", "version": "1"}, "entries": [
        {"startedDateTime": started_at, "time": 12,
         "request": {"method": "GET", "url": f"https://{host}/{paths[i % len(paths)]}/{i}", "headers": []},
         "response": {"status": 200, "headers": [], "content": {"size": 10, "mimeType": "text/html"}}}
        for i in range(entries)]}}).encode()


def bundle(*, manifest_data: dict[str, Any] | None = None, n_events: int = 2000, har_entries: int = 25,
           screenshots: int = 3, extra: dict[str, bytes] | None = None, skip: tuple[str, ...] = (),
           compression: int = zipfile.ZIP_DEFLATED, events_data: bytes | None = None, har_data: bytes | None = None,
           screenshot_size: tuple[int, int] = (8, 8), screenshot_noise: bool = False) -> bytes:
    """A bundle's bytes. `events_data`/`har_data` replace the generated members; `extra`
    adds (or replaces) members; `skip` leaves members out."""
    members: dict[str, bytes] = {
        "manifest.json": json.dumps(manifest_data if manifest_data is not None else manifest()).encode(),
        "events.jsonl": events_data if events_data is not None else events(n_events),
        "network.har": har_data if har_data is not None else har(har_entries),
    }
    for i in range(screenshots):
        members[f"screenshots/{i:04d}.png"] = png(*screenshot_size, seed=i, noise=screenshot_noise)
    members.update(extra or {})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            if name not in skip:
                zf.writestr(name, data)
    return buf.getvalue()


def members(*, manifest_data: dict[str, Any] | None = None, n_events: int = 200, har_entries: int = 5,
            screenshots: int = 1) -> list[tuple[str, bytes]]:
    """The members of a small valid bundle, as (name, bytes) pairs."""
    out = [("manifest.json", json.dumps(manifest_data if manifest_data is not None else manifest()).encode()),
           ("events.jsonl", events(n_events)), ("network.har", har(har_entries))]
    out += [(f"screenshots/{i:04d}.png", png(seed=i)) for i in range(screenshots)]
    return out


def write_large_bundle(path: str | os.PathLike[str], *, screenshots: int = 52,
                       screenshot_bytes: int = 4 * 1024 * 1024) -> int:
    """Writes a valid bundle of incompressible screenshots (random bytes after the PNG magic,
    stored, not deflated) to `path`, 1 MiB at a time; returns its size."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("manifest.json", json.dumps(manifest(metadata={"size": "large"})))
        zf.writestr("events.jsonl", events(5000))
        zf.writestr("network.har", har(50))
        for i in range(screenshots):
            with zf.open(f"screenshots/{i:04d}.png", "w") as f:
                f.write(b"\x89PNG\r\n\x1a\n")
                left = screenshot_bytes - 8
                while left > 0:
                    f.write(os.urandom(min(left, 1024 * 1024)))
                    left -= 1024 * 1024
    return os.path.getsize(path)
