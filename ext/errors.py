"""One error body for every failure: {code, message, details, hint}, as PostgREST answers.

Routers raise ApiError (or let psycopg errors through); the handlers here turn them, and
FastAPI's own validation errors, into that body.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg_pool import PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("ext.errors")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None, hint: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.hint = hint
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"code": self.code, "message": self.message, "details": self.details, "hint": self.hint}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def unauthorized(details: str) -> ApiError:
    return ApiError(401, "TP401", "invalid or revoked credentials", details,
                    headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def unavailable(what: str) -> ApiError:
    return ApiError(503, "TP503", f"{what} unavailable", None, "Retry shortly.", headers={"Retry-After": "1"})


def _status_for_sqlstate(state: str) -> int:
    """PostgREST's mapping of SQLSTATE to HTTP status, so both services answer alike."""
    exact = {"23503": 409, "23505": 409, "25006": 405, "42501": 403, "42883": 404, "42P01": 404,
             "P0001": 400, "23514": 400, "23502": 400, "57014": 503, "53400": 500}
    if state in exact:
        return exact[state]
    prefixes = {"08": 503, "0L": 403, "0P": 403, "28": 403, "22": 400, "23": 409, "53": 503, "40": 500}
    return prefixes.get(state[:2], 500)


def from_db_error(e: psycopg.Error) -> ApiError:
    diag = e.diag
    state = diag.sqlstate or ""
    if state == "PGRST":  # raised with a status: message and detail are JSON
        try:
            body = json.loads(diag.message_primary or "{}")
            meta = json.loads(diag.message_detail or "{}")
            return ApiError(int(meta.get("status", 400)), body.get("code", "PGRST"), body.get("message", ""),
                            body.get("details"), body.get("hint"), headers=meta.get("headers") or {})
        except (ValueError, TypeError):
            return ApiError(400, "PGRST", diag.message_primary or "error")
    if isinstance(e, psycopg.OperationalError) and not state:
        return unavailable("database")
    if state in ("57P01", "57P02", "57P03"):
        # the server is shutting down, crashed or is starting: a pooled connection met it
        # (the pool pings only idle connections), so it is the database that is unavailable
        return unavailable("database")
    if isinstance(e, psycopg.DataError) and not state:
        # refused by psycopg before it reached the server: a value PostgreSQL cannot hold,
        # such as a NUL character in text (PostgREST answers 22P05 for the same input)
        nul = "NUL" in str(e)
        return ApiError(400, "22P05" if nul else "22000", str(e), None,
                        "Remove NUL (\\u0000) characters from the request." if nul else None)
    return ApiError(_status_for_sqlstate(state), state or "TP500", diag.message_primary or str(e),
                    diag.message_detail, diag.message_hint)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(psycopg.Error)
    async def _db_error(_: Request, e: psycopg.Error) -> JSONResponse:
        err = from_db_error(e)
        if err.status >= 500:
            log.warning("database error %s: %s", err.code, err.message)
        return err.response()

    @app.exception_handler(PoolTimeout)
    async def _pool_timeout(_: Request, e: PoolTimeout) -> JSONResponse:
        log.warning("no database connection: %s", e)
        return unavailable("database").response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return ApiError(400, "TP400", "malformed JSON body", first.get("msg")).response()
        return ApiError(422 if errors else 400, "TP422", f"invalid request: {where or 'body'}: {first.get('msg', '')}",
                        _printable(errors)).response()

    @app.exception_handler(UnicodeEncodeError)
    async def _surrogates(_: Request, e: UnicodeEncodeError) -> JSONResponse:
        # a lone surrogate ("\\ud800" in a JSON string) that no validator looked at, met
        # when the value is encoded for the database or a password hash
        return ApiError(400, "TP400", "invalid Unicode in the request", str(e),
                        "Strings must not contain lone UTF-16 surrogates.").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return ApiError(e.status_code, f"TP{e.status_code}", str(e.detail), headers=dict(e.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return ApiError(500, "TP500", "internal error").response()

    app.add_middleware(LastResort)


def _printable(errors: Any) -> Any:
    """Validation errors without the `input` pydantic attaches: it may be a password or the
    whole body (a missing field echoes every other field). What remains (type, loc, msg,
    ctx) may still hold lone surrogates (`"\\ud800"` is valid JSON, not valid Unicode) that
    cannot be encoded into the error body: they become "?"."""
    kept = [{k: v for k, v in e.items() if k not in ("input", "url")} for e in errors]
    text = json.dumps(kept, default=str, ensure_ascii=False)
    return json.loads(text.encode("utf-8", "replace"))


class LastResort:
    """ASGI middleware inside the request log, so its lines carry the request id.

    An exception no handler took becomes the 500 error body here, without reaching uvicorn:
    uvicorn closes a connection whose request raised, and nginx, which keeps connections to
    ext alive, would see the next request on it reset and answer 502. A client that went
    away before its body was read is no error of ours: one info line, and 499 (nginx's
    "client closed request") for the access log; there is nobody left to answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            log.info("client disconnected before the request body was read: %s %s", scope["method"], scope["path"])
            if not started:
                await send({"type": "http.response.start", "status": 499, "headers": []})
                await send({"type": "http.response.body", "body": b""})
        except Exception:
            if started:
                raise  # the body is cut short: only closing the connection tells the client
            log.exception("unexpected error")
            await ApiError(500, "TP500", "internal error").response()(scope, receive, send)
