"""docker-compose helpers: the one-shot `migrate` service, and the secrets it and the others read.

    python -m tracepipe.compose_migrate            # in the `migrate` container (its command)
    python -m tracepipe.compose_migrate secrets DIR  # on the host, once, before `docker compose up`

The first does what `tracepipe migrate` does for the local stack, from environment URLs
instead of the state dir: roles, passwords and limits as the superuser, yoyo migrations,
then the API surface and policies as tp_owner (`tracepipe.migrate`), and makes sure the
bucket exists in the object store. Idempotent: it runs on every `docker compose up`.

    TP_MIGRATE_SUPERUSER_URL   postgresql://postgres:<pw>@postgres:5432/postgres
    TP_MIGRATE_OWNER_URL       postgresql://tp_owner:<pw>@postgres:5432/<db>  (the db is created)
    TP_AUTHENTICATOR_PASSWORD  the password PostgREST and ext log in with
    TP_REPLICATION_PASSWORD    the password of tp_replicator, which the `replica` service streams as
    TP_S3_ENDPOINT, TP_S3_ACCESS_KEY, TP_S3_SECRET_KEY
    and the StackSettings TP_* variables (TP_BUCKET, TP_S3_REGION, TP_JWT_*, statement timeouts)

The second writes DIR/compose.env (every password and key the compose file asks for with
`${VAR:?}`, mode 0600) and DIR/jwt/ (the ES256 signing key and its JWKS, by the same code as
the local stack). It never overwrites: a second run keeps what is there. DIR must be git-ignored.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path

import psycopg
import psycopg.conninfo

from tracepipe import credentials, migrate, replica
from tracepipe.settings import StackSettings

# The image's unprivileged user (Dockerfile). ext runs as TP_UID:TP_GID so it can read the
# private keys, which stay mode 0600 and owned by whoever generated them.
IMAGE_UID = 10001


def _env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise SystemExit(f"compose_migrate: {name} is not set")
    return value


def ensure_bucket(endpoint: str, access_key: str, secret_key: str, region: str, bucket: str,
                  timeout_s: float = 60.0) -> None:
    """Create the bucket unless it exists; retried while the object store starts."""
    import boto3
    import botocore.exceptions
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access_key,
                          aws_secret_access_key=secret_key, region_name=region,
                          config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            client.head_bucket(Bucket=bucket)
            return
        except botocore.exceptions.ClientError as e:
            last = e
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                try:
                    client.create_bucket(Bucket=bucket)
                    return
                except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e2:
                    last = e2
        except botocore.exceptions.BotoCoreError as e:
            last = e
        time.sleep(1)
    raise SystemExit(f"compose_migrate: bucket {bucket!r} at {endpoint} not reachable: {last}")


def run_migrate() -> int:
    superuser_url = _env("TP_MIGRATE_SUPERUSER_URL")
    owner_url = _env("TP_MIGRATE_OWNER_URL")
    owner = psycopg.conninfo.conninfo_to_dict(owner_url)
    if owner.get("user") != "tp_owner" or not owner.get("password") or not owner.get("dbname"):
        raise SystemExit("compose_migrate: TP_MIGRATE_OWNER_URL must name user tp_owner, its password and the database")
    settings = StackSettings(db_name=str(owner["dbname"]))
    stack_secrets = credentials.StackSecrets(
        owner_password=str(owner["password"]),
        authenticator_password=_env("TP_AUTHENTICATOR_PASSWORD"),
        s3_access_key=_env("TP_S3_ACCESS_KEY"),
        s3_secret_key=_env("TP_S3_SECRET_KEY"),
    )
    migrate.bootstrap(superuser_url, settings, stack_secrets)
    with psycopg.connect(superuser_url, autocommit=True) as conn:
        replica.ensure_primary(conn, _env("TP_REPLICATION_PASSWORD"), settings, slot=False)
    applied = migrate.migrate(owner_url)
    print(f"applied {len(applied)} migration(s){': ' + ', '.join(applied) if applied else ''}; "
          "API surface re-applied", flush=True)
    ensure_bucket(_env("TP_S3_ENDPOINT"), stack_secrets.s3_access_key, stack_secrets.s3_secret_key,
                  settings.s3_region, settings.bucket)
    print(f"bucket {settings.bucket!r} ready", flush=True)
    # pgBackRest's repository (the backup service) and the objects' versions (tracepipe/backup.py)
    ensure_bucket(_env("TP_S3_ENDPOINT"), stack_secrets.s3_access_key, stack_secrets.s3_secret_key,
                  settings.s3_region, settings.backup_bucket)
    from tracepipe import backup

    backup.ensure_object_versioning_with(backup.client_for(_env("TP_S3_ENDPOINT"), stack_secrets, settings),
                                         settings)
    print(f"bucket {settings.backup_bucket!r} ready; {settings.bucket!r} keeps versions", flush=True)
    return 0


def write_secrets(target: Path) -> Path:
    """DIR/compose.env and DIR/jwt/ for docker-compose; existing files are kept."""
    target.mkdir(parents=True, exist_ok=True)
    os.chmod(target, 0o700)
    stack_secrets = credentials.load_or_create(target)  # DIR/secrets.json, the local generator's format
    credentials.ensure_signing_key(target)
    from tracepipe.stack import PROXY_JWT_KEY, write_pgrst_jwks

    write_pgrst_jwks(target)  # PostgREST's JWKS: the proxy's HS256 key alone
    os.chmod(target / PROXY_JWT_KEY, 0o644)  # nginx's workers (the image's user) read it; the dir is 0700
    env_file = target / "compose.env"
    if env_file.exists():
        # kept as it is; a variable a later release asks for is added (an older file lacks it)
        have = {line.split("=", 1)[0] for line in env_file.read_text().splitlines() if "=" in line}
        missing = {k: v for k, v in _added_later().items() if k not in have}
        if missing:
            credentials.write_private_text(env_file, env_file.read_text()
                                           + "".join(f"{k}={v}\n" for k, v in missing.items()))
        return env_file
    if os.geteuid() == 0:
        # Root-owned 0600 keys would be unreadable to ext's unprivileged user: hand them to it.
        uid = gid = IMAGE_UID
        for pem in credentials.jwt_dir(target).glob("*.pem"):
            os.chown(pem, uid, gid)
    else:
        uid, gid = os.getuid(), os.getgid()
    values = {
        "TP_POSTGRES_PASSWORD": secrets.token_urlsafe(24),
        "TP_OWNER_PASSWORD": stack_secrets.owner_password,
        "TP_AUTHENTICATOR_PASSWORD": stack_secrets.authenticator_password,
        "TP_S3_ACCESS_KEY": stack_secrets.s3_access_key,
        "TP_S3_SECRET_KEY": stack_secrets.s3_secret_key,
        "TP_UID": str(uid),
        "TP_GID": str(gid),
        **_added_later(),
    }
    body = "# Generated by `python -m tracepipe.compose_migrate secrets`. Never commit this file.\n"
    body += "".join(f"{k}={v}\n" for k, v in values.items())
    credentials.write_private_text(env_file, body)
    return env_file


def _added_later() -> dict[str, str]:
    """Secrets of variables that came after the first compose.env files were written."""
    return {"TP_REPLICATION_PASSWORD": secrets.token_urlsafe(24)}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        return run_migrate()
    if args[0] == "secrets" and len(args) == 2:
        env_file = write_secrets(Path(args[1]))
        print(f"{env_file} (use: docker compose --env-file {env_file} up -d --build)")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
