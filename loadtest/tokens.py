"""`python -m loadtest.tokens`: PostgREST's memory over many distinct access tokens.

A throwaway stack (free ports, removed afterwards); one account signs up; then `--tokens`
distinct access tokens are minted with the stack's own ES256 signing key, with the claims
ext's login issues (sub, role, sid of that login; each with its own jti and iat), and each
is used once on GET /suites through the proxy. PostgREST's RSS (every instance, summed) is
sampled as it goes. Prints RSS at the start, the peak and the end, the growth per 1,000
tokens and the count of failed requests (anything but 200); exit code 1 if any failed.

    python -m loadtest.tokens                      # 100,000 tokens, the stack's settings
    python -m loadtest.tokens --tokens 20000 --jwt-cache-s 3600   # PostgREST 12.0.2's cache on

Every token has the same subject, so the per-caller rate limit (fair_use_rate) is lifted
on this stack: the soak is about PostgREST's memory, not about the limiter.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization

from tracepipe import credentials
from tracepipe.procs import process_tree, rss_bytes
from tracepipe.stack import Stack, throwaway_stack

MIB = 1024 * 1024
PASSWORD = "token soak password, long enough"


def postgrest_rss(stack: Stack) -> float:
    """RSS (MiB) of every PostgREST instance, summed."""
    total = 0
    for name in stack.process_names():
        if name.split("-", 1)[0] == "postgrest" and (pid := stack.pid_of(name)) is not None:
            total += sum(rss_bytes(p) for p in process_tree(pid))
    return total / MIB


class Minter:
    """Access tokens as ext's login signs them (ext/tokens.py: Keys.sign), one per call."""

    def __init__(self, stack: Stack, claims: dict[str, Any]) -> None:
        keys = credentials.jwt_dir(stack.state)
        pem = sorted(keys.glob("*.pem"))[-1]  # the key ext signs with (Keys.signing_kid)
        self.kid = pem.stem
        self.key = serialization.load_pem_private_key(pem.read_bytes(), password=None)
        self.claims = {k: claims[k] for k in ("sub", "role", "sid", "iss", "aud")}
        self.ttl = int(claims["exp"]) - int(claims["iat"])

    def __call__(self) -> str:
        now = int(time.time())
        payload = {**self.claims, "iat": now, "nbf": now - 1, "exp": now + self.ttl, "jti": secrets.token_hex(12)}
        return jwt.encode(payload, self.key, algorithm="ES256", headers={"kid": self.kid})  # type: ignore[arg-type]


@dataclass
class Soak:
    tokens: int
    seconds: float = 0.0
    failed: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    samples: list[tuple[int, float]] = field(default_factory=list)  # (tokens used, PostgREST RSS MiB)

    @property
    def start(self) -> float:
        return self.samples[0][1]

    @property
    def peak(self) -> float:
        return max(rss for _, rss in self.samples)

    @property
    def end(self) -> float:
        return self.samples[-1][1]

    @property
    def growth_per_1000(self) -> float:
        """MiB per 1,000 tokens from the start to the peak."""
        return (self.peak - self.start) / max(1, self.tokens) * 1000

    def report(self) -> str:
        return (f"{self.tokens} distinct tokens, each once on GET /suites, in {self.seconds:.0f} s "
                f"({self.tokens / max(self.seconds, 1e-9):.0f}/s): failed requests {self.failed} {self.statuses}\n"
                f"PostgREST RSS MiB: start {self.start:.1f}, peak {self.peak:.1f}, end {self.end:.1f}; "
                f"growth {self.growth_per_1000:.2f} MiB per 1,000 tokens")


async def soak(stack: Stack, tokens: int, concurrency: int = 16, sample_every: int = 1000, accounts: int = 1,
               warmup: int = 200) -> Soak:
    """Signs `accounts` accounts up, then uses `tokens` distinct tokens of their logins once
    each (round robin); `warmup` more requests first, before the start sample (PostgREST's
    pool connections and heap settle)."""
    base = stack.s.proxy_url
    minters = []
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        for _ in range(accounts):
            r = await c.post("/auth/signup", json={"email": f"tokens-{uuid.uuid4().hex[:10]}@example.test",
                                                   "password": PASSWORD})
            r.raise_for_status()
            minters.append(Minter(stack, jwt.decode(r.json()["access_token"], options={"verify_signature": False})))
        warm = {"Authorization": f"Bearer {minters[0]()}"}  # one token: no cache entry per request
        for _ in range(warmup):
            (await c.get("/suites", params={"select": "id", "limit": "1"}, headers=warm)).raise_for_status()
    result = Soak(tokens)
    result.samples.append((0, postgrest_rss(stack)))
    counter = iter(range(tokens))
    statuses: dict[int, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.monotonic()

    async def worker(client: httpx.AsyncClient) -> None:
        for n in counter:
            try:
                token = minters[n % accounts]()
                r = await client.get("/suites", params={"select": "id", "limit": "1"},
                                     headers={"Authorization": f"Bearer {token}"})
                status = r.status_code
            except httpx.HTTPError:
                status = 0
            statuses[status] = statuses.get(status, 0) + 1
            if (n + 1) % sample_every == 0:
                result.samples.append((n + 1, postgrest_rss(stack)))

    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    result.seconds = time.monotonic() - started
    await asyncio.sleep(1.0)
    result.samples.append((tokens, postgrest_rss(stack)))
    result.statuses = dict(sorted(statuses.items()))
    result.failed = sum(n for status, n in statuses.items() if status != 200)
    return result


def restart_postgrest(stack: Stack, jwt_cache_s: int) -> None:
    """Every PostgREST instance again, with this jwt-cache-max-lifetime."""
    stack.s = stack.s.model_copy(update={"pgrst_jwt_cache_s": jwt_cache_s})
    for name in stack.process_names():
        if name.split("-", 1)[0] == "postgrest":
            stack.stop_component(name)
            stack.start_component(name)


def cost(stack: Stack, rounds: int = 3, seconds: float = 10) -> dict[int, Any]:
    """Requests/s and p99 of GET /suites with one token (wrk, bench/load.py), PostgREST's JWT
    cache on (every request a hit: its best case) and off, interleaved rounds, medians."""
    from bench.load import median_result, wrk

    r = httpx.post(f"{stack.s.proxy_url}/auth/signup", json={
        "email": f"tokens-{uuid.uuid4().hex[:10]}@example.test", "password": PASSWORD}, timeout=60)
    r.raise_for_status()
    headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
    url = f"{stack.s.proxy_url}/suites?select=id&limit=1"
    original = stack.s.pgrst_jwt_cache_s
    runs: dict[int, list[Any]] = {3600: [], 0: []}
    try:
        for _ in range(rounds):
            for value in runs:
                restart_postgrest(stack, value)
                runs[value].append(wrk(url, headers=headers, connections=16, duration_s=seconds))
    finally:
        restart_postgrest(stack, original)
    return {value: median_result(results) for value, results in runs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.tokens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000, help="distinct tokens (default 100,000)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--jwt-cache-s", type=int, default=None,
                        help="PostgREST's jwt-cache-max-lifetime on this stack (default: the setting, "
                             "pgrst_jwt_cache_s)")
    parser.add_argument("--cost", action="store_true", help="instead: requests/s and p99 of one token's GET "
                        "/suites with the JWT cache on (3600) and off (0), wrk, interleaved rounds on one stack")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"fair_use_rate": 1_000_000, "fair_use_burst": 1_000_000}
    if args.jwt_cache_s is not None:
        overrides["pgrst_jwt_cache_s"] = args.jwt_cache_s
    with throwaway_stack("tp-tokens-", **overrides) as stack:
        if args.cost:
            for value, figures in cost(stack).items():
                print(f"jwt-cache-max-lifetime {value:>4}: {figures.rps:.0f} req/s, p50 {figures.p50_ms:.1f} ms, "
                      f"p99 {figures.p99_ms:.1f} ms")
            return 0
        print(f"PostgREST jwt-cache-max-lifetime = {stack.s.pgrst_jwt_cache_s}", flush=True)
        result = asyncio.run(soak(stack, args.tokens, args.concurrency))
    print(result.report())
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
