"""Bundles for the tests: the valid ones come from `tracepipe.bundles` (one copy, shared with
`tracepipe demo` and the benchmarks); the malformed ones — exact member names, zip bombs,
lying central directories — live here, since only tests want them."""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
import zlib

from tracepipe.bundles import bundle, events, har, manifest, members, png, write_large_bundle

__all__ = ["bomb", "bundle", "corrupt_member", "declare_entries", "deep_json", "directory_carrying", "end_record",
           "events", "har", "manifest", "many_members", "members", "patch_central_directory", "png",
           "raw_zip", "with_comment", "write_large_bundle", "zip_of"]


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


# --- hostile archives (issue 13): smuggling, lying end records, deep JSON ---------------------------
def deep_json(depth: int, prefix: bytes = b'{"log":{"entries":[', suffix: bytes = b"]}}") -> bytes:
    """`prefix` + `[`×depth + `]`×depth + `suffix`: by default a HAR whose one entry is nested
    `depth` deep (1.3 KB deflated at 200,000)."""
    return prefix + b"[" * depth + b"]" * depth + suffix


def many_members(count: int) -> bytes:
    """A bundle with `count` members in all (empty screenshots after the valid members),
    stored: about 100 bytes per member (100,000 members ≈ 9 MB, with zip64 end records)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        real = members(screenshots=0)
        for name, data in real:
            zf.writestr(name, data)
        for i in range(count - len(real)):
            zf.writestr(zipfile.ZipInfo(f"screenshots/{i:06d}.png", date_time=(2026, 11, 1, 10, 0, 0)), b"")
    return buf.getvalue()


def end_record(data: bytes) -> int:
    """Offset of the End Of Central Directory record."""
    at = data.rfind(b"PK\x05\x06")
    assert at >= 0
    return at


def declare_entries(data: bytes, count: int) -> bytes:
    """The zip with the member count of its (non-zip64) end record replaced: a directory
    that holds more members than the end record admits to."""
    out = bytearray(data)
    struct.pack_into("<HH", out, end_record(data) + 8, count, count)
    return bytes(out)


def with_comment(data: bytes, comment: bytes) -> bytes:
    """The zip with an archive comment (the bytes after the end record)."""
    at = end_record(data)
    return data[: at + 20] + struct.pack("<H", len(comment)) + comment


def directory_carrying(data: bytes, name: str = "screenshots/") -> bytes:
    """A valid bundle plus a directory entry `name` whose member holds `data`."""
    entries = [*members(), (name, data)]
    return zip_of(entries, zipfile.ZIP_STORED)


def corrupt_member(name: str, data: bytes) -> bytes:
    """A bundle with `name` stored (not deflated) and its last byte changed afterwards: its
    CRC no longer matches, whatever the member's format checks see."""
    body = bytearray(bundle(screenshots=0, extra={name: data}, compression=zipfile.ZIP_STORED))
    at = bytes(body).index(data) + len(data) - 1
    body[at] ^= 0xFF
    return bytes(body)


def raw_zip(entries: list[tuple[str, bytes, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip written by hand, for layouts zipfile will not write: each entry is (name, the
    member's content, bytes placed right after its compressed data, counted in neither its
    declared compressed size nor the directory). With method ZIP_DEFLATED and a `gap` that
    begins with b"IN:" the gap is put inside the compressed size instead (after the end of
    the deflate stream)."""
    out = bytearray()
    directory = bytearray()
    for name, content, gap in entries:
        data = content
        if method == zipfile.ZIP_DEFLATED:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            data = c.compress(content) + c.flush()
        inside = gap.startswith(b"IN:")
        if inside:
            data, gap = data + gap, b""
        crc = zlib.crc32(content)
        offset = len(out)
        encoded = name.encode()
        fields = struct.pack("<HHHHHLLLHH", 20, 0, method, 0, 0x5B61, crc, len(data), len(content), len(encoded), 0)
        out += b"PK\x03\x04" + fields + encoded + data + gap
        directory += (b"PK\x01\x02" + struct.pack("<H", 20) + fields
                      + struct.pack("<HHHLL", 0, 0, 0, 0, offset) + encoded)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(directory), len(out), 0)
    return bytes(out + directory + end)
