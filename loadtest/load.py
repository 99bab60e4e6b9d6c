"""The load generator: accounts set up through the API, then `users` concurrent virtual
users, each in a loop of weighted operations for `seconds`, then a verification of every
acknowledged write. Latency is measured per endpoint (path templates, not ids).

Writes are checked, not trusted: each created action's last acknowledged state, each
uploaded bundle and each registered example are read back through the API afterwards
(rows compared field by field, objects by sha256 of what was sent). A write whose answer
was lost (a transport error) may or may not have happened; for an action update either
outcome is accepted, nothing else is.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tracepipe import bundles

PASSWORD = "load test password, long enough"
TUS = {"Tus-Resumable": "1.0.0"}
TUS_ATTEMPTS = 120  # PATCH/HEAD rounds a resumable upload tries (0.5 s apart) before it terminates itself


@dataclass
class Failure:
    endpoint: str
    status: int  # 0: no answer (transport error)
    detail: str
    started: float = 0.0  # monotonic: when the request was sent and when it ended (loadtest/faults.py
    ended: float = 0.0  # places each failure inside or outside a fault's window)


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    server_errors: list[Failure] = field(default_factory=list)
    transport_errors: list[Failure] = field(default_factory=list)
    unexpected: list[Failure] = field(default_factory=list)  # 4xx the mix never provokes (429 aside)

    def record(self, endpoint: str, started: float, response: httpx.Response | None, error: str = "",
               expected: tuple[int, ...] = ()) -> None:
        """`expected`: 4xx statuses the caller handles (tus's 409: resume from the server's offset)."""
        ended = time.monotonic()
        self.latencies[endpoint].append(ended - started)
        status = response.status_code if response is not None else 0
        self.statuses[endpoint][status] += 1
        if response is None:
            self.transport_errors.append(Failure(endpoint, 0, error, started, ended))
        elif status >= 500:
            self.server_errors.append(Failure(endpoint, status, _describe(response), started, ended))
        elif status >= 400 and status != 429 and status not in expected:
            self.unexpected.append(Failure(endpoint, status, _describe(response), started, ended))

    def percentiles(self) -> dict[str, dict[str, float]]:
        out = {}
        for endpoint, values in sorted(self.latencies.items()):
            ordered = sorted(values)
            out[endpoint] = {"count": len(ordered), "p50_ms": _rank(ordered, 0.50) * 1000,
                             "p99_ms": _rank(ordered, 0.99) * 1000, "max_ms": ordered[-1] * 1000}
        return out


def _rank(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    return ordered[max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.999999) - 1))]


def _describe(r: httpx.Response) -> str:
    return f"{r.request.method} {r.request.url.path} -> {r.status_code} {r.text[:200]!r} " \
           f"(request id {r.headers.get('x-request-id')})"


@dataclass
class Account:
    email: str
    token: str
    api_key: str
    suite_id: str
    action_ids: list[str]
    example_ids: list[str]
    logged_in_at: float = field(default_factory=time.monotonic)


@dataclass
class Ledger:
    """What the server acknowledged, to be found again afterwards."""
    actions: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> {owner, name, descriptions}
    sessions: dict[str, tuple[int, str, str]] = field(default_factory=dict)  # id -> (account, sha256, size)
    examples: dict[str, tuple[int, str]] = field(default_factory=dict)  # id -> (account, sha256)
    tus: set[str] = field(default_factory=set)  # the sessions (above) that came through /uploads


class TokenBucket:
    """Token exchanges share nginx's per-IP auth rate with logins: the generator keeps them
    below it (every virtual user comes from one IP here), so the figures are about the
    stack, not about the rate limiter doing its job."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def jsonl(n: int, tag: str) -> bytes:
    return b"".join(json.dumps({"messages": [{"role": "user", "content": f"{tag} question {i}"},
                                             {"role": "assistant", "content": f"answer {i}"}]}).encode() + b"\n"
                    for i in range(n))


async def setup(base_url: str, accounts: int) -> list[Account]:
    """Accounts, each with a suite, a few actions, an example and a write API key."""
    out = []
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as c:
        for i in range(accounts):
            email = f"load-{uuid.uuid4().hex[:10]}@example.test"
            r = await c.post("/auth/signup", json={"email": email, "password": PASSWORD})
            r.raise_for_status()
            auth = {"Authorization": f"Bearer {r.json()['access_token']}"}
            slug = f"load-{uuid.uuid4().hex[:10]}"
            r = await c.post("/suites", json={"name": f"Load {i}", "slug": slug}, headers={
                **auth, "Prefer": "return=representation", "Accept": "application/vnd.pgrst.object+json"})
            r.raise_for_status()
            suite_id = r.json()["id"]
            actions = []
            for n in range(5):
                r = await c.post(f"/suites/{suite_id}/actions", json={"name": f"seed-{n}"},
                                 headers={**auth, "Prefer": "return=representation"})
                r.raise_for_status()
                actions.append(r.json()[0]["id"])
            r = await c.post("/examples", params={"suite_id": suite_id, "model": "load"}, content=jsonl(50, "seed"),
                             headers={**auth, "Content-Type": "application/jsonl"})
            r.raise_for_status()
            example = r.json()["id"]
            r = await c.post("/api-keys", json={"name": "load", "access": "write"}, headers=auth)
            r.raise_for_status()
            out.append(Account(email, auth["Authorization"].removeprefix("Bearer "), r.json()["key"], suite_id,
                               actions, [example]))
    return out


class User:
    """One virtual user: an account's credentials and its own connection."""

    def __init__(self, n: int, account_no: int, account: Account, client: httpx.AsyncClient, stats: Stats,
                 ledger: Ledger, exchanges: TokenBucket, rng: random.Random) -> None:
        self.n, self.account_no, self.account = n, account_no, account
        self.c, self.stats, self.ledger, self.exchanges, self.rng = client, stats, ledger, exchanges, rng
        self.mine: list[str] = []  # actions this user created (only it updates them)
        self.counter = 0

    async def call(self, endpoint: str, method: str, path: str, expected: tuple[int, ...] = (),
                   **kwargs: Any) -> httpx.Response | None:
        headers = {"Authorization": f"Bearer {self.account.token}", **kwargs.pop("headers", {})}
        started = time.monotonic()
        try:
            r = await self.c.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as e:
            self.stats.record(endpoint, started, None, f"{method} {path}: {type(e).__name__}: {e}")
            return None
        self.stats.record(endpoint, started, r, expected=expected)
        return r

    # --- the mix ------------------------------------------------------------------------------
    async def list_suites(self) -> None:
        await self.call("GET /suites", "GET", "/suites", params={"select": "id,name,slug", "limit": "20"})

    async def get_suite(self) -> None:
        await self.call("GET /suites/{id}", "GET", f"/suites/{self.account.suite_id}")

    async def list_actions(self) -> None:
        await self.call("GET /suites/{id}/actions", "GET", f"/suites/{self.account.suite_id}/actions",
                        params={"limit": "20", "order": "created_at.desc"})

    async def me(self) -> None:
        await self.call("GET /users/me", "GET", "/users/me")

    async def create_action(self) -> None:
        self.counter += 1
        name = f"u{self.n}-{self.counter}-{uuid.uuid4().hex[:6]}"
        description = f"created by user {self.n}"
        r = await self.call("POST /suites/{id}/actions", "POST", f"/suites/{self.account.suite_id}/actions",
                            json={"name": name, "description": description,
                                  "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}},
                            headers={"Prefer": "return=representation"})
        if r is not None and r.status_code == 201:
            action_id = r.json()[0]["id"]
            self.mine.append(action_id)
            self.ledger.actions[action_id] = {"account": self.account_no, "name": name, "acked": description,
                                              "maybe": []}

    async def update_action(self) -> None:
        if not self.mine:
            return await self.create_action()
        action_id = self.rng.choice(self.mine)
        self.counter += 1
        description = f"updated by user {self.n}, #{self.counter}"
        r = await self.call("PATCH /suites/{id}/actions/{id}", "PATCH",
                            f"/suites/{self.account.suite_id}/actions/{action_id}", json={"description": description})
        entry = self.ledger.actions[action_id]
        if r is not None and r.status_code == 200 and r.json().get("description") == description:
            entry["acked"], entry["maybe"] = description, []
        elif r is None or r.status_code in (502, 504):
            entry["maybe"].append(description)  # unknown whether it happened (the answer was lost)
        return None

    async def exchange_key(self) -> None:
        if not self.exchanges.take():
            return await self.list_actions()
        started = time.monotonic()
        try:
            r = await self.c.post("/auth/token", headers={"Authorization": f"ApiKey {self.account.api_key}"})
        except httpx.HTTPError as e:
            self.stats.record("POST /auth/token", started, None, f"{type(e).__name__}: {e}")
            return None
        self.stats.record("POST /auth/token", started, r)
        if r.status_code == 200:  # the key's token works at once
            key_token = r.json()["access_token"]
            started = time.monotonic()
            try:
                check = await self.c.get(f"/suites/{self.account.suite_id}",
                                         headers={"Authorization": f"Bearer {key_token}"})
                self.stats.record("GET /suites/{id} (key token)", started, check)
            except httpx.HTTPError as e:
                self.stats.record("GET /suites/{id} (key token)", started, None, str(e))
        return None

    async def upload(self) -> None:
        self.counter += 1
        body = bundles.bundle(manifest_data=bundles.manifest(metadata={"user": self.n, "n": self.counter}),
                              n_events=50 + self.rng.randrange(100), har_entries=3, screenshots=1)
        r = await self.call("POST /sessions", "POST", "/sessions", content=body,
                            headers={"Content-Type": "application/zip", "Idempotency-Key": uuid.uuid4().hex})
        if r is not None and r.status_code == 201:
            self.ledger.sessions[r.json()["id"]] = (self.account_no, hashlib.sha256(body).hexdigest(), str(len(body)))

    async def register_and_stream(self) -> None:
        self.counter += 1
        lines = jsonl(5 + self.rng.randrange(40), f"u{self.n}-{self.counter}")
        r = await self.call("POST /examples", "POST", "/examples", content=lines,
                            params={"suite_id": self.account.suite_id, "model": f"load-{self.n % 4}"},
                            headers={"Content-Type": "application/jsonl"})
        if r is None or r.status_code != 201:
            return
        example_id = r.json()["id"]
        self.ledger.examples[example_id] = (self.account_no, hashlib.sha256(lines).hexdigest())
        self.account.example_ids.append(example_id)
        await self.stream(example_id, hashlib.sha256(lines).hexdigest())

    async def stream(self, example_id: str | None = None, expected: str | None = None) -> None:
        example_id = example_id or self.rng.choice(self.account.example_ids)
        r = await self.call("GET /examples/{id}/messages", "GET", f"/examples/{example_id}/messages")
        if r is not None and r.status_code == 200 and expected and hashlib.sha256(r.content).hexdigest() != expected:
            self.stats.unexpected.append(Failure("GET /examples/{id}/messages", 200,
                                                 f"{example_id}: streamed bytes differ from what was registered"))

    async def tus_upload(self) -> None:
        """A resumable upload (tus, /uploads) in two PATCHes; any failure is resumed from the
        offset the server reports (HEAD), as a tus client does, until the session commits.
        One that cannot finish within TUS_ATTEMPTS rounds is terminated (DELETE)."""
        self.counter += 1
        body = bundles.bundle(manifest_data=bundles.manifest(metadata={"user": self.n, "tus": self.counter}),
                              n_events=40 + self.rng.randrange(60), har_entries=2, screenshots=1)
        filename = base64.b64encode(b"load.zip").decode()
        r = await self.call("POST /uploads", "POST", "/uploads", headers={
            **TUS, "Upload-Length": str(len(body)), "Upload-Metadata": f"filename {filename}"})
        if r is None or r.status_code != 201:
            return
        url = r.headers["location"]
        offset, half = 0, len(body) // 2
        for _ in range(TUS_ATTEMPTS):
            end = half if offset < half else len(body)
            r = await self.call("PATCH /uploads/{id}", "PATCH", url, expected=(409,), content=body[offset:end],
                                headers={**TUS, "Content-Type": "application/offset+octet-stream",
                                         "Upload-Offset": str(offset)})
            if r is not None and r.status_code == 204:
                offset = int(r.headers["upload-offset"])
                if offset == len(body):
                    session_id = r.headers["upload-session-id"]
                    self.ledger.sessions[session_id] = (self.account_no, hashlib.sha256(body).hexdigest(),
                                                        str(len(body)))
                    self.ledger.tus.add(session_id)
                    return
                continue
            if r is not None and r.status_code < 500 and r.status_code not in (409, 429):
                break  # refused (recorded as unexpected): not something to resume
            await asyncio.sleep(0.5)
            head = await self.call("HEAD /uploads/{id}", "HEAD", url, headers=TUS)
            if head is not None and head.status_code == 200:
                offset = int(head.headers["upload-offset"])
        for _ in range(TUS_ATTEMPTS):
            r = await self.call("DELETE /uploads/{id}", "DELETE", url, expected=(404, 409), headers=TUS)
            if r is not None and r.status_code in (204, 404):
                return
            await asyncio.sleep(0.5)

    def mix(self) -> list[tuple[int, Callable[[], Awaitable[None]]]]:
        return [(10, self.list_suites), (10, self.get_suite), (15, self.list_actions), (8, self.me),
                (9, self.create_action), (9, self.update_action), (5, self.exchange_key),
                (9, self.upload), (8, self.register_and_stream), (17, self.stream), (3, self.tus_upload)]

    async def run(self, deadline: float, think: float) -> None:
        weights, operations = zip(*self.mix(), strict=True)
        while time.monotonic() < deadline:
            await self.rng.choices(operations, weights)[0]()
            if think:
                await asyncio.sleep(self.rng.uniform(0, think))


async def relogin(base_url: str, accounts: list[Account], every: float, deadline: float) -> None:
    """Storefront tokens last 15 minutes: a long soak signs the accounts in again."""
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as c:
        while time.monotonic() < deadline:
            await asyncio.sleep(min(every, max(0.0, deadline - time.monotonic())))
            for a in accounts:
                if time.monotonic() - a.logged_in_at > every:
                    r = await c.post("/auth/login", json={"email": a.email, "password": PASSWORD})
                    if r.status_code == 200:
                        a.token, a.logged_in_at = r.json()["access_token"], time.monotonic()


async def verify(base_url: str, accounts: list[Account], ledger: Ledger, concurrency: int = 8) -> list[str]:
    """Every acknowledged write, read back: the lost or altered ones."""
    lost: list[str] = []
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as c:
        def auth(account: int) -> dict[str, str]:
            return {"Authorization": f"Bearer {accounts[account].token}"}

        ids = list(ledger.actions)
        for start in range(0, len(ids), 100):
            batch = ids[start:start + 100]
            by_account: dict[int, list[str]] = defaultdict(list)
            for action_id in batch:
                by_account[ledger.actions[action_id]["account"]].append(action_id)
            for account, chunk in by_account.items():
                r = await c.get("/actions", params={"id": f"in.({','.join(chunk)})", "select": "id,name,description"},
                                headers=auth(account))
                r.raise_for_status()
                found = {row["id"]: row for row in r.json()}
                for action_id in chunk:
                    want = ledger.actions[action_id]
                    row = found.get(action_id)
                    if row is None:
                        lost.append(f"action {action_id}: acknowledged, not found")
                    elif row["name"] != want["name"] or row["description"] not in (want["acked"], *want["maybe"]):
                        lost.append(f"action {action_id}: {row} is not its last acknowledged state {want}")

        async def check_session(session_id: str, account: int, digest: str, size: str) -> None:
            async with semaphore:
                meta = await c.get(f"/sessions/{session_id}", headers=auth(account))
                if meta.status_code != 200:
                    lost.append(f"session {session_id}: row answered {meta.status_code}")
                    return
                if (meta.json()["sha256"], str(meta.json()["size_bytes"])) != (digest, size):
                    lost.append(f"session {session_id}: row says {meta.json()['sha256']}, sent {digest}")
                got = await c.get(f"/sessions/{session_id}/bundle", headers=auth(account))
                if got.status_code != 200 or hashlib.sha256(got.content).hexdigest() != digest:
                    lost.append(f"session {session_id}: bundle answered {got.status_code}, not the bytes sent")

        async def check_example(example_id: str, account: int, digest: str) -> None:
            async with semaphore:
                meta = await c.get(f"/examples/{example_id}", headers=auth(account))
                if meta.status_code != 200 or meta.json()["sha256"] != digest:
                    lost.append(f"example {example_id}: row answered {meta.status_code}")
                    return
                got = await c.get(f"/examples/{example_id}/messages", headers=auth(account))
                if got.status_code != 200 or hashlib.sha256(got.content).hexdigest() != digest:
                    lost.append(f"example {example_id}: messages answered {got.status_code}, not the lines sent")

        await asyncio.gather(*(check_session(s, *v) for s, v in ledger.sessions.items()),
                             *(check_example(e, *v) for e, v in ledger.examples.items()))
    return lost


@dataclass
class Deadline:
    """When the users stop; what runs alongside them (loadtest/faults.py) may move it later."""
    at: float


@dataclass
class Result:
    seconds: float
    users: int
    stats: Stats
    ledger: Ledger
    lost: list[str]
    memory_start: Any = None  # what `probe` answered when the load began and when it ended
    memory_end: Any = None

    @property
    def requests(self) -> int:
        return sum(sum(c.values()) for c in self.stats.statuses.values())

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 1), "users": self.users, "requests": self.requests,
            "requests_per_s": round(self.requests / self.seconds, 1),
            "server_errors": len(self.stats.server_errors), "transport_errors": len(self.stats.transport_errors),
            "unexpected_4xx": len(self.stats.unexpected),
            "throttled_429": sum(c[429] for c in self.stats.statuses.values()),
            "acknowledged_writes": {"actions": len(self.ledger.actions), "sessions": len(self.ledger.sessions),
                                    "of_which_tus": len(self.ledger.tus), "examples": len(self.ledger.examples)},
            "lost_writes": len(self.lost),
            "endpoints": {k: {**{m: round(v, 1) for m, v in p.items()},
                              "statuses": dict(sorted(self.stats.statuses[k].items()))}
                          for k, p in self.stats.percentiles().items()},
        }


async def run_load(base_url: str, *, users: int = 100, seconds: float = 300, accounts: int = 10,
                   think: float = 0.1, exchanges_per_s: float = 8.0, seed: int = 1,
                   probe: Callable[[], Any] | None = None,
                   alongside: Callable[[Deadline], Awaitable[Any]] | None = None) -> Result:
    """`probe` (e.g. the components' memory) is called as the load starts and as it ends,
    before the verification reads everything back. `alongside` runs with the users (the
    faults of loadtest/faults.py) and may extend their deadline."""
    account_list = await setup(base_url, accounts)
    memory_start = probe() if probe else None
    stats, ledger = Stats(), Ledger()
    exchanges = TokenBucket(exchanges_per_s)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)  # one connection per user
    clients = [httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) for _ in range(users)]
    started = time.monotonic()
    deadline = Deadline(started + seconds)

    async def until_deadline(u: User) -> None:
        while time.monotonic() < deadline.at:
            await u.run(deadline.at, think)

    try:
        virtual = [User(n, n % accounts, account_list[n % accounts], clients[n], stats, ledger, exchanges,
                        random.Random(seed * 1000 + n)) for n in range(users)]
        await asyncio.gather(relogin(base_url, account_list, 600, deadline.at),
                             *(until_deadline(u) for u in virtual),
                             *([alongside(deadline)] if alongside else []))
    finally:
        for client in clients:
            await client.aclose()
    elapsed = time.monotonic() - started
    memory_end = probe() if probe else None
    lost = await verify(base_url, account_list, ledger)
    return Result(elapsed, users, stats, ledger, lost, memory_start, memory_end)
