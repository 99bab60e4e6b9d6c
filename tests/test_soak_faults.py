"""Faults under load, short (issue 13; `make soak FAULTS=1` runs the long one): TP_SOAK_USERS
(20) users mix storefront reads, capability writes, key exchanges, bundle uploads (POST
/sessions and tus /uploads) and example registrations and streams, while PostgreSQL,
SeaweedFS, PostgREST, one ext worker and nginx are killed with SIGKILL in turn
(loadtest/faults.py says what restarts each). Afterwards: every acknowledged write reads
back (rows field by field, objects by sha256), and after ext's sweep the scrub finds no
orphan either way and ListMultipartUploads lists nothing the load opened. Every 5xx,
transport error and unexpected 4xx lies inside a fault's window (kill to the health
probe's recovery, plus faults.GRACE_S). Counts are asserted, never durations; the recovery
times are printed."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from loadtest import faults
from loadtest.load import jsonl
from loadtest.run import report
from tests.bundles import bundle
from tests.conftest import User
from tests.test_tus import create, patch
from tracepipe.stack import Stack

USERS = int(os.environ.get("TP_SOAK_USERS", "20"))
SECONDS = float(os.environ.get("TP_SOAK_SECONDS", "30"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_each_component_killed_under_load_loses_nothing_and_leaves_nothing(
        stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    before = faults.baseline(stack)
    result, found = faults.run_with_faults(stack, users=USERS, seconds=SECONDS, accounts=5, before=before, lead=3.0,
                                           gap=4.0)
    with capsys.disabled():
        print("\n" + report(result) + faults.report(found))

    assert [f.component for f in found.faults] == list(faults.COMPONENTS)
    assert all(f.recovered_at is not None for f in found.faults)
    # each kill was felt: requests failed inside the windows of the components every request needs
    felt = {f.component: sum(f.errors.values()) for f in found.faults}
    assert all(felt[c] > 0 for c in ("postgres", "postgrest", "nginx")), felt
    writes = result.summary()["acknowledged_writes"]
    assert writes["actions"] and writes["sessions"] and writes["of_which_tus"] and writes["examples"], writes

    assert not found.outside, [f"{f.endpoint}: {f.detail}" for f in found.outside[:10]]
    assert not found.lost, found.lost[:10]
    assert found.scrub["checked"] >= writes["sessions"] + writes["examples"], found.scrub["checked"]
    assert found.orphans == 0, {k: v[:5] for k, v in found.scrub.items() if isinstance(v, list)} | {
        "tus tails": found.tus_tails[:5]}
    assert not found.open_uploads, [(u["Key"], u["UploadId"]) for u in found.open_uploads]
    assert found.ok
    assert all(st.healthy for st in stack.status()), stack.status()


def test_tus_patches_reuse_the_lock_pools_connections(person: User, su: psycopg.Connection[dict[str, Any]]) -> None:
    """Found by the soak: the lock pool's reset left each connection inside a transaction, so
    psycopg_pool discarded it and every PATCH opened a new database connection (under load:
    connection churn on a saturated CPU). Sequential PATCHes now reuse the pooled ones."""
    body = bundle(n_events=5, screenshots=0)
    started = su.execute("select now() as t").fetchone()
    assert started is not None
    opened: set[int] = set()
    for _ in range(12):
        r = patch(person.client, create(person, len(body)), 0, body)
        assert r.status_code == 204 and r.headers["upload-session-id"], r.text
        rows = su.execute("select pid from pg_stat_activity where application_name = 'tracepipe-ext tus'"
                          " and backend_start >= %s", [started["t"]]).fetchall()
        opened |= {row["pid"] for row in rows}
    assert len(opened) <= 2, f"{len(opened)} connections opened for 12 sequential PATCHes"


@pytest.mark.parametrize("kind", ["sessions", "examples"])
def test_an_upload_whose_commit_answer_is_lost_keeps_its_object(
        kind: str, person: User, suite: dict[str, Any], su: psycopg.Connection[dict[str, Any]]) -> None:
    """Found by the soak (PostgreSQL killed as an upload committed): the COMMIT reached the
    WAL, its answer never reached ext, ext removed the object, and after crash recovery the
    row named an object that was gone. Made deterministic here: with a synchronous standby
    that never comes, a COMMIT is durable locally and waits; terminating that backend loses
    its answer exactly so. The upload answers 503 and its row and object stay together."""
    headers = {"X-Request-Id": uuid.uuid4().hex}  # the proxy passes it on: ext's backend is named after it
    if kind == "sessions":
        body = bundle(n_events=5, screenshots=0)
        send: dict[str, Any] = {"content": body, "headers": {**headers, "Content-Type": "application/zip"}}
    else:  # multipart: the suite comes with the body, so no earlier transaction writes (and waits) first
        body = jsonl(3, "commit")
        send = {"files": {"messages": ("m.jsonl", body, "application/jsonl")}, "headers": headers,
                "data": {"metadata": json.dumps({"suite_id": suite["id"], "model": "m"})}}
    digest = hashlib.sha256(body).hexdigest()
    answer: dict[str, Any] = {}
    su.execute("alter system set synchronous_standby_names = 'tp_no_such_standby'")
    su.execute("select pg_reload_conf()")
    try:
        thread = threading.Thread(target=lambda: answer.update(r=person.client.post(f"/{kind}", timeout=60, **send)))
        thread.start()
        waiting = None
        for _ in range(300):  # the request's backend, its COMMIT waiting for the standby
            waiting = su.execute("select pid from pg_stat_activity where wait_event = 'SyncRep'"
                                 " and application_name = %s", [f"tracepipe-ext {headers['X-Request-Id']}"]).fetchone()
            if waiting or not thread.is_alive():
                break
            time.sleep(0.1)
        assert waiting is not None, answer
        su.execute("select pg_terminate_backend(%s)", [waiting["pid"]])
        thread.join(60)
    finally:
        su.execute("alter system reset synchronous_standby_names")
        su.execute("select pg_reload_conf()")
    assert answer["r"].status_code == 503, answer["r"].text
    row = su.execute(f"select id::text from app.{kind} where sha256 = %s", [digest]).fetchone()
    assert row is not None, "the row committed locally"
    read = f"/sessions/{row['id']}/bundle" if kind == "sessions" else f"/examples/{row['id']}/messages"
    got = person.client.get(read)
    assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == digest, got.status_code
