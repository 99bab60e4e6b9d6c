"""The one module that talks to object storage (boto3, any S3-compatible endpoint).

Blocking SDK calls run off the event loop. Uploads stream in parts (multipart above one
part), reads stream in bounded chunks, and `RangeReader` gives zipfile a seekable view of
a stored object through ranged GETs, so archives are inspected without being downloaded.
Failed cleanups (delete, abort) are queued and retried, and `sweep` removes what a crash
left behind, so no object or open multipart upload outlives a failed request.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import io
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config
from starlette.concurrency import run_in_threadpool

from ext.config import ExtSettings
from ext.errors import ApiError, unavailable

log = logging.getLogger("ext.storage")

STORE_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError)


def make_client(settings: ExtSettings) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        aws_access_key_id=settings.s3_access_key,
        aws_secret_access_key=settings.s3_secret_key,
        region_name=settings.s3_region,
        config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=3, read_timeout=60,
                      max_pool_connections=32, s3={"addressing_style": "path"}),
    )


def is_not_found(e: Exception) -> bool:
    if isinstance(e, botocore.exceptions.ClientError):
        return e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NoSuchUpload", "NotFound")
    return False


async def bucket_reachable(client: Any, bucket: str) -> bool:
    def check() -> bool:
        client.head_bucket(Bucket=bucket)
        return True

    try:
        return await run_in_threadpool(check)
    except Exception:
        return False


@dataclass
class StoredObject:
    key: str
    size: int
    sha256: str


class ObjectStore:
    """Bucket-level operations used by the routers; every method maps store failures to 503."""

    def __init__(self, client: Any, settings: ExtSettings) -> None:
        self.client = client
        self.bucket = settings.s3_bucket
        self.part_size = settings.upload_part_bytes
        self.chunk = settings.stream_chunk_bytes
        # failed cleanups to retry: (op, key, upload_id); a dict keeps them unique and ordered
        self._cleanup: dict[tuple[str, str, str | None], None] = {}

    async def _call(self, fn: Any, **kwargs: Any) -> Any:
        try:
            return await run_in_threadpool(fn, Bucket=self.bucket, **kwargs)
        except STORE_ERRORS as e:
            if is_not_found(e):
                raise
            log.warning("object store error in %s: %s", getattr(fn, "__name__", fn), e)
            raise unavailable("object storage") from e

    # --- writing ------------------------------------------------------------------------------
    def uploader(self, key: str, max_bytes: int) -> Upload:
        return Upload(self, key, max_bytes)

    async def delete(self, key: str, retry_later: bool = True) -> bool:
        """Deletes the object; True when done. A failure is queued for retry unless the
        caller keeps track itself (retry_later=False)."""
        try:
            await self._call(self.client.delete_object, Key=key)
            return True
        except ApiError:
            if retry_later:
                self._cleanup[("delete", key, None)] = None
            return False

    async def delete_prefix(self, prefix: str, retry_later: bool = True) -> bool:
        try:
            keys = [o["Key"] async for o in self.list_objects(prefix)]
        except ApiError:
            if retry_later:
                self._cleanup[("delete_prefix", prefix, None)] = None
            return False
        results = [await self.delete(key, retry_later) for key in keys]
        return all(results)

    async def abort(self, key: str, upload_id: str) -> bool:
        try:
            await self._call(self.client.abort_multipart_upload, Key=key, UploadId=upload_id)
            return True
        except botocore.exceptions.ClientError as e:
            if is_not_found(e):
                return True
            self._cleanup[("abort", key, upload_id)] = None
        except ApiError:
            self._cleanup[("abort", key, upload_id)] = None
        return False

    async def retry_cleanups(self) -> int:
        """Retries the deletes and aborts that failed (e.g. while the store was down)."""
        done = 0
        for op, key, upload_id in list(self._cleanup):
            del self._cleanup[(op, key, upload_id)]
            if op == "delete":
                ok = await self.delete(key)
            elif op == "delete_prefix":
                ok = await self.delete_prefix(key)
            else:
                ok = upload_id is not None and await self.abort(key, upload_id)
            done += ok
        return done

    @property
    def pending_cleanups(self) -> int:
        return len(self._cleanup)

    # --- reading ------------------------------------------------------------------------------
    async def head(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(await self._call(self.client.head_object, Key=key))
        except botocore.exceptions.ClientError as e:
            if is_not_found(e):
                return None
            raise

    async def list_objects(self, prefix: str) -> AsyncIterator[dict[str, Any]]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": prefix, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._call(self.client.list_objects_v2, **kwargs)
            for obj in page.get("Contents", []):
                yield obj
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    async def multipart_uploads(self, prefix: str) -> builtins.list[dict[str, Any]]:
        page = await self._call(self.client.list_multipart_uploads, Prefix=prefix)
        return list(page.get("Uploads", []))

    async def stream(self, key: str, start: int | None = None, end: int | None = None) -> AsyncIterator[bytes]:
        """The object's bytes [start, end] in chunks of `stream_chunk_bytes`; the S3 connection
        is released as soon as the consumer stops (client disconnect included)."""
        kwargs: dict[str, Any] = {"Key": key}
        if start is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end}"
        response = await self._call(self.client.get_object, **kwargs)
        body = response["Body"]
        chunks: Iterator[bytes] = body.iter_chunks(self.chunk)
        try:
            while True:
                chunk = await run_in_threadpool(next, chunks, None)
                if chunk is None:
                    break
                yield chunk
        except STORE_ERRORS as e:
            log.warning("object store error while streaming %s: %s", key, e)
            raise
        finally:
            body.close()

    def range_reader(self, key: str, size: int) -> RangeReader:
        return RangeReader(self.client, self.bucket, key, size)

    async def sweep(self, prefixes: tuple[str, ...], older_than: timedelta,
                    known: Any, keep_uploads: frozenset[str] = frozenset()) -> dict[str, int]:
        """Deletes objects under `prefixes` whose id `known(ids)` does not return, and aborts
        multipart uploads (except `keep_uploads`: live tus uploads), both when older than
        `older_than`."""
        cutoff = datetime.now(UTC) - older_than
        removed = aborted = 0
        for prefix in prefixes:
            for upload in await self.multipart_uploads(prefix):
                if upload["Initiated"] < cutoff and upload["UploadId"] not in keep_uploads:
                    await self.abort(upload["Key"], upload["UploadId"])
                    aborted += 1
            candidates: dict[str, builtins.list[str]] = {}
            async for obj in self.list_objects(prefix):
                if obj["LastModified"] < cutoff:
                    object_id = obj["Key"][len(prefix):].split("/", 1)[0]
                    candidates.setdefault(object_id, []).append(obj["Key"])
            if candidates:
                alive = await known(prefix, list(candidates))
                for object_id, keys in candidates.items():
                    if object_id not in alive:
                        for key in keys:
                            await self.delete(key)
                            removed += 1
        return {"orphans_removed": removed, "uploads_aborted": aborted}


class Upload:
    """Streams bytes to one key: a single PUT when everything fits in one part, multipart
    otherwise (one part uploading while the next is received). Computes sha256 and size on
    the way. Not committed until `finish()`; `abort()` leaves nothing behind.

    Memory: received chunks are kept as a list and joined once into a part, and the next
    part is only built after the previous one is sent, so at most two parts' worth of bytes
    (the one uploading, the one being received) are alive at any time."""

    def __init__(self, store: ObjectStore, key: str, max_bytes: int) -> None:
        self.store = store
        self.key = key
        self.max_bytes = max_bytes
        self.size = 0
        self._hash = hashlib.sha256()
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._pending: asyncio.Task[None] | None = None
        self._completing = False
        self._finished = False

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise ApiError(413, "TP413", "body too large", f"the limit is {self.max_bytes} bytes")
        self._hash.update(data)
        self._chunks.append(bytes(data))
        self._buffered += len(data)
        if self._buffered >= self.store.part_size:
            await self._send_part()

    def _take_buffer(self) -> bytes:
        part = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return part

    async def _send_part(self) -> None:
        if self._upload_id is None:
            created = await self.store._call(self.store.client.create_multipart_upload, Key=self.key)
            self._upload_id = created["UploadId"]
        if self._pending is not None:
            await self._pending  # at most one part in flight: bounded memory
            self._pending = None
        part = self._take_buffer()
        number = len(self._parts) + 1
        self._parts.append({"PartNumber": number})
        upload_id = self._upload_id

        async def send() -> None:
            # A file object, not bytes (botocore would copy bytes into one buffer with the
            # headers), closed at once so the part is freed before the next one is built.
            body = io.BytesIO(part)
            try:
                result = await self.store._call(self.store.client.upload_part, Key=self.key, UploadId=upload_id,
                                                PartNumber=number, Body=body)
            finally:
                body.close()
            self._parts[number - 1]["ETag"] = result["ETag"]

        self._pending = asyncio.create_task(send())

    async def finish(self) -> StoredObject:
        if self._upload_id is None:
            self._completing = True
            await self.store._call(self.store.client.put_object, Key=self.key, Body=self._take_buffer())
        else:
            if self._buffered:
                await self._send_part()
            if self._pending is not None:
                await self._pending
            self._completing = True
            await self.store._call(self.store.client.complete_multipart_upload, Key=self.key,
                                   UploadId=self._upload_id, MultipartUpload={"Parts": self._parts})
        self._finished = True
        return StoredObject(self.key, self.size, self._hash.hexdigest())

    async def abort(self) -> None:
        """Removes whatever was written: the open multipart upload, and the object if it may
        exist (finished, or a completion whose answer was lost)."""
        self._chunks.clear()
        if self._pending is not None:
            with contextlib.suppress(Exception):  # the part may have failed; abort regardless
                await self._pending
        if self._upload_id is not None and not self._finished:
            await self.store.abort(self.key, self._upload_id)
        if self._finished or self._completing or self._upload_id is None:
            await self.store.delete(self.key)


class RangeReader(io.RawIOBase):
    """A seekable, read-only view of a stored object through ranged GETs (blocking; use from
    a worker thread). Small reads fetch small ranges (zip headers, image magic bytes);
    sequential reads grow the fetch size up to 8 MiB, so scanning a member stays fast."""

    MIN_FETCH = 64 * 1024
    MAX_FETCH = 8 * 1024 * 1024

    def __init__(self, client: Any, bucket: str, key: str, size: int) -> None:
        self.client, self.bucket, self.key, self.size = client, bucket, key, size
        self.pos = 0
        self._block_start = 0
        self._block = b""
        self._fetch = self.MIN_FETCH
        self.bytes_fetched = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        n = min(n, self.size - self.pos)
        if n <= 0:
            return b""
        out = bytearray()
        while n > 0:
            offset = self.pos - self._block_start
            if 0 <= offset < len(self._block):
                take = self._block[offset: offset + n]
                out += take
                self.pos += len(take)
                n -= len(take)
                continue
            sequential = self.pos == self._block_start + len(self._block) and self._block
            self._fetch = min(self._fetch * 2, self.MAX_FETCH) if sequential else self.MIN_FETCH
            length = min(max(self._fetch, n), self.size - self.pos)
            end = self.pos + length - 1
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={self.pos}-{end}")
                self._block = response["Body"].read()
            except STORE_ERRORS as e:  # through zipfile to the router: 503, not an unexpected error
                log.warning("object store error while reading %s: %s", self.key, e)
                raise unavailable("object storage") from e
            self._block_start = self.pos
            self.bytes_fetched += len(self._block)
            if not self._block:
                break
        return bytes(out)
