"""The pipeline's worker loop (DESIGN §10), on top of `tracepipe.client` (httpx only).

    from tracepipe.client import Client

    with Client(url, api_key=pipeline_key) as tp:
        for job in tp.jobs():
            with job:                      # completes on success; fails with the exception text
                bundle = job.download_bundle(workdir / "bundle.zip")
                job.register_example(model, make_jsonl(bundle))

`jobs()` long-polls `POST /pipeline/claim`, so an idle worker costs one open request, not a
query a second. While the body runs a background thread (one per client, for every job it
holds) extends the lease every third of its length; if the lease is lost anyway (the worker
stalled past it and another worker took the job), `job.lease_lost` is set and completing
answers 409. `with job:` turns an exception
of the body into `POST …/fail` with its text (retried by the server after a backoff, dead
after the server's max attempts) and lets the loop go on; a body that left the job open
without `with` has it completed when the loop asks for the next job. A stopped loop
(`break`, Ctrl-C, an exception outside `with job:`) gives its unfinished job back through
`fail` with retry, so another worker takes it at once instead of after the lease.

A worker finishing the last job it holds leases its next one in the same request
(`complete` with `claim_next`: one request per job, not two); only when that finds nothing
does the loop long-poll `POST /pipeline/claim`. `limit` > 1 leases that many jobs per
request (each still completed on its own), for short jobs.

Connection errors and 5xx (an ext restart, say) never end the loop: it waits and claims
again. Only 4xx answers (a person's token: 403) stop it, with the API's error.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from tracepipe.client import Client, Example, TracepipeError

__all__ = ["Job", "LeaseKeeper", "claim", "jobs", "list_jobs", "requeue"]

log = logging.getLogger("tracepipe.worker")
MAX_ERROR_CHARS = 8192  # what the server keeps of an error text


def _post(client: Client, path: str, body: Mapping[str, Any]) -> Any:
    """POST retried on connection errors and 5xx (every pipeline call is safe to repeat:
    a repeated claim at worst leases a job nobody receives, which its lease gives back)."""
    r = client._send("POST", path, json=dict(body), retry=True)
    if not r.is_success:
        r.read()
        raise TracepipeError.from_response(r)
    return r.json()


def claim(client: Client, *, limit: int = 1, lease_s: int = 60, wait_s: float = 0,
          suite_id: str | None = None) -> list[dict[str, Any]]:
    """Leases up to `limit` jobs (of one suite's sessions with `suite_id`); waits up to
    `wait_s` seconds for one when none is due."""
    body: dict[str, Any] = {"limit": limit, "lease_s": lease_s, "wait_s": wait_s}
    if suite_id is not None:
        body["suite_id"] = suite_id
    return list(_post(client, "/pipeline/claim", body))


def requeue(client: Client, reason: str, *, session_id: str | None = None,
            suite_id: str | None = None) -> dict[str, Any]:
    """A new generation of jobs for a session or a suite's sessions (e.g. a new pipeline version)."""
    body = {"reason": reason, "session_id": session_id, "suite_id": suite_id}
    return dict(_post(client, "/pipeline/requeue", {k: v for k, v in body.items() if v is not None}))


def list_jobs(client: Client, filters: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """GET /pipeline/jobs with PostgREST filters: {"state": "eq.dead", "session_id": "eq.<id>"}."""
    return list(client._json("GET", "/pipeline/jobs", params=filters))


class LeaseKeeper:
    """Extends the leases of the jobs a client holds, each every third of its length, from
    one thread per client (a thread per job cost a worker a fifth of its CPU on short jobs).
    The thread stops after `linger_s` without jobs and starts again with the next one.
    A lease answered 404/409 is lost: the job's `lease_lost` is set and it is dropped."""

    def __init__(self, linger_s: float = 30.0) -> None:
        self.linger_s = linger_s
        self._due: dict[Job, float] = {}
        self._extending: Job | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._idle_since = time.monotonic()
        self._wakes_at = 0.0  # when the thread will look again on its own

    def hold(self, job: Job) -> None:
        with self._cond:
            due = self._due[job] = time.monotonic() + max(1.0, job.lease_s / 3)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tracepipe leases", daemon=True)
                self._thread.start()
            elif due < self._wakes_at:  # only then: a wake-up per job is a thread switch per job
                self._cond.notify()

    def release(self, job: Job) -> None:
        with self._cond:
            self._due.pop(job, None)
            if not self._due:
                self._idle_since = time.monotonic()
            while self._extending is job and threading.current_thread() is not self._thread:
                self._cond.wait()

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                if not self._due:
                    if now - self._idle_since >= self.linger_s:
                        self._thread = None
                        return
                    # Idle, it looks every second (hold() then needs no wake-up: a job is due
                    # a second after it is held at the earliest).
                    self._wakes_at = min(self._idle_since + self.linger_s, now + 1.0)
                    self._cond.wait(self._wakes_at - now)
                    continue
                job, due = min(self._due.items(), key=lambda item: item[1])
                if due > now:
                    self._wakes_at = due
                    self._cond.wait(due - now)
                    continue
                self._extending = job
                self._due[job] = now + max(1.0, job.lease_s / 3)
            try:
                job.extend()
            except TracepipeError as e:
                if e.status in (404, 409):
                    log.warning("lost the lease of %s: %s", job, e)
                    job.lease_lost.set()
                    self.release(job)
                else:
                    log.warning("could not extend the lease of %s (will retry): %s", job, e)
            except Exception:  # the thread keeps every other lease: never let it die
                log.exception("extending the lease of %s failed", job)
            finally:
                with self._cond:
                    self._extending = None
                    self._cond.notify_all()


_keepers: weakref.WeakKeyDictionary[Client, LeaseKeeper] = weakref.WeakKeyDictionary()
_keepers_lock = threading.Lock()


def _keeper(client: Client) -> LeaseKeeper:
    with _keepers_lock:
        keeper = _keepers.get(client)
        if keeper is None:
            keeper = _keepers[client] = LeaseKeeper()
        return keeper


class Job:
    """One leased job. Thread-safe: the heartbeat thread and the body share it."""

    def __init__(self, client: Client, lease: Mapping[str, Any], lease_s: int) -> None:
        self.client = client
        self.id: str = lease["id"]
        self.session_id: str = lease["session_id"]
        self.suite_id: str | None = lease.get("suite_id")
        self.generation: int = lease.get("generation", 1)
        self.attempt: int = lease["attempt"]
        self.lease_expires_at: str = lease["lease_expires_at"]
        self.lease_token: str = lease["lease_token"]
        self.lease_s = lease_s
        self.example_ids: list[str] = []
        # Set by the loop on the last job it holds: complete() then leases the next jobs in
        # the same request ({limit, lease_s, suite_id}); they land in next_jobs.
        self.claim_next: dict[str, Any] | None = None
        self.loop_stop: threading.Event | None = None  # the loop's stop: once set, claim nothing more
        self.next_jobs: list[Job] = []
        self.lease_lost = threading.Event()
        self.finished = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Job({self.id}, session {self.session_id}, attempt {self.attempt})"

    # -- the lease
    def start_heartbeat(self) -> None:
        _keeper(self.client).hold(self)

    def _finish(self) -> None:
        """No extend of this job runs once this returns (one may have been under way)."""
        _keeper(self.client).release(self)

    def extend(self, lease_s: int | None = None) -> dict[str, Any]:
        row = _post(self.client, f"/pipeline/jobs/{self.id}/extend",
                    {"lease_token": self.lease_token, "lease_s": lease_s or self.lease_s})
        self.lease_expires_at = row["lease_expires_at"]
        return dict(row)

    def complete(self, example_ids: list[str] | None = None) -> dict[str, Any]:
        """Marks the job done with the examples it registered (those of register_example by default)."""
        with self._lock:
            self._finish()
            body: dict[str, Any] = {"lease_token": self.lease_token,
                                    "example_ids": self.example_ids if example_ids is None else example_ids}
            if self.claim_next is not None and not (self.loop_stop is not None and self.loop_stop.is_set()):
                body["claim_next"] = self.claim_next
            row = dict(_post(self.client, f"/pipeline/jobs/{self.id}/complete", body))
            self.finished = True
            for lease in row.pop("next", None) or []:
                job = Job(self.client, lease, int(self.claim_next["lease_s"]) if self.claim_next else self.lease_s)
                job.start_heartbeat()
                self.next_jobs.append(job)
        return row

    def complete_if_held(self) -> dict[str, Any] | None:
        """complete(), or None when the lease is gone (another worker took the job over)."""
        try:
            return self.complete()
        except TracepipeError as e:
            if e.status not in (404, 409):
                raise
            log.warning("could not complete %s, its lease is gone: %s", self, e)
            self.finished = True
            return None

    def fail(self, error: str, *, retry: bool = True) -> dict[str, Any] | None:
        """Records the failure; None when the lease was already gone (another worker has it)."""
        with self._lock:
            self._finish()
            self.finished = True
            try:
                return dict(_post(self.client, f"/pipeline/jobs/{self.id}/fail",
                                  {"lease_token": self.lease_token, "error": error[-MAX_ERROR_CHARS:] or "failed",
                                   "retry": retry}))
            except TracepipeError as e:
                if e.status in (404, 409):
                    return None
                raise

    # -- the work
    def download_bundle(self, dest: str | Path) -> Path:
        """The session's bundle, streamed to `dest` and checked against its sha256."""
        return self.client.download_session(self.session_id, dest)

    def register_example(self, model: str, jsonl: str | Path | bytes, *, suite_id: str | None = None,
                         metadata: Mapping[str, Any] | None = None) -> Example:
        """Registers an example produced by this job (job_id and the session are recorded;
        the same content twice is one example). `suite_id` defaults to the session's suite."""
        suite = suite_id or self.suite_id
        if suite is None:
            raise ValueError(f"session {self.session_id} has no suite: pass suite_id")
        example = self.client.register_example(suite, model, jsonl, job_id=self.id, metadata=metadata)
        if example["id"] not in self.example_ids:
            self.example_ids.append(example["id"])
        return example

    # -- `with job:`
    def __enter__(self) -> Job:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if self.finished:
            return False
        if exc is None:
            self.complete_if_held()
            return False
        text = "".join(traceback.format_exception(kind, exc, tb))
        self.fail(text, retry=True)
        return isinstance(exc, Exception)  # the loop goes on; Ctrl-C and exits do not


def jobs(client: Client, *, lease_s: int = 60, wait_s: float = 20, limit: int = 1, suite_id: str | None = None,
         idle_retry_s: float = 2.0, stop: threading.Event | None = None, claim_next: bool = True) -> Iterator[Job]:
    """Claims jobs forever (or until `stop` is set), `limit` per request, yielded one at a
    time, each with its lease extended in the background while the loop body runs. With
    `claim_next` the last held job's complete leases the next ones (one request per job)."""
    pending: list[Job] = []
    current: Job | None = None
    try:
        while stop is None or not stop.is_set():
            if not pending:
                try:
                    leases = claim(client, limit=limit, lease_s=lease_s, wait_s=wait_s, suite_id=suite_id)
                except TracepipeError as e:
                    if e.status == 0 or e.status >= 500:
                        log.warning("claim failed (retrying in %.0f s): %s", idle_retry_s, e)
                        time.sleep(idle_retry_s)
                        continue
                    raise
                pending = [Job(client, lease, lease_s) for lease in leases]
                for job in pending:
                    job.start_heartbeat()
                continue
            current = pending.pop(0)
            if claim_next and not pending:
                body: dict[str, Any] = {"limit": limit, "lease_s": lease_s}
                if suite_id is not None:
                    body["suite_id"] = suite_id
                current.claim_next, current.loop_stop = body, stop
            yield current
            if not current.finished:
                current.complete_if_held()
            pending += current.next_jobs
            current.next_jobs = []
            current = None
    finally:
        # The loop stopped inside a body (break, an exception, Ctrl-C): give the jobs back,
        # those its complete leased included.
        held = [current] if current is not None and not current.finished else []
        for job in held + (current.next_jobs if current is not None else []) + pending:
            try:
                job.fail("the worker stopped before finishing the job", retry=True)
            except TracepipeError as e:
                log.warning("could not give %s back: %s", job, e)
