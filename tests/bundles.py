"""Real session bundles for the tests: a manifest, thousands of events, a HAR, real PNGs."""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
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


def members(*, manifest_data: dict[str, Any] | None = None, n_events: int = 200, har_entries: int = 5,
            screenshots: int = 1) -> list[tuple[str, bytes]]:
    """The members of a small valid bundle, as (name, bytes) for `zip_of`."""
    out = [("manifest.json", json.dumps(manifest_data if manifest_data is not None else manifest()).encode()),
           ("events.jsonl", events(n_events)), ("network.har", har(har_entries))]
    out += [(f"screenshots/{i:04d}.png", png(seed=i)) for i in range(screenshots)]
    return out


def zip_of(entries: list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip with exactly these member names: each is set on the ZipInfo after construction,
    so it is written byte for byte (ZipInfo() would cut a name at NUL)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicate names are wanted here
        for name, data in entries:
            info = zipfile.ZipInfo("placeholder", date_time=(2026, 11, 1, 10, 0, 0))
            info.filename = name
            info.compress_type = compression
            zf.writestr(info, data)
    return buf.getvalue()


def bomb(expanded: int = 100 * 1024 * 1024) -> bytes:
    """A valid bundle plus a "screenshot" of `expanded` bytes of zeros (PNG magic first),
    deflated about 1000:1, written in pieces so it is never whole in memory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, data in members():
            zf.writestr(name, data)
        with zf.open("screenshots/bomb.png", "w") as f:
            f.write(b"\x89PNG\r\n\x1a\n")
            zeros = bytes(1024 * 1024)
            left = expanded - 8
            while left > 0:
                f.write(zeros[: min(left, len(zeros))])
                left -= len(zeros)
    return buf.getvalue()


def patch_central_directory(data: bytes, name: str, *, compressed: int | None = None,
                            uncompressed: int | None = None) -> bytes:
    """The zip with the sizes its central directory declares for `name` replaced (a lying
    header); the member's bytes are untouched."""
    out = bytearray(data)
    pos = out.find(b"PK\x01\x02")
    while pos >= 0:
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", out, pos + 28)
        if bytes(out[pos + 46: pos + 46 + name_len]) == name.encode():
            if compressed is not None:
                struct.pack_into("<I", out, pos + 20, compressed)
            if uncompressed is not None:
                struct.pack_into("<I", out, pos + 24, uncompressed)
            return bytes(out)
        pos = out.find(b"PK\x01\x02", pos + 46 + name_len + extra_len + comment_len)
    raise KeyError(name)


def write_large_bundle(path: str, *, screenshots: int = 52, screenshot_bytes: int = 4 * 1024 * 1024) -> int:
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
