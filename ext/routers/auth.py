"""Identity: storefront signup/login/refresh/logout and API-key exchange (POST /auth/token).

Tokens carry only what the database records say: the account's role, and for key tokens
the key's id, suites and access. Secrets are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from datetime import timedelta
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Header, Response
from pydantic import BaseModel, Field, field_validator

from ext.db import as_caller, as_identity_service, as_identity_session
from ext.deps import CallerDep, IdentityPoolDep, KeysDep, PoolDep, RequestIdDep, SettingsDep
from ext.errors import ApiError, unauthorized
from ext.passwords import hash_password, verify_password

router = APIRouter(tags=["auth"])

EMAIL = re.compile(r"^[^@\s]{1,200}@[^@\s]{1,200}$")
KEY_FORMAT = re.compile(r"^(tp_[0-9a-f]{12})_[0-9a-f]{48}$")
_DUMMY_KEY_HASH = hashlib.sha256(b"tracepipe-dummy-key").digest()

# When this process last recorded each key's use (monotonic seconds). last_used_at is kept
# to TOUCH_INTERVAL_S: a key exchanged many times a second (a fleet of CI jobs sharing one)
# otherwise queued every exchange behind the row lock of the previous one's update.
TOUCH_INTERVAL_S = 10.0
_touched: dict[str, float] = {}


def _touch_due(key_id: str) -> bool:
    now = time.monotonic()
    last = _touched.get(key_id)
    if last is not None and now - last < TOUCH_INTERVAL_S:
        return False
    if len(_touched) >= 10_000:
        _touched.clear()
    _touched[key_id] = now
    return True


class SignupBody(BaseModel):
    email: str = Field(max_length=320)
    password: str
    display_name: str | None = Field(None, max_length=200)

    @field_validator("email")
    @classmethod
    def _email(cls, v: str) -> str:
        if not EMAIL.match(v):
            raise ValueError("not an email address")
        return v


class LoginBody(BaseModel):
    email: str = Field(max_length=320)
    password: str = Field(max_length=4096)


class RefreshBody(BaseModel):
    refresh_token: str = Field(max_length=200)


class LogoutBody(BaseModel):
    refresh_token: str | None = Field(None, max_length=200)


class TokenPair(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int
    refresh_token: str


class AccessToken(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _new_refresh_token() -> str:
    return "tpr_" + secrets.token_urlsafe(32)


async def _start_login(pool: PoolDep, keys: KeysDep, settings: SettingsDep, user_id: Any, role: str) -> TokenPair:
    refresh = _new_refresh_token()
    async with as_identity_service(pool) as conn:
        cur = await conn.execute("select auth.start_login(%s, %s, %s) as sid",
                                 [user_id, _sha256(refresh), timedelta(seconds=settings.refresh_token_ttl_s)])
        row = await cur.fetchone()
    assert row is not None
    token, ttl = keys.sign({"sub": str(user_id), "role": role, "sid": str(row["sid"])}, settings.access_token_ttl_s)
    return TokenPair(access_token=token, expires_in=ttl, refresh_token=refresh)


@router.post("/auth/signup", status_code=201, summary="Create an account and sign in")
async def signup(body: SignupBody, pool: PoolDep, keys: KeysDep, settings: SettingsDep) -> dict[str, Any]:
    if not settings.password_min_length <= len(body.password) <= settings.password_max_length:
        raise ApiError(422, "TP422", "invalid request: password: length out of range",
                       f"between {settings.password_min_length} and {settings.password_max_length} characters")
    password_hash = await hash_password(body.password)
    try:
        async with as_identity_service(pool) as conn:
            cur = await conn.execute("select auth.signup(%s, %s, %s) as id",
                                     [body.email, password_hash, body.display_name])
            row = await cur.fetchone()
    except psycopg.errors.UniqueViolation:
        raise ApiError(409, "TP409", "an account with this email exists", None,
                       "Sign in with POST /auth/login.") from None
    assert row is not None
    pair = await _start_login(pool, keys, settings, row["id"], "tp_user")
    return {"id": str(row["id"]), "email": body.email, "display_name": body.display_name, **pair.model_dump()}


def _throttled(wait: int, subject: str) -> None:
    """429 with Retry-After while the subject has too many recent failures."""
    if wait > 0:
        raise ApiError(429, "TP429", "too many failed attempts", subject.split(":", 1)[0],
                       "Retry after the number of seconds in Retry-After.", headers={"Retry-After": str(wait)})


async def _throttle(conn: Any, subject: str, max_failures: int, settings: SettingsDep) -> None:
    cur = await conn.execute("select auth.throttle_wait(%s, %s, %s) as wait",
                             [subject, max_failures, timedelta(seconds=settings.throttle_window_s)])
    row = await cur.fetchone()
    _throttled(row["wait"] if row else 0, subject)


async def _record_failure(pool: PoolDep, subject: str, settings: SettingsDep) -> None:
    async with as_identity_service(pool) as conn:
        await conn.execute("select auth.throttle_fail(%s, %s)",
                           [subject, timedelta(seconds=settings.throttle_window_s)])


@router.post("/auth/login", summary="Sign in with email and password")
async def login(body: LoginBody, pool: PoolDep, keys: KeysDep, settings: SettingsDep) -> TokenPair:
    subject = f"login:{body.email.lower()}"
    async with as_identity_service(pool) as conn:
        await _throttle(conn, subject, settings.login_max_failures, settings)
        cur = await conn.execute("select * from auth.login_lookup(%s)", [body.email])
        account = await cur.fetchone()
    ok = await verify_password(account["password_hash"] if account else None, body.password)
    if not ok or account is None or account["disabled"]:
        await _record_failure(pool, subject, settings)
        raise ApiError(401, "TP401", "wrong email or password", None, None,
                       headers={"WWW-Authenticate": "Bearer"})
    async with as_identity_service(pool) as conn:
        await conn.execute("select auth.throttle_clear(%s)", [subject])
    return await _start_login(pool, keys, settings, account["id"], account["account_role"])


@router.post("/auth/refresh", summary="Trade a refresh token for a new pair (rotation)")
async def refresh(body: RefreshBody, pool: PoolDep, keys: KeysDep, settings: SettingsDep) -> TokenPair:
    new_refresh = _new_refresh_token()
    async with as_identity_service(pool) as conn:
        cur = await conn.execute(
            "select * from auth.rotate_refresh(%s, %s, %s)",
            [_sha256(body.refresh_token), _sha256(new_refresh), timedelta(seconds=settings.refresh_token_ttl_s)],
        )
        row = await cur.fetchone()
    assert row is not None
    if row["status"] == "reused":
        raise unauthorized("refresh token reused: the login has been ended, sign in again")
    if row["status"] != "ok":
        raise unauthorized("refresh token invalid, expired or revoked")
    token, ttl = keys.sign({"sub": str(row["user_id"]), "role": row["account_role"], "sid": str(row["family_id"])},
                           settings.access_token_ttl_s)
    return TokenPair(access_token=token, expires_in=ttl, refresh_token=new_refresh)


@router.post("/auth/logout", status_code=204, summary="End the login of this token (and of a refresh token)",
             description="For a storefront session's token (from /auth/login, /auth/signup, /auth/refresh). "
                         "A token from POST /auth/token (an API key's) is refused with 400: revoke the key "
                         "with DELETE /api-keys/{id}, which ends its tokens.")
async def logout(caller: CallerDep, pool: PoolDep, rid: RequestIdDep, body: LogoutBody | None = None) -> Response:
    async with as_caller(pool, caller, rid):
        pass  # the token must still be valid (not revoked) to log out
    if caller.get("key_id"):  # a key's token has no login to end: a 204 would leave it working
        raise ApiError(400, "TP400", "logout ends a storefront session; this token is an API key's",
                       {"key_id": caller["key_id"]},
                       "Revoke the key with DELETE /api-keys/{id} (its tokens stop working); "
                       "log out with a token from POST /auth/login.")
    sid = caller.get("sid")
    token_hash = _sha256(body.refresh_token) if body and body.refresh_token else b""
    async with as_identity_service(pool) as conn:
        await conn.execute("select auth.end_login(%s, %s, %s)", [caller["sub"], sid, token_hash])
    return Response(status_code=204)


@router.post("/auth/token", summary="Exchange an API key for a short-lived access token")
async def token(pool: PoolDep, identity_pool: IdentityPoolDep, keys: KeysDep, settings: SettingsDep,
                authorization: Annotated[str, Header()] = "") -> AccessToken:
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    match = KEY_FORMAT.match(key)
    if scheme.lower() != "apikey" or not match:
        raise ApiError(401, "TP401", "an API key is required", "Authorization: ApiKey tp_…",
                       headers={"WWW-Authenticate": "ApiKey"})
    subject = f"key:{match.group(1)}"
    # One statement, one round trip: the throttle and the lookup on a connection that is
    # tp_auth in autocommit (ext/db.py make_identity_pool; the pool pings only idle
    # connections). Each round trip through the async driver costs about as much as the
    # queries. The touch is at most every TOUCH_INTERVAL_S per key and process, and commits
    # asynchronously: losing a last_used_at on a crash is harmless, and a synchronous commit
    # would hold the key row's lock through a WAL flush.
    async with as_identity_session(identity_pool) as conn:
        cur = await conn.execute(
            "select auth.throttle_wait(%s, %s, %s) as wait, k.* from (select) one"
            " left join auth.key_lookup(%s) k on true",
            [subject, settings.key_max_failures, timedelta(seconds=settings.throttle_window_s), match.group(1)])
        row = await cur.fetchone()
        assert row is not None
        _throttled(row["wait"], subject)
        record = row if row["id"] is not None else None
        stored = bytes(record["key_hash"]) if record else _DUMMY_KEY_HASH
        valid = hmac.compare_digest(stored, _sha256(key))
        if valid and record is not None:
            revoked = record["revoked_at"] is not None or record["disabled"]
            expires = record["expires_at"]
            expired = expires is not None and expires.timestamp() <= time.time()
            if not revoked and not expired and _touch_due(str(record["id"])):
                await conn.execute("select auth.touch_key(%s), set_config('synchronous_commit', 'off', true)",
                                   [record["id"]])
    if not valid or record is None:
        await _record_failure(pool, subject, settings)
        raise ApiError(401, "TP401", "invalid API key", None, None, headers={"WWW-Authenticate": "ApiKey"})
    if revoked:
        raise ApiError(401, "TP401", "API key revoked", None, None, headers={"WWW-Authenticate": "ApiKey"})
    if expired:
        raise ApiError(401, "TP401", "API key expired", None, None, headers={"WWW-Authenticate": "ApiKey"})
    claims = {
        "sub": str(record["user_id"]),
        "role": record["account_role"],
        "key_id": str(record["id"]),
        "key_suites": [str(s) for s in record["suites"]] if record["suites"] is not None else None,
        "key_access": record["access"],
        "exp": int(expires.timestamp()) if expires is not None else None,
    }
    access, ttl = keys.sign(claims, settings.key_token_ttl_s)
    return AccessToken(access_token=access, expires_in=ttl)


@router.get("/.well-known/jwks.json", summary="Public keys that verify Tracepipe tokens")
async def jwks(keys: KeysDep) -> dict[str, Any]:
    return keys.jwks()
