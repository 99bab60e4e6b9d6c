"""Validation of a stored session bundle (DESIGN.md §5), read in place through ranged
GETs: never extracted to disk, never held whole in memory.

Checks, in order: the end records (EOCD, zip64) before zipfile reads anything else —
declared member count, central-directory size, nothing before the first local header,
between the directory and the end record or after it (a comment up to a small bound); the
central directory; member count, names (no `..`, absolute paths, backslashes, NUL or other
control characters; no duplicates, also by case; only known members, exact lower-case
names), directory entries (only `screenshots/`, empty), sizes and compression ratios (zip
bombs); then every member is read once through a size cap: the manifest against
ext/schemas/manifest.schema.json; events.jsonl line by line; network.har / network.jsonl;
screenshot magic bytes and where each image says it ends (nothing after IEND, EOI or the
RIFF size); no member may start like an archive; every CRC is verified; members must lie
back to back from offset 0 to the central directory (nothing between them, nothing after
a deflate stream inside a member's compressed size).

Parsing is bounded by design: each JSON document passes ext.jsonl's byte-wise JsonBounds
(depth, token length) before or while it is parsed, network.har is parsed as a stream of
ijson events (basic_parse: no prefixes, nothing built), and the whole validation has a time
budget. Every refusal names the member (and line) and the setting whose limit was met.
"""

from __future__ import annotations

import io
import json
import re
import struct
import time
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import ijson
import jsonschema

from ext.config import ExtSettings
from ext.errors import ApiError
from ext.jsonl import JsonBounds, JsonLimitError, check_depth

SCHEMA_PATH = Path(__file__).parent / "schemas" / "manifest.schema.json"
# Names are exact and case-sensitive (\Z, not $, which would allow a final newline): a
# case variant (`Manifest.json`, `Screenshots/A.PNG`) is what another tool may open as the
# real member on a case-insensitive file system, so it is refused rather than ignored.
SCREENSHOT = re.compile(r"screenshots/[^/]+\.(png|jpe?g|webp)\Z")
KNOWN_FILES = {"manifest.json", "events.jsonl", "network.har", "network.jsonl"}
# The one directory entry allowed: zip tools write it before the files in it. It must be
# empty (a stored or deflated empty stream is at most 2 bytes), so it cannot carry data.
DIRECTORIES = {"screenshots/"}
# Magic numbers of archives and compressed streams: no member may be one (a bundle in a
# bundle escapes every check above). Images are checked against their own magic too.
ARCHIVE_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00",
                 b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07", b"\x28\xb5\x2f\xfd", b"\x04\x22\x4d\x18",
                 b"MSCF", b"\x1f\x9d")
EOCD = struct.Struct("<4s4H2LH")  # signature, disk, cd disk, entries here, entries, cd size, cd offset, comment
ZIP64_LOCATOR = struct.Struct("<4sLQL")  # signature, disk of the zip64 end record, its offset, disks
ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")  # signature, size, versions, disks, entries here, entries, size, offset
MAGIC = {
    "png": (b"\x89PNG\r\n\x1a\n",),
    "jpg": (b"\xff\xd8\xff",),
    "jpeg": (b"\xff\xd8\xff",),
}


@dataclass(frozen=True)
class Limits:
    max_members: int
    max_expanded_bytes: int
    max_ratio: float
    max_manifest_bytes: int
    max_line_bytes: int
    max_depth: int = 64
    max_token_bytes: int = 8 * 1024**2
    max_directory_bytes: int = 4 * 1024**2
    max_comment_bytes: int = 1024
    timeout_s: float = 300.0

    @classmethod
    def of(cls, s: ExtSettings) -> Limits:
        return cls(s.max_bundle_members, s.max_bundle_expanded_bytes, s.max_compression_ratio, s.max_manifest_bytes,
                   s.max_jsonl_line_bytes, s.max_json_depth, s.max_json_token_bytes, s.max_central_directory_bytes,
                   s.max_zip_comment_bytes, s.bundle_validation_timeout_s)


@dataclass
class BundleSummary:
    manifest: dict[str, Any]
    started_at: datetime
    ended_at: datetime
    event_count: int = 0
    network_count: int = 0
    screenshot_count: int = 0
    files: list[dict[str, Any]] = field(default_factory=list)


def invalid(message: str, details: Any = None, status: int = 422, code: str = "TP422",
            hint: str | None = None) -> ApiError:
    return ApiError(status, code, message, details, hint)


def over_limit(message: str, setting: str, limit: float, status: int = 413, **details: Any) -> ApiError:
    """A bound met: the body names the setting (TP_EXT_<SETTING>) and its value."""
    return ApiError(status, f"TP{status}", message, {**details, "limit": setting, "max": limit},
                    f"The limit is TP_EXT_{setting.upper()}={limit}.")


def json_limit(e: JsonLimitError, member: str, line: int | None = None) -> ApiError:
    where = f"{member}: line {line}" if line is not None else member
    details = e.details(file=member, **({"line": line} if line is not None else {}))
    return ApiError(e.status, f"TP{e.status}", f"{where}: {e.reason}", details, e.hint())


@lru_cache(maxsize=1)
def _manifest_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)  # type: ignore[no-any-return]


def _check_name(name: str) -> None:
    if ("\x00" in name or "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name)
            or ".." in name.split("/")):
        raise invalid("unsafe member path in the bundle", repr(name[:300]))
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in name):  # newline, escapes, bidi overrides
        raise invalid("control character in a member name", {"member": repr(name[:300])},
                      hint="Member names are printable: manifest.json, events.jsonl, screenshots/<name>.png …")


class _Capped:
    """Reads a member but never more than its declared size (+1 byte to detect lies);
    refuses a member that starts like an archive, and the read once the validation's time
    budget is spent. `drain` reads to the end, where zipfile verifies the CRC."""

    def __init__(self, raw: IO[bytes], limit: int, name: str, deadline: float, timeout_s: float) -> None:
        self.raw, self.left, self.name = raw, limit + 1, name
        self.deadline, self.timeout_s = deadline, timeout_s
        self.first = True

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise invalid("bundle member expands beyond its declared size", self.name, 413, "TP413")
        if time.monotonic() > self.deadline:
            raise over_limit("validating the bundle took longer than its time budget", "bundle_validation_timeout_s",
                             self.timeout_s, file=self.name)
        data = self.raw.read(self.left if n is None or n < 0 else min(n, self.left))
        self.left -= len(data)
        if self.left <= 0 and data:
            raise invalid("bundle member expands beyond its declared size", self.name, 413, "TP413")
        if self.first and data:
            self.first = False
            if data.startswith(ARCHIVE_MAGIC) or data[257:262] == b"ustar":
                raise invalid("nested archive in the bundle: members may not be archives or compressed files",
                              {"member": self.name})
        return data

    def drain(self) -> None:
        while self.read(1024 * 1024):
            pass
        # A deflate stream that ends before the member's compressed size leaves bytes zipfile
        # never reads: data no check above saw. (ZipExtFile's own counters; absent, nothing.)
        if getattr(self.raw, "_compress_left", 0) > 0 or \
                getattr(getattr(self.raw, "_decompressor", None), "unused_data", b""):
            raise invalid("bytes after the end of a member's compressed data", {"member": self.name})


def validate(archive: IO[bytes] | io.RawIOBase, limits: Limits) -> BundleSummary:
    """Validates the bundle in `archive` (a seekable file object); raises ApiError (400, 413
    or 422 with the reason) on the first problem, returns what the session row records."""
    deadline = time.monotonic() + limits.timeout_s
    declared = _check_end_records(archive, limits)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise invalid("the body is not a zip archive, or it is corrupt", str(e), 400, "TP400") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise over_limit("too many members in the bundle", "max_bundle_members", limits.max_members,
                             members=len(infos))
        if len(infos) != declared:
            raise invalid("the zip's end record and its central directory disagree on the member count",
                          {"declared": declared, "found": len(infos)})
        seen: set[str] = set()
        folded: dict[str, str] = {}
        total = 0
        files: list[dict[str, Any]] = []
        for info in infos:
            _check_name(info.orig_filename)  # as stored: zipfile cuts `filename` at the first NUL
            if info.filename in seen:
                raise invalid("duplicate member in the bundle", info.filename)
            seen.add(info.filename)
            if (other := folded.setdefault(info.filename.casefold(), info.filename)) != info.filename:
                raise invalid("two members differ only in case", {"member": info.filename, "other": other})
            if info.flag_bits & 0x1:
                raise invalid("encrypted members are not accepted", info.filename)
            if info.is_dir():
                if info.filename not in DIRECTORIES:
                    raise invalid("unexpected directory entry in the bundle (allowed: screenshots/)",
                                  {"member": info.filename})
                if info.file_size or info.compress_size > 2:
                    raise invalid("a directory entry carries bytes", {"member": info.filename,
                                  "size": info.file_size, "compressed_size": info.compress_size})
                continue
            if info.filename not in KNOWN_FILES and not SCREENSHOT.match(info.filename):
                lowered = info.filename.lower()
                if lowered in KNOWN_FILES or SCREENSHOT.match(lowered):
                    raise invalid("member name differs from an allowed name in case (names are lower-case)",
                                  {"member": info.filename})
                raise invalid("unexpected member in the bundle (allowed: manifest.json, events.jsonl, network.har,"
                              " network.jsonl, screenshots/*.png|jpg|jpeg|webp)", info.filename)
            total += info.file_size
            if total > limits.max_expanded_bytes:
                raise invalid("the bundle expands beyond the size limit",
                              f"more than {limits.max_expanded_bytes} bytes", 413, "TP413")
            if info.file_size > 1024 * 1024 and info.file_size > limits.max_ratio * max(info.compress_size, 1):
                raise invalid("compression ratio over the limit (zip bomb?)",
                              f"{info.filename}: {info.file_size} / {info.compress_size}", 413, "TP413")
            files.append({"name": info.filename, "size": info.file_size, "compressed_size": info.compress_size,
                          "crc": f"{info.CRC:08x}"})
        if "manifest.json" not in seen:
            raise invalid("manifest.json is missing", "manifest.json")
        if "events.jsonl" not in seen:
            raise invalid("events.jsonl is missing", "events.jsonl")
        reader = _Reader(zf, limits, deadline)
        try:
            return _read_members(reader, seen, files)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # bad CRC, broken deflate stream, lying sizes
            raise invalid("the zip archive is corrupt", {"member": reader.current, "error": str(e)},
                          400, "TP400") from None
        except NotImplementedError as e:  # compression methods zipfile cannot read
            raise invalid("unsupported zip member", {"member": reader.current, "error": str(e)}) from None


def _read_at(archive: IO[bytes] | io.RawIOBase, offset: int, n: int) -> bytes:
    archive.seek(offset)
    return archive.read(n) or b""


def _check_end_records(archive: IO[bytes] | io.RawIOBase, limits: Limits) -> int:
    """Reads only the end of the archive (EOCD, zip64 locator and record) and the first
    bytes, before zipfile parses the central directory: the declared member count and
    directory size must be within the limits, the directory must end where the end record
    starts, and nothing may come before the first member or after the end record (but a
    comment of up to max_zip_comment_bytes). Returns the declared member count."""
    size = archive.seek(0, io.SEEK_END)
    window = min(size, EOCD.size + 0xFFFF + 4096)  # the largest comment, and a few bytes more
    tail = _read_at(archive, size - window, window)
    at = tail.rfind(b"PK\x05\x06")
    while at >= 0 and window - at < EOCD.size:
        at = tail.rfind(b"PK\x05\x06", 0, at)
    if at < 0:
        raise invalid("the body is not a zip archive, or it is corrupt", "no end of central directory record",
                      400, "TP400")
    _, disk, cd_disk, here, entries, cd_size, cd_offset, comment = EOCD.unpack_from(tail, at)
    eocd_at = size - window + at
    if eocd_at + EOCD.size + comment != size:
        raise invalid("bytes after the end of the zip archive", {"member": None,
                      "trailing_bytes": size - eocd_at - EOCD.size - comment})
    if comment > limits.max_comment_bytes:
        raise over_limit("the zip comment is too long", "max_zip_comment_bytes", limits.max_comment_bytes, 422,
                         comment_bytes=comment)
    cd_end = eocd_at
    locator_at = eocd_at - ZIP64_LOCATOR.size
    if locator_at >= 0 and _read_at(archive, locator_at, 4) == b"PK\x06\x07":
        _, _, record_at, _ = ZIP64_LOCATOR.unpack(_read_at(archive, locator_at, ZIP64_LOCATOR.size))
        record = _read_at(archive, record_at, ZIP64_EOCD.size) if record_at < locator_at else b""
        if len(record) != ZIP64_EOCD.size or not record.startswith(b"PK\x06\x06"):
            raise invalid("the body is not a zip archive, or it is corrupt", "bad zip64 end record", 400, "TP400")
        _, length, _, _, disk, cd_disk, here, entries, cd_size, cd_offset = ZIP64_EOCD.unpack(record)
        if record_at + 12 + length != locator_at:
            raise invalid("bytes between the zip64 end record and its locator", {"member": None})
        cd_end = record_at
    if disk or cd_disk or here != entries:
        raise invalid("multi-disk zip archives are not accepted", {"member": None})
    if entries > limits.max_members:
        raise over_limit("too many members in the bundle (declared by the zip's end record)", "max_bundle_members",
                         limits.max_members, declared=entries)
    if cd_size > limits.max_directory_bytes:
        raise over_limit("the zip's central directory is too large", "max_central_directory_bytes",
                         limits.max_directory_bytes, declared=cd_size)
    if cd_offset + cd_size != cd_end:
        where = "before the first member" if cd_offset + cd_size < cd_end else "in the central directory"
        raise invalid(f"bytes {where}: the central directory does not end where the end record starts",
                      {"member": None, "offset": cd_offset, "size": cd_size, "end_record": cd_end})
    if entries and _read_at(archive, 0, 4) != b"PK\x03\x04":
        raise invalid("bytes before the first member of the zip archive", {"member": None})
    directory = _read_at(archive, cd_offset, cd_size)  # within max_central_directory_bytes
    if directory.count(b"PK\x01\x02") > limits.max_members:  # entries the end record did not declare
        raise over_limit("too many members in the bundle", "max_bundle_members", limits.max_members,
                         found=directory.count(b"PK\x01\x02"))
    archive.seek(0)
    return int(entries)


class _Reader:
    """Opens members through size caps; remembers which one is read, for error bodies, and
    where each member's bytes lie (local header to end of data), so `check_layout` can
    refuse bytes hidden between members."""

    def __init__(self, zf: zipfile.ZipFile, limits: Limits, deadline: float) -> None:
        self.zf, self.limits, self.deadline = zf, limits, deadline
        self.current: str | None = None
        self.archive: Any = zf.fp
        self.extents: dict[str, tuple[int, int]] = {}  # name -> (local header offset, end of its data)

    def _extent(self, info: zipfile.ZipInfo) -> None:
        header = _read_at(self.archive, info.header_offset, 30)
        if len(header) != 30 or not header.startswith(b"PK\x03\x04"):
            raise invalid("the zip archive is corrupt", {"member": info.filename, "error": "bad local header"},
                          400, "TP400")
        name_len, extra_len = struct.unpack_from("<HH", header, 26)
        self.extents[info.filename] = (info.header_offset,
                                       info.header_offset + 30 + name_len + extra_len + info.compress_size)

    def open(self, name: str) -> _Capped:
        self.current = name
        info = self.zf.getinfo(name)
        self._extent(info)  # the same bytes zipfile reads next: one ranged GET serves both
        return _Capped(self.zf.open(info), info.file_size, name, self.deadline, self.limits.timeout_s)

    def check_layout(self, cd_offset: int) -> None:
        """Members must follow each other from offset 0 to the central directory with
        nothing between: a data descriptor (12 to 24 bytes, after members written with
        flag bit 3) is the only thing allowed after a member's data."""
        for info in self.zf.infolist():
            if info.filename not in self.extents:
                self._extent(info)
        at = 0
        for info in sorted(self.zf.infolist(), key=lambda i: i.header_offset):
            start, end = self.extents[info.filename]
            if start != at:
                raise invalid("bytes between the members of the zip archive", {"member": info.filename,
                              "offset": start, "expected": at})
            at = end
            if info.flag_bits & 0x8:
                signed = _read_at(self.archive, end, 4) == b"PK\x07\x08"
                zip64 = max(info.file_size, info.compress_size) >= 0xFFFFFFFF
                at += (4 if signed else 0) + (20 if zip64 else 12)
        if at != cd_offset:
            raise invalid("bytes between the last member and the central directory", {"member": None,
                          "offset": at, "expected": cd_offset})


def _read_members(reader: _Reader, seen: set[str], files: list[dict[str, Any]]) -> BundleSummary:
    """Reads every member once, to its end (so zipfile verifies each CRC), through size
    caps; zipfile errors propagate to `validate`, which answers 400."""
    limits = reader.limits
    manifest = _read_manifest(reader)
    summary = BundleSummary(manifest, _parse_time(manifest["started_at"]), _parse_time(manifest["ended_at"]),
                            files=files)
    if summary.ended_at < summary.started_at:
        raise invalid("manifest: ended_at is before started_at", "ended_at")
    summary.event_count = _count_jsonl(reader, "events.jsonl", limits, require=("t", "type"))
    if "network.jsonl" in seen:
        summary.network_count = _count_jsonl(reader, "network.jsonl", limits, require=())
    if "network.har" in seen:
        summary.network_count += _count_har(reader)
    for f in files:
        if SCREENSHOT.match(f["name"]):
            _check_image(reader, f["name"])
            summary.screenshot_count += 1
    reader.check_layout(reader.zf.start_dir)
    return summary


def _read_manifest(reader: _Reader) -> dict[str, Any]:
    limits = reader.limits
    info = reader.zf.getinfo("manifest.json")
    if info.file_size > limits.max_manifest_bytes:
        raise invalid("manifest.json is too large", f"limit {limits.max_manifest_bytes} bytes", 413, "TP413")
    stream = reader.open("manifest.json")
    raw = stream.read()
    stream.drain()
    try:
        check_depth(raw, limits.max_depth)
    except JsonLimitError as e:
        raise json_limit(e, "manifest.json") from None
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid("manifest.json is not valid JSON", str(e)) from None
    errors = sorted(_manifest_validator().iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.absolute_path)
        if first.validator == "required":
            missing = [r for r in first.validator_value if isinstance(first.instance, dict) and r not in first.instance]
            where = ".".join(filter(None, [where, missing[0] if missing else ""]))
        raise invalid(f"manifest: {where or '(root)'}: {first.message}", {"field": where or None})
    return dict(manifest)


def _parse_time(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise invalid(f"manifest: not a date-time: {value!r}") from None


def _count_jsonl(reader: _Reader, name: str, limits: Limits, require: tuple[str, ...]) -> int:
    stream = reader.open(name)
    count = 0
    number = 0
    pending = b""
    while True:
        chunk = stream.read(1024 * 1024)
        data = pending + chunk
        lines = data.split(b"\n")
        pending = lines.pop() if chunk else b""
        if len(pending) > limits.max_line_bytes:
            raise invalid(f"{name}: line {number + 1} is longer than {limits.max_line_bytes} bytes",
                          {"file": name, "line": number + 1})
        for raw in lines:
            number += 1
            if not raw.strip():
                continue
            try:
                check_depth(raw, limits.max_depth)
            except JsonLimitError as e:
                raise json_limit(e, name, number) from None
            try:
                obj = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise invalid(f"{name}: line {number}: not valid JSON", {"file": name, "line": number,
                                                                          "error": str(e)}) from None
            if not isinstance(obj, dict):
                raise invalid(f"{name}: line {number}: not a JSON object", {"file": name, "line": number})
            missing = [k for k in require if k not in obj]
            if missing:
                raise invalid(f"{name}: line {number}: missing {', '.join(missing)}",
                              {"file": name, "line": number})
            if "t" in require and not isinstance(obj["t"], int | float | str):
                raise invalid(f"{name}: line {number}: t must be a number or a timestamp",
                              {"file": name, "line": number})
            if "type" in require and not isinstance(obj["type"], str):
                raise invalid(f"{name}: line {number}: type must be a string", {"file": name, "line": number})
            count += 1
        if not chunk:
            stream.drain()
            return count


class _Bounded:
    """network.har's bytes on their way to ijson, through JsonBounds: depth and token
    length are refused here, before yajl would buffer a token or nest further."""

    def __init__(self, stream: _Capped, bounds: JsonBounds) -> None:
        self.stream, self.bounds = stream, bounds

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.bounds.feed(data)
        return data


def _count_har(reader: _Reader) -> int:
    """Counts log.entries[*] from ijson's basic events (no prefix strings, which yajl2_c
    builds per level, quadratic in depth; no item is built). Only the first three levels'
    keys are kept."""
    limits = reader.limits
    stream = reader.open("network.har")
    bounds = JsonBounds(limits.max_depth, limits.max_token_bytes)
    containers: list[bool] = []  # True for an object, per open level
    keys: list[str | None] = []
    count = 0
    try:
        for event, value in ijson.basic_parse(_Bounded(stream, bounds), use_float=True, buf_size=64 * 1024):
            if event == "map_key":
                if len(containers) <= 3:
                    keys[-1] = value
                continue
            if event in ("end_map", "end_array"):
                containers.pop()
                if len(keys) > len(containers):
                    keys.pop()
                continue
            if containers == [True, True, False] and keys[0] == "log" and keys[1] == "entries":
                count += 1
            if event in ("start_map", "start_array"):
                containers.append(event == "start_map")
                if len(keys) < 3:
                    keys.append(None)
        stream.drain()
    except JsonLimitError as e:
        raise json_limit(e, "network.har") from None
    except (ijson.JSONError, ijson.IncompleteJSONError, ValueError, UnicodeDecodeError) as e:
        raise invalid("network.har: not valid HAR JSON", {"file": "network.har", "error": str(e)[:300]}) from None
    return count


def _check_image(reader: _Reader, name: str) -> None:
    """Magic bytes, then where the image says it ends: a PNG's IEND chunk, a WebP's RIFF
    size, a JPEG's EOI marker must be the member's last bytes, so nothing (an archive, say)
    rides after the picture. Data inside the image's own chunks is the image's business."""
    stream = reader.open(name)
    size = reader.zf.getinfo(name).file_size
    head = stream.read(16)
    ext = name.rsplit(".", 1)[1].lower()
    ok = (head[:4] == b"RIFF" and head[8:12] == b"WEBP") if ext == "webp" else head.startswith(MAGIC[ext])
    if not ok:
        raise invalid("screenshot is not the image its name says", name)
    if ext == "png":
        _walk_png(stream, head, name, size)
    else:
        tail = head
        while chunk := stream.read(1024 * 1024):
            tail = (tail + chunk)[-2:]
        ends = (struct.unpack_from("<I", head, 4)[0] + 8 == size) if ext == "webp" else tail == b"\xff\xd9"
        if not ends:
            raise invalid("bytes after the end of the image", {"member": name})
    stream.drain()


def _walk_png(stream: _Capped, head: bytes, name: str, size: int) -> None:
    """Follows the PNG's chunks (length, type, data, CRC) towards IEND, reading through; if
    IEND is reached it must end the member (`cat a.png b.zip` is refused). A PNG whose chunk
    structure does not hold is still accepted on its magic bytes alone, as it always was:
    images are the recorder's, decoded by viewers, never by us; this check catches an
    archive riding after a real picture, not a file crafted to look like none."""
    buffered = bytearray(head[8:])
    at = 8  # offset in the member of buffered[0]

    def take(n: int) -> bytes:
        nonlocal at
        while len(buffered) < n:
            chunk = stream.read(max(n - len(buffered), 64 * 1024))
            if not chunk:
                raise EOFError
            buffered.extend(chunk)
        out = bytes(buffered[:n])
        del buffered[:n]
        at += n
        return out

    try:
        while True:
            length, kind = struct.unpack(">I4s", take(8))
            if not kind.isalpha() or at + length + 4 > size:
                return  # not a chunk: no structure to follow (the caller drains and checks the CRC)
            left = length + 4  # the data and its CRC, in bounded pieces
            while left > 0:
                left -= len(take(min(left, 1024 * 1024)))
            if kind == b"IEND":
                break
    except EOFError:
        return
    if buffered or stream.read(1):
        raise invalid("bytes after the end of the image", {"member": name})
