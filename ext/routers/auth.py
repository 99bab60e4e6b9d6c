"""Identity: storefront signup/login/refresh/logout and API-key exchange (POST /auth/token).

Tokens carry only what the database records say: the account's role, and for key tokens
the key's id, suites and access. Secrets are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import time
from datetime import timedelta
from typing import Annotated, Any

import psycopg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from fastapi import APIRouter, Header, Request, Response
from pydantic import BaseModel, Field, field_validator

from ext import emails, mail
from ext.config import ExtSettings
from ext.db import as_caller, as_identity_service, as_identity_session
from ext.deps import CallerDep, IdentityPoolDep, KeysDep, PoolDep, RequestIdDep, SettingsDep
from ext.errors import ApiError, unauthorized
from ext.passwords import HashBound, hash_password, hashing_slot, verify_password

router = APIRouter(tags=["auth"])
log = logging.getLogger("ext.auth")

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


def _normal_email(v: str) -> str:
    """The one spelling of the address (ext/emails.py); a ValueError names what is wrong."""
    try:
        return emails.normalize(v)
    except emails.InvalidEmail as e:
        raise ValueError(str(e)) from None


class SignupBody(BaseModel):
    email: str = Field(max_length=320, description="stored and compared in its normal form (NFKC, casefold)")
    password: str
    display_name: str | None = Field(None, max_length=200)

    _email = field_validator("email")(_normal_email)


class LoginBody(BaseModel):
    email: str = Field(max_length=320)
    password: str = Field(max_length=4096)

    _email = field_validator("email")(_normal_email)


class VerifyEmailBody(BaseModel):
    token: str = Field(max_length=200, description="the code of the verification mail")


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


def _new_verification_code() -> str:
    return "tpv_" + secrets.token_urlsafe(32)


async def _start_verification(conn: Any, settings: ExtSettings, user_id: Any) -> tuple[str | None, str]:
    """Records a new code for the account; (the address to mail it to or None, the code)."""
    code = _new_verification_code()
    cur = await conn.execute("select auth.start_email_verification(%s, %s, %s) as email",
                             [user_id, _sha256(code), timedelta(seconds=settings.verify_email_ttl_s)])
    row = await cur.fetchone()
    return (row["email"] if row else None), code


def _mail_verification(settings: ExtSettings, address: str, code: str) -> None:
    hours = settings.verify_email_ttl_s / 3600
    link = settings.verify_email_link.replace("{token}", code) if settings.verify_email_link else ""
    text = (f"Your Tracepipe verification code:\n\n    {code}\n\n"
            + (f"Open {link}\nor send the code" if link else "Send it")
            + f' with POST /auth/verify-email {{"token": "<code>"}}. It is valid for {hours:g} hours, once.\n\n'
            "If you did not sign up for Tracepipe, ignore this mail: the account cannot receive what is meant "
            "for this address until the code is used.\n")
    try:
        msg = mail.compose(settings, address, "Verify your Tracepipe email address", text)
    except Exception as e:  # an address the mail library cannot put in a header (a domain literal...)
        # The account exists and works; only this mail cannot be sent. Never a 500 after the commit.
        log.warning("verification mail not sent: the address cannot be written as a mail header (%s)",
                    type(e).__name__)
        return
    mail.deliver_later(settings, msg)


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
async def signup(body: SignupBody, request: Request, pool: PoolDep, keys: KeysDep,
                 settings: SettingsDep) -> dict[str, Any]:
    if not settings.password_min_length <= len(body.password) <= settings.password_max_length:
        raise ApiError(422, "TP422", "invalid request: password: length out of range",
                       f"between {settings.password_min_length} and {settings.password_max_length} characters")
    password_hash = await hash_password(body.password, _hash_bound(request, settings))
    try:
        async with as_identity_service(pool) as conn:
            cur = await conn.execute("select auth.signup(%s, %s, %s) as id",
                                     [body.email, password_hash, body.display_name])
            row = await cur.fetchone()
            assert row is not None
            address, code = await _start_verification(conn, settings, row["id"])
    except psycopg.errors.UniqueViolation:
        # the address, or a confusable spelling of it (emails.skeleton), has an account
        raise ApiError(409, "TP409", "an account with this email exists", None,
                       "Sign in with POST /auth/login.") from None
    except psycopg.errors.IntegrityError as e:
        # never the database's text: "Failing row contains" would carry the password hash
        log.warning("signup refused by the database: %s", e.diag.constraint_name or e.diag.sqlstate)
        raise ApiError(422, "TP422", "invalid request: email: not accepted", None,
                       "Use a plain email address without control or space characters.") from None
    if address is not None:
        _mail_verification(settings, address, code)
    pair = await _start_login(pool, keys, settings, row["id"], "tp_user")
    return {"id": str(row["id"]), "email": body.email, "display_name": body.display_name,
            "email_verified": False, **pair.model_dump()}


@router.post("/auth/verify-email", summary="Prove the account's address with the code of the verification mail")
async def verify_email(body: VerifyEmailBody, pool: PoolDep) -> dict[str, Any]:
    async with as_identity_service(pool) as conn:
        cur = await conn.execute("select * from auth.verify_email(%s)", [_sha256(body.token)])
        row = await cur.fetchone()
    status = row["status"] if row else "invalid"
    if status != "ok":
        message = {"used": "verification code already used", "expired": "verification code expired"}.get(
            status, "invalid verification code")
        raise ApiError(400, "TP400", message, "token",
                       "Ask for a new code with POST /auth/verify-email/resend (signed in).")
    return {"email_verified": True}


@router.post("/auth/verify-email/resend", status_code=202, summary="Mail a new verification code")
async def resend_verification(caller: CallerDep, pool: PoolDep, settings: SettingsDep,
                              rid: RequestIdDep) -> dict[str, Any]:
    if caller.get("key_id"):
        raise ApiError(403, "TP403", "a session token is required", None, "Sign in with POST /auth/login.")
    async with as_caller(pool, caller, rid):
        pass  # the token must still be valid (not revoked)
    subjects = ([f"verify:{caller['sub']}"], [settings.verify_resend_max])
    async with as_identity_service(pool) as conn:
        await _throttle(conn, subjects, settings)
        address, code = await _start_verification(conn, settings, caller["sub"])
        if address is not None:  # each mail sent counts against the budget
            await conn.execute("select auth.throttle_fail(%s, %s)",
                               [subjects[0], timedelta(seconds=settings.throttle_window_s)])
    if address is None:
        raise ApiError(409, "TP409", "email already verified", None, None)
    _mail_verification(settings, address, code)
    return {"sent_to": address}


def _throttled(wait: int, subject: str) -> None:
    """429 with Retry-After while the subject has too many recent failures."""
    if wait > 0:
        raise ApiError(429, "TP429", "too many failed attempts", subject.split(":", 1)[0],
                       "Retry after the number of seconds in Retry-After.", headers={"Retry-After": str(wait)})


def _source(request: Request) -> str:
    """The caller's address. uvicorn runs with --proxy-headers and trusts X-Forwarded-For only
    from the proxy's address (--forwarded-allow-ips); nginx sets it to $remote_addr,
    replacing whatever the client sent (proxy/tracepipe/ext_proxy.conf). An IPv6 caller is
    its /64: one host commonly holds the whole prefix, and each address would get a budget."""
    host = request.client.host if request.client else "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _hash_bound(request: Request, settings: SettingsDep) -> HashBound:
    return HashBound(settings.password_hash_concurrency, settings.password_hash_per_source,
                     settings.password_busy_retry_after_s, _source(request))


def _login_subjects(email: str, source: str, settings: SettingsDep) -> tuple[list[str], list[int]]:
    """Failures are counted per account AND source, and per source: failures from elsewhere
    never delay the owner's source, and one source spraying accounts is slowed down too."""
    return ([f"login:{email}|{source}", f"src-login:{source}"],  # email: its normal form (ext/emails.py)
            [settings.login_max_failures, settings.source_max_login_failures])


def _key_subjects(prefix: str, source: str, settings: SettingsDep) -> tuple[list[str], list[int]]:
    return ([f"key:{prefix}|{source}", f"src-key:{source}"],
            [settings.key_max_failures, settings.source_max_key_failures])


def _throttle_args(subjects: tuple[list[str], list[int]], settings: SettingsDep) -> list[Any]:
    return [subjects[0], subjects[1], timedelta(seconds=settings.throttle_base_delay_s),
            timedelta(seconds=settings.throttle_max_delay_s), timedelta(seconds=settings.throttle_window_s)]


THROTTLE_WAIT = "auth.throttle_wait(%s, %s, %s, %s, %s)"


async def _throttle(conn: Any, subjects: tuple[list[str], list[int]], settings: SettingsDep) -> None:
    cur = await conn.execute(f"select {THROTTLE_WAIT} as wait", _throttle_args(subjects, settings))
    row = await cur.fetchone()
    _throttled(row["wait"] if row else 0, subjects[0][0])


async def _record_failure(pool: PoolDep, subjects: list[str], settings: SettingsDep) -> None:
    async with as_identity_service(pool) as conn:
        await conn.execute("select auth.throttle_fail(%s, %s)",
                           [subjects, timedelta(seconds=settings.throttle_window_s)])


@router.post("/auth/login", summary="Sign in with email and password")
async def login(body: LoginBody, request: Request, pool: PoolDep, keys: KeysDep, settings: SettingsDep) -> TokenPair:
    subjects = _login_subjects(body.email, _source(request), settings)
    with hashing_slot(_hash_bound(request, settings)):
        async with as_identity_service(pool) as conn:
            await _throttle(conn, subjects, settings)
            cur = await conn.execute("select * from auth.login_lookup(%s)", [body.email])
            account = await cur.fetchone()
        ok = await verify_password(account["password_hash"] if account else None, body.password)
    if not ok or account is None or account["disabled"]:
        await _record_failure(pool, subjects[0], settings)
        raise ApiError(401, "TP401", "wrong email or password", None, None,
                       headers={"WWW-Authenticate": "Bearer"})
    async with as_identity_service(pool) as conn:
        # this account's failures from this source; the source's own count stays (one good
        # password among a sprayed list must not reset it)
        await conn.execute("select auth.throttle_clear(%s)", [subjects[0][:1]])
    return await _start_login(pool, keys, settings, account["id"], account["account_role"])


def _grace_key(old_refresh: str) -> AESGCM:
    """The key that seals a token's successor: derived from the old token's secret, which the
    database never holds (it stores sha256 of it, a different derivation), so the sealed
    successor is readable only by whoever presents the old token again."""
    return AESGCM(HKDF(hashes.SHA256(), 32, None, b"tracepipe refresh successor").derive(old_refresh.encode()))


def _seal_successor(old_refresh: str, new_refresh: str) -> bytes:
    nonce = os.urandom(12)
    return nonce + _grace_key(old_refresh).encrypt(nonce, new_refresh.encode(), _sha256(old_refresh))


def _unseal_successor(old_refresh: str, sealed: bytes) -> str | None:
    try:
        return _grace_key(old_refresh).decrypt(sealed[:12], sealed[12:], _sha256(old_refresh)).decode()
    except (InvalidTag, ValueError):
        return None


@router.post("/auth/refresh", summary="Trade a refresh token for a new pair (rotation)")
async def refresh(body: RefreshBody, pool: PoolDep, keys: KeysDep, settings: SettingsDep) -> TokenPair:
    """Rotation with reuse detection. A token rotated less than refresh_grace_s ago whose
    successor is still unused answers that same successor (a retry after a lost response,
    or two refreshes at once: the row lock orders them); any other reuse ends the login."""
    new_refresh = _new_refresh_token()
    async with as_identity_service(pool) as conn:
        cur = await conn.execute(
            "select * from auth.rotate_refresh(%s, %s, %s, %s, %s)",
            [_sha256(body.refresh_token), _sha256(new_refresh), _seal_successor(body.refresh_token, new_refresh),
             timedelta(seconds=settings.refresh_token_ttl_s), timedelta(seconds=settings.refresh_grace_s)],
        )
        row = await cur.fetchone()
    assert row is not None
    if row["status"] == "replay":
        successor = _unseal_successor(body.refresh_token, bytes(row["successor_sealed"]))
        if successor is None:
            raise unauthorized("refresh token invalid, expired or revoked")
        new_refresh = successor
    elif row["status"] == "reused":
        raise unauthorized("refresh token reused: the login has been ended, sign in again")
    elif row["status"] != "ok":
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
async def token(request: Request, pool: PoolDep, identity_pool: IdentityPoolDep, keys: KeysDep,
                settings: SettingsDep, authorization: Annotated[str, Header()] = "") -> AccessToken:
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    match = KEY_FORMAT.match(key)
    if scheme.lower() != "apikey" or not key:
        raise ApiError(401, "TP401", "an API key is required", "Authorization: ApiKey tp_…",
                       "Send Authorization: ApiKey <your key>; create keys with POST /api-keys.",
                       headers={"WWW-Authenticate": "ApiKey"})
    if not match:
        raise ApiError(401, "TP401", "this is not an API key", "keys look like tp_<12 hex>_<48 hex>",
                       "Copy the whole key POST /api-keys showed once; a lost key cannot be shown again: create "
                       "a new one.", headers={"WWW-Authenticate": "ApiKey"})
    # The secret has 192 bits: failures on a prefix cannot lead to it, so they only slow down
    # the failing source (per prefix and overall), and a right secret is never refused.
    subjects = _key_subjects(match.group(1), _source(request), settings)
    # One statement, one round trip: the throttle and the lookup on a connection that is
    # tp_auth in autocommit (ext/db.py make_identity_pool; the pool pings only idle
    # connections). Each round trip through the async driver costs about as much as the
    # queries. The touch is at most every TOUCH_INTERVAL_S per key and process, and commits
    # asynchronously: losing a last_used_at on a crash is harmless, and a synchronous commit
    # would hold the key row's lock through a WAL flush.
    async with as_identity_session(identity_pool) as conn:
        cur = await conn.execute(
            f"select {THROTTLE_WAIT} as wait, k.* from (select) one left join auth.key_lookup(%s) k on true",
            [*_throttle_args(subjects, settings), match.group(1)])
        row = await cur.fetchone()
        assert row is not None
        record = row if row["id"] is not None else None
        stored = bytes(record["key_hash"]) if record else _DUMMY_KEY_HASH
        valid = hmac.compare_digest(stored, _sha256(key))
        if not valid or record is None:
            _throttled(row["wait"], subjects[0][0])
        if valid and record is not None:
            revoked = record["revoked_at"] is not None or record["disabled"]
            expires = record["expires_at"]
            expired = expires is not None and expires.timestamp() <= time.time()
            if not revoked and not expired and _touch_due(str(record["id"])):
                await conn.execute("select auth.touch_key(%s), set_config('synchronous_commit', 'off', true)",
                                   [record["id"]])
    if not valid or record is None:
        await _record_failure(pool, subjects[0], settings)
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
