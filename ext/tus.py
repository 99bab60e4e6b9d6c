"""Resumable uploads of session bundles: tus 1.0.0 core + creation + termination +
expiration + checksum (sha256) on /uploads (DESIGN.md §11), after tusd (pkg/handler/unrouted_handler.go: one
handler per verb, the offset checked before any byte is written; pkg/s3store/s3store.go:
the bytes go straight into an S3 multipart upload, and a tail smaller than S3's minimum
part waits in an "incomplete part" object of its own until the next PATCH completes it).

State lives in app.tus_uploads (offset, parts with their ETags, the tail object), written
as the caller after every part, so any ext instance takes any PATCH and a restarted one
goes on where the last stopped. A PATCH (and a DELETE) holds a session-level advisory
lock on its upload, on a connection of its own (the lock pool): a second PATCH of the same
upload answers 409, and a PATCH whose ext dies drops its lock with its connection. A row
lock would serialise the same way but lives only as long as a transaction, and each
part's progress must commit while the PATCH goes on.

Memory: a PATCH holds at most one part (tus_part_bytes) and sends it before reading more.
With a declared Content-Length (every tus client sends one) the part is sent while it is
received (tus_stream_parts): an upload_part in a worker thread reads the same chunks the
PATCH keeps as they arrive (references, no second copy), so storing overlaps receiving and
the PATCH answers right after its last byte is stored. The kept copy is the fallback: a
streamed part that fails (the client stalls past tus_stream_idle_s, the body is cut, the
store errs) is dropped and the buffered bytes go the buffered way. The streamed request is
sent without a payload hash (x-amz-content-sha256: UNSIGNED-PAYLOAD, its headers still
signed): SigV4 needs the hash before the first byte.

When the last byte lands, the bundle is validated and the session written with the
functions of POST /sessions (ext/routers/sessions.py), in the transaction that marks the
upload done. The session id is fixed when the upload is created (the multipart upload
targets sessions/{session_id}/bundle.zip), so one upload never yields two sessions. A bad
bundle answers the §5 error body and leaves nothing: no row, no object, no parts.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import logging
import queue
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ext import bundles
from ext.config import ExtSettings
from ext.db import as_caller, become_caller, idle_check
from ext.deps import CallerDep, PoolDep, RequestIdDep, SettingsDep, StoreDep
from ext.errors import ApiError, unavailable
from ext.routers.sessions import bundle_key, insert_session, validate_stored
from ext.storage import STORE_ERRORS, ObjectStore, RangeReader, StoredObject

log = logging.getLogger("ext.tus")
router = APIRouter(tags=["uploads"])

TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,termination,expiration,checksum"
OFFSET_TYPE = "application/offset+octet-stream"
COLUMNS = ("id, suite_id, upload_length, upload_offset, metadata, session_id, s3_upload_id, parts, tail_key,"
           " tail_bytes, state, error, expires_at")


# --- the lock pool ----------------------------------------------------------------------------
async def _unlock_all(conn: psycopg.AsyncConnection[Any]) -> None:
    """The pool's reset: no lock outlives its request. It must leave the connection idle (the
    select opens a transaction): one left in a transaction is discarded, which made every
    PATCH and DELETE open a new database connection."""
    await conn.execute("select pg_advisory_unlock_all()")
    await conn.commit()


def make_lock_pool(settings: ExtSettings) -> AsyncConnectionPool:
    """Connections held by PATCH and DELETE for their upload's lock (released on return)."""
    return AsyncConnectionPool(
        settings.session_url, min_size=1, max_size=settings.tus_max_patches, timeout=settings.db_pool_timeout_s,
        kwargs={"connect_timeout": settings.db_connect_timeout_s, "application_name": "tracepipe-ext tus",
                "row_factory": dict_row},
        open=False, check=idle_check(settings.db_check_idle_s), reset=_unlock_all)


async def get_lock_pool(request: Request) -> AsyncConnectionPool:
    pool: AsyncConnectionPool = request.app.state.tus_pool
    return pool


LockPoolDep = Annotated[AsyncConnectionPool, Depends(get_lock_pool)]


def lock_key(upload_id: str) -> int:
    """The upload's advisory lock key: the first 64 bits of its (random) id."""
    return int.from_bytes(uuid.UUID(upload_id).bytes[:8], "big", signed=True)


def tail_prefix(upload_id: str) -> str:
    return f"uploads/{upload_id}/"


# --- headers and errors -------------------------------------------------------------------------
def tus_headers(**extra: str) -> dict[str, str]:
    return {"Tus-Resumable": TUS_VERSION, "Cache-Control": "no-store", **extra}


def tus_error(status: int, message: str, details: Any = None, hint: str | None = None,
              code: str | None = None, **headers: str) -> ApiError:
    return ApiError(status, code or f"TP{status}", message, details, hint, headers=tus_headers(**headers))


def not_found() -> ApiError:
    return tus_error(404, "no such upload", None, "the upload does not exist, expired, or is not yours",
                     code="PGRST116")


def http_date(moment: datetime) -> str:
    return format_datetime(moment.astimezone(UTC), usegmt=True)


def _require_tus(request: Request) -> None:
    if request.headers.get("tus-resumable") != TUS_VERSION:
        raise tus_error(412, "Tus-Resumable: 1.0.0 is required", {"header": "Tus-Resumable"},
                        "This server speaks tus 1.0.0.", **{"Tus-Version": TUS_VERSION})


def _parse_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise not_found() from None


def _header_int(request: Request, name: str) -> int | None:
    raw = request.headers.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 19:
        raise tus_error(400, f"{name} must be a non-negative integer", {"header": name})
    return int(raw)


def parse_metadata(header: str, max_bytes: int) -> dict[str, str]:
    """Upload-Metadata: comma-separated `key base64(value)` pairs (a key may have no value)."""
    if len(header) > max_bytes:
        raise tus_error(413, "Upload-Metadata is too large", {"header": "Upload-Metadata"},
                        f"the limit is {max_bytes} bytes")
    out: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in header.split(","))):
        key, _, encoded = pair.partition(" ")
        if not key.isascii() or not key.isprintable() or key in out:
            raise tus_error(400, "Upload-Metadata: keys must be unique printable ASCII", {"key": key[:100]})
        try:
            out[key] = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise tus_error(400, f"Upload-Metadata: the value of {key} is not base64 of UTF-8 text",
                            {"key": key}) from None
        if "\x00" in out[key]:  # jsonb cannot hold it: the database's raw 22P05 otherwise
            raise tus_error(400, f"Upload-Metadata: the value of {key} holds U+0000", {"key": key})
    return out


def _parse_checksum(header: str | None) -> bytes | None:
    """Upload-Checksum: `sha256 <base64 digest>` (the checksum extension, sha256 only)."""
    if header is None:
        return None
    algorithm, _, encoded = header.strip().partition(" ")
    if algorithm.lower() != "sha256":
        raise tus_error(400, "Upload-Checksum: unsupported algorithm", {"header": "Upload-Checksum"},
                        "Use sha256.", **{"Tus-Checksum-Algorithm": "sha256"})
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except binascii.Error:
        digest = b""
    if len(digest) != 32:
        raise tus_error(400, "Upload-Checksum: not a base64 sha256 digest", {"header": "Upload-Checksum"})
    return digest


def encode_metadata(metadata: dict[str, str]) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in metadata.items())


def _state_headers(row: dict[str, Any]) -> dict[str, str]:
    headers = tus_headers(**{"Upload-Offset": str(row["upload_offset"]), "Upload-Length": str(row["upload_length"]),
                             "Upload-Expires": http_date(row["expires_at"])})
    if row["state"] == "done":
        headers["Upload-Session-Id"] = str(row["session_id"])
    return headers


# --- digests of this worker's uploads ------------------------------------------------------------
class _Digests:
    """sha256 state of the uploads whose last PATCH this worker took, keyed by upload and
    offset: a PATCH that continues one goes on hashing; any other hashes the object on the
    final validation's reads (another instance took a PATCH, or ext restarted). Bounded."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._entries: OrderedDict[str, tuple[int, Any]] = OrderedDict()

    def take(self, upload_id: str, offset: int) -> Any:
        entry = self._entries.pop(upload_id, None)
        if offset == 0:
            return hashlib.sha256()
        return entry[1] if entry is not None and entry[0] == offset else None

    def put(self, upload_id: str, offset: int, hasher: Any) -> None:
        if hasher is None:
            return
        self._entries[upload_id] = (offset, hasher)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


DIGESTS = _Digests()


# --- reading and locking rows -------------------------------------------------------------------
async def _select(conn: psycopg.AsyncConnection[Any], upload_id: str, lock: bool = False) -> dict[str, Any] | None:
    cur = await conn.execute(f"select {COLUMNS} from app.tus_uploads where id = %s{' for update' if lock else ''}",
                             [upload_id])
    return await cur.fetchone()


def _check_live(row: dict[str, Any] | None) -> dict[str, Any]:
    if row is None:
        raise not_found()
    if row["expires_at"] < datetime.now(UTC) and row["state"] != "done":
        raise tus_error(410, "the upload expired", {"expires_at": row["expires_at"].isoformat()},
                        "Start a new upload (POST /uploads).")
    return row


async def _visible(pool: AsyncConnectionPool, caller: dict[str, Any], rid: str | None,
                   upload_id: str) -> dict[str, Any]:
    async with as_caller(pool, caller, rid) as conn:
        row = await _select(conn, upload_id)
    return _check_live(row)


@asynccontextmanager
async def _locked(lock_pool: AsyncConnectionPool, caller: dict[str, Any], rid: str | None,
                  upload_id: str) -> AsyncIterator[tuple[psycopg.AsyncConnection[Any], dict[str, Any]]]:
    """The caller's upload (404 if RLS hides it), with its advisory lock held until the block
    ends (409 if another request holds it), and the connection that holds it."""
    key = lock_key(upload_id)
    async with lock_pool.connection() as pooled:
        conn: psycopg.AsyncConnection[Any] = pooled  # dict rows (make_lock_pool)
        async with conn.transaction():
            await become_caller(conn, caller, rid)
            row = _check_live(await _select(conn, upload_id, lock=True))
            cur = await conn.execute("select pg_try_advisory_lock(%s) as locked, auth.can_write() as can_write", [key])
            flags = await cur.fetchone()
        assert flags is not None
        if not flags["locked"]:
            raise tus_error(409, "another request is writing this upload", {"upload": upload_id},
                            "Wait until it ends, then HEAD the upload for its offset and resume.")
        try:
            if not flags["can_write"]:
                raise tus_error(403, "this token may not write", None, "Use a session token or a write key.",
                                code="42501")
            yield conn, row
        finally:
            with suppress(psycopg.Error):
                await conn.execute("select pg_advisory_unlock(%s)", [key])
                await conn.commit()


async def _write(conn: psycopg.AsyncConnection[Any], caller: dict[str, Any], rid: str | None, sql: str,
                 params: list[Any]) -> None:
    """One committed change of the caller's upload row; 409 if it moved (it cannot, under the lock)."""
    async with conn.transaction():
        await become_caller(conn, caller, rid)
        cur = await conn.execute(sql, params)
        if cur.rowcount != 1:
            raise tus_error(409, "the upload changed under this request", None, "HEAD the upload and resume.")


# --- object storage -----------------------------------------------------------------------------
async def discard_objects(store: ObjectStore, upload_id: str, session_id: str, s3_upload_id: str | None,
                          state: str) -> bool:
    """Aborts the upload's parts and removes its tail objects and (unless a session owns it)
    its assembled object; True when all of it is gone."""
    key = bundle_key(session_id)
    ok = await store.abort(key, s3_upload_id) if s3_upload_id else True
    ok = await store.delete_prefix(tail_prefix(upload_id), retry_later=False) and ok
    if state == "assembled":
        ok = await store.delete(key, retry_later=False) and ok
    return ok


class _PartStream:
    """The body of a streamed upload_part: read in boto3's worker thread, fed by the event
    loop with the chunks the receiver keeps anyway (references: the queue holds no bytes of
    its own beyond the one part). fail() or `idle_s` without bytes makes the next read raise,
    which ends the request with an error."""

    def __init__(self, size: int, idle_s: float) -> None:
        self.size = size
        self.fed = 0
        self.returned = 0
        self.idle_s = idle_s
        self._queue: queue.SimpleQueue[bytes | memoryview | None] = queue.SimpleQueue()
        self._current: memoryview = memoryview(b"")
        self._failed = False

    def feed(self, data: bytes | memoryview) -> None:
        self._queue.put(data)
        self.fed += len(data)

    def fail(self) -> None:
        self._queue.put(None)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:  # everything left (http.client reads in blocks; this is for completeness)
            parts = []
            while block := self.read(1 << 20):
                parts.append(block)
            return b"".join(parts)
        if self.returned >= self.size:
            return b""
        while not self._current:
            if self._failed:
                raise OSError("the part's bytes stopped coming")
            try:
                item = self._queue.get(timeout=self.idle_s)
            except queue.Empty:
                item = None
            if item is None:
                self._failed = True
                continue
            self._current = memoryview(item)
        take = min(n, len(self._current), self.size - self.returned)
        out = bytes(self._current[:take])
        self._current = self._current[take:]
        self.returned += take
        return out


def _streaming_client(store: ObjectStore, settings: ExtSettings) -> Any:
    """The store's S3 client for streamed parts: no payload hash (it would need the body
    before sending) and no checksum of the body (likewise); one per store."""
    client = getattr(store, "_tus_streaming_client", None)
    if client is None:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3", endpoint_url=settings.s3_endpoint, aws_access_key_id=settings.s3_access_key,
            aws_secret_access_key=settings.s3_secret_key, region_name=settings.s3_region,
            config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=3, read_timeout=60,
                          max_pool_connections=settings.tus_max_patches, request_checksum_calculation="when_required",
                          s3={"addressing_style": "path", "payload_signing_enabled": False}))
        store._tus_streaming_client = client  # type: ignore[attr-defined]
    return client


class _HashingObjects:
    """The store's client for one validation's RangeReader, hashing what it fetches: ranges
    that continue the hashed prefix feed sha256, so a bundle whose digest this worker does
    not hold (another instance took an earlier PATCH, or ext restarted) is hashed on the
    validation's own reads (it reads every member, in order); what they skipped (the central
    directory, gaps) is read once more by rest(). Blocking: use from a worker thread."""

    def __init__(self, client: Any, bucket: str, key: str, size: int, chunk: int) -> None:
        self.client, self.bucket, self.key, self.size, self.chunk = client, bucket, key, size, chunk
        self.hasher = hashlib.sha256()
        self.hashed = 0

    def get_object(self, **kwargs: Any) -> dict[str, Any]:
        response = self.client.get_object(**kwargs)
        data: bytes = response["Body"].read()
        spec = str(kwargs.get("Range", "bytes=0-"))
        start = int(spec.removeprefix("bytes=").split("-", 1)[0] or 0)
        if start <= self.hashed < start + len(data):
            self.hasher.update(memoryview(data)[self.hashed - start:])
            self.hashed = start + len(data)
        return {**response, "Body": io.BytesIO(data)}

    def rest(self) -> str:
        """sha256 of the whole object: the part the validation did not read in order, read now."""
        try:
            while self.hashed < self.size:
                end = min(self.size, self.hashed + self.chunk) - 1
                self.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={self.hashed}-{end}")
        except STORE_ERRORS as e:
            log.warning("object store error while hashing %s: %s", self.key, e)
            raise unavailable("object storage") from e
        return self.hasher.hexdigest()


async def _validate_and_digest(store: ObjectStore, settings: ExtSettings, key: str, size: int,
                               hasher: Any) -> tuple[bundles.BundleSummary, str]:
    """validate_stored, and the object's sha256: the one this worker computed while the bytes
    came in, or one computed on the validation's reads (no second pass over the object)."""
    if hasher is not None:
        return await validate_stored(store, settings, StoredObject(key, size, "")), hasher.hexdigest()
    objects = _HashingObjects(store.client, store.bucket, key, size, RangeReader.MAX_FETCH)
    reader = RangeReader(objects, store.bucket, key, size)
    reader.MAX_FETCH = settings.bundle_read_bytes  # as validate_stored
    summary = await run_in_threadpool(bundles.validate, reader, bundles.Limits.of(settings))
    return summary, await run_in_threadpool(objects.rest)


class _Receiver:
    """Moves one PATCH body into the upload's multipart upload: parts of tus_part_bytes as
    they fill, the rest at the end as a part (the last one, or one of at least S3's minimum)
    or as the new incomplete-part object. Every step commits the new offset."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], caller: dict[str, Any], rid: str | None,
                 store: ObjectStore, settings: ExtSettings, row: dict[str, Any]) -> None:
        self.conn, self.caller, self.rid, self.store = conn, caller, rid, store
        self.part_bytes = max(settings.tus_part_bytes, settings.tus_min_part_bytes)
        self.min_part = settings.tus_min_part_bytes
        self.expiry = settings.tus_expiry_s
        self.id = str(row["id"])
        self.key = bundle_key(str(row["session_id"]))
        self.s3_upload_id = row["s3_upload_id"]
        self.length: int = row["upload_length"]
        self.offset: int = row["upload_offset"]
        self.parts: list[dict[str, Any]] = list(row["parts"])
        self.parts_bytes = sum(p["size"] for p in self.parts)
        self.tail_key: str | None = row["tail_key"]
        self.tail_bytes: int = row["tail_bytes"]
        self.hasher = DIGESTS.take(self.id, self.offset)
        self._chunks: list[bytes] = []  # bytes from parts_bytes on, not in a part yet
        self._buffered = 0
        self.stream_parts = settings.tus_stream_parts
        self.stream_idle_s = settings.tus_stream_idle_s
        self._settings = settings
        self._end: int | None = None  # where this PATCH's bytes end, when it declared its length
        self._stream: _PartStream | None = None
        self._stream_task: asyncio.Future[Any] | None = None
        self.parts_streamed = 0

    async def receive(self, request: Request, checksum: bytes | None = None, declared: int | None = None) -> None:
        """With `checksum` (sha256 of this PATCH's body, at most tus_part_bytes) nothing is
        kept until the body is in and matches: a mismatch or a cut body changes nothing.
        With `declared` (Content-Length) and no checksum, parts are streamed as they arrive."""
        if self.tail_bytes:
            self._add(await self._read_tail())
        room = self.length - self.offset
        received = 0
        chunk_digest = hashlib.sha256() if checksum is not None else None
        if self.stream_parts and checksum is None and declared is not None and declared <= room:
            self._end = self.offset + declared
            self._start_stream()
        try:
            async for chunk in request.stream():
                if not chunk:
                    continue
                received += len(chunk)
                if received > room:
                    self.hasher = None
                    raise tus_error(413, "the body goes past Upload-Length", {"upload_length": self.length},
                                    f"send at most {room} bytes from offset {self.offset}")
                self._add(chunk)
                if self.hasher is not None:
                    self.hasher.update(chunk)
                if chunk_digest is not None:
                    chunk_digest.update(chunk)
                    continue
                if self._stream is not None:
                    need = self._stream.size - self._stream.fed
                    if need > 0:
                        self._stream.feed(chunk if len(chunk) <= need else memoryview(chunk)[:need])
                await self._flush_parts()
        except ClientDisconnect:  # keep what arrived (tus: the client resumes from the offset)
            await self._drop_stream()
            if chunk_digest is None:
                await self._save_rest()
                DIGESTS.put(self.id, self.offset, self.hasher)
            raise
        except BaseException:
            await self._drop_stream()
            raise
        if chunk_digest is not None:
            if chunk_digest.digest() != checksum:
                raise tus_error(460, "Upload-Checksum does not match the body", {"header": "Upload-Checksum"},
                                "Nothing of this PATCH was kept: send it again.", code="TP460")
            while self._buffered >= self.part_bytes:
                await self._send_part(self._take(self.part_bytes))
        await self._flush_parts()
        await self._drop_stream()  # a declared length the body did not reach: buffered way
        await self._save_rest()
        DIGESTS.put(self.id, self.offset, self.hasher)

    # -- streamed parts
    def _stream_size(self) -> int:
        """The size of the part starting at parts_bytes if this PATCH's declared bytes fill
        it (a full part, or the upload's last, or at least S3's minimum); else 0."""
        if self._end is None:
            return 0
        remaining = self._end - self.parts_bytes
        if remaining >= self.part_bytes:
            return self.part_bytes
        if remaining > 0 and (self._end == self.length or remaining >= self.min_part):
            return remaining
        return 0

    def _start_stream(self) -> None:
        size = self._stream_size()
        if not size:
            return
        stream = _PartStream(size, self.stream_idle_s)
        for chunk in self._chunks:  # the tail read back, or what the last part left over
            need = size - stream.fed
            if need <= 0:
                break
            stream.feed(chunk if len(chunk) <= need else memoryview(chunk)[:need])
        client = _streaming_client(self.store, self._settings)
        self._stream = stream
        self._stream_task = asyncio.ensure_future(self.store._call(
            client.upload_part, Key=self.key, UploadId=self.s3_upload_id, PartNumber=len(self.parts) + 1,
            Body=stream, ContentLength=size))

    async def _flush_parts(self) -> None:
        """Commits every part whose bytes are all in: a streamed one when its request ends
        (or, failed, sent from the kept copy), a buffered one when tus_part_bytes are in."""
        while True:
            stream, task = self._stream, self._stream_task
            if stream is not None and task is not None:
                if stream.fed < stream.size:
                    return
                self._stream = self._stream_task = None
                etag: str | None = None
                try:
                    etag = (await task)["ETag"]
                except Exception as e:  # the kept copy goes the buffered way
                    log.info("streamed part %s of upload %s failed (%s): sending it again", len(self.parts) + 1,
                             self.id, e)
                if etag is None:
                    await self._send_part(self._take(stream.size))
                else:
                    self._drop(stream.size)
                    self.parts_streamed += 1
                    await self._commit_part(stream.size, etag)
                self._start_stream()
            elif self._buffered >= self.part_bytes:
                await self._send_part(self._take(self.part_bytes))
            else:
                return

    async def _drop_stream(self) -> None:
        """Ends a streamed part that will not be completed (its bytes stay kept)."""
        stream, task = self._stream, self._stream_task
        self._stream = self._stream_task = None
        self._end = None
        if stream is not None and task is not None:
            stream.fail()
            with suppress(Exception):
                await task

    def _add(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)

    def _drop(self, n: int) -> None:
        """Forgets the first n buffered bytes (a streamed part's, stored): no join."""
        excess = self._buffered - n
        rest: bytes = b""
        if excess and len(self._chunks[-1]) >= excess:
            rest = self._chunks[-1][-excess:]
        elif excess:
            rest = b"".join(self._chunks)[n:]
        self._chunks = [rest] if rest else []
        self._buffered = len(rest)

    def _take(self, n: int) -> bytes:
        """The first n buffered bytes as one object (the one copy a part costs); the rest stays."""
        excess = self._buffered - n
        rest = b""
        if excess and len(self._chunks[-1]) > excess:  # cut the last chunk, not the joined part
            last = self._chunks.pop()
            self._chunks.append(last[:-excess])
            rest = last[-excess:]
        elif excess:
            joined = b"".join(self._chunks)
            self._chunks = [joined[:n]]
            rest = joined[n:]
            del joined
        part = b"".join(self._chunks)
        self._chunks = [rest] if rest else []
        self._buffered = len(rest)
        return part

    async def _read_tail(self) -> bytes:
        assert self.tail_key is not None
        response = await self.store._call(self.store.client.get_object, Key=self.tail_key)
        try:
            data: bytes = await run_in_threadpool(response["Body"].read)
        finally:
            response["Body"].close()
        if len(data) != self.tail_bytes:
            raise tus_error(500, "the upload's incomplete part is damaged", {"upload": self.id},
                            "DELETE the upload and start again.")
        return data

    async def _save_rest(self) -> None:
        end = self.parts_bytes + self._buffered
        if self._buffered and (end == self.length or self._buffered >= self.min_part):
            await self._send_part(self._take(self._buffered))
        elif end > self.offset:
            await self._store_tail(self._take(self._buffered), end)

    async def _send_part(self, data: bytes) -> None:
        number = len(self.parts) + 1
        body = io.BytesIO(data)
        try:
            result = await self.store._call(self.store.client.upload_part, Key=self.key, UploadId=self.s3_upload_id,
                                            PartNumber=number, Body=body)
        finally:
            body.close()
        await self._commit_part(len(data), result["ETag"])

    async def _commit_part(self, size: int, etag: str) -> None:
        """Records a stored part (its ETag) and the new offset, committed."""
        number = len(self.parts) + 1
        part = {"n": number, "etag": etag, "size": size}
        end = self.parts_bytes + size
        await _write(self.conn, self.caller, self.rid,
                     "update app.tus_uploads set parts = parts || %s, upload_offset = %s, tail_key = null,"
                     " tail_bytes = 0, expires_at = now() + make_interval(secs => %s)"
                     " where id = %s and upload_offset = %s",
                     [Jsonb([part]), end, self.expiry, self.id, self.offset])
        self.parts.append(part)
        self.parts_bytes, self.offset = end, end
        await self._forget_tail(None)

    async def _store_tail(self, data: bytes, end: int) -> None:
        key = f"{tail_prefix(self.id)}tail-{end}"
        await self.store._call(self.store.client.put_object, Key=key, Body=data)
        await _write(self.conn, self.caller, self.rid,
                     "update app.tus_uploads set upload_offset = %s, tail_key = %s, tail_bytes = %s,"
                     " expires_at = now() + make_interval(secs => %s) where id = %s and upload_offset = %s",
                     [end, key, len(data), self.expiry, self.id, self.offset])
        self.offset = end
        await self._forget_tail(key)
        self.tail_bytes = len(data)

    async def _forget_tail(self, new_key: str | None) -> None:
        old, self.tail_key, self.tail_bytes = self.tail_key, new_key, 0
        if old and old != new_key:
            await self.store.delete(old)


async def _finish(conn: psycopg.AsyncConnection[Any], caller: dict[str, Any], rid: str | None, store: ObjectStore,
                  settings: ExtSettings, row: dict[str, Any], hasher: Any) -> dict[str, Any]:
    """The last byte is in: assemble the object, validate it and commit the session exactly
    as POST /sessions does. A bad bundle removes everything and raises its §5 error; a
    failure of a dependency keeps the upload (state assembled, `error` set) for a retried
    final PATCH."""
    upload_id, session_id = str(row["id"]), str(row["session_id"])
    key = bundle_key(session_id)
    if row["state"] == "receiving":
        parts = [{"PartNumber": p["n"], "ETag": p["etag"]} for p in row["parts"]]
        await store._call(store.client.complete_multipart_upload, Key=key, UploadId=row["s3_upload_id"],
                          MultipartUpload={"Parts": parts})
        await _write(conn, caller, rid, "update app.tus_uploads set state = 'assembled', s3_upload_id = null"
                     " where id = %s and state = 'receiving'", [upload_id])
        row = {**row, "state": "assembled", "s3_upload_id": None}
    metadata = dict(row["metadata"])
    suite_id = str(row["suite_id"]) if row["suite_id"] else None
    try:
        summary, sha256 = await _validate_and_digest(store, settings, key, row["upload_length"], hasher)
        stored = StoredObject(key, row["upload_length"], sha256)
        async with conn.transaction():
            await become_caller(conn, caller, rid)
            session = await insert_session(conn, session_id, stored, summary, metadata, suite_id)
            await conn.execute("update app.tus_uploads set state = 'done', error = null where id = %s", [upload_id])
    except ApiError as e:
        if e.status >= 500:
            await _write(conn, caller, rid, "update app.tus_uploads set error = %s where id = %s",
                         [Jsonb({"code": e.code, "message": e.message, "details": e.details, "hint": e.hint}),
                          upload_id])
            raise
        await discard_objects(store, upload_id, session_id, None, "assembled")
        await _write(conn, caller, rid, "delete from app.tus_uploads where id = %s", [upload_id])
        e.headers.update(tus_headers())
        raise
    await store.delete_prefix(tail_prefix(upload_id))
    return {**row, "state": "done", "session": session}


# --- the verbs ---------------------------------------------------------------------------------
@router.options("/uploads", status_code=204, summary="tus: the version, extensions and size limit")
@router.options("/uploads/{upload_id}", status_code=204, include_in_schema=False)
async def tus_options(settings: SettingsDep) -> Response:
    return Response(status_code=204, headers=tus_headers(**{
        "Tus-Version": TUS_VERSION, "Tus-Extension": EXTENSIONS, "Tus-Max-Size": str(settings.max_bundle_bytes),
        "Tus-Checksum-Algorithm": "sha256"}))


@router.post("/uploads", status_code=201, summary="tus creation: a resumable bundle upload (Upload-Length, "
                                                  "Upload-Metadata filename and optional suite_id)")
async def create_upload(request: Request, caller: CallerDep, pool: PoolDep, settings: SettingsDep, store: StoreDep,
                        rid: RequestIdDep) -> Response:
    _require_tus(request)
    if request.headers.get("upload-defer-length") is not None:
        raise tus_error(400, "Upload-Defer-Length is not supported", {"header": "Upload-Defer-Length"},
                        "Send Upload-Length: the bundle's size in bytes.")
    length = _header_int(request, "Upload-Length")
    if length is None or length == 0:
        raise tus_error(400, "Upload-Length is required: the bundle's size in bytes (at least 1)",
                        {"header": "Upload-Length"})
    if length > settings.max_bundle_bytes:
        raise tus_error(413, "Upload-Length is over the bundle size limit", {"header": "Upload-Length"},
                        f"the limit is {settings.max_bundle_bytes} bytes",
                        **{"Tus-Max-Size": str(settings.max_bundle_bytes)})
    if (_header_int(request, "Content-Length") or 0) > 0:
        raise tus_error(400, "the creation request carries no bytes", {"header": "Content-Length"},
                        "Send the bytes with PATCH /uploads/{id}.")
    metadata = parse_metadata(request.headers.get("upload-metadata", ""), settings.max_metadata_bytes)
    if not metadata.get("filename"):
        raise tus_error(422, "Upload-Metadata: filename is required", {"field": "filename"},
                        "Name the bundle's file, e.g. filename base64(\"session.zip\").")
    suite_id = metadata.pop("suite_id", None)
    if suite_id is not None:
        try:
            suite_id = str(uuid.UUID(suite_id))
        except ValueError:
            raise tus_error(422, "Upload-Metadata: suite_id is not a uuid", {"field": "suite_id"}) from None

    session_id = str(uuid.uuid4())
    key = bundle_key(session_id)
    s3_upload_id: str | None = None
    try:
        async with as_caller(pool, caller, rid) as conn:
            created = await store._call(store.client.create_multipart_upload, Key=key, ContentType="application/zip")
            s3_upload_id = created["UploadId"]
            try:
                cur = await conn.execute(
                    "insert into app.tus_uploads (suite_id, upload_length, metadata, session_id, s3_upload_id,"
                    " expires_at) values (%s, %s, %s, %s, %s, now() + make_interval(secs => %s))"
                    " returning id, expires_at",
                    [suite_id, length, Jsonb(metadata), session_id, s3_upload_id, settings.tus_expiry_s])
            except psycopg.errors.InsufficientPrivilege:
                raise tus_error(403, "you may not upload this session", {"field": "suite_id"} if suite_id else None,
                                "tagging a session with a suite needs membership of it, and the token must allow "
                                "writes (and that suite, for a suite-scoped key)", code="42501") from None
            created_row = await cur.fetchone()
    except BaseException:
        if s3_upload_id is not None:
            await store.abort(key, s3_upload_id)
        raise
    assert created_row is not None
    upload_id = str(created_row["id"])
    return Response(status_code=201, headers=tus_headers(**{
        "Location": f"/uploads/{upload_id}", "Upload-Expires": http_date(created_row["expires_at"])}))


@router.head("/uploads/{upload_id}", summary="tus: the upload's offset (Upload-Offset)")
async def upload_head(request: Request, upload_id: str, caller: CallerDep, pool: PoolDep,
                      rid: RequestIdDep) -> Response:
    _require_tus(request)
    row = await _visible(pool, caller, rid, _parse_id(upload_id))
    headers = _state_headers(row)
    if row["metadata"] or row["suite_id"]:
        shown = {**row["metadata"], **({"suite_id": str(row["suite_id"])} if row["suite_id"] else {})}
        headers["Upload-Metadata"] = encode_metadata(shown)
    return Response(status_code=200, headers=headers)


@router.get("/uploads/{upload_id}", summary="The upload's state: {offset, length, state, session_id?, error?}")
async def upload_state(upload_id: str, caller: CallerDep, pool: PoolDep, rid: RequestIdDep) -> JSONResponse:
    row = await _visible(pool, caller, rid, _parse_id(upload_id))
    body: dict[str, Any] = {"id": str(row["id"]), "offset": row["upload_offset"], "length": row["upload_length"],
                            "state": row["state"], "expires_at": row["expires_at"].isoformat()}
    if row["state"] == "done":
        body["session_id"] = str(row["session_id"])
    if row["error"]:
        body["error"] = row["error"]
    return JSONResponse(body, headers=_state_headers(row))


@router.patch("/uploads/{upload_id}", status_code=204, summary="tus: append bytes at Upload-Offset "
              "(application/offset+octet-stream); the last byte commits the session (Upload-Session-Id)",
              openapi_extra={"requestBody": {"content": {OFFSET_TYPE: {"schema": {"type": "string",
                                                                                   "format": "binary"}}}}})
async def upload_patch(request: Request, upload_id: str, caller: CallerDep, lock_pool: LockPoolDep,
                       settings: SettingsDep, store: StoreDep, rid: RequestIdDep) -> Response:
    _require_tus(request)
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != OFFSET_TYPE:
        raise tus_error(415, f"Content-Type must be {OFFSET_TYPE}", {"header": "Content-Type"})
    offset = _header_int(request, "Upload-Offset")
    if offset is None:
        raise tus_error(400, "Upload-Offset is required", {"header": "Upload-Offset"},
                        "HEAD the upload for its offset.")
    declared = _header_int(request, "Content-Length")
    checksum = _parse_checksum(request.headers.get("upload-checksum"))
    if checksum is not None and (declared is None or declared > settings.tus_part_bytes):
        raise tus_error(413 if declared else 400, "a PATCH with Upload-Checksum carries Content-Length and at most "
                        f"{settings.tus_part_bytes} bytes", {"header": "Content-Length"},
                        "Send smaller chunks, or no Upload-Checksum.")
    uid = _parse_id(upload_id)
    async with _locked(lock_pool, caller, rid, uid) as (conn, row):
        length = row["upload_length"]
        if row["state"] == "done" and offset == length:  # a retried final PATCH: its answer again
            return Response(status_code=204, headers=_state_headers(row))
        if offset != row["upload_offset"] or row["state"] == "done":
            raise tus_error(409, "Upload-Offset is not the upload's offset", {"offset": row["upload_offset"]},
                            "HEAD the upload and resume from its Upload-Offset.",
                            **{"Upload-Offset": str(row["upload_offset"])})
        if declared is not None and offset + declared > length:
            raise tus_error(413, "the body goes past Upload-Length", {"upload_length": length},
                            f"send at most {length - offset} bytes from offset {offset}")
        hasher = None
        if offset < length:
            receiver = _Receiver(conn, caller, rid, store, settings, row)
            await receiver.receive(request, checksum, declared)
            row = {**row, "upload_offset": receiver.offset, "parts": receiver.parts,
                   "tail_key": receiver.tail_key, "tail_bytes": receiver.tail_bytes}
            hasher = receiver.hasher
        else:
            hasher = DIGESTS.take(uid, offset)
        if row["upload_offset"] == length:
            row = await _finish(conn, caller, rid, store, settings, row, hasher)
        else:
            row = {**row, "expires_at": datetime.now(UTC) + timedelta(seconds=settings.tus_expiry_s)}
    return Response(status_code=204, headers=_state_headers(row))


@router.delete("/uploads/{upload_id}", status_code=204, summary="tus termination: abort the upload, keep nothing "
                                                                "(a committed session stays)")
async def upload_delete(request: Request, upload_id: str, caller: CallerDep, lock_pool: LockPoolDep,
                        store: StoreDep, rid: RequestIdDep) -> Response:
    _require_tus(request)
    uid = _parse_id(upload_id)
    async with _locked(lock_pool, caller, rid, uid) as (conn, row):
        if row["state"] != "done" and not await discard_objects(store, uid, str(row["session_id"]),
                                                                row["s3_upload_id"], row["state"]):
            raise unavailable("object storage")
        await _write(conn, caller, rid, "delete from app.tus_uploads where id = %s", [uid])
    return Response(status_code=204, headers=tus_headers())
