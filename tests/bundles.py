"""Bundles for the tests: the valid ones come from `tracepipe.bundles` (one copy, shared with
`tracepipe demo` and the benchmarks); the malformed ones — exact member names, zip bombs,
lying central directories — live here, since only tests want them."""

from __future__ import annotations

import io
import struct
import warnings
import zipfile

from tracepipe.bundles import bundle, events, har, manifest, members, png, write_large_bundle

__all__ = ["bomb", "bundle", "events", "har", "manifest", "members", "patch_central_directory", "png",
           "write_large_bundle", "zip_of"]


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
