"""The pipeline's work queue (DESIGN §10) against the real stack: enqueue by trigger, leases
that no two workers share, a killed worker's job taken over after its lease, an ext restart
under long-polls, retries ending dead, requeue generations, lineage, RLS and metrics.

Each test works in a suite of its own and its workers claim with `suite_id`, so jobs of
other tests (every committed session has one) never reach them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import User, add_member, as_role, assert_error_body, create_key, create_suite
from tracepipe import bundles
from tracepipe.client import Client
from tracepipe.settings import REPO_ROOT
from tracepipe.stack import Stack
from tracepipe.worker import Job, jobs, list_jobs, requeue

MODEL = "pipeline-test-model"


@pytest.fixture(scope="module")
def pipeline_user(make_user: Callable[..., User]) -> User:
    return make_user("tp_pipeline")


@pytest.fixture(scope="module")
def pipeline_key(pipeline_user: User) -> str:
    return str(create_key(pipeline_user)["key"])


@pytest.fixture
def tp(base_url: str, pipeline_key: str) -> Iterator[Client]:
    with Client(base_url, api_key=pipeline_key) as client:
        yield client


@pytest.fixture
def team_suite(person: User) -> dict[str, Any]:
    """A fresh suite of `person`'s per test: the test's workers claim only its jobs."""
    return create_suite(person)


def upload_session(user: User, suite_id: str) -> dict[str, Any]:
    body = bundles.bundle(manifest_data=bundles.manifest(suite_id=suite_id), n_events=5, har_entries=1,
                          screenshots=0)
    r = user.client.post("/sessions", content=body, headers={"Content-Type": "application/zip"})
    assert r.status_code == 201, r.text
    return dict(r.json())


def jsonl_for(session_id: str, generation: int = 1) -> bytes:
    line = {"messages": [{"role": "user", "content": f"what happened in {session_id}?"},
                         {"role": "assistant", "content": f"generation {generation} says: a checkout"}]}
    return (json.dumps(line) + "\n").encode()


def suite_jobs(tp: Client, suite_id: str, **filters: str) -> list[dict[str, Any]]:
    return list_jobs(tp, {"suite_id": f"eq.{suite_id}", **filters})


def wait_for(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    """Waits for a state the stack reaches on its own (a guard against hanging, not a timing)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def run_workers(base_url: str, key: str, suite_id: str, n: int, body: Callable[[Job], None],
                stop: threading.Event, **options: Any) -> list[threading.Thread]:
    """n worker loops in threads, each with a client of its own, until `stop` is set."""
    def work() -> None:
        with Client(base_url, api_key=key) as client:
            for job in jobs(client, suite_id=suite_id, stop=stop, **options):
                with job:
                    body(job)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


# --- enqueue ---------------------------------------------------------------------------------------

def test_every_committed_session_has_one_job_in_its_transaction(
        person: User, team_suite: dict[str, Any], tp: Client, superuser_dsn: str) -> None:
    session = upload_session(person, team_suite["id"])
    [job] = suite_jobs(tp, team_suite["id"])
    assert job["session_id"] == session["id"] and job["state"] == "queued" and job["generation"] == 1
    assert job["attempt"] == 0 and job["suite_id"] == team_suite["id"]

    # Whatever path writes the row: a session inserted in SQL gets its job by the trigger, and
    # a transaction that rolls back leaves neither.
    with psycopg.connect(superuser_dsn, row_factory=dict_row) as conn:
        sid = conn.execute(
            "insert into app.sessions (user_id, suite_id, size_bytes, sha256) values (%s, %s, 0, repeat('0', 64))"
            " returning id", [person.id, team_suite["id"]]).fetchone()["id"]  # type: ignore[index]
        assert conn.execute("select count(*) as n from app.pipeline_jobs where session_id = %s",
                            [sid]).fetchone() == {"n": 1}
        conn.rollback()
        assert conn.execute("select count(*) as n from app.pipeline_jobs where session_id = %s",
                            [sid]).fetchone() == {"n": 0}
        orphans = conn.execute("select count(*) as n from app.sessions s where not exists"
                               " (select from app.pipeline_jobs j where j.session_id = s.id)").fetchone()
    assert orphans == {"n": 0}, "a session without a job"


def test_migration_0007_gives_every_existing_session_its_job(stack: Stack, secrets: Any) -> None:
    """Sessions committed before the queue existed are backfilled with a queued job."""
    from psycopg import sql
    from yoyo import get_backend, read_migrations

    from tracepipe import migrate

    name = f"mig_queue_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(stack.superuser_conninfo("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("create database {} owner tp_owner").format(sql.Identifier(name)))
        for setting, value in (("tp.jwt_issuer", stack.s.jwt_issuer), ("tp.jwt_audience", stack.s.jwt_audience)):
            conn.execute(sql.SQL("alter database {} set {} = {}").format(
                sql.Identifier(name), sql.Identifier(*setting.split(".")), value))
    url = stack.owner_url(secrets).rsplit("/", 1)[0] + f"/{name}"
    try:
        backend = get_backend(migrate.yoyo_url(url))
        migrations = read_migrations(str(migrate.DB_DIR / "migrations"))
        before = migrations.__class__([m for m in migrations if m.id < "0007"])
        with backend.lock():
            backend.apply_migrations(backend.to_apply(before))
        with psycopg.connect(url) as conn:
            user = conn.execute("insert into app.users (email, email_skeleton, account_role)"
                                " values ('old@example.test', 'old@example.test', 'tp_user')"
                                " returning id").fetchone()
            assert user is not None
            conn.execute("insert into app.sessions (user_id, size_bytes, sha256)"
                         " select %s, 0, repeat('0', 64) from generate_series(1, 3)", [user[0]])
        migrate.migrate(url)
        with psycopg.connect(url) as conn:
            rows = conn.execute("select j.state, j.generation, j.attempt from app.sessions s"
                                " left join app.pipeline_jobs j on j.session_id = s.id").fetchall()
    finally:
        with psycopg.connect(stack.superuser_conninfo("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
    assert rows == [("queued", 1, 0)] * 3


# --- leasing ------------------------------------------------------------------------------------

def test_eight_workers_over_500_sessions_do_each_exactly_once(
        base_url: str, person: User, team_suite: dict[str, Any], pipeline_key: str, tp: Client,
        superuser_dsn: str) -> None:
    """40 sessions go through the real upload (POST /sessions); the other 460 are inserted in
    SQL as a superuser to keep the test short. Both paths commit a row into app.sessions,
    and the job comes from the same AFTER INSERT trigger either way (shown by the test
    above), so the queue cannot tell them apart."""
    sid = team_suite["id"]
    with ThreadPoolExecutor(8) as pool:
        uploaded = list(pool.map(lambda _: upload_session(person, sid)["id"], range(40)))
    with psycopg.connect(superuser_dsn) as conn:
        rows = conn.execute(
            "insert into app.sessions (user_id, suite_id, size_bytes, sha256)"
            " select %s, %s, 0, repeat('0', 64) from generate_series(1, 460) returning id",
            [person.id, sid]).fetchall()
    sessions = set(uploaded) | {str(r[0]) for r in rows}
    assert len(sessions) == 500

    done: list[tuple[str, str]] = []  # (job id, session id) per completed body
    lock = threading.Lock()

    def body(job: Job) -> None:
        job.register_example(MODEL, jsonl_for(job.session_id))
        with lock:
            done.append((job.id, job.session_id))

    stop = threading.Event()
    workers = run_workers(base_url, pipeline_key, sid, 8, body, stop, wait_s=2, lease_s=60)
    try:
        wait_for("500 jobs done", lambda: len(suite_jobs(tp, sid, state="eq.done", limit="1000")) == 500, 600)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)

    assert len(done) == 500 and len({j for j, _ in done}) == 500, "a job was worked twice"
    assert {s for _, s in done} == sessions
    all_jobs = suite_jobs(tp, sid, limit="1000")
    assert len(all_jobs) == 500 and {j["state"] for j in all_jobs} == {"done"}
    assert {j["attempt"] for j in all_jobs} == {1}, "a job was leased more than once"
    examples = tp.list_examples({"suite_id": f"eq.{sid}", "limit": "1000"})
    assert len(examples) == 500
    assert len({e["job_id"] for e in examples}) == 500 and len({e["sha256"] for e in examples}) == 500
    by_job = {j["id"]: j for j in all_jobs}
    for e in examples:  # lineage: example -> job -> session, and complete recorded the example
        assert e["session_id"] == by_job[e["job_id"]]["session_id"]
        assert by_job[e["job_id"]]["example_ids"] == [e["id"]]


def test_a_long_poll_is_woken_by_a_new_session(person: User, team_suite: dict[str, Any], tp: Client,
                                               pipeline_key: str, base_url: str) -> None:
    result: dict[str, Any] = {}

    def poll() -> None:
        with Client(base_url, api_key=pipeline_key) as other:
            started = time.monotonic()
            result["jobs"] = other._json("POST", "/pipeline/claim", json={"wait_s": 60, "suite_id": team_suite["id"]})
            result["waited"] = time.monotonic() - started

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(1)  # let the claim find nothing and start waiting (ordering, not timing)
    session = upload_session(person, team_suite["id"])
    t.join(timeout=90)
    [job] = result["jobs"]
    assert job["session_id"] == session["id"] and job["attempt"] == 1
    assert result["waited"] < 60, "answered at its deadline: the claim was not woken by the new job"
    # Nothing to claim: a long-poll ends with [] at its deadline.
    assert tp._json("POST", "/pipeline/claim", json={"wait_s": 1, "suite_id": team_suite["id"]}) == []


def test_only_the_lease_holder_extends_completes_or_fails(person: User, team_suite: dict[str, Any],
                                                          tp: Client) -> None:
    upload_session(person, team_suite["id"])
    [lease] = tp._json("POST", "/pipeline/claim", json={"suite_id": team_suite["id"], "lease_s": 30})
    assert set(lease) >= {"id", "session_id", "suite_id", "attempt", "lease_expires_at", "lease_token"}
    path = f"/pipeline/jobs/{lease['id']}"
    wrong = str(uuid.uuid4())
    for op, body in (("extend", {"lease_s": 30}), ("complete", {}), ("fail", {"error": "x"})):
        r = tp._send("POST", f"{path}/{op}", json={**body, "lease_token": wrong})
        assert r.status_code == 409, (op, r.text)
        assert assert_error_body(r)["details"]["state"] == "leased"
    r = tp._send("POST", f"{path}/extend", json={"lease_s": 5, "lease_token": lease["lease_token"]})
    assert r.status_code == 422 and "lease_s" in assert_error_body(r)["message"]
    r = tp._send("POST", f"{path}/extend", json={"lease_s": 120, "lease_token": lease["lease_token"]})
    assert r.status_code == 200 and r.json()["lease_expires_at"] > lease["lease_expires_at"]
    done = tp._json("POST", f"{path}/complete", json={"lease_token": lease["lease_token"]})
    assert done["state"] == "done"
    # A retried complete (its answer lost) is the same answer; the holder's fail after it is not.
    assert tp._json("POST", f"{path}/complete", json={"lease_token": lease["lease_token"]})["state"] == "done"
    r = tp._send("POST", f"{path}/fail", json={"error": "late", "lease_token": lease["lease_token"]})
    assert r.status_code == 409 and assert_error_body(r)["details"]["state"] == "done"
    r = tp._send("POST", f"/pipeline/jobs/{uuid.uuid4()}/complete", json={"lease_token": wrong})
    assert r.status_code == 404
    r = tp._send("POST", "/pipeline/jobs/not-a-uuid/complete", json={"lease_token": wrong})
    assert r.status_code == 400 and assert_error_body(r)["details"] == {"parameter": "id"}
    for bad in ({"limit": 0}, {"limit": 101}, {"lease_s": 5}, {"wait_s": 61}):
        r = tp._send("POST", "/pipeline/claim", json=bad)
        assert r.status_code == 422, (bad, r.text)
        assert next(iter(bad)) in assert_error_body(r)["message"]


def test_complete_leases_the_next_jobs_in_the_same_request(person: User, team_suite: dict[str, Any],
                                                            tp: Client) -> None:
    """claim_next on complete: the worker loop's one request per job. Only the lease holder's
    complete claims; the bounds are claim's; the leases are real ones."""
    sid = team_suite["id"]
    for _ in range(3):
        upload_session(person, sid)
    [lease] = tp._json("POST", "/pipeline/claim", json={"suite_id": sid})
    path = f"/pipeline/jobs/{lease['id']}/complete"
    r = tp._send("POST", path, json={"lease_token": str(uuid.uuid4()), "claim_next": {"suite_id": sid, "limit": 2}})
    assert r.status_code == 409, r.text
    assert len(suite_jobs(tp, sid, state="eq.queued")) == 2, "a complete that was refused claimed jobs"
    for bad in ({"limit": 0}, {"limit": 101}, {"lease_s": 5}):
        r = tp._send("POST", path, json={"lease_token": lease["lease_token"], "claim_next": bad})
        assert r.status_code == 422, (bad, r.text)
        assert next(iter(bad)) in assert_error_body(r)["message"]
    done = tp._json("POST", path, json={"lease_token": lease["lease_token"],
                                        "claim_next": {"suite_id": sid, "limit": 2, "lease_s": 30}})
    assert done["id"] == lease["id"] and done["state"] == "done"
    nxt = done["next"]
    assert len(nxt) == 2 and lease["id"] not in {n["id"] for n in nxt}
    assert all(n["attempt"] == 1 and n["lease_token"] and n["suite_id"] == sid for n in nxt)
    assert {j["id"]: j["state"] for j in suite_jobs(tp, sid)} == {
        lease["id"]: "done", nxt[0]["id"]: "leased", nxt[1]["id"]: "leased"}
    # Without claim_next the answer is a plain complete's; with nothing due, next is empty.
    plain = tp._json("POST", f"/pipeline/jobs/{nxt[0]['id']}/complete", json={"lease_token": nxt[0]["lease_token"]})
    assert plain["state"] == "done" and "next" not in plain
    last = tp._json("POST", f"/pipeline/jobs/{nxt[1]['id']}/complete",
                    json={"lease_token": nxt[1]["lease_token"], "claim_next": {"suite_id": sid}})
    assert last["state"] == "done" and last["next"] == []
    assert {j["state"] for j in suite_jobs(tp, sid)} == {"done"}


def test_a_loop_left_after_a_job_gives_back_the_job_its_complete_leased(
        person: User, team_suite: dict[str, Any], tp: Client, base_url: str, pipeline_key: str) -> None:
    sid = team_suite["id"]
    for _ in range(2):
        upload_session(person, sid)
    with Client(base_url, api_key=pipeline_key) as client:
        for job in jobs(client, suite_id=sid, wait_s=0, lease_s=30):
            with job:
                pass
            assert job.next_jobs, "the complete did not lease the next job"
            break
    # The second job is not held until its lease runs out: the loop gave it back (retry).
    assert sorted(j["state"] for j in suite_jobs(tp, sid)) == ["done", "failed"]


def test_the_loop_keeps_every_held_lease_while_a_body_runs_past_it(
        person: User, team_suite: dict[str, Any], tp: Client, base_url: str, pipeline_key: str) -> None:
    """Two jobs leased together (limit 2) for the shortest lease, the first body running past
    it: both leases are extended in the background (one thread for the client's jobs), so
    neither is claimed again or lost, and both complete as attempt 1."""
    sid = team_suite["id"]
    for _ in range(2):
        upload_session(person, sid)
    done: list[Job] = []
    with Client(base_url, api_key=pipeline_key) as client:
        for job in jobs(client, suite_id=sid, wait_s=0, lease_s=10, limit=2, claim_next=False):
            with job:
                if not done:
                    time.sleep(14)  # past the 10 s lease of both jobs
                    taken = tp._json("POST", "/pipeline/claim", json={"suite_id": sid, "limit": 2})
                    assert taken == [], "another worker could claim a job whose lease was held"
            done.append(job)
            if len(done) == 2:
                break
    assert not any(j.lease_lost.is_set() for j in done)
    jobs_now = suite_jobs(tp, sid)
    assert [(j["state"], j["attempt"]) for j in jobs_now] == [("done", 1), ("done", 1)]


def test_a_killed_worker_s_job_is_taken_over_after_its_lease(
        stack_env: dict[str, str], person: User, team_suite: dict[str, Any], pipeline_key: str,
        tp: Client, tmp_path: Path) -> None:
    """`tracepipe pipeline run` holds the job while its command sleeps; SIGKILL of the whole
    process group (CLI and command) stops the heartbeat, the lease runs out, and another
    worker's long-poll takes the job (attempt 2) and completes it."""
    session = upload_session(person, team_suite["id"])
    marker = tmp_path / "started"
    command = [sys.executable, "-c",
               f"import pathlib, time, os; pathlib.Path({str(marker)!r}).write_text(os.environ['TRACEPIPE_JOB_ID']);"
               " time.sleep(600)"]
    env = {**stack_env, "PYTHONPATH": str(REPO_ROOT), "TRACEPIPE_API_KEY": pipeline_key}
    tracepipe = Path(sys.executable).parent / "tracepipe"
    proc = subprocess.Popen([str(tracepipe), "pipeline", "run", "--model", MODEL, "--suite", team_suite["id"],
                             "--lease-s", "10", "--", *command], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for("the command to start", marker.exists, 60)
        job_id = marker.read_text()
        [held] = suite_jobs(tp, team_suite["id"])
        assert held["id"] == job_id and held["state"] == "leased" and held["session_id"] == session["id"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    [lease] = tp._json("POST", "/pipeline/claim", json={"suite_id": team_suite["id"], "wait_s": 60, "lease_s": 30})
    assert lease["id"] == job_id and lease["attempt"] == 2
    done = tp._json("POST", f"/pipeline/jobs/{job_id}/complete", json={"lease_token": lease["lease_token"]})
    assert done["state"] == "done"
    [job] = suite_jobs(tp, team_suite["id"])
    assert job["state"] == "done" and job["attempt"] == 2 and "ran out" not in (job["last_error"] or "")


def test_ext_restarted_under_long_polls_workers_carry_on(
        stack: Stack, base_url: str, person: User, team_suite: dict[str, Any], pipeline_key: str,
        tp: Client) -> None:
    sid = team_suite["id"]
    done: list[str] = []

    def body(job: Job) -> None:
        job.register_example(MODEL, jsonl_for(job.session_id))
        done.append(job.session_id)

    stop = threading.Event()
    workers = run_workers(base_url, pipeline_key, sid, 3, body, stop, wait_s=30, idle_retry_s=0.5)
    try:
        first = upload_session(person, sid)
        wait_for("the first job", lambda: first["id"] in done, 60)
        stack.stop_component("ext", grace=2.0)  # the three workers are in their long-polls now
        stack.start_component("ext")
        later = [upload_session(person, sid)["id"] for _ in range(5)]
        wait_for("the jobs after the restart", lambda: set(later) <= set(done), 180)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)
    states = Counter(j["state"] for j in suite_jobs(tp, sid))
    assert states == {"done": 6}
    assert sorted(done) == sorted([first["id"], *later]), "a job was worked twice"


def test_a_job_failing_every_time_ends_dead_with_its_error(
        base_url: str, person: User, team_suite: dict[str, Any], pipeline_key: str, tp: Client) -> None:
    sid = team_suite["id"]
    session = upload_session(person, sid)
    attempts: list[int] = []

    def body(job: Job) -> None:
        attempts.append(job.attempt)
        raise RuntimeError(f"the model refused, attempt {job.attempt}")

    stop = threading.Event()
    [worker] = run_workers(base_url, pipeline_key, sid, 1, body, stop, wait_s=30)
    try:
        wait_for("the job to die", lambda: suite_jobs(tp, sid)[0]["state"] == "dead", 240)
    finally:
        stop.set()
        worker.join(timeout=60)
    [job] = suite_jobs(tp, sid)
    assert job["session_id"] == session["id"]
    assert job["attempt"] == job["max_attempts"] and attempts == list(range(1, job["max_attempts"] + 1))
    assert "RuntimeError: the model refused, attempt" in job["last_error"]
    assert job["last_error"].rstrip().endswith(f"attempt {job['max_attempts']}")
    assert job["finished_at"] is not None
    assert tp._json("POST", "/pipeline/claim", json={"suite_id": sid}) == [], "a dead job is not claimed"

    # retry: false is dead at once.
    upload_session(person, sid)
    [lease] = tp._json("POST", "/pipeline/claim", json={"suite_id": sid})
    dead = tp._json("POST", f"/pipeline/jobs/{lease['id']}/fail",
                    json={"lease_token": lease["lease_token"], "error": "not a checkout", "retry": False})
    assert dead["state"] == "dead" and dead["attempt"] == 1 and dead["last_error"] == "not a checkout"


def test_requeue_makes_a_second_generation_with_its_own_examples(
        base_url: str, person: User, team_suite: dict[str, Any], pipeline_key: str, tp: Client) -> None:
    sid = team_suite["id"]
    sessions = {upload_session(person, sid)["id"] for _ in range(3)}
    generation = {"n": 1}

    def body(job: Job) -> None:
        assert job.generation == generation["n"]
        job.register_example(MODEL, jsonl_for(job.session_id, job.generation))

    def run_generation() -> None:
        stop = threading.Event()
        workers = run_workers(base_url, pipeline_key, sid, 2, body, stop, wait_s=2)
        try:
            wait_for("the generation", lambda: len(suite_jobs(
                tp, sid, state="eq.done", generation=f"eq.{generation['n']}")) == 3, 120)
        finally:
            stop.set()
            for w in workers:
                w.join(timeout=60)

    run_generation()
    first = {e["job_id"] for e in tp.list_examples({"suite_id": f"eq.{sid}"})}
    assert requeue(tp, "pipeline v2", suite_id=sid)["requeued"] == 3
    generation["n"] = 2
    run_generation()

    jobs_now = suite_jobs(tp, sid)
    assert Counter((j["generation"], j["state"]) for j in jobs_now) == {(1, "done"): 3, (2, "done"): 3}
    assert {j["reason"] for j in jobs_now if j["generation"] == 2} == {"pipeline v2"}
    examples = tp.list_examples({"suite_id": f"eq.{sid}"})
    assert len(examples) == 6 and {e["session_id"] for e in examples} == sessions
    second = {e["job_id"] for e in examples} - first
    assert len(first) == 3 and len(second) == 3 and not first & second
    # Lineage through the API: the examples of one job, by job_id.
    some_job = next(iter(second))
    [example] = tp.list_examples({"job_id": f"eq.{some_job}"})
    assert example["job_id"] == some_job

    r = tp._send("POST", "/pipeline/requeue", json={"reason": "v3"})
    assert r.status_code == 422 and assert_error_body(r)["details"] == {"field": "session_id"}
    r = tp._send("POST", "/pipeline/requeue", json={"session_id": str(uuid.uuid4()), "reason": "v3"})
    assert r.status_code == 404


def test_the_same_content_for_one_job_is_one_example(person: User, team_suite: dict[str, Any],
                                                     tp: Client) -> None:
    session = upload_session(person, team_suite["id"])
    [lease] = tp._json("POST", "/pipeline/claim", json={"suite_id": team_suite["id"]})
    body = jsonl_for(session["id"])
    params = {"suite_id": team_suite["id"], "model": MODEL, "job_id": lease["id"]}
    headers = {"Content-Type": "application/jsonl"}
    r1 = httpx.post(f"{tp.base_url}/examples", params=params, content=body,
                    headers={**headers, "Authorization": f"Bearer {tp.token}"})
    r2 = httpx.post(f"{tp.base_url}/examples", params=params, content=body,
                    headers={**headers, "Authorization": f"Bearer {tp.token}"})
    assert r1.status_code == 201, r1.text
    assert r2.status_code == 200 and r2.json()["id"] == r1.json()["id"]
    assert r1.json()["session_id"] == session["id"], "the session comes from the job"
    assert len(tp.list_examples({"job_id": f"eq.{lease['id']}"})) == 1
    # Other content for the same job is another example; a job that does not exist is refused.
    r3 = httpx.post(f"{tp.base_url}/examples", params=params, content=jsonl_for(session["id"], 2),
                    headers={**headers, "Authorization": f"Bearer {tp.token}"})
    assert r3.status_code == 201 and r3.json()["id"] != r1.json()["id"]
    r4 = httpx.post(f"{tp.base_url}/examples", params={**params, "job_id": str(uuid.uuid4())}, content=body,
                    headers={**headers, "Authorization": f"Bearer {tp.token}"})
    assert r4.status_code == 422 and assert_error_body(r4)["details"] == {"field": "job_id"}
    r5 = httpx.post(f"{tp.base_url}/examples", params={**params, "session_id": str(uuid.uuid4())}, content=body,
                    headers={**headers, "Authorization": f"Bearer {tp.token}"})
    assert r5.status_code == 422 and assert_error_body(r5)["details"] == {"field": "session_id"}


# --- who sees and works the queue ------------------------------------------------------------------

def test_people_see_only_their_own_sessions_jobs_and_cannot_work_the_queue(
        make_user: Callable[..., User], person: User, team_suite: dict[str, Any], tp: Client, anon: httpx.Client,
        superuser_dsn: str) -> None:
    mine = upload_session(person, team_suite["id"])
    member = make_user()
    add_member(person, team_suite["id"], member, "viewer")
    theirs = upload_session(member, team_suite["id"])

    r = person.client.get("/pipeline/jobs", params={"suite_id": f"eq.{team_suite['id']}"},
                          headers={"Prefer": "count=exact"})
    assert r.status_code == 200 and [j["session_id"] for j in r.json()] == [mine["id"]]
    assert r.headers["content-range"].endswith("/1")
    assert "lease_token" not in r.json()[0]
    # The co-member reads the session (suite member) but not the job of a session not theirs.
    assert member.client.get(f"/sessions/{mine['id']}").status_code == 200
    assert member.client.get("/pipeline/jobs", params={"session_id": f"eq.{mine['id']}"}).json() == []
    assert [j["session_id"] for j in member.client.get(
        "/pipeline/jobs", params={"suite_id": f"eq.{team_suite['id']}"}).json()] == [theirs["id"]]
    # The pipeline sees both.
    assert {j["session_id"] for j in suite_jobs(tp, team_suite["id"])} == {mine["id"], theirs["id"]}

    for path, body in (("/pipeline/claim", {}), ("/pipeline/requeue", {"session_id": mine["id"], "reason": "x"}),
                       (f"/pipeline/jobs/{uuid.uuid4()}/complete", {"lease_token": str(uuid.uuid4())})):
        r = person.client.post(path, json=body)
        assert r.status_code == 403, (path, r.text)
        assert "pipeline" in assert_error_body(r)["hint"]
        r = anon.post(path, json=body)
        assert r.status_code == 401, (path, r.text)
        assert_error_body(r)
    r = anon.get("/pipeline/jobs")
    assert r.status_code == 401 and assert_error_body(r)

    # The same in SQL, as the real role: the lease functions are not the person's to run.
    claims = {"sub": person.id, "role": "tp_user"}
    with as_role(superuser_dsn, "tp_user", claims) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("select * from app.pipeline_claim(1, 60, 5, null)")
    with as_role(superuser_dsn, "tp_user", claims) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("update app.pipeline_jobs set state = 'done' where session_id = %s", [mine["id"]])
    with as_role(superuser_dsn, "tp_user", claims) as conn:
        seen = conn.execute("select session_id from api.pipeline_jobs where suite_id = %s",
                            [team_suite["id"]]).fetchall()
        assert [str(r["session_id"]) for r in seen] == [mine["id"]]


def test_a_read_only_pipeline_key_cannot_claim(base_url: str, pipeline_user: User) -> None:
    key = create_key(pipeline_user, access="read")["key"]
    with Client(base_url, api_key=key) as reader:
        r = reader._send("POST", "/pipeline/claim", json={})
        assert r.status_code == 403 and assert_error_body(r)


# --- metrics and analysts -------------------------------------------------------------------------

def test_queue_metrics_on_ext_s_prometheus_endpoint_and_in_sql(
        stack: Stack, person: User, team_suite: dict[str, Any], tp: Client, superuser_dsn: str) -> None:
    upload_session(person, team_suite["id"])
    [lease] = tp._json("POST", "/pipeline/claim", json={"suite_id": team_suite["id"]})
    tp._json("POST", f"/pipeline/jobs/{lease['id']}/complete", json={"lease_token": lease["lease_token"]})
    upload_session(person, team_suite["id"])  # one waiting

    sock = stack.service_socket("ext")  # ext's own socket (or port): not through the proxy
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)) if sock else None, timeout=30) as direct:
        text = direct.get(f"{stack.ext_url()}/metrics").text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line.startswith("tracepipe_pipeline")}
    for state in ("queued", "leased", "done", "failed", "dead"):
        assert f'tracepipe_pipeline_jobs{{state="{state}"}}' in samples, text
    assert samples['tracepipe_pipeline_jobs{state="queued"}'] >= 1
    assert samples['tracepipe_pipeline_jobs{state="done"}'] >= 1
    assert "tracepipe_pipeline_oldest_waiting_seconds" in samples
    assert samples["tracepipe_pipeline_claim_to_complete_seconds_count"] >= 1

    with psycopg.connect(superuser_dsn, row_factory=dict_row) as conn:
        queue = {r["state"]: r for r in conn.execute("select * from analytics.pipeline_queue")}
        assert set(queue) == {"queued", "leased", "done", "failed", "dead"} and queue["queued"]["jobs"] >= 1
        through = conn.execute("select sum(done) as done from analytics.pipeline_throughput"
                               " where suite_id = %s", [team_suite["id"]]).fetchone()
    assert through == {"done": 1}


def test_admins_read_and_delete_jobs_people_do_not_delete(make_user: Callable[..., User], person: User,
                                                          team_suite: dict[str, Any]) -> None:
    session = upload_session(person, team_suite["id"])
    admin = make_user("tp_admin")
    mine = {"session_id": f"eq.{session['id']}"}
    [job] = admin.client.get("/pipeline/jobs", params=mine).json()
    r = person.client.delete("/pipeline/jobs", params={"id": f"eq.{job['id']}"})
    assert r.status_code == 403 and assert_error_body(r)
    assert len(person.client.get("/pipeline/jobs", params=mine).json()) == 1
    r = admin.client.delete("/pipeline/jobs", params={"id": f"eq.{job['id']}"})
    assert r.status_code == 204, r.text
    assert admin.client.get("/pipeline/jobs", params=mine).json() == []


def test_pipeline_run_registers_what_the_command_writes_and_fails_with_its_stderr(
        stack_env: dict[str, str], person: User, team_suite: dict[str, Any], pipeline_key: str, tp: Client) -> None:
    sid = team_suite["id"]
    session = upload_session(person, sid)
    env = {**stack_env, "PYTHONPATH": str(REPO_ROOT), "TRACEPIPE_API_KEY": pipeline_key}
    tracepipe = str(Path(sys.executable).parent / "tracepipe")
    # The command reads the bundle it is given and writes one example line from it.
    script = ("import json, os, sys, zipfile; z = zipfile.ZipFile(sys.argv[1]);"
              " m = json.loads(z.read('manifest.json'));"
              " open(os.environ['TRACEPIPE_OUTPUT'], 'w').write(json.dumps({'messages': ["
              "{'role': 'user', 'content': os.environ['TRACEPIPE_SESSION_ID']},"
              " {'role': 'assistant', 'content': m['suite_id']}]}) + '\\n')")
    r = subprocess.run([tracepipe, "pipeline", "run", "--model", MODEL, "--suite", sid, "--max-jobs", "1",
                        "--json", "--", sys.executable, "-c", script, "{bundle}"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.splitlines()[-1])
    [example_id] = report["example_ids"]
    [job] = suite_jobs(tp, sid)
    assert report["job_id"] == job["id"] and job["state"] == "done" and job["example_ids"] == [example_id]
    example = tp.get_example(example_id)
    assert example["job_id"] == job["id"] and example["session_id"] == session["id"]
    record = next(tp.iter_messages(example_id))
    assert record["messages"] == [{"role": "user", "content": session["id"]}, {"role": "assistant", "content": sid}]

    upload_session(person, sid)
    r = subprocess.run([tracepipe, "pipeline", "run", "--model", MODEL, "--suite", sid, "--max-jobs", "1", "--",
                        sys.executable, "-c", "import sys; sys.exit('no checkout in this session')"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "exited with status 1" in r.stderr
    [failed] = suite_jobs(tp, sid, state="eq.failed")
    assert "no checkout in this session" in failed["last_error"] and failed["attempt"] == 1
