"""`make bench` (`python -m bench.run`): every figure of the benchmark suite beside the bare
component it rides on, measured in the same run, with the ratio and the target.

Writes bench/results/latest.json (a list of {name, value, unit, baseline, baseline_value,
ratio, target, met}), latest.md (the table, with the machine) and latest.meta.json (the
machine, per-phase load average, per-component memory, raw figures); prints the table.
`--quick` is a ~2-minute subset (short runs, smaller files and seed) for development.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench import data
from bench.load import BenchError, LoadResult, median_result, pgbench, sql_literal, wrk
from bench.stack import BenchStack
from tracepipe import worker
from tracepipe.client import Client
from tracepipe.procs import PeakRss
from tracepipe.settings import REPO_ROOT

RESULTS = REPO_ROOT / "bench" / "results"
MIB = 1024 * 1024


@dataclass(frozen=True)
class Profile:
    name: str
    duration_s: float  # each measured load run
    warmup_s: float
    rounds: int  # interleaved product/baseline rounds; the median is reported
    file_mib: int  # bundle and JSONL size
    transfer_rounds: int
    seed_rows: int
    cold_up: bool  # stop the stack and time `tracepipe up` on its state dir


FULL = Profile("full", duration_s=8, warmup_s=2, rounds=3, file_mib=256, transfer_rounds=3, seed_rows=1_000_000,
               cold_up=True)
QUICK = Profile("quick", duration_s=3, warmup_s=1, rounds=1, file_mib=64, transfer_rounds=1, seed_rows=100_000,
                cold_up=False)


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    baseline: str | None
    baseline_value: float | None
    ratio: float | None
    target: str
    met: bool | None


@dataclass
class Run:
    profile: Profile
    bs: BenchStack
    work: Path
    figures: list[Figure] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def proxy(self) -> str:
        return self.bs.s.proxy_url

    def phase(self, name: str) -> None:
        self.meta.setdefault("phases", []).append({"phase": name, "at_s": round(time.monotonic() - START, 1),
                                                   "loadavg": _loadavg()})
        print(f"[bench] {name}", file=sys.stderr, flush=True)

    def add(self, name: str, value: float, unit: str, baseline: str | None = None,
            baseline_value: float | None = None, target: str = "report",
            check: Callable[[float, float | None], bool] | None = None) -> None:
        ratio = value / baseline_value if baseline_value else None
        met = None if check is None else bool(check(value, ratio))
        self.figures.append(Figure(name, round(value, 2), unit, baseline, _round(baseline_value),
                                   _round(ratio, 3), target, met))


START = time.monotonic()


def _round(x: float | None, digits: int = 2) -> float | None:
    if x is None:
        return None
    return round(x, digits) if abs(x) < 100 else round(x, 1)


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    mem_kib = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                       if ln.startswith("MemTotal:")))

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    commit = version(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip() != ""
    return {
        "nproc": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "wrk": version(["wrk", "-v"]), "git_commit": commit + ("+dirty" if dirty else ""),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --- reads: proxy + PostgREST + RLS vs bare PostgREST vs pgbench --------------------------------------
def pgbench_script(claims: dict[str, Any], select: str) -> str:
    """What PostgREST runs for a read, as one transaction: role and claims set locally, the
    pre-request hook, then the select aggregated to JSON."""
    return "\n".join([
        "begin;",
        f"select set_config('role', 'tp_user', true), set_config('request.jwt.claims', "
        f"{sql_literal(json.dumps(claims))}, true);",
        "select auth.check_request();",
        f"select coalesce(json_agg(t), '[]') from ({select}) t;",
        "commit;",
        "",
    ])


def reads(run: Run, fx: data.Fixtures) -> None:
    run.phase("reads: proxy vs bare PostgREST vs pgbench")
    p, bs = run.profile, run.bs
    token = data.login(run.proxy, fx.email)
    claims = data.claims_of(token)
    bs.create_bare_schema()
    bare = bs.start_bare(run.work)
    product_auth = {"Authorization": f"Bearer {token}"}
    bare_auth = {"Authorization": f"Bearer {bs.bare_token()}"}
    suite = fx.suite_ids[0]
    one = "application/vnd.pgrst.object+json"
    cases: list[tuple[str, str, dict[str, str], str, dict[str, str], str]] = [
        ("GET one suite by id", f"{run.proxy}/suites/{suite}", {},
         f"{bare}/suites?id=eq.{suite}", {"Accept": one},
         f"select * from api.suites where id = {sql_literal(suite)}"),
        ("GET a 20-row page of a suite's actions", f"{run.proxy}/suites/{suite}/actions?order=name&limit=20", {},
         f"{bare}/actions?suite_id=eq.{suite}&order=name&limit=20", {},
         f"select * from api.actions where suite_id = {sql_literal(suite)} order by name limit 20"),
    ]
    try:
        for label, product_url, product_headers, bare_url, bare_headers, select in cases:
            product_headers = {**product_auth, **product_headers}
            bare_headers = {**bare_auth, **bare_headers}
            _same_answer(product_url, product_headers, bare_url, bare_headers)
            script = pgbench_script(claims, select)
            prod_runs, bare_runs, sql_runs = [], [], []
            for _ in range(p.rounds):
                prod_runs.append(_wrk_with_cpu(run, f"{label}: proxy", product_url, product_headers))
                bare_runs.append(_wrk_with_cpu(run, f"{label}: bare PostgREST", bare_url, bare_headers))
                sql_runs.append(pgbench(bs.authenticator(), script, duration_s=p.duration_s, warmup_s=p.warmup_s))
            prod, bare_r, sql = median_result(prod_runs), median_result(bare_runs), median_result(sql_runs)
            run.meta.setdefault("reads", {})[label] = {"proxy": [asdict(r) for r in prod_runs],
                                                       "bare": [asdict(r) for r in bare_runs],
                                                       "pgbench": [asdict(r) for r in sql_runs]}
            name = f"{label} via proxy (ES256 JWT, pre-request hook, membership RLS), 32 conns"
            bare_name = "bare PostgREST (its defaults, HS256, table without RLS, no hook)"
            run.add(f"{name}: req/s", prod.rps, "req/s", bare_name, bare_r.rps, "≥ 90%",
                    lambda v, r: r is not None and r >= 0.9)
            run.add(f"{name}: p99", prod.p99_ms, "ms", f"{bare_name}: p99", bare_r.p99_ms, "≤ 1.5×",
                    lambda v, r: r is not None and r <= 1.5)
            run.add(f"{name}: req/s vs SQL", prod.rps, "req/s",
                    "same SQL via pgbench as tp_user with the claims, hook included, 32 clients", sql.rps)
    finally:
        bs.stop_bare()
        bs.drop_bare_schema()


def _wrk_with_cpu(run: Run, label: str, url: str, headers: dict[str, str], method: str = "GET") -> LoadResult:
    """wrk after its warm-up, recording each component's CPU time per request (µs) in the
    meta (the last round's), so the table says where a request's time goes."""
    p = run.profile
    wrk(url, method=method, headers=headers, duration_s=p.warmup_s, warmup_s=0)
    before = run.bs.cpu_by_component()
    result = wrk(url, method=method, headers=headers, duration_s=p.duration_s, warmup_s=0)
    after = run.bs.cpu_by_component()
    used = {name: round((after[name] - before.get(name, 0.0)) * 1e6 / result.requests, 1) for name in after}
    run.meta.setdefault("cpu_us_per_request", {})[label] = {k: v for k, v in used.items() if v >= 0.5}
    return result


def _same_answer(product_url: str, product_headers: dict[str, str], bare_url: str,
                 bare_headers: dict[str, str]) -> None:
    """Both sides answer 200 with the same rows: they do the same work."""
    a = httpx.get(product_url, headers=product_headers, timeout=30)
    b = httpx.get(bare_url, headers=bare_headers, timeout=30)
    if a.status_code != 200 or b.status_code != 200 or a.json() != b.json():
        raise BenchError(f"product and bare answers differ: {a.status_code} {a.text[:300]} / "
                         f"{b.status_code} {b.text[:300]}")


# --- POST /auth/token vs a constant endpoint of the same ext --------------------------------------------
def auth_token(run: Run, fx: data.Fixtures) -> None:
    run.phase("POST /auth/token vs /health")
    p, s = run.profile, run.bs.s
    if s.service_sockets:  # --running on a stack whose ext is on a unix socket, which wrk cannot reach
        run.phase("POST /auth/token skipped: it measures ext on its port (TP_SERVICE_SOCKETS=false)")
        return
    ext = f"http://{s.host}:{s.ext_port}"
    headers = {"Authorization": f"ApiKey {fx.api_key}"}
    r = httpx.post(f"{ext}/auth/token", headers=headers, timeout=30)
    if r.status_code != 200:
        raise BenchError(f"/auth/token answered {r.status_code}: {r.text[:300]}")
    token_runs, health_runs = [], []
    for _ in range(p.rounds):
        token_runs.append(_wrk_with_cpu(run, "POST /auth/token", f"{ext}/auth/token", headers, method="POST"))
        health_runs.append(_wrk_with_cpu(run, "GET /health", f"{ext}/health", {}))
    tok, health = median_result(token_runs), median_result(health_runs)
    run.meta["auth_token"] = {"token": [asdict(x) for x in token_runs], "health": [asdict(x) for x in health_runs]}
    name = "POST /auth/token (API key → ES256 JWT), ext direct (the proxy rate-limits it), 32 conns"
    run.add(f"{name}: req/s", tok.rps, "req/s", "GET /health (constant JSON), same ext", health.rps, "≥ 40%",
            lambda v, r: r is not None and r >= 0.4)
    run.add(f"{name}: p99", tok.p99_ms, "ms", "GET /health: p99", health.p99_ms, "< 20 ms", lambda v, r: v < 20)


# --- upload and stream vs boto3 --------------------------------------------------------------------------
def s3_client(run: Run) -> Any:
    import boto3
    from botocore.config import Config

    s = run.bs.s
    return boto3.client("s3", endpoint_url=s.s3_endpoint, aws_access_key_id=run.bs.secrets.s3_access_key,
                        aws_secret_access_key=run.bs.secrets.s3_secret_key, region_name=s.s3_region,
                        config=Config(s3={"addressing_style": "path"}, max_pool_connections=32))


def upload(run: Run, fx: data.Fixtures) -> None:
    from boto3.s3.transfer import TransferConfig

    p = run.profile
    run.phase(f"upload {p.file_mib} MiB bundle vs boto3 multipart put, and through tus")
    bundle = run.work / "bundle.zip"
    size = data.make_bundle(bundle, p.file_mib)
    s3, bucket = s3_client(run), run.bs.s.bucket
    ext_pid = run.bs.stack.pid_of("ext")
    assert ext_pid is not None
    part = 8 * MIB  # ext's part size (TP_EXT_UPLOAD_PART_BYTES)
    transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part)
    prod, direct, peaks = [], [], []
    tus, tus_peaks = [], []
    for _ in range(p.transfer_rounds):
        token = data.login(run.proxy, fx.email)
        with PeakRss(ext_pid) as peak:
            status, body, seconds = data.post_file(f"{run.proxy}/sessions", bundle, {
                "Authorization": f"Bearer {token}", "Content-Type": "application/zip"})
        if status != 201:
            raise BenchError(f"upload answered {status}: {body[:300]!r}")
        prod.append(size / seconds / 1e6)
        peaks.append(peak.peak)
        session_id = json.loads(body)["id"]
        with PeakRss(ext_pid) as peak:  # the same bundle through tus, 5 MiB PATCHes (DESIGN.md §11)
            status, tus_session, seconds = data.tus_file(f"{run.proxy}/uploads", bundle,
                                                         {"Authorization": f"Bearer {token}"}, 5 * MIB)
        if status != 204 or not tus_session:
            raise BenchError(f"tus upload answered {status}")
        tus.append(size / seconds / 1e6)
        tus_peaks.append(peak.peak)
        httpx.delete(f"{run.proxy}/sessions/{tus_session}", headers={"Authorization": f"Bearer {token}"},
                     timeout=60).raise_for_status()
        key = f"bench/{uuid.uuid4()}/bundle.zip"
        started = time.perf_counter()
        s3.upload_file(str(bundle), bucket, key, Config=transfer)
        direct.append(size / (time.perf_counter() - started) / 1e6)
        s3.delete_object(Bucket=bucket, Key=key)
        httpx.delete(f"{run.proxy}/sessions/{session_id}", headers={"Authorization": f"Bearer {token}"},
                     timeout=60).raise_for_status()
    bundle.unlink()
    ext_log = run.bs.stack.logfile("ext")
    fallbacks = ext_log.read_text(errors="replace").count("streamed part") if ext_log.exists() else None
    run.meta["upload"] = {"bytes": size, "proxy_mbps": prod, "boto3_mbps": direct, "ext_peak_rss": peaks,
                          "tus_mbps": tus, "tus_ext_peak_rss": tus_peaks,
                          "tus_streamed_parts_sent_again": fallbacks}  # ext/tus.py's fallback, from ext's log
    name = f"upload a {p.file_mib} MiB bundle via proxy (POST /sessions, stored, validated, row written)"
    _transfer_figures(run, name, prod, "direct boto3 multipart put (8 MiB parts), same store", direct, 0.7, peaks)
    name = f"upload a {p.file_mib} MiB bundle through tus (5 MiB PATCHes, then validated, row written)"
    _transfer_figures(run, name, tus, "POST /sessions of the same bundle, same run", prod, 0.8, tus_peaks)


def _transfer_figures(run: Run, name: str, prod: list[float], baseline: str, direct: list[float],
                      min_ratio: float, peaks: list[int]) -> None:
    """MB/s beside boto3's (medians over the rounds) and ext's peak RSS, for uploads and streams."""
    run.add(f"{name}: MB/s", statistics.median(prod), "MB/s", baseline, statistics.median(direct),
            f"≥ {min_ratio:.0%}", lambda v, r: r is not None and r >= min_ratio)
    run.add(f"{name}: ext peak RSS (largest process)", max(peaks) / MIB, "MiB", None, None, "< 150 MiB",
            lambda v, r: v < 150)


def stream(run: Run, fx: data.Fixtures) -> None:
    p = run.profile
    run.phase(f"stream {p.file_mib} MiB JSONL vs boto3 GET")
    jsonl = run.work / "example.jsonl"
    size = data.make_jsonl(jsonl, p.file_mib)
    token = data.login(run.proxy, fx.email)
    auth = {"Authorization": f"Bearer {token}"}
    status, body, seconds = data.post_file(
        f"{run.proxy}/examples?suite_id={fx.suite_ids[0]}&model=bench-model", jsonl,
        {**auth, "Content-Type": "application/jsonl"})
    if status != 201:
        raise BenchError(f"registering the example answered {status}: {body[:300]!r}")
    jsonl.unlink()
    example_id = json.loads(body)["id"]
    run.meta["register_example_mbps"] = round(size / seconds / 1e6, 1)
    s3, bucket = s3_client(run), run.bs.s.bucket
    ext_pid = run.bs.stack.pid_of("ext")
    assert ext_pid is not None
    prod, direct, peaks = [], [], []
    for _ in range(p.transfer_rounds):
        with PeakRss(ext_pid) as peak:
            status, got, seconds = data.get_stream(f"{run.proxy}/examples/{example_id}/messages", auth)
        if status != 200 or got != size:
            raise BenchError(f"stream answered {status} with {got} of {size} bytes")
        prod.append(size / seconds / 1e6)
        peaks.append(peak.peak)
        started = time.perf_counter()
        obj = s3.get_object(Bucket=bucket, Key=f"examples/{example_id}/messages.jsonl")
        got = sum(len(c) for c in obj["Body"].iter_chunks(MIB))
        direct.append(got / (time.perf_counter() - started) / 1e6)
    run.meta["stream"] = {"bytes": size, "proxy_mbps": prod, "boto3_mbps": direct, "ext_peak_rss": peaks}
    name = f"stream a {p.file_mib} MiB JSONL example via proxy (GET /examples/{{id}}/messages)"
    _transfer_figures(run, name, prod, "direct boto3 GET, 1 MiB chunks, same store", direct, 0.8, peaks)


# --- examples listing at scale ------------------------------------------------------------------------------
def seed(run: Run) -> None:
    rows = run.profile.seed_rows
    run.phase(f"seed {rows} example rows")
    started = time.monotonic()
    run.bs.cli("seed-examples", "--rows", str(rows), "--suites", "1000", "--models", "20", timeout=900)
    run.meta["seed"] = {"rows": rows, "seconds": round(time.monotonic() - started, 1)}


def listing(run: Run, fx: data.Fixtures) -> None:
    p = run.profile
    run.phase(f"examples listing at {p.seed_rows} rows vs pgbench")
    suite = data.add_viewer(run.bs.superuser_dsn, fx.user_id, "scale-suite-0042")
    token = data.login(run.proxy, fx.email)
    claims = data.claims_of(token)
    headers = {"Authorization": f"Bearer {token}"}
    with psycopg.connect(run.bs.superuser_dsn) as conn:
        count = conn.execute("select count(*) from app.examples").fetchone()
    n = int(count[0]) if count else 0
    rows = f"{n / 1e6:.1f}M" if n >= 1_000_000 else f"{n // 1000}k"
    run.meta["listing_rows"] = n
    cases = [
        ("one suite and model, newest 20",
         f"{run.proxy}/examples?suite_id=eq.{suite}&model=eq.model-07&order=created_at.desc&limit=20",
         f"select * from api.examples where suite_id = {sql_literal(suite)} and model = 'model-07'"
         " order by created_at desc limit 20"),
        ("one model across the caller's suites, newest 20",
         f"{run.proxy}/examples?model=eq.model-03&order=created_at.desc&limit=20",
         "select * from api.examples where model = 'model-03' order by created_at desc limit 20"),
    ]
    for label, url, select in cases:
        r = httpx.get(url, headers=headers, timeout=30)
        if r.status_code != 200 or not r.json():
            raise BenchError(f"listing answered {r.status_code}: {r.text[:300]}")
        script = pgbench_script(claims, select)
        http_runs, sql_runs = [], []
        for _ in range(p.rounds):
            http_runs.append(wrk(url, headers=headers, connections=1, threads=1, duration_s=p.duration_s,
                                 warmup_s=p.warmup_s))
            sql_runs.append(pgbench(run.bs.authenticator(), script, clients=1, jobs=1, duration_s=p.duration_s,
                                    warmup_s=p.warmup_s))
        h, q = median_result(http_runs), median_result(sql_runs)
        run.meta.setdefault("listing", {})[label] = {"proxy": [asdict(x) for x in http_runs],
                                                     "pgbench": [asdict(x) for x in sql_runs]}
        name = f"examples listing at {rows} rows via proxy, {label}, 1 client"
        run.add(f"{name}: p50", h.p50_ms, "ms", "same SQL via pgbench as tp_user with the claims: p50", q.p50_ms,
                "≤ 3×", lambda v, r: r is not None and r <= 3)
        run.add(f"{name}: p99", h.p99_ms, "ms", "same SQL via pgbench: p99", q.p99_ms)


# --- memory and start-up ------------------------------------------------------------------------------------
# --- the pipeline's queue: claim + complete through the API vs the same SQL via pgbench ----------------
PIPELINE_WORKERS = 8


def _pipeline_account(run: Run) -> tuple[str, dict[str, Any], str]:
    """A pipeline account's token and claims, and a suite for its jobs (operator steps in SQL)."""
    fx = data.create_fixtures(run.proxy)
    with psycopg.connect(run.bs.superuser_dsn, autocommit=True) as conn:
        conn.execute("update app.users set account_role = 'tp_pipeline' where id = %s", [fx.user_id])
    token = data.login(run.proxy, fx.email)
    return token, data.claims_of(token), fx.user_id


def _enqueue(run: Run, user_id: str, suite_id: str, n: int) -> None:
    """n sessions (rows only) in the suite; the trigger gives each its job."""
    with psycopg.connect(run.bs.superuser_dsn, autocommit=True) as conn:
        conn.execute("insert into app.sessions (user_id, suite_id, size_bytes, sha256)"
                     " select %s, %s, 0, repeat('0', 64) from generate_series(1, %s)", [user_id, suite_id, n])
        conn.execute("analyze app.pipeline_jobs")  # what autovacuum does after a bulk, before the measurement


def _new_suite(run: Run, user_id: str) -> str:
    with psycopg.connect(run.bs.superuser_dsn, autocommit=True) as conn:
        slug = f"bench-queue-{uuid.uuid4().hex[:8]}"
        row = conn.execute("insert into app.suites (name, slug, created_by) values (%s, %s, %s) returning id",
                           [slug, slug, user_id]).fetchone()
    assert row is not None
    return str(row[0])


def _drain(run: Run, label: str, user_id: str, headers: dict[str, str], n: int,
           way: Callable[[httpx.Client, str, Callable[[], bool], threading.Event], None]) -> float:
    """jobs/s of PIPELINE_WORKERS threads working n fresh jobs of a new suite with `way`
    (it calls count() after each completed job; `finished` is set once all n are done)."""
    suite = _new_suite(run, user_id)
    _enqueue(run, user_id, suite, n)
    lock, done, finished = threading.Lock(), [0], threading.Event()

    def count() -> bool:
        with lock:
            done[0] += 1
            if done[0] >= n:
                finished.set()
            return finished.is_set()

    def work(_: int) -> None:
        with httpx.Client(base_url=run.proxy, headers=headers, timeout=60) as c:
            way(c, suite, count, finished)

    before = run.bs.cpu_by_component() | {"bench client": time.process_time()}
    started = time.monotonic()
    with ThreadPoolExecutor(PIPELINE_WORKERS) as pool:
        futures = [pool.submit(work, i) for i in range(PIPELINE_WORKERS)]
        finished.wait(timeout=900)
        seconds = time.monotonic() - started
        after = run.bs.cpu_by_component() | {"bench client": time.process_time()}
        for f in futures:
            f.result()
    if done[0] != n:
        raise BenchError(f"the workers finished {done[0]} of {n} jobs")
    used = {k: round((after[k] - before.get(k, 0.0)) * 1e6 / n) for k in after}
    run.meta.setdefault("cpu_us_per_request", {})[f"pipeline {label} (per job)"] = {k: v for k, v in used.items() if v}
    return n / seconds


def pipeline(run: Run) -> None:
    run.phase("pipeline queue: claim + complete via the API vs pgbench; long-poll wake-up")
    p = run.profile
    token, claims, user_id = _pipeline_account(run)
    headers = {"Authorization": f"Bearer {token}"}
    jobs_n = 600 if p.name == "quick" else 3000

    # Throughput, three ways, each 8 workers draining jobs_n jobs of a suite of their own:
    # raw calls (claim one, complete it: two requests per job), the client's worker loop
    # (complete leases the next job: one request per job), and the loop leasing 10 per claim.
    def per_job(c: httpx.Client, suite: str, count: Callable[[], bool], finished: threading.Event) -> None:
        while True:
            r = c.post("/pipeline/claim", json={"suite_id": suite})
            r.raise_for_status()
            leases = r.json()
            if not leases:
                return
            for lease in leases:
                c.post(f"/pipeline/jobs/{lease['id']}/complete",
                       json={"lease_token": lease["lease_token"]}).raise_for_status()
                count()

    def worker_loop(limit: int) -> Callable[[httpx.Client, str, Callable[[], bool], threading.Event], None]:
        def work(c: httpx.Client, suite: str, count: Callable[[], bool], finished: threading.Event) -> None:
            with Client(run.proxy, token=token) as tp:  # the loop ends once all are done (finished)
                for job in worker.jobs(tp, limit=limit, wait_s=0.5, suite_id=suite, stop=finished):
                    with job:
                        pass
                    if job.lease_lost.is_set():
                        raise BenchError(f"lost the lease of {job}")
                    count()
        return work

    # The same two transactions per job through pgbench (8 clients), as tp_pipeline with the
    # claims and the pre-request hook, on a suite with more jobs than it can take in its runs;
    # one run per round, interleaved with the API's (the machine's load moves).
    sql_suite = _new_suite(run, user_id)
    _enqueue(run, user_id, sql_suite, 40_000 if p.name == "quick" else 120_000)
    prologue = (f"select set_config('role', 'tp_pipeline', true), set_config('request.jwt.claims', "
                f"{sql_literal(json.dumps(claims))}, true);\nselect auth.check_request();")
    script = "\n".join([
        "begin;", prologue,
        f"select id as job_id, lease_token as token from app.pipeline_claim(1, 60, 5, {sql_literal(sql_suite)}) \\gset",
        "commit;", "begin;", prologue,
        "select state from app.pipeline_complete(:job_id::uuid, :token::uuid, null);",
        "commit;", ""])

    ways = [("per_job", per_job), ("worker_loop", worker_loop(1)), ("worker_loop_batch10", worker_loop(10))]
    rates: dict[str, list[float]] = {name: [] for name, _ in ways}
    sql_runs: list[LoadResult] = []
    for _ in range(p.rounds):
        for name, way in ways:
            rates[name].append(_drain(run, name, user_id, headers, jobs_n, way))
        sql_runs.append(pgbench(run.bs.authenticator(), script, clients=PIPELINE_WORKERS, jobs=2,
                                duration_s=p.duration_s, warmup_s=p.warmup_s))
    sql = median_result(sql_runs)
    run.meta["pipeline"] = {"api_jobs": jobs_n, "api_jobs_per_s": rates, "pgbench": [asdict(r) for r in sql_runs],
                            "ratio_per_round": {name: [round(v / r.rps, 3) for v, r in zip(vs, sql_runs, strict=True)]
                                                for name, vs in rates.items()}}
    base = "same SQL (claim, complete: two transactions per job) via pgbench as tp_pipeline, hook included, 8 clients"
    # The target (#15: claim + complete with 8 workers, >= 50% of pgbench) is the worker loop's:
    # the API's way to work the queue, one request per job. Raw calls take two requests per job
    # for pgbench's two transactions, each request costing about what a whole job costs pgbench
    # (CPU per job below): reported as the floor of the raw API, not held to the target.
    run.add("pipeline: raw calls, 8 workers through the proxy, claim one then complete it (2 requests per job)",
            statistics.median(rates["per_job"]), "jobs/s", base, sql.rps)
    run.add("pipeline: the client's worker loop (tp.jobs()), 8 workers, one job at a time, complete leasing the "
            "next (1 request per job)", statistics.median(rates["worker_loop"]), "jobs/s", base, sql.rps, "≥ 50%",
            lambda v, r: r is not None and r >= 0.5)
    run.add("pipeline: the client's worker loop, 8 workers, batched: 10 jobs per claim (each completed on its own)",
            statistics.median(rates["worker_loop_batch10"]), "jobs/s", base, sql.rps)

    # Wake-up: one worker long-polls; a session is committed; time until its job is claimed.
    wake_suite = _new_suite(run, user_id)
    rounds = 30 if p.name == "quick" else 100
    arrived: queue.Queue[float] = queue.Queue()
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=run.proxy, headers=headers, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/pipeline/claim", json={"suite_id": wake_suite, "wait_s": 30})
                r.raise_for_status()
                for lease in r.json():
                    arrived.put(time.monotonic())
                    c.post(f"/pipeline/jobs/{lease['id']}/complete",
                           json={"lease_token": lease["lease_token"]}).raise_for_status()

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    latencies: list[float] = []
    with psycopg.connect(run.bs.superuser_dsn, autocommit=True) as conn:
        for _ in range(rounds):
            time.sleep(0.1)  # the worker is back in its long-poll
            t0 = time.monotonic()
            conn.execute("insert into app.sessions (user_id, suite_id, size_bytes, sha256)"
                         " values (%s, %s, 0, repeat('0', 64))", [user_id, wake_suite])
            latencies.append((arrived.get(timeout=60) - t0) * 1000)
    stop.set()
    _enqueue(run, user_id, wake_suite, 1)  # ends the last long-poll
    poller.join(timeout=60)
    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    run.meta["pipeline"]["wake_ms"] = latencies
    run.add(f"pipeline: long-poll wake-up, commit to claimed ({rounds} jobs): p50", p50, "ms")
    run.add(f"pipeline: long-poll wake-up, commit to claimed ({rounds} jobs): p99", p99, "ms", target="< 100 ms",
            check=lambda v, r: v < 100)


def backups(run: Run, fx: data.Fixtures) -> None:
    """pgBackRest (issue 18): a full backup's throughput into S3, the time to restore it (files
    from S3, then recovery until promoted, into a scratch data directory on a spare port), and
    read req/s while a full backup runs beside the same reads without one, in the same run."""
    from tracepipe import backup
    from tracepipe.ports import port_is_free

    run.phase("backup: full into S3, restore, reads during a backup")
    st, p = run.bs.stack, run.profile
    with psycopg.connect(st.superuser_conninfo(), autocommit=True) as conn:
        row = conn.execute("select pg_database_size(current_database()), (select count(*) from app.examples)"
                           ).fetchone()
    assert row is not None
    db_bytes, examples = int(row[0]), int(row[1])
    backup.backup(st, "full")  # the scheduler's first is done (it waits for it); the cache is warm
    started = time.monotonic()
    made = backup.backup(st, "full")
    seconds = time.monotonic() - started
    run.meta["backup"] = {"examples": examples, "db_bytes": db_bytes, "backup": made, "seconds": round(seconds, 1)}
    run.add(f"full backup ({examples} example rows, {db_bytes / MIB:.0f} MiB database): cluster read",
            made["size_bytes"] / seconds / 1e6, "MB/s")
    run.add("full backup: written into S3 (lz4)", made["repo_bytes"] / seconds / 1e6, "MB/s")

    scratch = st.daemon_dir / "bench-restore"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o700)
    ids = st._pg_user_ids()
    if ids is not None:
        os.chown(scratch, *ids)
    port = next(q for q in range(st.s.pg_port + 1, st.s.pg_port + 200) if port_is_free(q))
    started = time.monotonic()
    try:
        backup.pgbackrest(st, "restore", f"--pg1-path={scratch}", "--type=immediate", "--target-action=promote",
                          "--archive-mode=off")
        files_s = time.monotonic() - started
        opts = (f"-p {port} -k {st.socket_dir} -c listen_addresses='' -c max_connections=200"
                " -c shared_preload_libraries=pgaudit,tp_guard"
                " -c archive_mode=off")
        st._as_pg_user([str(st.pg_bindir / "pg_ctl"), "-D", str(scratch), "-o", opts, "-w", "-t", "600",
                        "-l", str(scratch.parent / "bench-restore.log"), "start"], stdout=subprocess.DEVNULL)
        conninfo = f"host={st.socket_dir} port={port} user=postgres dbname={st.s.db_name}"
        while True:
            with psycopg.connect(conninfo, autocommit=True) as conn:
                row = conn.execute("select pg_is_in_recovery(), (select count(*) from app.examples)").fetchone()
            if row is not None and not row[0]:
                break
            time.sleep(0.2)
        total_s = time.monotonic() - started
        if int(row[1]) != examples:
            raise BenchError(f"restored {row[1]} example rows, backed up {examples}")
    finally:
        subprocess.run([str(st.pg_bindir / "pg_ctl"), "-D", str(scratch), "-m", "immediate", "stop"],
                       capture_output=True, user=ids[0] if ids else None, group=ids[1] if ids else None)
        shutil.rmtree(scratch, ignore_errors=True)
    run.add(f"restore of that backup from S3 ({db_bytes / MIB:.0f} MiB): files", files_s, "s")
    run.add("restore: files, then recovery until promoted", total_s, "s")

    token = data.login(run.proxy, fx.email)
    url, headers = f"{run.proxy}/suites/{fx.suite_ids[0]}", {"Authorization": f"Bearer {token}"}
    quiet = wrk(url, headers=headers, duration_s=p.duration_s, warmup_s=p.warmup_s)
    tracepipe = Path(sys.executable).parent / "tracepipe"
    proc = subprocess.Popen([str(tracepipe), "backup"], env=st.cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)  # the backup has begun copying
        busy = wrk(url, headers=headers, duration_s=min(p.duration_s, max(1.0, seconds - 2)), warmup_s=0)
        overlapped = proc.poll() is None  # the backup was still running when the reads ended
    finally:
        _, err = proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"tracepipe backup failed: {err}")
    run.meta["backup"]["reads"] = {"quiet": asdict(quiet), "during_backup": asdict(busy), "overlapped": overlapped}
    run.add("GET one suite by id via proxy during a full backup: req/s", busy.rps, "req/s",
            "same reads, no backup running", quiet.rps)


def memory(run: Run) -> None:
    run.phase("whole-stack memory")
    by_component = run.bs.pss_by_component()
    run.meta["pss_mib"] = {k: round(v / MIB, 1) for k, v in by_component.items()}
    run.add("whole local stack memory after the run (PSS summed over every component process)",
            sum(by_component.values()) / MIB, "MiB", None, None, "< 1536 MiB", lambda v, r: v < 1536)


def start_up(run: Run) -> None:
    run.phase("tracepipe up on an existing state dir")
    bs = run.bs
    if run.profile.cold_up and bs.owned:
        started = time.monotonic()
        bs.stack.down()
        run.meta["down_s"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        bs.cli("up")
        run.add("tracepipe up (make up) on a stopped, initialised state dir", time.monotonic() - started, "s",
                None, None, "< 10 s", lambda v, r: v < 10)
    started = time.monotonic()
    bs.cli("up")
    run.add("tracepipe up (make up) on the running stack (no-op)", time.monotonic() - started, "s", None, None,
            "< 10 s", lambda v, r: v < 10)


# --- output ---------------------------------------------------------------------------------------------------
def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "—"
    text = f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.2f}"
    return f"{text} {unit}".strip()


def markdown(figures: list[Figure], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        f"# Benchmarks ({meta['profile']}, {m['date']}, {m['git_commit']})",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, Linux {m['kernel']}; "
        f"load average at start {meta['loadavg_start']}, at end {meta['loadavg_end']} "
        f"(other work on the machine adds noise); run took {meta['seconds']} s. "
        "Each figure is the median of interleaved rounds; the baseline is measured in the same run.",
        "",
        "| figure | value | baseline | baseline value | ratio | target | met |",
        "| --- | ---: | --- | ---: | ---: | --- | --- |",
    ]
    for f in figures:
        ratio = "—" if f.ratio is None else f"{f.ratio:.2f}×"
        met = {True: "yes", False: "**no**", None: "—"}[f.met]
        unit = f.unit
        lines.append(f"| {f.name} | {_fmt(f.value, unit)} | {f.baseline or '—'} | "
                     f"{_fmt(f.baseline_value, unit)} | {ratio} | {f.target} | {met} |")
    cpu = meta.get("cpu_us_per_request")
    if cpu:
        lines += ["", "CPU time per request by component (µs, last round; wrk's own CPU not counted):", ""]
        lines += [f"- {label}: " + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]))
                  + f" (total {sum(used.values()):,.0f})" for label, used in cpu.items()]
    pss = meta.get("pss_mib")
    if pss:
        lines += ["", "PSS by component (MiB): " + ", ".join(f"{k} {v}" for k, v in pss.items())]
    return "\n".join(lines) + "\n"


def write_results(figures: list[Figure], meta: dict[str, Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(figures, meta)
    for name, text in (("latest.json", json.dumps([asdict(f) for f in figures], indent=2, ensure_ascii=False)),
                       ("latest.md", md), ("latest.meta.json", json.dumps(meta, indent=2, ensure_ascii=False))):
        tmp = out / f"{name}.tmp"
        tmp.write_text(text + ("" if text.endswith("\n") else "\n"))
        tmp.replace(out / name)
    return md


def _pipeline_phase(run: Run, fx: data.Fixtures) -> None:
    pipeline(run)


def _backup_phase(run: Run, fx: data.Fixtures) -> None:
    seed(run)
    backups(run, fx)


ONLY: dict[str, Callable[[Run, data.Fixtures], None]] = {
    "queue": _pipeline_phase,  # the pipeline's queue: throughput and wake-up
    "pipeline": _pipeline_phase,
    "tus": upload,  # uploads: POST /sessions, tus and boto3 in the same rounds
    "upload": upload,
    "stream": stream,
    "reads": reads,  # a suite by id and a page of actions: proxy vs bare PostgREST vs pgbench
    "backup": _backup_phase,  # seeds the profile's rows first
    # scaleout: the read replica and PgBouncer (bench/scaleout.py), on throwaway stacks of its own
    "scaleout": lambda run, fx: None,
}


def _phases(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ONLY]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown phase {', '.join(unknown) or text!r}: choose from {', '.join(ONLY)}")
    out: list[str] = []
    for n in names:  # in the order given, aliases once
        if all(ONLY[m] is not ONLY[n] for m in out):
            out.append(n)
    return out


class _Done(Exception):
    """The phases asked for (--only) are measured."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~2-minute subset (short runs, 64 MiB files)")
    parser.add_argument("--running", action="store_true",
                        help="benchmark the running stack of the TP_* environment instead of a throwaway one")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where latest.{json,md,meta.json} go")
    parser.add_argument("--only", type=_phases, default=None, metavar="PHASE[,PHASE]",
                        help=f"run only these phases, comma-separated ({', '.join(ONLY)}; development)")
    parser.add_argument("--scale", type=int, default=2, help="--only scaleout: instances of PostgREST and ext")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    if shutil.which("wrk") is None:
        print("bench: wrk is missing (apt-get install wrk; scripts/bootstrap.sh does)", file=sys.stderr)
        return 2
    meta: dict[str, Any] = {"profile": profile.name, "machine": machine(), "loadavg_start": _loadavg()}
    if args.only and "scaleout" in args.only:
        from bench.scaleout import scaleout

        run = Run(profile, None, Path(tempfile.gettempdir()), meta=meta)  # type: ignore[arg-type]
        scaleout(run, args.scale)
        run.phase("done")
        meta["loadavg_end"] = _loadavg()
        meta["seconds"] = round(time.monotonic() - START, 1)
        md = write_results(run.figures, meta, args.out)
        print(md)
        return 0
    opener = BenchStack.running if args.running else BenchStack.throwaway
    work = Path(tempfile.mkdtemp(prefix="tp-bench-work-"))
    try:
        with opener() as bs:
            run = Run(profile, bs, work, meta=meta)
            meta["stack"] = {"owned": bs.owned, "state_dir": str(bs.stack.state),
                             "started_s": round(time.monotonic() - START, 1)}
            fx = data.create_fixtures(run.proxy)
            if args.only:
                for name in args.only:
                    ONLY[name](run, fx)
                raise _Done
            seed(run)
            reads(run, fx)
            auth_token(run, fx)
            upload(run, fx)
            stream(run, fx)
            listing(run, fx)
            pipeline(run)
            backups(run, fx)
            memory(run)
            start_up(run)
            run.phase("done")
    except _Done:
        run.phase("done")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta["loadavg_end"] = _loadavg()
    meta["seconds"] = round(time.monotonic() - START, 1)
    md = write_results(run.figures, meta, args.out)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
