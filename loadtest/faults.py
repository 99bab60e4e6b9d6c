"""Faults under load (issue 13): while the users of loadtest/load.py run, PostgreSQL,
SeaweedFS, PostgREST, one ext worker and nginx are killed with SIGKILL, in turn, each
restarted and waited for; afterwards every acknowledged write is read back (load.verify),
ext's maintenance sweep and the integrity scrub run, and the bucket's multipart uploads
are listed. Every 5xx, transport error and unexpected 4xx must fall inside a fault's
window: from the kill to the moment the health probe sees the whole stack again, plus
`grace` seconds.

What restarts what (tracepipe/stack.py starts each component detached, with a pid file,
and supervises none of them; uvicorn supervises its own workers):
- an ext worker: uvicorn's supervisor replaces it (the harness only waits);
- PostgreSQL, SeaweedFS, PostgREST, nginx: the harness, through the stack's own
  `Stack.start_component(name)` (pg_ctl start with crash recovery from the WAL; a new
  `weed server` behind the S3 relay that stays up; a new PostgREST; a new nginx), after
  the component has been down `down_s` seconds.

SIGKILL goes to the component's whole process tree (the postmaster and its backends,
nginx's master and workers): nothing of it is left to answer or to hold a port.

The health probe: every component of `Stack.status()` answers (PostgreSQL's port,
SeaweedFS's /healthz through the relay, PostgREST's admin /ready, ext's /health, nginx's
/health, the mail sink), the proxy's /ready is 200 (ext reaches the database, PostgREST
and the bucket) and, for the worker, uvicorn runs its full count of workers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import httpx
import psycopg
from botocore.config import Config

from loadtest.load import Deadline, Failure, Result
from tracepipe import credentials
from tracepipe.procs import process_tree
from tracepipe.stack import Stack

ACCOUNT_PREFIX = "load-"  # load.setup's accounts: load-<hex>@example.test

COMPONENTS = ("postgres", "seaweedfs", "postgrest", "ext-worker", "nginx")
RESTARTED_BY = {
    "postgres": "harness: Stack.start_component('postgres') (pg_ctl start, crash recovery)",
    "seaweedfs": "harness: Stack.start_component('seaweedfs') (the S3 relay stays up)",
    "postgrest": "harness: Stack.start_component('postgrest')",
    "ext-worker": "uvicorn's supervisor (replaces the dead worker)",
    "nginx": "harness: Stack.start_component('nginx')",
}


@dataclass
class Fault:
    component: str
    killed_at: float  # monotonic
    pids: list[int]
    restarted_at: float | None = None
    recovered_at: float | None = None
    errors: Counter[str] = field(default_factory=Counter)  # "5xx", "transport", "4xx" inside the window

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.killed_at

    def contains(self, f: Failure, grace: float) -> bool:
        """The request overlapped the window [kill, recovery + grace]."""
        end = (self.recovered_at if self.recovered_at is not None else float("inf")) + grace
        return f.started <= end and f.ended >= self.killed_at


def _state(pid: int) -> str | None:
    """The process's state letter (Z: a zombie), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _gone(pid: int) -> bool:
    """Gone from the process table: a zombie still holds its pid, and PostgreSQL refuses to
    start while the pid in postmaster.pid exists."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # the stack's processes may be this process's children: reap them
    return _state(pid) is None


def workers(stack: Stack) -> list[int]:
    """ext's uvicorn workers: the live direct children of its supervisor."""
    supervisor = stack.pid_of("ext")
    if supervisor is None:
        return []
    out = []
    for pid in process_tree(supervisor):
        if pid == supervisor or _state(pid) in (None, "Z"):
            continue
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == supervisor and "multiprocessing.resource_tracker" not in _cmdline(pid):
            out.append(pid)
    return sorted(out)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill(stack: Stack, component: str) -> list[int]:
    """SIGKILL: one ext worker, or the component's whole process tree (root first, so it
    cannot fork a replacement); returns when every killed process is gone."""
    if component == "ext-worker":
        victims = workers(stack)[-1:]
    else:
        root = stack.pid_of(component)
        victims = process_tree(root) if root is not None else []
    if not victims:
        raise RuntimeError(f"{component}: no running process to kill")
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not all(_gone(p) for p in victims):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{component}: processes {victims} outlived SIGKILL by 30 s")
        time.sleep(0.05)
    return victims


def healthy(stack: Stack, component: str) -> bool:
    """The health probe (see the module's docstring)."""
    if not all(st.healthy for st in stack.status()):
        return False
    if component == "ext-worker" and len(workers(stack)) < stack.s.ext_workers:
        return False
    try:
        return httpx.get(f"{stack.s.proxy_url}/ready", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def inject(stack: Stack, component: str, down_s: float, timeout: float = 180.0) -> Fault:
    """Kills the component, restarts it as RESTARTED_BY says, waits for the health probe."""
    killed_at = time.monotonic()
    fault = Fault(component, killed_at, kill(stack, component))
    if component != "ext-worker":
        time.sleep(max(0.0, killed_at + down_s - time.monotonic()))
        stack.start_component(component)
        fault.restarted_at = time.monotonic()
    deadline = time.monotonic() + timeout
    while not healthy(stack, component):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the stack did not recover within {timeout:.0f} s of killing {component}")
        time.sleep(0.1)
    fault.recovered_at = time.monotonic()
    return fault


@dataclass
class FaultPlan:
    """Runs alongside the users (load.run_load's `alongside`): the first kill `lead` seconds
    in, each next one `gap` seconds after the previous recovery (and no earlier than its
    even share of `seconds`), and keeps the users going `gap` seconds after the last
    recovery, so clean traffic follows every window."""
    stack: Stack
    components: tuple[str, ...] = COMPONENTS
    seconds: float = 60.0
    lead: float = 5.0
    gap: float = 5.0
    down_s: float = 1.0
    faults: list[Fault] = field(default_factory=list)

    async def __call__(self, deadline: Deadline) -> None:
        started = time.monotonic()
        slot = max(0.0, self.seconds - self.lead - self.gap) / max(1, len(self.components))
        next_at = started + self.lead
        planned_end = deadline.at
        done = asyncio.Event()

        async def keep_going() -> None:  # the users go on until the last recovery (they re-read `at`)
            while not done.is_set():
                deadline.at = max(deadline.at, time.monotonic() + 1.0)
                await asyncio.sleep(0.25)

        ticker = asyncio.create_task(keep_going())
        try:
            for i, component in enumerate(self.components):
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                fault = await asyncio.to_thread(inject, self.stack, component, self.down_s)
                self.faults.append(fault)
                assert fault.recovered_at is not None
                next_at = max(fault.recovered_at + self.gap, started + self.lead + (i + 1) * slot)
        finally:
            done.set()
            await ticker
            deadline.at = max(planned_end, time.monotonic() + self.gap)


# --- after the load ---------------------------------------------------------------------------------
def _s3(stack: Stack) -> Any:
    secrets = credentials.load_or_create(stack.state)
    return boto3.client("s3", endpoint_url=stack.s.s3_endpoint, aws_access_key_id=secrets.s3_access_key,
                        aws_secret_access_key=secrets.s3_secret_key, region_name=stack.s.s3_region,
                        config=Config(retries={"max_attempts": 3}, connect_timeout=3, read_timeout=30,
                                      s3={"addressing_style": "path"}))


def open_uploads(stack: Stack) -> list[dict[str, Any]]:
    """ListMultipartUploads on the whole bucket (every page)."""
    s3 = _s3(stack)
    out: list[dict[str, Any]] = []
    kwargs: dict[str, str] = {}
    while True:
        page = s3.list_multipart_uploads(Bucket=stack.s.bucket, **kwargs)
        out += page.get("Uploads", [])
        if not page.get("IsTruncated"):
            return out
        kwargs = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}


def keys(stack: Stack, prefix: str) -> list[str]:
    s3, out = _s3(stack), []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.s.bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def unacknowledged_tus_uploads(stack: Stack, acknowledged: set[str]) -> list[dict[str, Any]]:
    """The load's tus uploads still receiving that no client holds: their creation committed
    but its answer was lost in a fault (the client never learned the id). They are live until
    they expire (Upload-Expires, TP_EXT_TUS_EXPIRY_S), so the sweep keeps their multipart upload."""
    with psycopg.connect(stack.superuser_conninfo()) as conn:
        rows = conn.execute("select t.id::text, t.session_id::text, t.s3_upload_id, t.upload_offset"
                            " from app.tus_uploads t join app.users u on u.id = t.user_id"
                            " where t.state <> 'done' and u.email like %s", [f"{ACCOUNT_PREFIX}%"]).fetchall()
    return [{"id": r[0], "session_id": r[1], "s3_upload_id": r[2], "offset": r[3]} for r in rows
            if r[1] not in acknowledged]


def expire_now(stack: Stack, upload_ids: list[str]) -> None:
    """Moves those uploads' expiry to now, as if their hours had passed: ext's own expiry
    (maintenance.expire_tus_uploads, in `maintain`) then aborts their parts."""
    if upload_ids:
        with psycopg.connect(stack.superuser_conninfo(), autocommit=True) as conn:
            conn.execute("update app.tus_uploads set expires_at = now() - interval '1 second'"
                         " where id = any(%s::uuid[])", [upload_ids])


@contextlib.asynccontextmanager
async def _ext(stack: Stack) -> AsyncIterator[tuple[Any, Any, Any]]:
    """ext's settings, database pool and object store for this stack, as ext runs them
    (tracepipe.cli._ext_services does the same for the stack of the environment)."""
    from ext.config import ExtSettings
    from ext.db import make_pool
    from ext.storage import ObjectStore, make_client

    secrets = credentials.load_or_create(stack.state)
    values: dict[str, Any] = {k.removeprefix("TP_EXT_").lower(): v for k, v in stack.ext_env(secrets).items()}
    settings = ExtSettings(**values)
    async with make_pool(settings) as pool:
        yield settings, pool, ObjectStore(make_client(settings), settings)


def maintain(stack: Stack) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """ext's maintenance, once (what `tracepipe scrub` and `tracepipe sweep --grace-seconds 0`
    run, in this process): the scrub without digests (what the faults left), the expiry of
    tus uploads, the sweep, the full scrub."""
    from ext import maintenance
    from ext.scrub import scrub

    async def run() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with _ext(stack) as (settings, pool, store):
            before = (await scrub(pool, store, verify_digests=False)).as_dict()
            await maintenance.expire_tus_uploads(pool, store)
            swept = await maintenance.sweep(pool, store, settings, timedelta(0))
            swept["cleanups_pending"] = store.pending_cleanups
            return before, swept, (await scrub(pool, store)).as_dict()

    return asyncio.run(run())


@dataclass
class Baseline:
    """What the bucket and the scrub showed before the load (a shared test stack carries
    other tests' data): only what the load added counts."""
    uploads: frozenset[str] = frozenset()
    scrub: dict[str, frozenset[str]] = field(default_factory=dict)


SCRUB_LISTS = ("rows_without_object", "size_mismatch", "digest_mismatch", "objects_without_row")


def baseline(stack: Stack) -> Baseline:
    from ext.scrub import scrub as run_scrub

    async def listed() -> dict[str, Any]:
        async with _ext(stack) as (_, pool, store):
            return (await run_scrub(pool, store, verify_digests=False)).as_dict()

    scrub = asyncio.run(listed())
    return Baseline(frozenset(u["UploadId"] for u in open_uploads(stack)),
                    {k: frozenset(scrub[k]) for k in SCRUB_LISTS})


@dataclass
class FaultReport:
    faults: list[Fault]
    grace: float
    outside: list[Failure]  # failures in no window
    lost: list[str]
    scrub_before_sweep: dict[str, Any]
    sweep: dict[str, Any]
    scrub: dict[str, Any]
    open_uploads_before_sweep: int
    open_uploads: list[dict[str, Any]]
    tus_unacknowledged: int  # live tus uploads whose creation answer was lost, expired by ext's expiry
    tus_tails: list[str]  # objects under uploads/ once every upload is done or expired
    logs: Path | None = None  # a copy of the stack's logs, kept when the run failed

    @property
    def orphans(self) -> int:
        """What the scrub still finds after the sweep (rows without their object, objects
        without a row, size or sha256 off), plus tus tail objects of no live upload."""
        return sum(len(self.scrub[k]) for k in SCRUB_LISTS) + len(self.tus_tails)

    @property
    def ok(self) -> bool:
        return not (self.outside or self.lost or self.orphans or self.open_uploads) and \
            len(self.faults) == len(COMPONENTS)

    def summary(self) -> dict[str, Any]:
        return {
            "grace_s": self.grace,
            "faults": [{"component": f.component, "restarted_by": RESTARTED_BY[f.component],
                        "killed_pids": len(f.pids), "recovery_s": round(f.recovery_s or -1, 2),
                        "errors_in_window": dict(f.errors)} for f in self.faults],
            "errors_outside_windows": len(self.outside),
            "lost_writes": len(self.lost),
            "left_for_the_sweep": {"objects_without_row": len(self.scrub_before_sweep["objects_without_row"]),
                                   "open_multipart_uploads": self.open_uploads_before_sweep,
                                   "tus_uploads_with_lost_creation_answer": self.tus_unacknowledged},
            "sweep": self.sweep,
            "after_sweep": {"orphans": self.orphans, "open_multipart_uploads": len(self.open_uploads),
                            "scrub_ok": self.scrub["ok"], "scrub_checked": self.scrub["checked"]},
        }


SETTLE_S = 7.0  # after the load, ext's own retry round (cleanup_retry_s, 5 s) runs before the checks


def check(stack: Stack, result: Result, plan: FaultPlan, grace: float, before: Baseline | None = None,
          settle_s: float = SETTLE_S) -> FaultReport:
    """After the load: place every failure in a window; after `settle_s` (ext's own retries
    of failed deletes and aborts, and its deletion outbox, get their round) the sweep, the
    scrub and the bucket's open multipart uploads (minus what `before` already showed)."""
    before = before or Baseline()
    outside: list[Failure] = []
    stats = result.stats
    for kind, failures in (("5xx", stats.server_errors), ("transport", stats.transport_errors),
                           ("4xx", stats.unexpected)):
        for f in failures:
            window = next((x for x in plan.faults if x.contains(f, grace)), None)
            if window is None:
                outside.append(f)
            else:
                window.errors[kind] += 1
    time.sleep(settle_s)
    uploads_before = len(open_uploads(stack))
    stray = unacknowledged_tus_uploads(stack, set(result.ledger.sessions))
    expire_now(stack, [u["id"] for u in stray])
    scrub_before, sweep, scrub = maintain(stack)
    for k in SCRUB_LISTS:
        scrub[k] = [x for x in scrub[k] if x not in before.scrub.get(k, frozenset())]
    live = {u["id"] for u in unacknowledged_tus_uploads(stack, set(result.ledger.sessions))}
    tails = [k for k in keys(stack, "uploads/") if k.split("/")[1] not in live]
    uploads = [u for u in open_uploads(stack) if u["UploadId"] not in before.uploads]
    return FaultReport(plan.faults, grace, outside, result.lost, scrub_before, sweep, scrub, uploads_before,
                       uploads, len(stray), tails)


def _where(r: FaultReport, f: Failure) -> str:
    """When a failure outside every window happened: after which recovery, how long."""
    before = [x for x in r.faults if x.recovered_at is not None and x.recovered_at <= f.started]
    if not before:
        return f"[{f.ended - f.started:.1f} s long, before the first kill]"
    last = before[-1]
    assert last.recovered_at is not None
    after = f.started - last.recovered_at
    return f"[{after:+.1f} s after {last.component} recovered, {f.ended - f.started:.1f} s long]"


def keep_logs(stack: Stack) -> Path:
    """A copy of the stack's logs (ext, PostgREST, nginx, SeaweedFS, PostgreSQL) that outlives it."""
    import shutil
    import tempfile

    target = Path(tempfile.mkdtemp(prefix="tp-faults-logs-"))
    shutil.copytree(stack.logs, target / "logs", dirs_exist_ok=True)
    with contextlib.suppress(OSError):
        shutil.copy(stack.logfile("postgres"), target / "logs" / "postgres.log")
    return target


def report(r: FaultReport) -> str:
    lines = ["", f"faults (window: kill to recovery + {r.grace} s grace):",
             f"  {'component':<11} {'recovery s':>10} {'5xx':>5} {'transport':>9} {'4xx':>5}  restarted by"]
    for f in r.faults:
        lines.append(f"  {f.component:<11} {f.recovery_s or -1:>10.2f} {f.errors['5xx']:>5} "
                     f"{f.errors['transport']:>9} {f.errors['4xx']:>5}  {RESTARTED_BY[f.component]}")
    s = r.summary()
    lines += [f"errors outside every window: {len(r.outside)}; lost writes: {len(r.lost)}",
              f"left for the sweep: {s['left_for_the_sweep']}; sweep: {r.sweep}",
              f"after the sweep: {s['after_sweep']}"]
    if r.logs:
        lines.append(f"the stack's logs are kept in {r.logs}")
    for title, items in (("outside the windows", [f"{_where(r, f)} {f.endpoint}: {f.detail}" for f in r.outside]),
                         ("scrub", [f"{k}: {v[:5]}" for k, v in r.scrub.items() if isinstance(v, list) and v]),
                         ("open multipart uploads", [f"{u['Key']} {u['UploadId']}" for u in r.open_uploads]),
                         ("tus tail objects", r.tus_tails)):
        if items:
            lines += [f"{title} (first 20 of {len(items)}):"] + [f"  {x}" for x in items[:20]]
    return "\n".join(lines)


GRACE_S = 3.0  # a window ends this long after the probe saw the stack again (requests in flight then)


def restore(stack: Stack) -> list[str]:
    """Starts whatever is down (after a failed run); returns the names started."""
    started = []
    for name in stack.process_names():
        if stack.pid_of(name) is None:
            stack.start_component(name)
            started.append(name)
    return started


def run_with_faults(stack: Stack, *, users: int, seconds: float, accounts: int = 10, think: float = 0.1,
                    grace: float = GRACE_S, probe: Any = None, before: Baseline | None = None,
                    components: tuple[str, ...] = COMPONENTS, lead: float = 5.0,
                    gap: float = 5.0) -> tuple[Result, FaultReport]:
    """The load with the faults of `components` in turn (see FaultPlan), then `check`."""
    from loadtest.load import run_load

    plan = FaultPlan(stack, components, seconds=seconds, lead=lead, gap=gap)
    try:
        result = asyncio.run(run_load(stack.s.proxy_url, users=users, seconds=seconds, accounts=accounts,
                                      think=think, probe=probe, alongside=plan))
    finally:
        restore(stack)
    found = check(stack, result, plan, grace, before)
    if not found.ok:
        found.logs = keep_logs(stack)
    return result, found
