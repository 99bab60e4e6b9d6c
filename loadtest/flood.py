"""The load test with a flooding API key (`python -m loadtest.run --flood`, `make soak FLOOD=1`).

Two runs of the same load (loadtest/load.py) on one stack: unloaded, then with one more
client, an API key's token, sending GET /suites back to back on `connections` connections
for the whole run. The proxy's fair use per caller (fair_use_rate, fair_use_burst) should
refuse most of the flood with 429 while the other users' latency stays close to the
unloaded run's: the report gives both p99s (over every request of the other users, and per
endpoint), their ratio, and what the flooder got.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtest.load import PASSWORD, Result, _rank, run_load

P99_RATIO_LIMIT = 1.5  # what issue 13 asks of the other users' p99 under a flood


@dataclass
class Flooder:
    statuses: Counter[int] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())


async def flooding_token(base_url: str) -> str:
    """An account of its own, an API key, the key's access token (POST /auth/token)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as c:
        r = await c.post("/auth/signup", json={"email": f"flood-{uuid.uuid4().hex[:10]}@example.test",
                                               "password": PASSWORD})
        r.raise_for_status()
        auth = {"Authorization": f"Bearer {r.json()['access_token']}"}
        r = await c.post("/api-keys", json={"name": "flood", "access": "read"}, headers=auth)
        r.raise_for_status()
        r = await c.post("/auth/token", headers={"Authorization": f"ApiKey {r.json()['key']}"})
        r.raise_for_status()
        return str(r.json()["access_token"])


async def flood(base_url: str, token: str, stop: asyncio.Event, connections: int, out: Flooder) -> None:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits,
                                 headers={"Authorization": f"Bearer {token}"}) as c:
        async def one() -> None:
            while not stop.is_set():
                try:
                    r = await c.get("/suites", params={"select": "id"})
                    out.statuses[r.status_code] += 1
                except httpx.HTTPError:
                    out.statuses[0] += 1
        await asyncio.gather(*(one() for _ in range(connections)))
    out.seconds = time.monotonic() - started


def p99_ms(result: Result) -> float:
    return _rank(sorted(v for values in result.stats.latencies.values() for v in values), 0.99) * 1000


async def run_flood(base_url: str, *, connections: int = 8, **load: Any) -> tuple[Result, Result, Flooder]:
    """The load unloaded, then the same load beside a flooding key."""
    unloaded = await run_load(base_url, **load)
    token = await flooding_token(base_url)
    stop, flooder = asyncio.Event(), Flooder()
    task = asyncio.create_task(flood(base_url, token, stop, connections, flooder))
    try:
        flooded = await run_load(base_url, **load)
    finally:
        stop.set()
        await task
    return unloaded, flooded, flooder


def report(unloaded: Result, flooded: Result, flooder: Flooder) -> str:
    a, b = p99_ms(unloaded), p99_ms(flooded)
    ratio = b / a if a else float("inf")
    ok = flooder.statuses[200] / max(flooder.seconds, 1e-9)
    lines = [
        f"flooding key: {flooder.requests} requests in {flooder.seconds:.0f} s "
        f"({flooder.requests / max(flooder.seconds, 1e-9):.0f}/s), statuses {dict(sorted(flooder.statuses.items()))}; "
        f"served {ok:.0f}/s, refused 429: {flooder.statuses[429]}",
        f"other users' p99 over every request: unloaded {a:.1f} ms, beside the flood {b:.1f} ms: "
        f"{ratio:.2f}x ({'within' if ratio <= P99_RATIO_LIMIT else 'ABOVE'} {P99_RATIO_LIMIT}x)",
        f"other users' requests: unloaded {unloaded.requests} ({unloaded.requests / unloaded.seconds:.0f}/s), "
        f"beside the flood {flooded.requests} ({flooded.requests / flooded.seconds:.0f}/s); 429 of theirs "
        f"{flooded.summary()['throttled_429']}",
        "", f"{'endpoint':<34} {'p99 unloaded':>13} {'p99 flooded':>12}"]
    pa, pb = unloaded.stats.percentiles(), flooded.stats.percentiles()
    for endpoint in sorted(set(pa) | set(pb)):
        lines.append(f"{endpoint:<34} {pa.get(endpoint, {}).get('p99_ms', 0):>13.1f} "
                     f"{pb.get(endpoint, {}).get('p99_ms', 0):>12.1f}")
    return "\n".join(lines)


def failed(unloaded: Result, flooded: Result, flooder: Flooder) -> bool:
    """Failures of the run (the ratio is reported, not judged: a shared machine's timing)."""
    bad = [r.stats.server_errors or r.stats.transport_errors or r.lost or r.stats.unexpected
           for r in (unloaded, flooded)]
    return any(bad) or flooder.statuses[429] == 0
