"""Secrets of a local stack, generated on first start into the git-ignored state dir.

Nothing here is ever committed: passwords, S3 credentials and the JWT signing keys are
created with `secrets`/`cryptography` the first time a state dir is used and read back
afterwards. Files are mode 0600.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm


@dataclass(frozen=True)
class StackSecrets:
    owner_password: str
    authenticator_password: str
    s3_access_key: str
    s3_secret_key: str


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def load_or_create(state_dir: Path) -> StackSecrets:
    path = state_dir / "secrets.json"
    if path.exists():
        return StackSecrets(**json.loads(path.read_text()))
    created = StackSecrets(
        owner_password=secrets.token_urlsafe(24),
        authenticator_password=secrets.token_urlsafe(24),
        s3_access_key="tp" + secrets.token_hex(8),
        s3_secret_key=secrets.token_urlsafe(30),
    )
    _write_private(path, json.dumps(asdict(created), indent=2).encode())
    return created


def jwt_dir(state_dir: Path) -> Path:
    return state_dir / "jwt"


def add_signing_key(state_dir: Path) -> str:
    """Create a new ES256 signing key (it becomes the one ext signs with) and rewrite the
    public JWKS. Older keys stay in the JWKS so tokens they signed stay valid until exp."""
    keys = jwt_dir(state_dir)
    kid = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(keys / f"{kid}.pem", pem)
    write_jwks(state_dir)
    return kid


def ensure_signing_key(state_dir: Path) -> None:
    if not list(jwt_dir(state_dir).glob("*.pem")):
        add_signing_key(state_dir)
    elif not (jwt_dir(state_dir) / "jwks.json").exists():
        write_jwks(state_dir)


def write_jwks(state_dir: Path) -> None:
    entries = []
    for pem_path in sorted(jwt_dir(state_dir).glob("*.pem")):
        private = serialization.load_pem_private_key(pem_path.read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        jwk = json.loads(ECAlgorithm.to_jwk(private.public_key()))
        jwk.update({"kid": pem_path.stem, "alg": "ES256", "use": "sig"})
        entries.append(jwk)
    target = jwt_dir(state_dir) / "jwks.json"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": entries}, indent=2))
    os.chmod(tmp, 0o644)
    tmp.replace(target)


def write_private_text(path: Path, text: str) -> None:
    _write_private(path, text.encode())


def write_private_json(path: Path, data: object) -> None:
    _write_private(path, json.dumps(data, indent=2).encode())
