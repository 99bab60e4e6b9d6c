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
                        json.loads(json.dumps(errors, default=str))).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return ApiError(e.status_code, f"TP{e.status_code}", str(e.detail), headers=dict(e.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return ApiError(500, "TP500", "internal error").response()
