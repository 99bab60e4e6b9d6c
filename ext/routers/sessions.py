"""Session bundles: upload (POST /sessions), download (GET /sessions/{id}/bundle), one
member (GET /sessions/{id}/files/{path}), delete (DELETE /sessions/{id}).

Upload is all-or-nothing: the body streams to `sessions/{id}/bundle.zip`, the stored
archive is validated in place, and only then is the row written, as the caller (RLS
decides, e.g. whether the caller may tag the session with a suite). Any failure removes
the object or aborts the multipart upload. Reads check visibility as the caller first.
"""

from __future__ import annotations

import mimetypes
import uuid
import zipfile
from collections.abc import AsyncIterator
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse
from psycopg.types.json import Jsonb
from starlette.concurrency import run_in_threadpool

from ext import bundles
from ext.config import ExtSettings
from ext.db import api_row, as_caller
from ext.deps import CallerDep, PoolDep, RequestIdDep, SettingsDep, StoreDep
from ext.errors import ApiError
from ext.maintenance import drain_deletions
from ext.storage import ObjectStore, StoredObject
from ext.streaming import PrimedStreamingResponse, documented, stream_object
from ext.uploads import (
    ConcurrentRetry,
    HashSink,
    body_kind,
    check_idempotency_key,
    discard,
    discard_unless_committed,
    idempotent_result,
    remember_result,
    replay_winner,
    replayed,
    request_digest,
    stream_body,
)

router = APIRouter(tags=["sessions"])

ZIP_TYPES = ("application/zip", "application/x-zip-compressed")


def not_found() -> ApiError:
    return ApiError(404, "PGRST116", "not found", "the session does not exist or you may not see it")


def bundle_key(session_id: str) -> str:
    return f"sessions/{session_id}/bundle.zip"


def _parse_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise not_found() from None


async def validate_stored(store: ObjectStore, settings: ExtSettings, stored: StoredObject) -> bundles.BundleSummary:
    """Validates a stored bundle in place (ranged reads, off the event loop); ApiError (§5) on
    the first problem. The first half of the commit step of POST /sessions and of tus uploads."""
    reader = store.range_reader(stored.key, stored.size)
    reader.MAX_FETCH = settings.bundle_read_bytes  # validation reads every member: keep its blocks small
    return await run_in_threadpool(bundles.validate, reader, bundles.Limits.of(settings))


async def insert_session(conn: psycopg.AsyncConnection[Any], session_id: str, stored: StoredObject,
                         summary: bundles.BundleSummary, user_metadata: dict[str, Any],
                         suite_id: str | None = None) -> dict[str, Any]:
    """Writes the session row as the caller (RLS decides, e.g. the suite tag) and returns it as
    PostgREST shows it. The second half of the commit step of POST /sessions and of tus uploads
    (ext/tus.py), which calls it in the transaction that marks the upload done. `suite_id`
    tags a session whose manifest names none; a manifest naming another suite is refused."""
    manifest = summary.manifest
    if suite_id and manifest.get("suite_id") and manifest["suite_id"] != suite_id:
        raise ApiError(422, "TP422", "the manifest's suite_id differs from the upload's suite_id",
                       {"field": "suite_id"}, "Name one suite, in the manifest or in the upload metadata.")
    metadata = {**manifest.get("metadata", {}), **user_metadata, "client": manifest["client"],
                "format_version": manifest["format_version"]}
    try:
        await conn.execute(
            "insert into app.sessions (id, user_id, suite_id, size_bytes, sha256, started_at, ended_at,"
            " event_count, network_count, screenshot_count, files, metadata)"
            " values (%s, auth.uid(), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [session_id, manifest.get("suite_id") or suite_id, stored.size, stored.sha256, summary.started_at,
             summary.ended_at, summary.event_count, summary.network_count, summary.screenshot_count,
             Jsonb(summary.files), Jsonb(metadata)])
    except psycopg.errors.InsufficientPrivilege:
        raise ApiError(403, "42501", "you may not upload this session",
                       "tagging a session with a suite needs membership of it, and the token must "
                       "allow writes (and that suite, for a suite-scoped key)") from None
    return await api_row(conn, "sessions", session_id)


@router.post("/sessions", status_code=201, summary="Upload a trace bundle (zip); 201 with the session row",
             openapi_extra={"requestBody": {"content": {
                 "application/zip": {"schema": {"type": "string", "format": "binary"}},
                 "multipart/form-data": {"schema": {"type": "object", "required": ["bundle"], "properties": {
                     "bundle": {"type": "string", "format": "binary"},
                     "metadata": {"type": "string", "description": "JSON object kept with the session"}}}}}}})
async def upload_session(request: Request, caller: CallerDep, pool: PoolDep, settings: SettingsDep,
                         store: StoreDep, rid: RequestIdDep,
                         idempotency_key: Annotated[str | None, Header()] = None) -> Response:
    kind = body_kind(request, ZIP_TYPES)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.max_bundle_bytes:
        raise ApiError(413, "TP413", "body too large", f"the limit is {settings.max_bundle_bytes} bytes")
    key = check_idempotency_key(idempotency_key)
    async with as_caller(pool, caller, rid) as conn:  # refuse revoked tokens before reading the body
        previous = await idempotent_result(conn, "sessions", key) if key else None

    if previous is not None:  # a retry: digest the body, replay the first result or refuse
        sink = HashSink(settings.max_bundle_bytes)
        fields = await stream_body(request, kind, sink, "bundle", ("metadata",), settings.max_metadata_bytes)
        digest = request_digest(sink.hexdigest(), fields.json_object("metadata"))
        return replayed(previous, digest)

    session_id = str(uuid.uuid4())
    upload = store.uploader(bundle_key(session_id), settings.max_bundle_bytes)
    committing = False
    try:
        fields = await stream_body(request, kind, upload, "bundle", ("metadata",), settings.max_metadata_bytes)
        user_metadata = fields.json_object("metadata")
        stored = await upload.finish()
        summary = await validate_stored(store, settings, stored)
        digest = request_digest(stored.sha256, user_metadata)
        async with as_caller(pool, caller, rid) as conn:
            row = await insert_session(conn, session_id, stored, summary, user_metadata)
            await remember_result(conn, "sessions", key, digest, session_id, row)
            committing = True  # what fails from here on is the COMMIT
    except ConcurrentRetry:
        await discard(upload)
        return await replay_winner(pool, caller, rid, "sessions", key or "", digest)
    except BaseException as e:  # bad input, disconnect, store or database failure: leave nothing
        await discard_unless_committed(upload, committing, e)
        raise
    return JSONResponse(row, status_code=201, headers={"Location": f"/sessions/{session_id}"})


async def _visible_session(pool: PoolDep, caller: dict[str, Any], rid: str | None, session_id: str) -> dict[str, Any]:
    async with as_caller(pool, caller, rid) as conn:
        cur = await conn.execute("select id, sha256, size_bytes, files from api.sessions where id = %s",
                                 [session_id])
        row = await cur.fetchone()
    if row is None:
        raise not_found()
    return dict(row)


@router.get("/sessions/{session_id}/bundle", summary="The stored bundle, byte-identical (Range, ETag)",
            response_class=Response, responses=documented("application/zip"))
async def download_bundle(session_id: str, caller: CallerDep, pool: PoolDep, store: StoreDep, rid: RequestIdDep,
                          range_header: Annotated[str | None, Header(alias="range")] = None,
                          if_none_match: Annotated[str | None, Header()] = None) -> Response:
    sid = _parse_id(session_id)
    row = await _visible_session(pool, caller, rid, sid)
    return stream_object(store, bundle_key(sid), row["size_bytes"], f'"{row["sha256"]}"', "application/zip",
                         range_header, if_none_match,
                         {"Content-Disposition": f'attachment; filename="session-{sid}.zip"'})


MEDIA_TYPES = {".jsonl": "application/jsonl", ".har": "application/json", ".json": "application/json",
               ".webp": "image/webp"}


@router.get("/sessions/{session_id}/files/{path:path}", summary="One member of the bundle (e.g. a screenshot)",
            response_class=Response, responses=documented("*/*", ranges=False))
async def download_member(session_id: str, path: str, caller: CallerDep, pool: PoolDep, store: StoreDep,
                          rid: RequestIdDep) -> Response:
    sid = _parse_id(session_id)
    row = await _visible_session(pool, caller, rid, sid)
    member = next((f for f in row["files"] if f["name"] == path), None)
    if member is None:
        raise ApiError(404, "TP404", "no such file in the bundle", path)
    suffix = "." + path.rsplit(".", 1)[-1].lower() if "." in path else ""
    media_type = MEDIA_TYPES.get(suffix) or mimetypes.guess_type(path)[0] or "application/octet-stream"
    reader = store.range_reader(bundle_key(sid), row["size_bytes"])
    chunk = store.chunk

    def open_member() -> Any:
        return zipfile.ZipFile(reader).open(path)

    handle = await run_in_threadpool(open_member)

    async def body() -> AsyncIterator[bytes]:
        try:
            while data := await run_in_threadpool(handle.read, chunk):
                yield data
        finally:
            handle.close()

    return PrimedStreamingResponse(body(), media_type=media_type,
                                   headers={"Content-Length": str(member["size"]), "ETag": f'"{member["crc"]}"'})


@router.delete("/sessions/{session_id}", summary="Delete a session (its uploader): the row, then its objects")
async def delete_session(session_id: str, caller: CallerDep, pool: PoolDep, store: StoreDep,
                         rid: RequestIdDep) -> JSONResponse:
    sid = _parse_id(session_id)
    async with as_caller(pool, caller, rid) as conn:
        cur = await conn.execute("delete from app.sessions s where s.id = %s returning to_json(s) as row", [sid])
        deleted = await cur.fetchone()
    if deleted is None:
        raise not_found()
    # The delete queued sessions/{id}/ (and its examples' prefixes) in app.object_deletions.
    await drain_deletions(pool, store)
    return JSONResponse(deleted["row"])


# HEAD answers what GET would, without the body (PrimedStreamingResponse reads nothing for it).
router.add_api_route("/sessions/{session_id}/bundle", download_bundle, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/sessions/{session_id}/files/{path:path}", download_member, methods=["HEAD"],
                     include_in_schema=False)
