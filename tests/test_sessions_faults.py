"""The object store goes away mid-upload (DESIGN.md §8, issue 3): the upload answers 503 with
the error body and leaves no row; reads answer 503 too; once SeaweedFS is back, ext's own
background retries abort the half multipart upload and finish queued deletions, and uploads
work again — without restarting ext. SeaweedFS is restarted in a `finally`, so the modules
after this one still have it."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests import bundles
from tests.conftest import User, assert_error_body
from tests.test_sessions import (
    MiB,
    RawPost,
    Snapshot,
    assert_nothing_left,
    error_of,
    ext_workers,
    make_bucket,
    snapshot,
    upload,
    upload_ok,
    wait_for,
)
from tracepipe.stack import Stack


@pytest.mark.slow
def test_object_store_outage_mid_upload(stack: Stack, make_user: Callable[..., User],
                                        su: psycopg.Connection[dict[str, Any]]) -> None:
    bucket = make_bucket(stack)
    user = make_user()
    kept_body = bundles.bundle(n_events=200, screenshots=2)
    kept = upload_ok(user.client, kept_body)
    doomed = upload_ok(user.client, bundles.bundle(n_events=5, screenshots=0))
    doomed_key = f"sessions/{doomed['id']}/bundle.zip"
    ext_pid, workers = stack.pid_of("ext"), sorted(ext_workers(stack))
    before = snapshot(su, bucket)

    raw = RawPost(stack, user.token, 96 * MiB)
    try:
        raw.send(24 * MiB)
        # its own: other tests' tus uploads stay open until they expire
        wait_for("the upload to open a multipart upload",
                 lambda: [u for u in bucket.open_uploads() if u["Key"] not in before.uploads], 15)
        # A crash, not a polite stop: SeaweedFS keeps its S3 port open ~25 s after SIGTERM.
        stack.stop_component("seaweedfs", grace=0)
        assert stack.pid_of("seaweedfs") is None
        raw.send(72 * MiB, stop_when_answered=True)
        status, headers, body = raw.answer()
        raw.close()
        assert status == 503, body
        assert headers["content-type"].startswith("application/json")
        err = error_of(body)
        assert err["code"] == "TP503" and "object storage" in err["message"], err
        assert su.execute("select count(*) as n from app.sessions").fetchone() == {"n": before.rows}

        # Everything that needs the store says so, with the error body; nothing is recorded.
        r = upload(user.client, bundles.bundle(n_events=5, screenshots=0))
        assert r.status_code == 503, r.text
        assert assert_error_body(r)["code"] == "TP503"
        assert su.execute("select count(*) as n from app.sessions").fetchone() == {"n": before.rows}
        for path in (f"/sessions/{kept['id']}/bundle", f"/sessions/{kept['id']}/files/screenshots/0001.png"):
            r = user.client.get(path)
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert assert_error_body(r)["code"] == "TP503"
        ready = user.client.get("/ready")
        assert ready.status_code == 503, ready.text
        # Metadata is the database's: a deletion is accepted, its objects are removed later.
        r = user.client.delete(f"/sessions/{doomed['id']}")
        assert r.status_code == 200, r.text
    finally:
        raw.close()
        if stack.pid_of("seaweedfs") is None:
            stack.start_component("seaweedfs")

    # Back: within a few of ext's 5 s retry rounds the half upload is aborted and the
    # deleted session's object is gone, with no restart of ext.
    wait_for("the deleted session's object to be removed", lambda: not bucket.exists(doomed_key), 30)
    expected = Snapshot(before.rows - 1, before.idempotency_records, before.keys - {doomed_key})
    assert_nothing_left(su, bucket, expected, within=30)
    assert su.execute("select count(*) as n from app.object_deletions").fetchone() == {"n": 0}
    assert stack.pid_of("ext") == ext_pid and sorted(ext_workers(stack)) == workers

    # Uploads and downloads work again (multipart too).
    big = bundles.bundle(n_events=50, screenshots=0,
                         extra={f"screenshots/{i:04d}.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 24 * 1024
                                for i in range(3)}, compression=zipfile.ZIP_STORED)
    assert len(big) > 16 * MiB  # above two parts: a multipart upload
    row = upload_ok(user.client, big)
    assert row["sha256"] == hashlib.sha256(big).hexdigest()
    assert user.client.get(f"/sessions/{row['id']}/bundle").content == big
    assert user.client.get(f"/sessions/{kept['id']}/bundle").content == kept_body
    assert user.client.get("/ready").status_code == 200
    assert not bucket.open_uploads(f"sessions/{row['id']}/")  # its multipart upload completed
