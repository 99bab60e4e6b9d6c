"""Training examples: registration (POST /examples), the JSONL stream
(GET /examples/{id}/messages) and the export of many examples as one fine-tuning file
(GET /examples/export). Listing and metadata are PostgREST's (GET /examples[/{id}]).

Registration streams the body to `examples/{id}/messages.jsonl` while validating every
line; the first bad line aborts the upload (nothing stored) and is reported. The row is
written as the caller, so RLS decides who may register (the pipeline, suite editors).
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
import uuid
import zlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

import psycopg
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from psycopg.types.json import Jsonb
from pydantic import BaseModel, Field, ValidationError

from ext.db import api_row, as_caller
from ext.deps import CallerDep, PoolDep, RequestIdDep, SettingsDep, StoreDep
from ext.errors import ApiError
from ext.jsonl import LineValidator
from ext.storage import Upload
from ext.streaming import PrimedStreamingResponse, documented, stream_object
from ext.uploads import (
    ConcurrentRetry,
    HashSink,
    body_kind,
    check_idempotency_key,
    discard_unless_committed,
    idempotent_result,
    remember_result,
    replay_winner,
    replayed,
    request_digest,
    stream_body,
)

router = APIRouter(tags=["examples"])

JSONL_TYPES = ("application/jsonl", "application/x-ndjson", "application/jsonlines", "application/json-lines")


class ExampleMeta(BaseModel):
    suite_id: uuid.UUID
    model: str = Field(min_length=1, max_length=200)
    session_id: uuid.UUID | None = None
    job_id: uuid.UUID | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


def example_key(example_id: str) -> str:
    return f"examples/{example_id}/messages.jsonl"


def not_found() -> ApiError:
    return ApiError(404, "PGRST116", "not found", "the example does not exist or you may not see it")


def _meta(values: dict[str, Any]) -> ExampleMeta:
    try:
        return ExampleMeta.model_validate(values)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(422, "TP422", f"invalid example metadata: {where}: {first['msg']}", {"field": where}) from None


class _ValidatingSink:
    """Validates JSONL lines on their way to the upload."""

    def __init__(self, upload: Upload | HashSink, max_line_bytes: int, max_depth: int) -> None:
        self.upload = upload
        self.lines = LineValidator(max_line_bytes, max_depth)

    async def write(self, data: bytes) -> None:
        self.lines.feed(data)
        await self.upload.write(data)


async def _job_lineage(conn: psycopg.AsyncConnection[Any], meta: ExampleMeta) -> None:
    """An example registered for a pipeline job belongs to the job's session."""
    if meta.job_id is None:
        return
    cur = await conn.execute("select session_id from api.pipeline_jobs where id = %s", [meta.job_id])
    job = await cur.fetchone()
    if job is None:
        raise ApiError(422, "TP422", "job_id does not exist or you may not see it", {"field": "job_id"},
                       "Pass the id of the job POST /pipeline/claim leased to you.")
    if meta.session_id is None:
        meta.session_id = job["session_id"]
    elif meta.session_id != job["session_id"]:
        raise ApiError(422, "TP422", "session_id is not the session of job_id", {"field": "session_id"},
                       "Leave session_id out: it is taken from the job.")


async def _insert(conn: psycopg.AsyncConnection[Any], example_id: str, meta: ExampleMeta, lines: int, size: int,
                  sha256: str) -> dict[str, Any]:
    """Inserts the row; for a job that already registered the same content, answers that
    example's row instead (registration with a job_id is idempotent)."""
    try:
        await _job_lineage(conn, meta)
        cur = await conn.execute(
            "insert into app.examples (id, session_id, suite_id, model, message_count, size_bytes, sha256, metadata,"
            " job_id) values (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " on conflict (job_id, sha256) do nothing returning id",
            [example_id, meta.session_id, meta.suite_id, meta.model, lines, size, sha256, Jsonb(meta.metadata),
             meta.job_id])
        if await cur.fetchone() is None:
            cur = await conn.execute("select id from app.examples where job_id = %s and sha256 = %s",
                                     [meta.job_id, sha256])
            existing = await cur.fetchone()
            assert existing is not None
            return await api_row(conn, "examples", str(existing["id"]))
    except psycopg.errors.InsufficientPrivilege:
        raise ApiError(403, "42501", "you may not register examples in this suite or for this session",
                       "registering needs a pipeline account or the editor role in the suite, a token that may "
                       "write to it, and a session_id (if any) of a session you can read") from None
    except psycopg.errors.ForeignKeyViolation:
        raise ApiError(422, "TP422", "session_id, suite_id or job_id does not exist", None) from None
    return await api_row(conn, "examples", example_id)


@router.post("/examples", status_code=201, summary="Register an example: metadata + JSONL messages; 201 with the row",
             openapi_extra={"requestBody": {"content": {
                 "application/jsonl": {"schema": {"type": "string", "format": "binary"}},
                 "multipart/form-data": {"schema": {"type": "object", "required": ["metadata", "messages"],
                                                    "properties": {
                     "metadata": {"type": "string",
                                  "description": "JSON {suite_id, model, session_id?, job_id?, metadata?}"},
                     "messages": {"type": "string", "format": "binary"}}}}}}})
async def register_example(
    request: Request, caller: CallerDep, pool: PoolDep, settings: SettingsDep, store: StoreDep, rid: RequestIdDep,
    suite_id: Annotated[str | None, Query(description="raw bodies: the suite")] = None,
    model: Annotated[str | None, Query(description="raw bodies: the model")] = None,
    session_id: Annotated[str | None, Query(description="raw bodies: the session it came from")] = None,
    job_id: Annotated[str | None, Query(description="raw bodies: the pipeline job that produced it")] = None,
    metadata: Annotated[str | None, Query(description="raw bodies: JSON object kept with the example")] = None,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    kind = body_kind(request, JSONL_TYPES)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.max_example_bytes:
        raise ApiError(413, "TP413", "body too large", f"the limit is {settings.max_example_bytes} bytes")
    key = check_idempotency_key(idempotency_key)
    example_id = str(uuid.uuid4())
    meta: ExampleMeta | None = None
    if kind == "raw":
        extra: dict[str, Any] = {"suite_id": suite_id, "model": model, "session_id": session_id, "job_id": job_id}
        if metadata is not None:
            try:
                extra["metadata"] = json.loads(metadata)
            except ValueError:
                raise ApiError(422, "TP422", "metadata is not valid JSON", {"field": "metadata"}) from None
        meta = _meta({k: v for k, v in extra.items() if v is not None})
    async with as_caller(pool, caller, rid) as conn:
        previous = await idempotent_result(conn, "examples", key) if key else None
        if meta is not None and previous is None:  # fail fast: may the caller register here at all?
            async with conn.transaction(force_rollback=True):
                await _insert(conn, example_id, meta, 0, 0, "0" * 64)

    if previous is not None:
        sink = _ValidatingSink(HashSink(settings.max_example_bytes), settings.max_jsonl_line_bytes,
                               settings.max_json_depth)
        fields = await stream_body(request, kind, sink, "messages", ("metadata",), settings.max_metadata_bytes)
        meta = meta or _meta(fields.json_object("metadata"))
        assert isinstance(sink.upload, HashSink)
        digest = request_digest(sink.upload.hexdigest(), meta.model_dump(mode="json"))
        return replayed(previous, digest)

    upload = store.uploader(example_key(example_id), settings.max_example_bytes)
    validating = _ValidatingSink(upload, settings.max_jsonl_line_bytes, settings.max_json_depth)
    committing = False
    try:
        fields = await stream_body(request, kind, validating, "messages", ("metadata",), settings.max_metadata_bytes)
        validating.lines.finish()
        meta = meta or _meta(fields.json_object("metadata"))
        stored = await upload.finish()
        digest = request_digest(stored.sha256, meta.model_dump(mode="json"))
        async with as_caller(pool, caller, rid) as conn:
            row = await _insert(conn, example_id, meta, validating.lines.lines, stored.size, stored.sha256)
            await remember_result(conn, "examples", key, digest, row["id"], row)
            committing = True  # what fails from here on is the COMMIT
    except ConcurrentRetry:
        await upload.abort()
        return await replay_winner(pool, caller, rid, "examples", key or "", digest)
    except BaseException as e:
        await discard_unless_committed(upload, committing, e)
        raise
    if row["id"] != example_id:  # the job registered this content before: one example, ours is a copy
        await store.delete(example_key(example_id))
        return JSONResponse(row, status_code=200, headers={"Location": f"/examples/{row['id']}"})
    return JSONResponse(row, status_code=201, headers={"Location": f"/examples/{example_id}"})


async def _visible_example(pool: PoolDep, caller: dict[str, Any], rid: str | None, example_id: str) -> dict[str, Any]:
    try:
        eid = str(uuid.UUID(example_id))
    except ValueError:
        raise not_found() from None
    async with as_caller(pool, caller, rid) as conn:
        cur = await conn.execute("select id, sha256, size_bytes from api.examples where id = %s", [eid])
        row = await cur.fetchone()
    if row is None:
        raise not_found()
    return dict(row)


LINES_HINT = "a-b (lines a to b), a- (line a to the end) or a (line a alone); 1-based, inclusive"


def _line_range(spec: str) -> tuple[int, int]:
    """`a-b`, `a-` (to the end: sys.maxsize) or `a`."""
    first, dash, last = spec.partition("-")
    try:
        start = int(first)
        end = int(last) if last else (sys.maxsize if dash else start)
    except ValueError:
        raise ApiError(400, "TP400", "invalid lines parameter", spec, f"Use {LINES_HINT}.") from None
    if start < 1 or end < start:
        raise ApiError(400, "TP400", "invalid lines parameter", spec, f"Use {LINES_HINT}.")
    return start, end


async def _select_lines(chunks: AsyncIterator[bytes], start: int, end: int) -> AsyncIterator[bytes]:
    """Only lines start..end (1-based); stops reading the object after `end`."""
    number = 1
    pending = b""
    async for chunk in chunks:
        data = pending + chunk
        pos = 0
        while (nl := data.find(b"\n", pos)) != -1:
            if start <= number <= end:
                yield data[pos: nl + 1]
            number += 1
            pos = nl + 1
            if number > end:
                await chunks.aclose()  # type: ignore[attr-defined]
                return
        pending = data[pos:]
    if pending and start <= number <= end:
        yield pending


async def _gzip(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    async for chunk in chunks:
        out = compressor.compress(chunk)
        if out:
            yield out
    yield compressor.flush()


def _accepts_gzip(header: str | None) -> bool:
    """Whether Accept-Encoding allows gzip (present, and not with q=0)."""
    for part in (header or "").split(","):
        name, _, params = part.strip().partition(";")
        if name.strip().lower() == "gzip":
            q = params.replace(" ", "").removeprefix("q=") if params else "1"
            try:
                return float(q) > 0
            except ValueError:
                return True
    return False


def _bad_cursor(reason: str) -> ApiError:
    return ApiError(400, "TP400", f"invalid cursor parameter: {reason}", {"parameter": "cursor", "reason": reason},
                    "Pass the X-Next-Cursor header of the previous page unchanged, or omit cursor for the first page.")


def _parse_cursor(cursor: str, max_bytes: int) -> tuple[datetime, uuid.UUID]:
    """The (created_at, id) an X-Next-Cursor encodes: base64url of {"c": iso time, "i": uuid},
    nothing else. Checked piece by piece, bounded before anything is decoded."""
    if len(cursor) > max_bytes:
        raise _bad_cursor(f"longer than {max_bytes} characters")
    try:
        raw = base64.urlsafe_b64decode(cursor.encode("ascii") + b"=" * (-len(cursor) % 4))
    except (ValueError, binascii.Error):
        raise _bad_cursor("not base64url") from None
    if raw.count(b"{") + raw.count(b"[") > 1:  # one flat object: nothing nested to recurse into
        raise _bad_cursor("not a flat JSON object")
    try:
        decoded = json.loads(raw)
    except ValueError:
        raise _bad_cursor("not JSON") from None
    if not isinstance(decoded, dict) or set(decoded) != {"c", "i"}:
        raise _bad_cursor('not {"c": …, "i": …}')
    created, ident = decoded["c"], decoded["i"]
    if not isinstance(created, str) or not isinstance(ident, str):
        raise _bad_cursor("c and i must be strings")
    try:
        at = datetime.fromisoformat(created)
        eid = uuid.UUID(ident)
    except ValueError:
        raise _bad_cursor("c must be an ISO timestamp and i a UUID") from None
    if at.tzinfo is None:
        raise _bad_cursor("c must carry a time zone")
    return at, eid


@router.get("/examples/export", summary="Every visible example's lines as one JSONL stream (fine-tuning format)",
            response_class=Response, responses=documented(
                "application/jsonl", ranges=False, description="The lines of every example of the page, in order"))
async def export_examples(
    caller: CallerDep, pool: PoolDep, store: StoreDep, settings: SettingsDep, rid: RequestIdDep,
    suite_id: uuid.UUID | None = None, model: str | None = None, session_id: uuid.UUID | None = None,
    split: Annotated[Literal["all", "train", "validation"], Query(
        description="deterministic split by a hash of the example id")] = "all",
    validation_percent: Annotated[int, Query(ge=1, le=50)] = 10,
    cursor: Annotated[str | None, Query(description="X-Next-Cursor of the previous page")] = None,
    limit: Annotated[int | None, Query(ge=1, description="examples per page")] = None,
) -> Response:
    page = min(limit or settings.export_page_examples, settings.export_page_examples)
    after = _parse_cursor(cursor, settings.max_cursor_bytes) if cursor else None
    bucket = "(('x' || substr(md5(id::text), 1, 8))::bit(32)::bigint %% 100)"
    split_sql = {"all": "true", "train": f"{bucket} >= %(pct)s", "validation": f"{bucket} < %(pct)s"}[split]
    query = (
        "select id, created_at, size_bytes from api.examples"
        " where (%(suite)s::uuid is null or suite_id = %(suite)s) and (%(model)s::text is null or model = %(model)s)"
        " and (%(session)s::uuid is null or session_id = %(session)s)"
        " and (%(after_c)s::timestamptz is null or (created_at, id) > (%(after_c)s, %(after_i)s::uuid))"
        f" and {split_sql} order by created_at, id limit %(n)s"
    )
    async with as_caller(pool, caller, rid) as conn:
        cur = await conn.execute(query, {
            "suite": suite_id, "model": model, "session": session_id, "pct": validation_percent,
            "after_c": after[0] if after else None, "after_i": after[1] if after else None, "n": page + 1})
        rows = await cur.fetchall()
    more = len(rows) > page
    rows = rows[:page]
    headers = {"X-Export-Count": str(len(rows))}
    if more:
        last = rows[-1]
        token = json.dumps({"c": last["created_at"].isoformat(), "i": str(last["id"])}).encode()
        headers["X-Next-Cursor"] = base64.urlsafe_b64encode(token).decode().rstrip("=")

    async def body() -> AsyncIterator[bytes]:
        for row in rows:
            tail = b""
            async for chunk in store.stream(example_key(str(row["id"]))):
                tail = chunk[-1:]
                yield chunk
            if tail and tail != b"\n":
                yield b"\n"

    return PrimedStreamingResponse(body(), media_type="application/jsonl", headers=headers)


@router.get("/examples/{example_id}/messages", summary="The example's JSONL, byte-identical (Range, ETag, gzip)",
            response_class=Response, responses=documented("application/jsonl"))
async def stream_messages(
    example_id: str, caller: CallerDep, pool: PoolDep, store: StoreDep, rid: RequestIdDep,
    lines: Annotated[str | None, Query(description=f"only these lines: {LINES_HINT}")] = None,
    range_header: Annotated[str | None, Header(alias="range")] = None,
    if_none_match: Annotated[str | None, Header()] = None,
    accept_encoding: Annotated[str | None, Header()] = None,
) -> Response:
    row = await _visible_example(pool, caller, rid, example_id)
    key = example_key(str(row["id"]))
    etag = f'"{row["sha256"]}"'
    if lines is not None:
        start, end = _line_range(lines)
        chunks = _select_lines(store.stream(key), start, end)
        if _accepts_gzip(accept_encoding):
            return PrimedStreamingResponse(_gzip(chunks), media_type="application/jsonl",
                                     headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
        return PrimedStreamingResponse(chunks, media_type="application/jsonl", headers={"Vary": "Accept-Encoding"})
    if _accepts_gzip(accept_encoding) and range_header is None:
        gz_etag = f'"{row["sha256"]}-gzip"'
        if if_none_match and gz_etag in [t.strip() for t in if_none_match.split(",")]:
            return Response(status_code=304, headers={"ETag": gz_etag})
        return PrimedStreamingResponse(_gzip(store.stream(key)), media_type="application/jsonl",
                                 headers={"Content-Encoding": "gzip", "ETag": gz_etag, "Vary": "Accept-Encoding"})
    return stream_object(store, key, row["size_bytes"], etag, "application/jsonl", range_header, if_none_match,
                         {"Vary": "Accept-Encoding"})


# HEAD answers what GET would, without the body (PrimedStreamingResponse reads nothing for it).
router.add_api_route("/examples/export", export_examples, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/examples/{example_id}/messages", stream_messages, methods=["HEAD"], include_in_schema=False)
