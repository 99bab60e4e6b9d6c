"""`python -m bench.run --only scaleout` (issue 17): the read replica and the pooler, each
beside what it replaces, in one run on throwaway stacks of its own.

1. Reads (GET one suite by id through the proxy, 32 connections) on a stack with a
   replica: 1 PostgREST on the primary (TP-Read-Primary: 1), the replica's PostgREST pool
   alone, and both at once (two wrk processes side by side; req/s summed).
2. At SCALE=N: PostgREST reads plus ext's key exchange under load, without and with
   PgBouncer: the primary's authenticator server connections (peak, sampled every 50 ms)
   and the req/s each got. The pooled stack also runs without server-side prepared
   statements (PgBouncer 1.18 cannot carry them), so its req/s includes that cost.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg

from bench import data
from bench.load import LoadResult, median_result, wrk
from tracepipe.stack import Stack, throwaway_stack


@contextmanager
def throwaway(scale: int = 1, **fields: Any) -> Iterator[Stack]:
    # the load exchanges keys; one wrk caller reads at thousands of requests/s
    settings: dict[str, Any] = {"scale": scale, "auth_rate": "100000r/s", "auth_burst": 100000,
                                "fair_use_rate": 1_000_000, "fair_use_burst": 1_000_000, **fields}
    with throwaway_stack("tp-bench-scaleout-", **settings) as st:
        yield st


def _authenticator_connections(st: Stack) -> int:
    with psycopg.connect(st.superuser_conninfo(), autocommit=True) as conn:
        row = conn.execute("select count(*) from pg_stat_activity where usename = 'authenticator'"
                           " and backend_type = 'client backend'").fetchone()
    return int(row[0]) if row else 0


def _with_an_analyst_query(st: Stack, measure: Callable[[], LoadResult]) -> LoadResult:
    """measure() while an analyst (its real login, on the replica) runs a CPU-bound query
    that its statement_timeout ends; on one machine the two still share its cores."""
    from tracepipe import analysts

    name = "bench_" + uuid.uuid4().hex[:8]
    url = analysts.create(st.s, name, None)
    started = threading.Event()

    def query() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            started.set()
            with contextlib.suppress(psycopg.Error):  # its timeout, or the revoke ending it
                conn.execute("select count(*) from generate_series(1, 2000000000)")

    worker = threading.Thread(target=query)
    worker.start()
    try:
        started.wait(30)
        return measure()
    finally:
        analysts.revoke(st.s, name)
        worker.join()


def reads(run: Any) -> None:
    p = run.profile
    run.phase("scaleout: reads on primary, replica, both")
    with throwaway(replica=True) as st:
        fx = data.create_fixtures(st.s.proxy_url)
        token = data.login(st.s.proxy_url, fx.email)
        url = f"{st.s.proxy_url}/suites/{fx.suite_ids[0]}"
        auth = {"Authorization": f"Bearer {token}"}
        primary_h = {**auth, "TP-Read-Primary": "1"}
        for headers in (auth, primary_h):
            r = httpx.get(url, headers=headers, timeout=30)
            r.raise_for_status()
        one, ro, both = [], [], []
        for _ in range(p.rounds):
            one.append(wrk(url, headers=primary_h, duration_s=p.duration_s, warmup_s=p.warmup_s))
            ro.append(wrk(url, headers=auth, duration_s=p.duration_s, warmup_s=p.warmup_s))
            with ThreadPoolExecutor(2) as pool:
                pair = list(pool.map(lambda h: wrk(url, headers=h, connections=16, duration_s=p.duration_s,
                                                   warmup_s=p.warmup_s), (primary_h, auth)))
            both.append(LoadResult(rps=sum(x.rps for x in pair), p50_ms=max(x.p50_ms for x in pair),
                                   p90_ms=max(x.p90_ms for x in pair), p99_ms=max(x.p99_ms for x in pair),
                                   requests=sum(x.requests for x in pair), errors=sum(x.errors for x in pair)))
        m_one, m_ro, m_both = median_result(one), median_result(ro), median_result(both)
        busy = _with_an_analyst_query(st, lambda: wrk(url, headers=primary_h, duration_s=p.duration_s,
                                                      warmup_s=p.warmup_s))
        base = "1 PostgREST on the primary (TP-Read-Primary: 1), 32 conns"
        run.add("GET one suite: the replica's PostgREST pool, 32 conns: req/s", m_ro.rps, "req/s", base, m_one.rps)
        run.add("GET one suite: primary + replica PostgREST side by side, 16 + 16 conns: req/s", m_both.rps,
                "req/s", base, m_one.rps)
        run.add("GET one suite on the primary while an analyst's query runs on the replica: p99", busy.p99_ms,
                "ms", f"{base}: p99", m_one.p99_ms)
        run.add("GET one suite: primary + replica side by side: p99", m_both.p99_ms, "ms", f"{base}: p99",
                m_one.p99_ms)


def _under_load(run: Any, scale: int, pooled: bool) -> tuple[int, float, float]:
    """(peak authenticator connections, read req/s, key-exchange req/s) on a fresh stack."""
    p = run.profile
    run.phase(f"scaleout: server connections at SCALE={scale}, pooler {'on' if pooled else 'off'}")
    with throwaway(scale=scale, pooler=pooled) as st:
        fx = data.create_fixtures(st.s.proxy_url)
        token = data.login(st.s.proxy_url, fx.email)
        read_url = f"{st.s.proxy_url}/suites/{fx.suite_ids[0]}"
        stop, peak = threading.Event(), [0]

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _authenticator_connections(st))
                stop.wait(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            with ThreadPoolExecutor(2) as pool:
                reads_f = pool.submit(wrk, read_url, headers={"Authorization": f"Bearer {token}"},
                                      connections=48, duration_s=p.duration_s, warmup_s=p.warmup_s)
                token_f = pool.submit(wrk, f"{st.s.proxy_url}/auth/token", method="POST",
                                      headers={"Authorization": f"ApiKey {fx.api_key}"}, connections=16,
                                      duration_s=p.duration_s, warmup_s=p.warmup_s)
                read_r, token_r = reads_f.result(), token_f.result()
        finally:
            stop.set()
            sampler.join()
        run.meta.setdefault("scaleout", {})[f"pooler_{'on' if pooled else 'off'}"] = {
            "peak_authenticator_connections": peak[0], "read_rps": read_r.rps, "token_rps": token_r.rps,
            "pool_size": st.s.pooler_pool_size, "identity_pool_size": st.s.pooler_identity_pool_size,
            "scale": scale}
    return peak[0], read_r.rps, token_r.rps


def connections(run: Any, scale: int) -> None:
    results = {pooled: _under_load(run, scale, pooled) for pooled in (False, True)}
    off, on = results[False], results[True]
    label = f"SCALE={scale}, 48 conns of reads + 16 of key exchanges"
    run.add(f"{label}, PgBouncer: peak authenticator server connections on the primary", on[0], "connections",
            "without PgBouncer", off[0])
    run.add(f"{label}, PgBouncer (no prepared statements): read req/s", on[1], "req/s", "without PgBouncer",
            off[1])
    run.add(f"{label}, PgBouncer: key exchange req/s", on[2], "req/s", "without PgBouncer", off[2])


def scaleout(run: Any, scale: int = 2) -> None:
    reads(run)
    connections(run, scale)
