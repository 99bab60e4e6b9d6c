"""Signing and verifying Tracepipe's JWTs (ES256). ext is the only holder of private keys.

Keys live in a directory as <kid>.pem; the newest kid (they sort by creation time) signs,
every key verifies, and jwks.json beside them (read by PostgREST) lists their public
halves. Rotation = add a key: tokens of older keys stay valid until they expire.

A verified token's claims are remembered (under the token's sha256, never the token: a
lookup compares digests) until it expires, for at most `cache_size` tokens (least recently
used go first): a worker calling every few milliseconds is verified once, not per call. A
key that leaves the directory empties the memory, so its tokens are refused at once.
Revocation never depended on this: it is checked in the database on every request.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ext.errors import unauthorized

ALGORITHM = "ES256"
TOKEN_ROLES = ("tp_user", "tp_pipeline", "tp_admin")


@dataclass
class KeySet:
    directory: Path
    issuer: str
    audience: str
    leeway_s: int
    _private: dict[str, ec.EllipticCurvePrivateKey]
    _loaded_at: float = 0.0
    cache_size: int = 2_000
    # sha256(token) -> (claims, exp); guarded by _lock (uvicorn runs handlers on one loop, the
    # lock is for callers in threads)
    _verified: OrderedDict[bytes, tuple[dict[str, Any], float]] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, directory: Path, issuer: str, audience: str, leeway_s: int, cache_size: int = 2_000) -> KeySet:
        ks = cls(directory, issuer, audience, leeway_s, {}, cache_size=cache_size)
        ks.reload()
        return ks

    def reload(self) -> None:
        keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        for pem in sorted(self.directory.glob("*.pem")):
            key = serialization.load_pem_private_key(pem.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{pem}: not an EC private key")
            keys[pem.stem] = key
        if not keys:
            raise ValueError(f"no signing keys (*.pem) in {self.directory}")
        if set(keys) != set(self._private):
            with self._lock:
                self._verified.clear()
        self._private = keys
        self._loaded_at = time.monotonic()

    def _maybe_reload(self) -> None:
        """Pick up a rotated key without a restart (checked at most every 10 s)."""
        if time.monotonic() - self._loaded_at > 10:
            kids = {p.stem for p in self.directory.glob("*.pem")}
            if kids != set(self._private):
                self.reload()
            else:
                self._loaded_at = time.monotonic()

    @property
    def signing_kid(self) -> str:
        return sorted(self._private)[-1]

    def jwks(self) -> dict[str, Any]:
        self._maybe_reload()
        path = self.directory / "jwks.json"
        return dict(json.loads(path.read_text()))

    def sign(self, claims: dict[str, Any], ttl_s: int) -> tuple[str, int]:
        self._maybe_reload()
        now = int(time.time())
        exp = now + ttl_s
        if claims.get("exp") is not None:
            exp = min(exp, int(claims["exp"]))
        payload = {**claims, "iss": self.issuer, "aud": self.audience, "iat": now, "nbf": now - 1,
                   "exp": exp, "jti": secrets.token_hex(12)}
        kid = self.signing_kid
        token = jwt.encode(payload, self._private[kid], algorithm=ALGORITHM, headers={"kid": kid})
        return token, exp - now

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or 401. Checks alg, kid, signature, exp/nbf, aud and iss."""
        self._maybe_reload()
        if len(token) > 8192:
            raise unauthorized("token too large")
        digest = hashlib.sha256(token.encode()).digest()
        with self._lock:
            hit = self._verified.get(digest)
            if hit is not None:
                if time.time() < hit[1] + self.leeway_s:
                    self._verified.move_to_end(digest)
                    return dict(hit[0])
                del self._verified[digest]  # expired: verified again below, which says so
        claims = self._verify(token)
        if self.cache_size > 0:
            with self._lock:
                self._verified[digest] = (claims, float(claims["exp"]))
                while len(self._verified) > self.cache_size:
                    self._verified.popitem(last=False)
        return dict(claims)

    def _verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise unauthorized(f"malformed token: {e}") from None
        if header.get("alg") != ALGORITHM:
            raise unauthorized("token algorithm not accepted")
        key = self._private.get(str(header.get("kid")))
        if key is None:
            raise unauthorized("unknown signing key")
        try:
            claims = jwt.decode(
                token, key.public_key(), algorithms=[ALGORITHM], audience=self.audience, issuer=self.issuer,
                leeway=self.leeway_s, options={"require": ["exp", "iat", "sub", "aud", "iss", "role"]},
            )
        except jwt.PyJWTError as e:
            raise unauthorized(str(e)) from None
        if claims.get("role") not in TOKEN_ROLES:
            raise unauthorized("the token's role is not one a token may carry")
        return dict(claims)
