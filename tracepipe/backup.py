"""Continuous backup of the stack's PostgreSQL with pgBackRest, its repository in S3.

PostgreSQL archives every WAL segment (archive_command = pgbackrest archive-push) into a
bucket of its own (TP_BACKUP_BUCKET) on the stack's SeaweedFS; a stanza is created at the
first start, and the backup scheduler (`python -m tracepipe.backup schedule`, started by
`Stack.up`, pid file run/backup.pid) takes a full backup at once and again whenever the
last is older than TP_BACKUP_FULL_EVERY_S; pgBackRest expires all but the newest
TP_BACKUP_RETENTION_FULL fulls (and the WAL only they need) after each backup.

pgBackRest speaks S3 over TLS only (no release talks plain HTTP to S3), so the S3 relay
also listens on TP_S3_TLS_PORT with a self-signed certificate generated into
<state>/s3relay/tls at start (never in git); pgBackRest checks the relay against that
certificate (repo1-storage-ca-file).

`restore()` is `tracepipe restore [--to TIME] [--from STATE]`: into a stopped or fresh
stack, point in time, then the scrub (ext/scrub.py) reports rows whose object is missing
and objects newer than the restore point. Those objects are held: the stack's ext sweeps
objects without a row only once they are older than the restore point by the orphan grace
period (<state>/restore.json), so nothing is swept before the operator has seen the report.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracepipe import credentials

if TYPE_CHECKING:
    from tracepipe.settings import StackSettings
    from tracepipe.stack import Stack

PGBACKREST = "pgbackrest"
LOCK_HELD = 50  # pgBackRest's exit code when another backup holds the stanza's lock
WAL_NAME = re.compile(r"^[0-9A-F]{24}(\.partial)?$|^[0-9A-F]{8}\.history$")


class BackupError(RuntimeError):
    """pgBackRest failed or a precondition of a backup or restore does not hold; says which."""


# --- files ---------------------------------------------------------------------------------
def tls_dir(stack: Stack) -> Path:
    return stack.state / "s3relay" / "tls"


def ensure_tls_cert(stack: Stack) -> tuple[Path, Path]:
    """The S3 relay's self-signed certificate and key (generated once per state dir)."""
    d = tls_dir(stack)
    cert, key = d / "s3.crt", d / "s3.key"
    if cert.exists() and key.exists():
        return cert, key
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    openssl = shutil.which("openssl") or "/usr/bin/openssl"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "3650", "-subj", "/CN=tracepipe-s3",
                    # pgBackRest matches the host against DNS names only, so the address is one too
                    "-addext", f"subjectAltName=DNS:{stack.s.host},IP:{stack.s.host}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    os.chmod(key, 0o600)
    return cert, key


def repo_dir(stack: Stack) -> Path:
    """pgBackRest's config, lock, log and spool files: the PostgreSQL user's (it runs
    archive-push), inside the daemon dir."""
    return stack.daemon_dir / "pgbackrest"


def config_path(stack: Stack) -> Path:
    return repo_dir(stack) / "pgbackrest.conf"


def config_text(stack: Stack, secrets: credentials.StackSecrets, ca_file: Path | str) -> str:
    """pgbackrest.conf of the stack; docker-compose.yml renders the same keys."""
    s = stack.s
    d = repo_dir(stack)
    return "\n".join([
        "[global]",
        "repo1-type=s3",
        f"repo1-s3-endpoint={s.host}",
        f"repo1-storage-port={s.s3_tls_port}",
        f"repo1-storage-ca-file={ca_file}",
        f"repo1-s3-bucket={s.backup_bucket}",
        f"repo1-s3-region={s.s3_region}",
        f"repo1-s3-key={secrets.s3_access_key}",
        f"repo1-s3-key-secret={secrets.s3_secret_key}",
        "repo1-s3-uri-style=path",
        "repo1-path=/pgbackrest",
        f"repo1-retention-full={s.backup_retention_full}",
        "compress-type=lz4",
        "start-fast=y",
        "process-max=1",
        f"lock-path={d / 'lock'}",
        f"log-path={d / 'log'}",
        f"spool-path={d / 'spool'}",
        "log-level-console=warn",
        "log-level-file=info",
        "",
        # PostgreSQL waits for archive-push at shutdown: an unreachable S3 fails it soon
        "[global:archive-push]",
        "io-timeout=15",
        "",
        f"[{s.backup_stanza}]",
        f"pg1-path={stack.pg_data}",
        f"pg1-port={s.pg_port}",
        f"pg1-socket-path={stack.socket_dir}",
        "pg1-user=postgres",
        "",
    ])


def write_config(stack: Stack) -> Path:
    """Writes pgbackrest.conf (0600, the PostgreSQL user's: it holds the S3 secret) and a copy
    of the relay's certificate pgBackRest checks the relay against."""
    secrets = credentials.load_or_create(stack.state)
    d = repo_dir(stack)
    ids = stack._pg_user_ids()
    for sub in (d, d / "lock", d / "log", d / "spool"):
        sub.mkdir(parents=True, exist_ok=True)
        os.chmod(sub, 0o700)
        if ids is not None:
            os.chown(sub, *ids)
    cert, _ = ensure_tls_cert(stack)
    ca = d / "s3-ca.crt"
    shutil.copyfile(cert, ca)
    conf = config_path(stack)
    credentials.write_private_text(conf, config_text(stack, secrets, ca))
    if ids is not None:
        os.chown(ca, *ids)
        os.chown(conf, *ids)
    return conf


def postgres_options(stack: Stack) -> str:
    """The `pg_ctl -o` settings that turn WAL archiving on (empty when backups are off)."""
    if not stack.s.backup_enabled:
        return ""
    command = f"{PGBACKREST} --config={config_path(stack)} --stanza={stack.s.backup_stanza} archive-push %p"
    return (f" -c archive_mode=on -c 'archive_command={command}'"
            f" -c archive_timeout={stack.s.backup_archive_timeout_s}")


# --- running pgBackRest ----------------------------------------------------------------------
def pgbackrest(stack: Stack, *args: str, timeout: float = 3600) -> str:
    """Runs pgBackRest as the PostgreSQL user with the stack's config; its stdout."""
    if shutil.which(PGBACKREST) is None:
        raise BackupError("pgbackrest is not installed: run `make bootstrap` (scripts/bootstrap.sh installs it)")
    argv = [PGBACKREST, f"--config={config_path(stack)}", f"--stanza={stack.s.backup_stanza}", *args]
    try:
        out = stack._as_pg_user(argv, capture_output=True, text=True, timeout=timeout, cwd="/")
    except subprocess.CalledProcessError as e:
        err = BackupError(f"pgbackrest {args[0] if args else ''} failed (exit {e.returncode}): "
                          f"{(e.stderr or e.stdout or '').strip()[-2000:]}")
        err.returncode = e.returncode  # type: ignore[attr-defined]
        raise err from None
    return str(out.stdout)


def client_for(endpoint: str, secrets: credentials.StackSecrets, settings: StackSettings) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=secrets.s3_access_key,
                        aws_secret_access_key=secrets.s3_secret_key, region_name=settings.s3_region,
                        config=Config(retries={"max_attempts": 3}, connect_timeout=5, read_timeout=30))


def s3_client(stack: Stack) -> Any:
    return client_for(stack.s.s3_endpoint, credentials.load_or_create(stack.state), stack.s)


def ensure_bucket(stack: Stack) -> None:
    import botocore.exceptions

    client = s3_client(stack)
    try:
        client.head_bucket(Bucket=stack.s.backup_bucket)
    except botocore.exceptions.ClientError:
        client.create_bucket(Bucket=stack.s.backup_bucket)


def ensure_object_versioning(stack: Stack) -> None:
    """The objects' bucket keeps every overwritten or deleted version (S3 versioning) and
    expires noncurrent ones after TP_BUCKET_NONCURRENT_DAYS (a lifecycle rule): a bundle
    deleted or overwritten by mistake comes back within that window (`recover_objects`)."""
    ensure_object_versioning_with(s3_client(stack), stack.s)


def ensure_object_versioning_with(client: Any, settings: StackSettings) -> None:
    client.put_bucket_versioning(Bucket=settings.bucket, VersioningConfiguration={"Status": "Enabled"})
    client.put_bucket_lifecycle_configuration(Bucket=settings.bucket, LifecycleConfiguration={"Rules": [{
        "ID": "tracepipe-noncurrent-expiry", "Status": "Enabled", "Filter": {"Prefix": ""},
        "NoncurrentVersionExpiration": {"NoncurrentDays": settings.bucket_noncurrent_days}}]})


def setup(stack: Stack) -> None:
    """After the stack is up: the objects' bucket versioned, the repository's bucket, the
    stanza (idempotent) and the scheduler (which takes the first full backup)."""
    if not stack.s.backup_enabled:
        return
    ensure_object_versioning(stack)
    write_config(stack)
    ensure_bucket(stack)
    pgbackrest(stack, "stanza-create", timeout=300)
    start_scheduler(stack)


def backup(stack: Stack, kind: str = "full", wait_s: float = 600) -> dict[str, Any]:
    """One backup now (full, diff or incr); waits while another holds the lock (the
    scheduler's). Returns the new backup as `backups()` lists it."""
    if kind not in ("full", "diff", "incr"):
        raise BackupError(f"backup type {kind!r}: use full, diff or incr")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            pgbackrest(stack, "backup", f"--type={kind}")
            break
        except BackupError as e:
            if getattr(e, "returncode", None) != LOCK_HELD or time.monotonic() > deadline:
                raise
            time.sleep(2)
    return backups(stack)[-1]


def backups(stack: Stack) -> list[dict[str, Any]]:
    """Every backup in the repository, oldest first: label, type, start and stop (UTC ISO),
    database size, size in the repository, and the WAL range it needs."""
    info = json.loads(pgbackrest(stack, "--output=json", "info", timeout=120) or "[]")
    out = []
    for stanza in info:
        for b in stanza.get("backup", []):
            out.append({
                "label": b["label"], "type": b["type"],
                "start": _iso(b["timestamp"]["start"]), "stop": _iso(b["timestamp"]["stop"]),
                "size_bytes": b["info"]["size"], "repo_bytes": b["info"]["repository"]["delta"],
                "wal_start": b["archive"]["start"], "wal_stop": b["archive"]["stop"],
            })
    return out


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def archive_status(stack: Stack) -> dict[str, Any]:
    """pg_stat_archiver and the lag: WAL bytes written since the end of the last archived
    segment, and seconds since it was archived."""
    import psycopg

    with psycopg.connect(stack.superuser_conninfo(), autocommit=True) as conn:
        row = conn.execute(
            "select a.archived_count, a.last_archived_wal, a.last_archived_time, a.failed_count,"
            " a.last_failed_wal, a.last_failed_time, pg_current_wal_lsn()::text,"
            " (select setting::bigint from pg_settings where name = 'wal_segment_size'),"
            " current_setting('archive_mode'),"
            " extract(epoch from now() - a.last_archived_time)::float"
            " from pg_stat_archiver a").fetchone()
        assert row is not None
        archived, last_wal, last_time, failed, failed_wal, failed_time, current, seg_size, mode, age = row
        lag = None
        if last_wal and WAL_NAME.match(last_wal) and len(last_wal) == 24:
            log_id, seg = int(last_wal[8:16], 16), int(last_wal[16:24], 16)
            end = (log_id << 32) + (seg + 1) * seg_size
            hi, lo = (int(x, 16) for x in current.split("/"))
            lag = max(0, (hi << 32) + lo - end)
    return {"archive_mode": mode, "archived_count": archived, "last_archived_wal": last_wal,
            "last_archived_time": last_time.isoformat() if last_time else None,
            "seconds_since_archived": round(age, 1) if age is not None else None, "lag_bytes": lag,
            "failed_count": failed, "last_failed_wal": failed_wal,
            "last_failed_time": failed_time.isoformat() if failed_time else None}


# --- the scheduler -----------------------------------------------------------------------------
def start_scheduler(stack: Stack) -> None:
    if stack.pid_of("backup") is not None:
        return
    from tracepipe.settings import REPO_ROOT

    stack._spawn("backup", [sys.executable, "-m", "tracepipe.backup", "schedule"],
                 env={**stack.cli_env(), "PYTHONPATH": str(REPO_ROOT)})


def stop_scheduler(stack: Stack) -> None:
    stack._stop_pid("backup", grace=10.0)


def due(stack: Stack, now: float | None = None) -> bool:
    """Whether a full backup is due: none yet, or the newest is older than the schedule."""
    fulls = [b for b in backups(stack) if b["type"] == "full"]
    if not fulls:
        return True
    stop = datetime.fromisoformat(fulls[-1]["stop"]).timestamp()
    return (now or time.time()) - stop >= stack.s.backup_full_every_s


def schedule(stack: Stack) -> None:
    """The scheduler's loop: a full backup whenever one is due, checked every
    TP_BACKUP_CHECK_EVERY_S; a failure is logged and tried again at the next check."""
    while True:
        try:
            if due(stack):
                print(f"{datetime.now(UTC).isoformat()} full backup", flush=True)
                b = backup(stack, "full")
                print(f"{datetime.now(UTC).isoformat()} done: {b['label']} {b['repo_bytes']} bytes", flush=True)
        except Exception as e:  # the repository or the database may be down for a while
            print(f"{datetime.now(UTC).isoformat()} backup failed: {e}", flush=True)
        time.sleep(stack.s.backup_check_every_s)


# --- restore -------------------------------------------------------------------------------------
def parse_time(text: str) -> datetime:
    """An ISO 8601 time; without an offset it is UTC."""
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise BackupError(f"--to {text!r} is not an ISO 8601 time (e.g. 2026-12-02T01:30:00+00:00)") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def adopt(stack: Stack, source: Path) -> None:
    """A fresh state dir takes what survives the loss of the database machine from another
    stack's: its secrets (the restored roles' passwords), its JWT keys and its S3 data (the
    local stand-in for the same S3 service). The source stack must be stopped."""
    source = source.resolve()
    if not (source / "secrets.json").exists():
        raise BackupError(f"--from {source}: no stack state dir there (secrets.json is missing)")
    try:
        pid = int((source / "run" / "seaweedfs.pid").read_text())
        os.kill(pid, 0)
        raise BackupError(f"--from {source}: its SeaweedFS still runs (pid {pid}); stop that stack first")
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pass
    if stack.pg_data.exists() or (stack.state / "s3").exists():
        raise BackupError(f"--from: {stack.state} is not fresh (it has a cluster or S3 data)")
    stack.state.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "secrets.json", stack.state / "secrets.json")
    shutil.copytree(credentials.jwt_dir(source), credentials.jwt_dir(stack.state))
    if (source / "s3").is_dir():  # the local SeaweedFS's data; elsewhere S3 is not in the state dir
        shutil.copytree(source / "s3", stack.state / "s3", symlinks=True)


def restore(stack: Stack, target: datetime | None, source: Path | None = None) -> dict[str, Any]:
    """Restores the database from the repository into this (stopped or fresh) stack, to
    `target` or to the end of the WAL (latest), promotes it, starts the stack and scrubs."""
    if stack.pid_of("postgres") is not None:
        raise BackupError("PostgreSQL is running: restore replaces the database; `tracepipe down` first")
    stack.down()
    if source is not None:
        adopt(stack, source)
    for d in (stack.state, stack.run_dir, stack.logs):
        d.mkdir(parents=True, exist_ok=True)
    credentials.load_or_create(stack.state)
    credentials.ensure_signing_key(stack.state)
    stack.start_component("seaweedfs")
    write_config(stack)
    if not backups(stack):
        raise BackupError(f"no backup in the repository (bucket {stack.s.backup_bucket}): nothing to restore")
    aside = None
    if stack.pg_data.exists():
        aside = stack.pg_data.with_name(f"pgdata.before-restore-{datetime.now(UTC):%Y%m%dT%H%M%S}")
        stack.pg_data.rename(aside)
    stack.pg_data.mkdir(mode=0o700)
    ids = stack._pg_user_ids()
    if ids is not None:
        os.chown(stack.pg_data, *ids)
    args = ["restore"]
    if target is not None:
        args += ["--type=time", f"--target={target.isoformat(sep=' ')}", "--target-action=promote"]
    pgbackrest(stack, *args)
    if aside is not None:  # WAL not archived yet (a crash): recovery reads pg_wal after the archive
        for f in sorted((aside / "pg_wal").iterdir()):
            dest = stack.pg_data / "pg_wal" / f.name
            if WAL_NAME.match(f.name) and not dest.exists():
                shutil.copy2(f, dest)
                if ids is not None:
                    os.chown(dest, *ids)
    restored_at = datetime.now(UTC)
    _write_hold(stack, target, restored_at)
    stack._start_postgres()
    _wait_promoted(stack)
    stack.up()
    report = asyncio.run(_scrub(stack))
    broken = [key for kind in ("rows_without_object", "size_mismatch", "digest_mismatch")
              for key in report["scrub"][kind]]
    objects: dict[str, list[str]] = {"recovered": [], "unrecoverable": []}
    if broken:  # deleted or overwritten after the target: their versions bring them back
        objects = recover_objects(stack, broken, target)
        report = asyncio.run(_scrub(stack))
    # a new timeline begins: a full backup of it now, the base of the next restore
    fresh = backup(stack, "full")
    return {"restored_to": target.isoformat() if target else "latest", "moved_aside": str(aside) if aside else None,
            "backup_after_restore": fresh["label"], "objects_recovered": objects["recovered"],
            "objects_unrecoverable": objects["unrecoverable"],
            "objects_newer_than_target": sorted(report["objects_newer_than_target"]),
            "held_until": _hold(stack).get("held_until"), "scrub": report["scrub"]}


def recover_objects(stack: Stack, keys: list[str], before: datetime | None = None) -> dict[str, list[str]]:
    """Brings back each key's object from its versions: the newest version (written at or
    before `before`, when given) whose sha256 is the one its row records becomes current
    again (a server-side copy). Returns {"recovered": [...], "unrecoverable": [...]}."""
    import psycopg

    client = s3_client(stack)
    recovered, lost = [], []
    with psycopg.connect(stack.superuser_conninfo(), autocommit=True) as conn:
        for key in keys:
            kind, row_id, _ = key.split("/", 2)
            table = {"sessions": "app.sessions", "examples": "app.examples"}[kind]
            row = conn.execute(f"select sha256 from {table} where id = %s", [row_id]).fetchone()
            listed = client.list_object_versions(Bucket=stack.s.bucket, Prefix=key)
            versions = sorted((v for v in listed.get("Versions", []) if v["Key"] == key
                               and (before is None or v["LastModified"] <= before)),
                              key=lambda v: v["LastModified"], reverse=True)
            for v in versions:
                body = client.get_object(Bucket=stack.s.bucket, Key=key, VersionId=v["VersionId"])["Body"]
                digest = hashlib.sha256()
                for chunk in iter(functools.partial(body.read, 1 << 20), b""):
                    digest.update(chunk)
                if row is not None and digest.hexdigest() == row[0]:
                    client.copy_object(Bucket=stack.s.bucket, Key=key,
                                       CopySource={"Bucket": stack.s.bucket, "Key": key, "VersionId": v["VersionId"]})
                    recovered.append(key)
                    break
            else:
                lost.append(key)
    return {"recovered": recovered, "unrecoverable": lost}


def _write_hold(stack: Stack, target: datetime | None, restored_at: datetime) -> None:
    """Objects newer than the restore point have no row now; ext sweeps an object without a
    row once it is older than its orphan grace, so the grace becomes (restore - target) +
    grace: those objects stay until a grace period after the restore."""
    if target is None:
        return
    from ext.config import ExtSettings

    grace = int(os.environ.get("TP_EXT_ORPHAN_GRACE_S") or ExtSettings.model_fields["orphan_grace_s"].default)
    held = max(0, int((restored_at - target).total_seconds())) + grace
    (stack.state / "restore.json").write_text(json.dumps({
        "target": target.isoformat(), "restored_at": restored_at.isoformat(), "orphan_grace_s": held,
        "held_until": datetime.fromtimestamp(restored_at.timestamp() + grace, UTC).isoformat()}, indent=2))


def _hold(stack: Stack) -> dict[str, Any]:
    path = stack.state / "restore.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


def ext_env(stack: Stack) -> dict[str, str]:
    """What a restore adds to ext's environment: the longer orphan grace (see _write_hold)."""
    hold = _hold(stack)
    return {"TP_EXT_ORPHAN_GRACE_S": str(hold["orphan_grace_s"])} if hold else {}


def _wait_promoted(stack: Stack, timeout: float = 600) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(stack.superuser_conninfo(), autocommit=True, connect_timeout=5) as conn:
                row = conn.execute("select pg_is_in_recovery()").fetchone()
                if row and not row[0]:
                    return
        except psycopg.OperationalError:
            pass
        time.sleep(0.5)
    raise BackupError(f"PostgreSQL did not finish recovery within {timeout:.0f}s (see {stack.logfile('postgres')})")


async def _scrub(stack: Stack) -> dict[str, Any]:
    from ext.config import ExtSettings
    from ext.db import make_pool
    from ext.scrub import scrub
    from ext.storage import ObjectStore, make_client

    secrets = credentials.load_or_create(stack.state)
    values: dict[str, Any] = {k.removeprefix("TP_EXT_").lower(): v for k, v in stack.ext_env(secrets).items()}
    settings = ExtSettings(**values)
    hold = _hold(stack)
    async with make_pool(settings) as pool:
        store = ObjectStore(make_client(settings), settings)
        report = (await scrub(pool, store)).as_dict()
        newer = []
        if hold:
            target = datetime.fromisoformat(hold["target"])
            for key in report["objects_without_row"]:
                head = await store.head(key)
                if head is not None and head["LastModified"] > target:
                    newer.append(key)
    return {"scrub": report, "objects_newer_than_target": newer}


def main(argv: list[str]) -> int:
    from tracepipe.settings import StackSettings
    from tracepipe.stack import Stack

    if argv != ["schedule"]:
        print("usage: python -m tracepipe.backup schedule", file=sys.stderr)
        return 2
    schedule(Stack(StackSettings()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
