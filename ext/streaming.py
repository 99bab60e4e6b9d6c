"""Stored objects as HTTP responses: ETag, Content-Length, a single Range, 304, and a
streaming response that reads the first chunk before the status line goes out, so an
object store that is down answers 503 with the error body instead of a 200 cut short."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ext.errors import ApiError, unavailable
from ext.storage import STORE_ERRORS, ObjectStore


def documented(media_type: str, *, ranges: bool = True,
               description: str = "The object, byte-identical") -> dict[int | str, dict[str, Any]]:
    """The OpenAPI responses of a route that streams an object (with `response_class=Response`;
    FastAPI would otherwise document a JSON body)."""
    body = {"content": {media_type: {"schema": {"type": "string", "format": "binary"}}}}
    out: dict[int | str, dict[str, Any]] = {200: {"description": description, **body}}
    if ranges:
        out[206] = {"description": "The requested byte range (Range)", **body}
        out[304] = {"description": "Not modified (If-None-Match names the current ETag)"}
    return out


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end) inclusive for a single satisfiable range, None for the whole object."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # multiple ranges: answer the whole object (allowed by RFC 9110)
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            length = int(last)
            if length <= 0:
                raise ValueError
            start, end = max(size - length, 0), size - 1
        else:
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
    except ValueError:
        raise ApiError(416, "TP416", "invalid Range header", header, headers={"Content-Range": f"bytes */{size}"})\
            from None
    if start >= size or end < start:
        raise ApiError(416, "TP416", "range not satisfiable", header, headers={"Content-Range": f"bytes */{size}"})
    return start, end


class PrimedStreamingResponse(StreamingResponse):
    """Reads the first chunk before the status line goes out: an object store that is down
    then answers 503 with the error body (through the app's handlers), not a 200 cut short."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") == "HEAD":  # the headers GET would send, and no body read from the store
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        chunks = self.body_iterator.__aiter__()
        try:
            first: bytes | str | memoryview | None = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        except STORE_ERRORS as e:
            raise unavailable("object storage") from e

        async def primed() -> AsyncIterator[bytes | str | memoryview]:
            if first is not None:
                yield first
            async for chunk in chunks:
                yield chunk

        self.body_iterator = primed()
        await super().__call__(scope, receive, send)


def stream_object(store: ObjectStore, key: str, size: int, etag: str, media_type: str, range_header: str | None,
                  if_none_match: str | None, extra_headers: dict[str, str] | None = None) -> Response:
    """A stored object as an HTTP response: ETag, Content-Length, single Range, 304."""
    headers = {"ETag": etag, "Accept-Ranges": "bytes", **(extra_headers or {})}
    if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    byte_range = parse_range(range_header, size)
    if byte_range is None:
        headers["Content-Length"] = str(size)
        return PrimedStreamingResponse(store.stream(key), media_type=media_type, headers=headers)
    start, end = byte_range
    headers["Content-Length"] = str(end - start + 1)
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return PrimedStreamingResponse(store.stream(key, start, end), status_code=206, media_type=media_type,
                                   headers=headers)
