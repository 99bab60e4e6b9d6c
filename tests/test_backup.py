"""Continuous backup and a tested restore (issue 18): real PostgreSQL archiving WAL through
real pgBackRest into a real S3 bucket (SeaweedFS, over the relay's TLS listener).

The module runs one story on stacks of its own, in order: the origin takes a full backup at
first start and on demand (while /ready keeps answering); writes go through the API, a
time T is noted, more writes follow and a suite is deleted by mistake (its objects swept)
and a bundle overwritten behind the API's back; the origin stops and a fresh stack (its own
state dir and ports, the origin's S3 data and secrets) restores to T: every write before T
is there field by field and byte for byte (the deleted and overwritten objects come back
from the bucket's versions), nothing after T is, and the scrub reports exactly the objects
written after T, which the sweep then leaves alone. Last, PostgreSQL of that stack is
SIGKILLed right after more writes and restored to the latest: every acknowledged write is
there."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests import bundles
from tests.conftest import free_ports, run_cli
from tracepipe import backup
from tracepipe.settings import REPO_ROOT, StackSettings
from tracepipe.stack import Stack, _alive

# The origin's S3 address is the one the fresh stack uses too (the S3 service outlives the
# database machine); everything else of the fresh stack is its own.
S3_FIELDS = ("s3_port", "s3_tls_port", "weed_master_port", "weed_volume_port", "weed_filer_port")


def new_stack(**overrides: Any) -> Stack:
    state = Path(tempfile.mkdtemp(prefix="tp-backup-"))
    state.chmod(0o755)
    return Stack(StackSettings(state_dir=state, tools_dir=REPO_ROOT / ".tools", **{**free_ports(), **overrides}))


@pytest.fixture(scope="module")
def stacks() -> Iterator[dict[str, Stack]]:
    made: dict[str, Stack] = {}
    origin = new_stack()
    made["origin"] = origin
    try:
        origin.up()
        yield made
    finally:
        for st in made.values():
            st.destroy()


@pytest.fixture(scope="module")
def origin(stacks: dict[str, Stack]) -> Stack:
    return stacks["origin"]


@pytest.fixture(scope="module")
def story() -> dict[str, Any]:
    """What the tests of the module hand each other, in order."""
    return {}


class Api:
    """A person's session on a stack, through its proxy."""

    def __init__(self, stack: Stack, token: str | None = None) -> None:
        self.client = httpx.Client(base_url=stack.s.proxy_url, timeout=60)
        if token is None:
            email = f"backup-{uuid.uuid4().hex[:10]}@example.test"
            r = self.client.post("/auth/signup", json={"email": email, "password": "correct horse battery staple",
                                                      "display_name": "Backup Person"})
            assert r.status_code == 201, r.text
            token = r.json()["access_token"]
        self.token = token
        self.client.headers["Authorization"] = f"Bearer {token}"

    def suite(self) -> dict[str, Any]:
        slug = f"suite-{uuid.uuid4().hex[:10]}"
        r = self.client.post("/suites", json={"name": slug, "slug": slug},
                             headers={"Prefer": "return=representation",
                                      "Accept": "application/vnd.pgrst.object+json"})
        assert r.status_code == 201, r.text
        return dict(r.json())

    def writes(self, suite_id: str, n: int) -> dict[str, bytes]:
        """n sessions (bundles) and n examples in the suite, and an API key (a capability):
        {object key or "api-keys/<id>": the bytes sent}."""
        sent: dict[str, bytes] = {}
        for i in range(n):
            body = bundles.bundle(manifest_data=bundles.manifest(suite_id=suite_id), n_events=30 + i, screenshots=1)
            r = self.client.post("/sessions", content=body, headers={"Content-Type": "application/zip"})
            assert r.status_code == 201, r.text
            sent[f"sessions/{r.json()['id']}/bundle.zip"] = body
            lines = b"".join(json.dumps({"messages": [{"role": "user", "content": f"q {uuid.uuid4()} {k}"},
                                                      {"role": "assistant", "content": "a"}]}).encode() + b"\n"
                             for k in range(5 + i))
            r = self.client.post("/examples", params={"suite_id": suite_id, "model": "backup-model"},
                                 content=lines, headers={"Content-Type": "application/jsonl"})
            assert r.status_code == 201, r.text
            sent[f"examples/{r.json()['id']}/messages.jsonl"] = lines
        r = self.client.post("/api-keys", json={"name": f"key-{uuid.uuid4().hex[:8]}"})
        assert r.status_code == 201, r.text
        sent[f"api-keys/{r.json()['id']}"] = b""
        return sent

    def row(self, key: str) -> dict[str, Any] | None:
        kind, row_id = key.split("/")[:2]
        r = self.client.get(f"/{kind}", params={"id": f"eq.{row_id}"})
        assert r.status_code == 200, r.text
        rows = r.json()
        return dict(rows[0]) if rows else None

    def object_sha256(self, key: str) -> str:
        kind, row_id = key.split("/")[:2]
        r = self.client.get(f"/{kind}/{row_id}/" + ("bundle" if kind == "sessions" else "messages"))
        assert r.status_code == 200, (key, r.status_code, r.text[:200])
        return hashlib.sha256(r.content).hexdigest()


def cli(stack: Stack, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cli(stack.cli_env(), *args, check=check)


def object_keys(sent: dict[str, bytes]) -> set[str]:
    return {k for k in sent if not k.startswith("api-keys/")}


def test_first_start_archives_wal_and_takes_a_full_backup(origin: Stack) -> None:
    deadline = time.monotonic() + 300
    while not backup.backups(origin) and time.monotonic() < deadline:  # the scheduler's first
        time.sleep(1)
    listed = json.loads(cli(origin, "backup", "list", "--json").stdout)
    assert [b["type"] for b in listed] == ["full"], listed
    assert listed[0]["repo_bytes"] > 0 and listed[0]["wal_start"]
    backup.pgbackrest(origin, "check")  # switches WAL and waits for it in the repository
    archive = backup.archive_status(origin)
    assert archive["archive_mode"] == "on" and archive["archived_count"] >= 1, archive
    assert isinstance(archive["lag_bytes"], int) and archive["lag_bytes"] >= 0, archive
    assert archive["last_archived_wal"] and archive["last_archived_time"], archive
    status = cli(origin, "status").stdout
    assert f"last backup: {listed[0]['label']} (full" in status, status
    assert f"backup scheduler: running (pid {origin.pid_of('backup')})" in status, status
    assert f"WAL archive: last {archive['last_archived_wal']}" in status or "WAL archive: last 0" in status, status
    text = backup.config_path(origin).read_text()
    assert "repo1-type=s3" in text and f"repo1-s3-bucket={origin.s.backup_bucket}" in text


def test_restore_refuses_a_running_database_and_a_bad_time(origin: Stack) -> None:
    refused = cli(origin, "restore", check=False)
    assert refused.returncode == 1 and "PostgreSQL is running" in refused.stderr, refused.stderr
    bad = cli(origin, "restore", "--to", "yesterday", check=False)
    assert bad.returncode == 1 and "--to 'yesterday' is not an ISO 8601 time" in bad.stderr, bad.stderr
    assert origin.pid_of("postgres") is not None and not (origin.state / "restore.json").exists()


def test_ready_answers_during_a_full_backup(origin: Stack) -> None:
    before = backup.backups(origin)
    tracepipe = Path(sys.executable).parent / "tracepipe"
    proc = subprocess.Popen([str(tracepipe), "backup"], env=origin.cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    answered = 0
    with httpx.Client(base_url=origin.s.proxy_url, timeout=30) as client:
        while proc.poll() is None:
            r = client.get("/ready")
            assert r.status_code == 200, r.text
            answered += 1
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert answered >= 1
    made = json.loads(out)
    after = backup.backups(origin)
    assert made["type"] == "full" and made["label"] not in {b["label"] for b in before}
    assert [b["label"] for b in after][-1] == made["label"]
    assert len(after) <= origin.s.backup_retention_full  # retention expires the oldest fulls


def test_restore_to_a_point_in_time_on_a_fresh_stack(stacks: dict[str, Stack], origin: Stack,
                                                     story: dict[str, Any]) -> None:
    person = Api(origin)
    doomed = person.suite()  # deleted by mistake after T
    kept = person.suite()
    before = person.writes(doomed["id"], 2) | person.writes(kept["id"], 1)
    rows = {k: person.row(k) for k in object_keys(before)}
    keys_before = {r["id"] for r in person.client.get("/api-keys").json()}
    with psycopg.connect(origin.superuser_conninfo(), autocommit=True) as conn:
        row = conn.execute("select clock_timestamp()").fetchone()
        assert row is not None
        target: datetime = row[0]
    time.sleep(1.5)  # commits after T are at least this much later (ordering, not an assertion)

    after = person.writes(kept["id"], 1) | person.writes(person.suite()["id"], 1)
    assert person.client.delete(f"/suites/{doomed['id']}").status_code == 200
    overwritten = next(k for k in before if k.startswith("sessions/") and rows[k]["suite_id"] == kept["id"])
    s3 = backup.s3_client(origin)
    s3.put_object(Bucket=origin.s.bucket, Key=overwritten, Body=b"not the bundle")  # a bad overwrite
    cli(origin, "sweep", "--grace-seconds", "0")  # the deletion outbox drained, now
    gone = [k for k in object_keys(before) if person.row(k) is None]
    assert {k for k in gone if k.startswith("examples/")} == {
        k for k in object_keys(before) if k.startswith("examples/") and rows[k]["suite_id"] == doomed["id"]}
    for key in gone:  # the suite's rows and their objects are really gone from the origin
        with pytest.raises(s3.exceptions.ClientError):
            s3.head_object(Bucket=origin.s.bucket, Key=key)
    backup.pgbackrest(origin, "check")
    origin.down()

    fresh = new_stack(**{f: getattr(origin.s, f) for f in S3_FIELDS})
    stacks["fresh"] = fresh
    result = cli(fresh, "restore", "--to", target.isoformat(), "--from", str(origin.state), check=False)
    assert result.returncode == 1, result.stderr  # the scrub reports the objects written after T
    report = json.loads(result.stdout)
    newer = object_keys(after)
    assert set(report["objects_newer_than_target"]) == newer, report
    assert set(report["objects_recovered"]) == {*gone, overwritten}, report
    assert report["objects_unrecoverable"] == [], report
    scrub = report["scrub"]
    assert scrub["rows_without_object"] == scrub["size_mismatch"] == scrub["digest_mismatch"] == [], scrub
    assert set(scrub["objects_without_row"]) == newer, scrub

    restored = Api(fresh, token=person.token)  # the same signing keys: the token still holds
    for key, expected in rows.items():
        assert restored.row(key) == expected, key
        assert restored.object_sha256(key) == hashlib.sha256(before[key]).hexdigest() == expected["sha256"], key
    for key in object_keys(after):
        assert restored.row(key) is None, key
    assert {r["id"] for r in restored.client.get("/api-keys").json()} == keys_before
    assert restored.client.get(f"/suites/{doomed['id']}").status_code == 200

    # ext sweeps objects without a row only a grace period after the restore: the objects
    # written after T stay until the operator has had the report for that long
    cli(fresh, "sweep")
    for key in newer:
        backup.s3_client(fresh).head_object(Bucket=fresh.s.bucket, Key=key)
    story.update(fresh=fresh, person=restored, rows=rows, newer=newer)


def test_restore_latest_after_sigkill_keeps_every_acknowledged_write(story: dict[str, Any]) -> None:
    fresh: Stack = story["fresh"]
    person: Api = story["person"]
    suite = person.suite()
    acknowledged = person.writes(suite["id"], 2)
    rows = {k: person.row(k) for k in object_keys(acknowledged)}
    pid = fresh.pid_of("postgres")
    assert pid is not None
    children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == pid]
    for victim in (pid, *children):  # the whole server at once, as a lost machine would
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in (pid, *children)) and time.monotonic() < deadline:
        time.sleep(0.1)

    result = cli(fresh, "restore", check=False)
    report = json.loads(result.stdout or "{}")
    assert report.get("restored_to") == "latest", result.stderr
    assert report["moved_aside"], report
    scrub = report["scrub"]
    assert scrub["rows_without_object"] == scrub["size_mismatch"] == scrub["digest_mismatch"] == [], scrub
    assert set(scrub["objects_without_row"]) == story["newer"], scrub  # still held from the restore to T
    for key, expected in {**story["rows"], **rows}.items():
        assert person.row(key) == expected, key
        assert person.object_sha256(key) == expected["sha256"], key
    assert suite["id"] in {s["id"] for s in person.client.get("/suites").json()}


def _ppid(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0
