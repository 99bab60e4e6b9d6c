"""The pipeline's work queue (DESIGN §10): claim (long-poll), extend, complete, fail, requeue.
Listing is PostgREST's (GET /pipeline/jobs is api.pipeline_jobs).

Every statement runs as the caller (as ext.db.as_caller does), so grants and RLS decide who works
the queue: the lease functions in db/schema/35_pipeline.sql are executable by tp_pipeline
and tp_admin only, and a person's token gets 403.

The long-poll holds no database connection while it waits. Each ext worker keeps one
direct connection of its own that LISTENs on `tp_pipeline_jobs` (NOTIFYed by a trigger
when a job becomes claimable) and wakes every waiting claim; a claim that found nothing
sleeps until a notification, the next known due time (a backoff that ends, a lease that
runs out) or its own deadline, whichever comes first — there is no polling loop.

Each call is one round trip to PostgreSQL: the caller's role and claims, the pre-request
hook and the lease function go out as one query string, one implicit transaction
(`_as_caller_at_once`), where `ext.db.as_caller` waits for each statement (five round trips).
A worker finishing a job may lease its next ones in the same request (`claim_next` on
complete: one request and one transaction per job instead of two).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, cast

import psycopg
from fastapi import APIRouter, Body, FastAPI, Request
from pydantic import BaseModel, Field

from ext import observability
from ext.config import ExtSettings
from ext.db import CALLER_SQL, CHECK_REQUEST_SQL, caller_params
from ext.deps import CallerDep, PoolDep, RequestIdDep, SettingsDep
from ext.errors import ApiError, unauthorized

log = logging.getLogger("ext.pipeline")
CHANNEL = "tp_pipeline_jobs"
# A due job that a concurrent claim holds locked (SKIP LOCKED passed it over) leaves the
# next due time in the past: wait this long before looking again rather than spin.
LOCKED_REWAIT_S = 0.05


class JobSignal:
    """One LISTEN connection per ext worker, fanned out to the claims waiting in it.

    `generation` counts wake-ups; a claim reads it before querying and waits only if no
    wake-up came since, so a notification between its query and its wait is never lost.
    A lost connection wakes everyone (their next query answers 503 or finds the jobs) and
    reconnects after `pipeline_listen_retry_s`."""

    def __init__(self, settings: ExtSettings) -> None:
        self.settings = settings
        self.generation = 0
        self.listening = False
        self._event = asyncio.Event()

    def wake(self) -> None:
        self.generation += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, seen: int, timeout: float) -> None:
        if self.generation != seen or timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)

    async def run(self) -> None:
        s = self.settings
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    s.session_url, autocommit=True, connect_timeout=max(1, round(s.db_connect_timeout_s)),
                    application_name="tracepipe-ext pipeline listener")
                async with conn:
                    await conn.execute(f"listen {CHANNEL}")
                    self.listening = True
                    self.wake()  # jobs may have come while this worker was not listening
                    async for _ in conn.notifies():
                        self.wake()
            except psycopg.Error as e:
                log.warning("pipeline listener lost its connection: %s", e)
            except Exception:  # whatever it was, the listener must come back
                log.exception("pipeline listener failed")
            finally:
                self.listening = False
            self.wake()
            await asyncio.sleep(s.pipeline_listen_retry_s)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    signal = JobSignal(app.state.settings)
    app.state.pipeline_signal = signal
    task = asyncio.create_task(signal.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


router = APIRouter(tags=["pipeline"], lifespan=lifespan)


class Claim(BaseModel):
    limit: int = Field(1, ge=1, description="most jobs to lease (at most TP_EXT_PIPELINE_CLAIM_MAX_JOBS)")
    lease_s: int | None = Field(None, description="lease length in seconds (10..3600 by default)")
    wait_s: float = Field(0, ge=0, description="long-poll up to this many seconds when nothing is due")
    suite_id: uuid.UUID | None = Field(None, description="only jobs of this suite's sessions")


class ClaimNext(BaseModel):
    limit: int = Field(1, ge=1, description="most jobs to lease (at most TP_EXT_PIPELINE_CLAIM_MAX_JOBS)")
    lease_s: int | None = Field(None, description="lease length in seconds (10..3600 by default)")
    suite_id: uuid.UUID | None = Field(None, description="only jobs of this suite's sessions")


class Extend(BaseModel):
    lease_token: uuid.UUID = Field(description="the token the claim answered with")
    lease_s: int


class Complete(BaseModel):
    lease_token: uuid.UUID
    example_ids: list[uuid.UUID] | None = None
    claim_next: ClaimNext | None = Field(
        None, description="also lease the next due jobs in the same transaction (answered as `next`, the leases "
                          "of POST /pipeline/claim); never waits: long-poll with POST /pipeline/claim")


class Fail(BaseModel):
    lease_token: uuid.UUID
    error: str = Field(min_length=1, description="what went wrong (kept up to 8192 characters)")
    retry: bool = True


class Requeue(BaseModel):
    session_id: uuid.UUID | None = None
    suite_id: uuid.UUID | None = None
    reason: str = Field(min_length=1, max_length=500, description="why (e.g. 'pipeline v2')")


JOB_FIELDS = ("id", "session_id", "suite_id", "generation", "attempt", "lease_expires_at", "lease_token")


def _lease(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row[k] for k in JOB_FIELDS}
    for k in ("id", "session_id", "suite_id", "lease_token"):
        out[k] = str(out[k]) if out[k] is not None else None
    out["lease_expires_at"] = row["lease_expires_at"].isoformat()
    return out


def _check_range(field: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ApiError(422, "TP422", f"invalid request: {field}: must be between {low:g} and {high:g}",
                       {"field": field, "min": low, "max": high})


def _job_uuid(job_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise ApiError(400, "TP400", "job id is not a uuid", {"parameter": "id"},
                       "Use the id POST /pipeline/claim answered.") from None


def _forbidden() -> ApiError:
    return ApiError(403, "42501", "only pipeline accounts work the queue",
                    "this needs a token of a pipeline account (or an admin) that may write",
                    "Exchange a pipeline account's API key at POST /auth/token.")


def _refuse_read_only(caller: dict[str, Any]) -> None:
    # The update policy would silently match no row; say why instead.
    if caller.get("key_access", "write") != "write":
        raise _forbidden()


async def _as_caller_at_once(pool: PoolDep, caller: dict[str, Any], rid: str | None,
                             statements: list[tuple[str, list[Any]]]) -> list[list[dict[str, Any]]]:
    """The statements in one transaction as the caller (role, claims and pre-request hook as
    in ext.db.as_caller), sent as one query string: one round trip and one wait, where
    as_caller takes one per statement plus BEGIN and COMMIT. PostgreSQL runs a string of
    statements as one implicit transaction (all or nothing; the caller's settings last until
    its end), so the connection is in autocommit for it. The parameters are bound by psycopg
    on this side (its literal quoting). Each statement's rows."""
    sql = ";\n".join([CALLER_SQL, CHECK_REQUEST_SQL, *(q for q, _ in statements)])
    async with pool.connection() as conn:
        await conn.set_autocommit(True)
        try:
            params = [*await caller_params(conn, caller, rid), *(p for _, ps in statements for p in ps)]
            cur = psycopg.AsyncClientCursor(conn)
            await cur.execute(sql, params)
        except psycopg.errors.InsufficientPrivilege as e:
            if "set role" in (e.diag.message_primary or ""):
                raise unauthorized("the token's role is not one a token may carry") from None
            raise _forbidden() from None
        finally:
            await conn.set_autocommit(False)
        results: list[list[dict[str, Any]]] = []
        for _ in range(2):  # the caller's settings and the hook
            cur.nextset()
        for _ in statements:
            results.append(cast(list[dict[str, Any]], await cur.fetchall()))
            cur.nextset()
        return results


@router.post("/pipeline/claim", summary="Lease up to `limit` due jobs; with wait_s, long-poll until one comes")
async def claim(request: Request, caller: CallerDep, pool: PoolDep, settings: SettingsDep, rid: RequestIdDep,
                body: Annotated[Claim | None, Body()] = None) -> list[dict[str, Any]]:
    body = body or Claim()
    lease_s = body.lease_s if body.lease_s is not None else settings.pipeline_lease_default_s
    _check_range("limit", body.limit, 1, settings.pipeline_claim_max_jobs)
    _check_range("lease_s", lease_s, settings.pipeline_lease_min_s, settings.pipeline_lease_max_s)
    _check_range("wait_s", body.wait_s, 0, settings.pipeline_wait_max_s)
    _refuse_read_only(caller)
    signal: JobSignal = request.app.state.pipeline_signal
    deadline = time.monotonic() + body.wait_s
    while True:
        seen = signal.generation
        due_in: float | None = None
        statements: list[tuple[str, list[Any]]] = [
            ("select * from app.pipeline_claim(%s, %s, %s, %s)",
             [body.limit, lease_s, settings.pipeline_max_attempts, body.suite_id])]
        if body.wait_s > 0:  # when to look again if nothing is due: asked in the same round trip
            statements.append(("select extract(epoch from app.pipeline_next_due(%s) - now())::float8 as due_in",
                               [body.suite_id]))
        results = await _as_caller_at_once(pool, caller, rid, statements)
        rows = results[0]
        if not rows and body.wait_s > 0 and results[1]:
            due_in = results[1][0]["due_in"]
        remaining = deadline - time.monotonic()
        if rows or remaining <= 0:
            observability.PIPELINE_CLAIMED.inc(len(rows))
            return [_lease(r) for r in rows]
        timeout = remaining if due_in is None else min(remaining, max(due_in, LOCKED_REWAIT_S))
        await signal.wait(seen, timeout)
        if await request.is_disconnected():  # nobody would receive what we lease now
            return []


async def _lease_operation(pool: PoolDep, caller: dict[str, Any], rid: str | None, job: uuid.UUID,
                           sql: str, params: list[Any]) -> dict[str, Any]:
    rows = await _lease_operation_rows(pool, caller, rid, job, sql, params)
    return dict(rows[0])


async def _lease_operation_rows(pool: PoolDep, caller: dict[str, Any], rid: str | None, job: uuid.UUID,
                                sql: str, params: list[Any]) -> list[dict[str, Any]]:
    """The lease function's rows (the job's first), or 404/409 when the caller does not hold the lease."""
    _refuse_read_only(caller)
    [rows] = await _as_caller_at_once(pool, caller, rid, [(sql, params)])
    if rows:
        return rows
    # Why nothing matched, asked only then (an RLS query on every success cost the database
    # a fifth of a complete).
    [seen_rows] = await _as_caller_at_once(pool, caller, rid, [
        ("select state, attempt from api.pipeline_jobs where id = %s", [job])])
    seen = seen_rows[0] if seen_rows else None
    if seen is None:
        raise ApiError(404, "PGRST116", "not found", "the job does not exist or you may not see it")
    raise ApiError(409, "TP409", "you do not hold this job's lease",
                   {"state": seen["state"], "attempt": seen["attempt"]},
                   "The lease ran out or the job was finished: claim again with POST /pipeline/claim.")


def _job(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "session_id", "suite_id", "state", "generation", "attempt", "max_attempts", "run_after",
            "lease_expires_at", "last_error", "example_ids", "finished_at")
    out: dict[str, Any] = {}
    for k in keep:
        v = row[k]
        if isinstance(v, uuid.UUID):
            v = str(v)
        elif isinstance(v, list):
            v = [str(x) for x in v]
        elif hasattr(v, "isoformat"):
            v = v.isoformat()
        out[k] = v
    return out


@router.post("/pipeline/jobs/{job_id}/extend", summary="Extend the lease by lease_s from now (lease holder only)")
async def extend(job_id: str, body: Extend, caller: CallerDep, pool: PoolDep, settings: SettingsDep,
                 rid: RequestIdDep) -> dict[str, Any]:
    job = _job_uuid(job_id)
    _check_range("lease_s", body.lease_s, settings.pipeline_lease_min_s, settings.pipeline_lease_max_s)
    row = await _lease_operation(pool, caller, rid, job, "select * from app.pipeline_extend(%s, %s, %s)",
                                 [job, body.lease_token, body.lease_s])
    return _job(row)


@router.post("/pipeline/jobs/{job_id}/complete", summary="Mark the job done (lease holder only)")
async def complete(job_id: str, body: Complete, caller: CallerDep, pool: PoolDep, settings: SettingsDep,
                   rid: RequestIdDep) -> dict[str, Any]:
    job = _job_uuid(job_id)
    nxt = body.claim_next
    if nxt is None:
        rows = await _lease_operation_rows(pool, caller, rid, job, "select * from app.pipeline_complete(%s, %s, %s)",
                                           [job, body.lease_token, body.example_ids])
    else:
        lease_s = nxt.lease_s if nxt.lease_s is not None else settings.pipeline_lease_default_s
        _check_range("claim_next.limit", nxt.limit, 1, settings.pipeline_claim_max_jobs)
        _check_range("claim_next.lease_s", lease_s, settings.pipeline_lease_min_s, settings.pipeline_lease_max_s)
        rows = await _lease_operation_rows(
            pool, caller, rid, job, "select * from app.pipeline_complete_and_claim(%s, %s, %s, %s, %s, %s, %s)",
            [job, body.lease_token, body.example_ids, nxt.limit, lease_s, settings.pipeline_max_attempts,
             nxt.suite_id])
    row = rows[0]
    if row["finished_at"] is not None and row["leased_at"] is not None:
        observability.PIPELINE_CLAIM_TO_COMPLETE.observe((row["finished_at"] - row["leased_at"]).total_seconds())
    out = _job(row)
    if nxt is not None:
        observability.PIPELINE_CLAIMED.inc(len(rows) - 1)
        out["next"] = [_lease(r) for r in rows[1:]]
    return out


@router.post("/pipeline/jobs/{job_id}/fail",
             summary="Record a failure (lease holder only): retried after a backoff, or dead")
async def fail(job_id: str, body: Fail, caller: CallerDep, pool: PoolDep, settings: SettingsDep,
               rid: RequestIdDep) -> dict[str, Any]:
    job = _job_uuid(job_id)
    row = await _lease_operation(
        pool, caller, rid, job, "select * from app.pipeline_fail(%s, %s, %s, %s, %s, %s, %s)",
        [job, body.lease_token, body.error, body.retry, settings.pipeline_max_attempts,
         settings.pipeline_backoff_base_s, settings.pipeline_backoff_max_s])
    return _job(row)


@router.post("/pipeline/requeue", summary="Enqueue a new generation of jobs for a session or a suite's sessions")
async def requeue(body: Requeue, caller: CallerDep, pool: PoolDep, rid: RequestIdDep) -> dict[str, Any]:
    if body.session_id is None and body.suite_id is None:
        raise ApiError(422, "TP422", "invalid request: session_id or suite_id is required",
                       {"field": "session_id"}, "Name the session (session_id) or the suite (suite_id) to requeue.")
    _refuse_read_only(caller)
    [rows] = await _as_caller_at_once(pool, caller, rid, [("select id from app.pipeline_requeue(%s, %s, %s)",
                                                           [body.session_id, body.suite_id, body.reason])])
    if not rows and body.session_id is not None:
        raise ApiError(404, "PGRST116", "not found", "no such session (in that suite)")
    return {"requeued": len(rows), "job_ids": [str(r["id"]) for r in rows]}
