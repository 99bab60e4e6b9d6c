"""Streaming request bodies into object storage, shared by POST /sessions and POST /examples.

A body arrives raw (one content type) or as multipart/form-data with one file field and
small JSON fields; either way the file's bytes go straight to a sink (an `Upload`, or a
hash-only sink when an idempotent retry only needs the digest), chunk by chunk, never
whole in memory. Idempotency: the first result of (caller, scope, Idempotency-Key) is
replayed for a retry with the same content and refused (409) for different content.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect

from ext.db import as_caller
from ext.errors import ApiError

log = logging.getLogger("ext.uploads")


class Sink(Protocol):
    async def write(self, data: bytes) -> None: ...


class Discardable(Protocol):
    async def abort(self) -> None: ...


async def discard(upload: Discardable) -> None:
    """The cleanup of every failed upload (an object written, a multipart upload open):
    run as its own task and shielded, so it completes even when the request's task is being
    cancelled (a cancelled scope would otherwise cancel the cleanup's first await too)."""
    await asyncio.shield(asyncio.ensure_future(upload.abort()))


def commit_outcome_unknown(e: BaseException) -> bool:
    """A COMMIT that failed without the server saying how: the connection broke (no SQLSTATE)
    or the server went away (class 08, 57P). The transaction may have committed."""
    return isinstance(e, psycopg.OperationalError) and (e.sqlstate is None or e.sqlstate.startswith(("08", "57P")))


async def discard_unless_committed(upload: Discardable, committing: bool, e: BaseException) -> None:
    """The cleanup of a failed upload, except when the failure was its row's COMMIT with an
    unknown outcome (PostgreSQL killed as it committed: the row may be there after its crash
    recovery). The object then stays: removing it could leave a committed row without its
    object; the orphan sweep removes it (after orphan_grace_s) if no row names it."""
    if committing and commit_outcome_unknown(e):
        log.warning("the commit's outcome is unknown (%s): the object stays for the orphan sweep to judge", e)
        return
    await discard(upload)


class HashSink:
    """Digest and size of a body, nothing stored (idempotent retries)."""

    def __init__(self, max_bytes: int) -> None:
        self.size = 0
        self.max_bytes = max_bytes
        self._hash = hashlib.sha256()

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise ApiError(413, "TP413", "body too large", f"the limit is {self.max_bytes} bytes")
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@dataclass
class BodyFields:
    """The small form fields that came with the file (parsed JSON objects or strings)."""

    values: dict[str, Any] = field(default_factory=dict)

    def json_object(self, name: str) -> dict[str, Any]:
        raw = self.values.get(name)
        if raw is None:
            return {}
        try:
            parsed = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(422, "TP422", f"form field {name} is not valid JSON", {"field": name}) from None
        if not isinstance(parsed, dict):
            raise ApiError(422, "TP422", f"form field {name} must be a JSON object", {"field": name})
        return parsed


def body_kind(request: Request, raw_types: tuple[str, ...]) -> str:
    """'raw' or 'multipart'; 415 for anything else, 413/400 from Content-Length at once."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return "multipart"
    if ctype in raw_types:
        return "raw"
    raise ApiError(415, "TP415", "unsupported content type",
                   f"send {' or '.join(raw_types)}, or multipart/form-data", None)


async def stream_body(request: Request, kind: str, sink: Sink, file_field: str, text_fields: tuple[str, ...],
                      max_field_bytes: int) -> BodyFields:
    """Feeds the file's bytes to `sink`; returns the small fields. 400 for an empty or
    malformed body; a client that disconnects mid-body raises ClientDisconnect."""
    fields = BodyFields()
    received = 0
    if kind == "raw":
        async for chunk in request.stream():
            if chunk:
                received += len(chunk)
                await sink.write(chunk)
        if received == 0:
            raise ApiError(400, "TP400", "empty body", "send the file as the request body")
        return fields

    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "TP400", "multipart body without a boundary")
    state: dict[str, Any] = {"name": None, "header_field": b"", "header_value": b"", "disposition": b"",
                             "file_seen": False, "ended": False}
    file_data = bytearray()
    field_data: dict[str, bytearray] = {}

    def on_part_begin() -> None:
        state["name"] = None
        state["disposition"] = b""

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header_field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["header_value"] += data[start:end]

    def on_header_end() -> None:
        if state["header_field"].lower() == b"content-disposition":
            state["disposition"] = state["header_value"]
        state["header_field"] = b""
        state["header_value"] = b""

    def on_headers_finished() -> None:
        _, opts = parse_options_header(state["disposition"])
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        if name == file_field:
            state["file_seen"] = True
        elif name in text_fields:
            field_data[name] = bytearray()
        else:
            raise ApiError(422, "TP422", f"unexpected form field {name!r}",
                           {"expected": [file_field, *text_fields]})
        state["name"] = name

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["name"] == file_field:
            file_data.extend(data[start:end])
        else:
            buf = field_data[state["name"]]
            buf.extend(data[start:end])
            if len(buf) > max_field_bytes:
                raise ApiError(413, "TP413", f"form field {state['name']} is too large",
                               f"the limit is {max_field_bytes} bytes")

    def on_end() -> None:
        state["ended"] = True

    parser = MultipartParser(boundary, {  # type: ignore[arg-type]
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_end": on_end,
    })
    async for chunk in request.stream():
        if not chunk:
            continue
        try:
            parser.write(chunk)
        except ApiError:
            raise
        except Exception as e:
            raise ApiError(400, "TP400", "malformed multipart body", str(e)) from None
        if file_data:
            received += len(file_data)
            data = bytes(file_data)
            file_data.clear()
            await sink.write(data)
    try:
        parser.finalize()
    except Exception as e:
        raise ApiError(400, "TP400", "malformed multipart body", str(e)) from None
    if not state["ended"]:  # the parser does not check this itself; the file's tail may be missing
        raise ApiError(400, "TP400", "malformed multipart body", "the closing boundary is missing")
    if not state["file_seen"]:
        raise ApiError(422, "TP422", f"form field {file_field} is missing", {"field": file_field})
    if received == 0:
        raise ApiError(400, "TP400", f"form field {file_field} is empty", {"field": file_field})
    fields.values = {k: bytes(v).decode("utf-8", "replace") for k, v in field_data.items()}
    return fields


def request_digest(content_sha256: str, extra: dict[str, Any]) -> str:
    """What an Idempotency-Key is bound to: the file's digest and the other fields."""
    canonical = json.dumps(jsonable_encoder(extra), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{content_sha256}\n{canonical}".encode()).hexdigest()


async def idempotent_result(conn: psycopg.AsyncConnection[Any], scope: str, key: str) -> dict[str, Any] | None:
    """The first result of (caller, scope, key), as this token may see it now: the row is
    read again through the api view under the caller's RLS, so a narrower token of the same
    person (a suite-scoped or read-only key) never gets a row it could not GET (`visible`
    is false, and the replay answers 404)."""
    cur = await conn.execute(
        psycopg.sql.SQL(
            "select k.request_sha256, (select to_json(v) from api.{} v where v.id = k.resource_id) as response"
            " from app.idempotency_keys k"
            " where k.user_id = auth.uid() and k.scope = %s and k.key = %s").format(psycopg.sql.Identifier(scope)),
        [scope, key])
    return await cur.fetchone()


def replayed(record: dict[str, Any], digest: str) -> JSONResponse:
    """The first result again (201, Idempotent-Replayed), or 409 if the content differs."""
    if record["request_sha256"] != digest:
        raise ApiError(409, "TP409", "Idempotency-Key was already used for a different request",
                       None, "Use a new Idempotency-Key for a new upload.")
    if record["response"] is None:  # the first result is not this token's to see (or is gone)
        raise ApiError(404, "TP404", "not found", None)
    return JSONResponse(record["response"], status_code=201, headers={"Idempotent-Replayed": "true"})


class ConcurrentRetry(Exception):
    """Another request with the same Idempotency-Key committed first."""


async def remember_result(conn: psycopg.AsyncConnection[Any], scope: str, key: str | None, digest: str,
                          resource_id: str, row: dict[str, Any]) -> None:
    """Records the first result of (caller, scope, key) in the transaction that writes the
    row; raises ConcurrentRetry when a concurrent request with the same key won."""
    if not key:
        return
    try:
        async with conn.transaction():
            await conn.execute(
                "insert into app.idempotency_keys (user_id, scope, key, request_sha256, resource_id, response)"
                " values (auth.uid(), %s, %s, %s, %s, %s)", [scope, key, digest, resource_id, Jsonb(row)])
    except psycopg.errors.UniqueViolation:
        raise ConcurrentRetry() from None


async def replay_winner(pool: AsyncConnectionPool, caller: dict[str, Any], rid: str | None, scope: str, key: str,
                        digest: str) -> JSONResponse:
    """After ConcurrentRetry: answer with the result of the request that committed first."""
    async with as_caller(pool, caller, rid) as conn:
        first = await idempotent_result(conn, scope, key)
    assert first is not None
    return replayed(first, digest)


def check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    key = key.strip()
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise ApiError(400, "TP400", "Idempotency-Key must be 1 to 255 printable characters")
    return key


__all__ = ["BodyFields", "ClientDisconnect", "ConcurrentRetry", "HashSink", "body_kind", "check_idempotency_key",
           "discard",
           "idempotent_result", "remember_result", "replay_winner", "replayed", "request_digest", "stream_body"]
