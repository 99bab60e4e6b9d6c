"""ext remembers a verified token until it expires (ext/tokens.py): what it remembers must
never accept more than verifying again would. Real keys in a temporary key directory."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ext.errors import ApiError
from ext.tokens import KeySet


def _write_key(directory: Path, kid: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (directory / f"{kid}.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@pytest.fixture
def keys(tmp_path: Path) -> KeySet:
    _write_key(tmp_path, "k1")
    return KeySet.load(tmp_path, "tracepipe", "tracepipe", leeway_s=0, cache_size=3)


def _token(keys: KeySet, ttl_s: int = 60, sub: str = "u1") -> str:
    token, _ = keys.sign({"sub": sub, "role": "tp_pipeline"}, ttl_s)
    return token


def test_a_cached_token_is_refused_once_it_expires(keys: KeySet) -> None:
    token = _token(keys, ttl_s=1)
    assert keys.verify(token)["sub"] == "u1"
    assert keys.verify(token)["sub"] == "u1"  # remembered
    time.sleep(2.1)
    with pytest.raises(ApiError) as e:
        keys.verify(token)
    assert e.value.status == 401 and "expired" in str(e.value.details).lower()


def test_a_removed_key_empties_the_memory(keys: KeySet, tmp_path: Path) -> None:
    token = _token(keys)
    assert keys.verify(token)["sub"] == "u1"
    _write_key(tmp_path, "k2")
    (tmp_path / "k1.pem").unlink()
    keys.reload()  # what _maybe_reload does within 10 s
    with pytest.raises(ApiError) as e:
        keys.verify(token)
    assert e.value.status == 401


def test_the_memory_is_bounded_and_answers_copies(keys: KeySet) -> None:
    tokens = [_token(keys, sub=f"u{i}") for i in range(10)]
    for t in tokens:
        claims = keys.verify(t)
        claims["role"] = "tp_admin"  # a caller changing its copy changes nothing remembered
    assert len(keys._verified) == 3
    assert all(keys.verify(t)["role"] == "tp_pipeline" for t in tokens)


def test_a_tampered_token_is_not_taken_for_a_remembered_one(keys: KeySet) -> None:
    token = _token(keys)
    keys.verify(token)
    header, _payload, signature = token.split(".")
    forged = jwt.encode({**jwt.decode(token, options={"verify_signature": False}), "role": "tp_admin"},
                        "x" * 32, algorithm="HS256").split(".")[1]
    with pytest.raises(ApiError) as e:
        keys.verify(f"{header}.{forged}.{signature}")
    assert e.value.status == 401
