"""Housekeeping that keeps object storage and the database in step: drain the outbox of
object deletions, abort stale multipart uploads, remove objects without a row (older than
a grace period), retry failed cleanups, expire idempotency records, bound the auth throttle
table and forget refresh successors past their grace. Runs periodically in
ext (one worker at a time, by advisory lock) and on demand (`tracepipe sweep`). Also holds
analyst sessions to their role's timeouts (every round, every worker: it is idempotent)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import Any
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from ext.config import ExtSettings
from ext.db import as_identity_service
from ext.storage import ObjectStore

log = logging.getLogger("ext.maintenance")
SWEEP_LOCK = 7_340_002


async def drain_deletions(pool: AsyncConnectionPool, store: ObjectStore, batch: int = 500) -> int:
    async with as_identity_service(pool) as conn:
        cur = await conn.execute("select auth.pending_object_deletions(%s) as prefix", [batch])
        prefixes = [r["prefix"] for r in await cur.fetchall()]
    done = 0
    for prefix in prefixes:
        # the outbox row is the retry record: nothing goes to the in-memory queue
        if await store.delete_prefix(prefix, retry_later=False):
            async with as_identity_service(pool) as conn:
                await conn.execute("select auth.finish_object_deletion(%s)", [prefix])
            done += 1
    return done


async def stop_overrunning_analysts(pool: AsyncConnectionPool, grace: timedelta) -> int:
    """The database holds analyst sessions to their role's timeouts: a query past its limit
    is cancelled, one still running `grace` later (it caught the cancel) is terminated."""
    async with as_identity_service(pool) as conn:
        cur = await conn.execute("select auth.stop_overrunning_analysts(%s) as n", [grace])
        row = await cur.fetchone()
    stopped = int(row["n"]) if row else 0
    if stopped:
        log.info("stopped %d analyst session(s) past their role's timeouts", stopped)
    return stopped


async def sweep(pool: AsyncConnectionPool, store: ObjectStore, settings: ExtSettings,
                grace: timedelta | None = None) -> dict[str, int]:
    async def known(prefix: str, ids: list[str]) -> set[str]:
        valid = []
        for i in ids:
            with contextlib.suppress(ValueError):
                valid.append(UUID(i))
        async with as_identity_service(pool) as conn:
            cur = await conn.execute("select auth.existing_objects(%s, %s) as id", [prefix.rstrip("/"), valid])
            return {str(r["id"]) for r in await cur.fetchall()}

    report: dict[str, int] = {"deletions_done": await drain_deletions(pool, store)}
    age = grace if grace is not None else timedelta(seconds=settings.orphan_grace_s)
    async with as_identity_service(pool) as conn:  # a tus upload may outlive the grace period
        cur = await conn.execute("select auth.live_tus_multipart_ids() as id")
        live = frozenset(r["id"] for r in await cur.fetchall())
    report |= await store.sweep(("sessions/", "examples/"), age, known, live)
    async with as_identity_service(pool) as conn:
        cur = await conn.execute("select auth.expire_idempotency_keys(%s) as n",
                                 [timedelta(seconds=settings.idempotency_ttl_s)])
        row = await cur.fetchone()
    report["idempotency_expired"] = int(row["n"]) if row else 0
    report["cleanups_retried"] = await store.retry_cleanups()
    report |= await sweep_identity(pool, settings)
    return report


async def expire_tus_uploads(pool: AsyncConnectionPool, store: ObjectStore, batch: int = 100) -> int:
    """Aborts the parts and removes the objects of tus uploads past their expiry, then their
    rows (a done upload's session stays). An upload a PATCH holds (its advisory lock) waits
    for the next round; so does one whose objects the store would not remove yet."""
    from ext import tus  # ext.tus imports the routers, which import this module

    async with as_identity_service(pool) as conn:
        cur = await conn.execute("select * from auth.expired_tus_uploads(%s)", [batch])
        expired = await cur.fetchall()
    done = 0
    for row in expired:
        upload_id = str(row["id"])
        async with as_identity_service(pool) as conn:
            cur = await conn.execute("select pg_try_advisory_xact_lock(%s) as locked", [tus.lock_key(upload_id)])
            locked = await cur.fetchone()
            if not (locked and locked["locked"]):
                continue
            if row["state"] == "done" or await tus.discard_objects(store, upload_id, str(row["session_id"]),
                                                                   row["s3_upload_id"], row["state"]):
                await conn.execute("select auth.forget_tus_upload(%s)", [upload_id])
                done += 1
    if done:
        log.info("expired %d tus upload(s)", done)
    return done


async def sweep_identity(pool: AsyncConnectionPool, settings: ExtSettings) -> dict[str, int]:
    """Throttle rows past their window go and the table is capped at throttle_max_rows (the
    newest kept); rotated refresh tokens forget their sealed successor after the grace."""
    async with as_identity_service(pool) as conn:
        cur = await conn.execute("select * from auth.throttle_sweep(%s, %s)",
                                 [timedelta(seconds=settings.throttle_window_s), settings.throttle_max_rows])
        throttle = await cur.fetchone()
        cur = await conn.execute("select auth.forget_refresh_successors(%s) as n",
                                 [timedelta(seconds=settings.refresh_grace_s)])
        successors = await cur.fetchone()
    return {"throttle_expired": int(throttle["expired"]) if throttle else 0,
            "throttle_evicted": int(throttle["evicted"]) if throttle else 0,
            "refresh_successors_forgotten": int(successors["n"]) if successors else 0}


async def run_forever(app_state: Any) -> None:
    """Background loop of one ext worker: cleanups often, the sweep now and then (only the
    worker holding the advisory lock sweeps)."""
    settings: ExtSettings = app_state.settings
    waited = 0
    while True:
        await asyncio.sleep(settings.cleanup_retry_s)
        waited += settings.cleanup_retry_s
        try:
            await app_state.store.retry_cleanups()
            await drain_deletions(app_state.pool, app_state.store)
            await stop_overrunning_analysts(app_state.pool, timedelta(seconds=settings.analyst_cancel_grace_s))
            await expire_tus_uploads(app_state.pool, app_state.store)
            if waited >= settings.sweep_interval_s:
                waited = 0
                async with app_state.pool.connection() as conn:
                    cur = await conn.execute("select pg_try_advisory_lock(%s) as locked", [SWEEP_LOCK])
                    row = await cur.fetchone()
                    if row and row["locked"]:
                        try:
                            log.info("sweep: %s", await sweep(app_state.pool, app_state.store, settings))
                        finally:
                            await conn.execute("select pg_advisory_unlock(%s)", [SWEEP_LOCK])
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the next round tries again; a dependency may be down
            log.warning("maintenance round failed: %s", e)
