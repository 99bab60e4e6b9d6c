"""Validation of a stored session bundle (DESIGN.md §5), read in place through ranged
GETs: never extracted to disk, never held whole in memory.

Checks, in order: the central directory; member count, names (no `..`, absolute paths,
backslashes, NUL; no duplicates; only known members), sizes and compression ratios (zip
bombs); the manifest against ext/schemas/manifest.schema.json; events.jsonl line by line;
network.har / network.jsonl; screenshot magic bytes. Every member that is read is read
through a size cap, so a lying header cannot expand past its declared size.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import ijson
import jsonschema

from ext.errors import ApiError

SCHEMA_PATH = Path(__file__).parent / "schemas" / "manifest.schema.json"
SCREENSHOT = re.compile(r"^screenshots/[^/]+\.(png|jpe?g|webp)$", re.IGNORECASE)
KNOWN_FILES = {"manifest.json", "events.jsonl", "network.har", "network.jsonl"}
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


@dataclass
class BundleSummary:
    manifest: dict[str, Any]
    started_at: datetime
    ended_at: datetime
    event_count: int = 0
    network_count: int = 0
    screenshot_count: int = 0
    files: list[dict[str, Any]] = field(default_factory=list)


def invalid(message: str, details: Any = None, status: int = 422, code: str = "TP422") -> ApiError:
    return ApiError(status, code, message, details)


@lru_cache(maxsize=1)
def _manifest_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)  # type: ignore[no-any-return]


def _check_name(name: str) -> None:
    if ("\x00" in name or "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name)
            or ".." in name.split("/")):
        raise invalid("unsafe member path in the bundle", repr(name[:300]))


class _Capped:
    """Reads a member but never more than its declared size (+1 byte to detect lies)."""

    def __init__(self, raw: IO[bytes], limit: int, name: str) -> None:
        self.raw, self.left, self.name = raw, limit + 1, name

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise invalid("bundle member expands beyond its declared size", self.name, 413, "TP413")
        data = self.raw.read(self.left if n is None or n < 0 else min(n, self.left))
        self.left -= len(data)
        if self.left <= 0 and data:
            raise invalid("bundle member expands beyond its declared size", self.name, 413, "TP413")
        return data


def validate(archive: IO[bytes] | io.RawIOBase, limits: Limits) -> BundleSummary:
    """Validates the bundle in `archive` (a seekable file object); raises ApiError (400, 413
    or 422 with the reason) on the first problem, returns what the session row records."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise invalid("the body is not a zip archive, or it is corrupt", str(e), 400, "TP400") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise invalid("too many members in the bundle", f"{len(infos)} > {limits.max_members}", 413, "TP413")
        seen: set[str] = set()
        total = 0
        files: list[dict[str, Any]] = []
        for info in infos:
            _check_name(info.orig_filename)  # as stored: zipfile cuts `filename` at the first NUL
            if info.filename in seen:
                raise invalid("duplicate member in the bundle", info.filename)
            seen.add(info.filename)
            if info.flag_bits & 0x1:
                raise invalid("encrypted members are not accepted", info.filename)
            if info.is_dir():
                continue
            if info.filename not in KNOWN_FILES and not SCREENSHOT.match(info.filename):
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
        try:
            return _read_members(zf, seen, files, limits)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # bad CRC, broken deflate stream, lying sizes
            raise invalid("the zip archive is corrupt", str(e), 400, "TP400") from None
        except NotImplementedError as e:  # compression methods zipfile cannot read
            raise invalid("unsupported zip member", str(e)) from None


def _read_members(zf: zipfile.ZipFile, seen: set[str], files: list[dict[str, Any]], limits: Limits) -> BundleSummary:
    """Reads the members that say what the session holds (through size caps); zipfile
    errors propagate to `validate`, which answers 400."""
    manifest = _read_manifest(zf, limits)
    summary = BundleSummary(manifest, _parse_time(manifest["started_at"]), _parse_time(manifest["ended_at"]),
                            files=files)
    if summary.ended_at < summary.started_at:
        raise invalid("manifest: ended_at is before started_at", "ended_at")
    summary.event_count = _count_jsonl(zf, "events.jsonl", limits, require=("t", "type"))
    if "network.jsonl" in seen:
        summary.network_count = _count_jsonl(zf, "network.jsonl", limits, require=())
    if "network.har" in seen:
        summary.network_count += _count_har(zf)
    for f in files:
        if SCREENSHOT.match(f["name"]):
            _check_image(zf, f["name"])
            summary.screenshot_count += 1
    return summary


def _open(zf: zipfile.ZipFile, name: str) -> _Capped:
    info = zf.getinfo(name)
    return _Capped(zf.open(info), info.file_size, name)


def _read_manifest(zf: zipfile.ZipFile, limits: Limits) -> dict[str, Any]:
    info = zf.getinfo("manifest.json")
    if info.file_size > limits.max_manifest_bytes:
        raise invalid("manifest.json is too large", f"limit {limits.max_manifest_bytes} bytes", 413, "TP413")
    try:
        manifest = json.loads(_open(zf, "manifest.json").read())
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


def _count_jsonl(zf: zipfile.ZipFile, name: str, limits: Limits, require: tuple[str, ...]) -> int:
    stream = _open(zf, name)
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
            return count


def _count_har(zf: zipfile.ZipFile) -> int:
    try:
        return sum(1 for _ in ijson.items(_open(zf, "network.har"), "log.entries.item"))
    except ijson.JSONError as e:
        raise invalid("network.har: not valid HAR JSON", str(e)) from None


def _check_image(zf: zipfile.ZipFile, name: str) -> None:
    head = _open(zf, name).read(16)
    ext = name.rsplit(".", 1)[1].lower()
    ok = (head[:4] == b"RIFF" and head[8:12] == b"WEBP") if ext == "webp" else head.startswith(MAGIC[ext])
    if not ok:
        raise invalid("screenshot is not the image its name says", name)
