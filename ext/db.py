"""Database access as the caller, exactly like PostgREST: one transaction with the
caller's role and claims set locally, the pre-request hook run first. RLS decides."""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import psycopg.sql
from psycopg.rows import dict_row, tuple_row
from psycopg_pool import AsyncConnectionPool
from psycopg_pool.base import AttemptWithBackoff

from ext.config import ExtSettings
from ext.errors import unauthorized


def idle_check(idle_s: float) -> Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]:
    """The pool's check on checkout: a round trip (an empty query) only for a connection
    idle at least idle_s. Checking every checkout cost /auth/token one of its six round
    trips; a connection in steady use is known good, and one that broke in the last idle_s
    fails its request (503) and is discarded by the pool."""
    last_checked: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = weakref.WeakKeyDictionary()

    async def check(conn: psycopg.AsyncConnection[Any]) -> None:
        now = time.monotonic()
        if now - last_checked.get(conn, float("-inf")) >= idle_s:
            await AsyncConnectionPool.check_connection(conn)
        last_checked[conn] = now

    return check


def make_pool(settings: ExtSettings) -> AsyncConnectionPool:
    # psycopg_pool retries a lost database with a doubling delay (1 s, 2 s, 4 s, ... up to
    # minutes), which left a worker answering 503 long after PostgreSQL was back. Retry
    # every ~second instead: reconnecting is cheap and recovery is what matters.
    AttemptWithBackoff.DELAY_BACKOFF = 1.0
    return AsyncConnectionPool(
        settings.database_url,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        timeout=settings.db_pool_timeout_s,
        kwargs={"connect_timeout": settings.db_connect_timeout_s, "application_name": "tracepipe-ext",
                "row_factory": dict_row, "prepare_threshold": settings.prepare_threshold},
        open=False,
        check=idle_check(settings.db_check_idle_s),
    )


async def _become_identity_service(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute("set role tp_auth")


def make_identity_pool(settings: ExtSettings) -> AsyncConnectionPool:
    """Connections that are tp_auth for their whole session, in autocommit: the key
    exchange (POST /auth/token) is then one statement, one round trip, where BEGIN, SET
    LOCAL ROLE, the query and COMMIT on the main pool were four. tp_auth may only run the
    identity functions; nothing else uses this pool."""
    return AsyncConnectionPool(
        settings.identity_url,
        min_size=1,
        max_size=settings.db_identity_pool_max,
        timeout=settings.db_pool_timeout_s,
        kwargs={"connect_timeout": settings.db_connect_timeout_s, "application_name": "tracepipe-ext identity",
                "row_factory": dict_row, "autocommit": True, "prepare_threshold": settings.prepare_threshold},
        open=False,
        configure=_become_identity_service,
        check=idle_check(settings.db_check_idle_s),
    )


@asynccontextmanager
async def as_caller(pool: AsyncConnectionPool, claims: dict[str, Any],
                    request_id: str | None = None) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A transaction as the token's role with request.jwt.claims set; commits on success."""
    async with pool.connection() as conn, conn.transaction():
        await become_caller(conn, claims, request_id)
        yield conn


# The role's own statement_timeout (ALTER ROLE … SET, for this database or all), as
# PostgREST applies it to the requests it runs as that role: SET ROLE alone would keep
# authenticator's longer bound for ext's queries as the caller. Looked up once per role and
# remembered for ROLE_SETTINGS_TTL_S (ExtSettings.db_role_settings_ttl_s; PostgREST, too,
# reads role settings into its schema cache): inline in every request's first statement the
# catalog lookup cost the database ~0.2 ms a request, more than the pre-request hook.
ROLE_SETTINGS_TTL_S = 60.0
_ROLE_STATEMENT_TIMEOUT_SQL = (
    "select substr(s, length('statement_timeout=') + 1)"
    " from pg_catalog.pg_db_role_setting d cross join unnest(d.setconfig) s"
    " where d.setrole = (select oid from pg_catalog.pg_roles where rolname = %s)"
    " and d.setdatabase in (0, (select oid from pg_catalog.pg_database where datname = current_database()))"
    " and s like 'statement\\_timeout=%%' order by d.setdatabase desc limit 1"
)
_role_timeouts: dict[str, tuple[str | None, float]] = {}  # token roles only (KeySet.verify): at most three


async def role_statement_timeout(conn: psycopg.AsyncConnection[Any], role: str) -> str | None:
    """The role's own statement_timeout, or None when it has none (the session's applies)."""
    hit = _role_timeouts.get(role)
    now = time.monotonic()
    if hit is not None and now - hit[1] < ROLE_SETTINGS_TTL_S:
        return hit[0]
    cur = conn.cursor(row_factory=tuple_row)
    await cur.execute(_ROLE_STATEMENT_TIMEOUT_SQL, [role])
    row = await cur.fetchone()
    value = None if row is None else str(row[0])
    _role_timeouts[role] = (value, now)
    return value


# Becoming the caller, inside a transaction: the token's role, its claims, the request id
# and the role's statement_timeout, all transaction-local; then the pre-request hook.
CALLER_SQL = ("select set_config('role', %s, true), set_config('request.jwt.claims', %s, true),"
              " set_config('application_name', %s, true),"
              " set_config('statement_timeout', coalesce(%s, current_setting('statement_timeout')), true)")
CHECK_REQUEST_SQL = "select auth.check_request()"


async def become_caller(conn: psycopg.AsyncConnection[Any], claims: dict[str, Any],
                        request_id: str | None = None) -> None:
    """Inside an open transaction: the token's role and claims, set locally, and the
    pre-request hook. For connections held across transactions (tus PATCH, ext/tus.py)."""
    params = await caller_params(conn, claims, request_id)
    try:
        await conn.execute(CALLER_SQL, params)
    except psycopg.errors.InsufficientPrivilege:
        raise unauthorized("the token's role is not one a token may carry") from None
    await conn.execute(CHECK_REQUEST_SQL)


async def caller_params(conn: psycopg.AsyncConnection[Any], claims: dict[str, Any],
                        request_id: str | None = None) -> list[Any]:
    """The parameters of CALLER_SQL for these claims (the role's statement_timeout looked up
    on `conn` when not remembered)."""
    role = claims["role"]
    return [role, json.dumps(claims), f"tracepipe-ext {request_id or ''}".strip(),
            await role_statement_timeout(conn, role)]


@asynccontextmanager
async def as_identity_service(pool: AsyncConnectionPool) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A transaction as tp_auth, the role of ext's identity functions (no token carries it)."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("set local role tp_auth")
        yield conn


@asynccontextmanager
async def as_identity_session(identity_pool: AsyncConnectionPool) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection of the identity pool (tp_auth, autocommit: each statement commits)."""
    async with identity_pool.connection() as conn:
        yield conn


async def api_row(conn: psycopg.AsyncConnection[Any], view: str, row_id: str) -> dict[str, Any]:
    """The row as PostgREST shows it (PostgreSQL's JSON of the api view), so ext and
    PostgREST answer the same resource with the same bytes (e.g. timestamps)."""
    cur = await conn.execute(
        psycopg.sql.SQL("select to_json(v) as row from api.{} v where v.id = %s").format(psycopg.sql.Identifier(view)),
        [row_id])
    found = await cur.fetchone()
    assert found is not None, (view, row_id)
    return dict(found["row"])
