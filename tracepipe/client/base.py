"""The transport under every resource: one origin and one identity, tokens renewed before
they expire, retries with backoff on connection errors, 429 and 5xx, streaming."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import httpx

from tracepipe.client.errors import TracepipeError, _network_error, _raise_for
from tracepipe.client.rows import Progress

CHUNK_BYTES = 1024 * 1024
OBJECT = "application/vnd.pgrst.object+json"
CREATE_HEADERS = {"Prefer": "return=representation", "Accept": OBJECT}
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_WAIT_S = 30.0  # a longer Retry-After (a throttled key: up to 15 minutes) is answered, not waited out
TUS_THRESHOLD_BYTES = 64 * 1024 * 1024  # bundles this large go through tus (resumable, DESIGN.md §11)
TUS_CHUNK_BYTES = 8 * 1024 * 1024  # bytes per tus PATCH: what a dropped connection costs at most
TUS = {"Tus-Resumable": "1.0.0"}


def default_resume_dir() -> Path:
    """Where resume files of tus uploads live: $XDG_CACHE_HOME/tracepipe/uploads (~/.cache/…)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tracepipe" / "uploads"


# A refresh whose answer was lost is answered again (the same pair) only within ext's grace
# (refresh_grace_s, 30 s by default): its retries stop before that, a later one would be a reuse.
REFRESH_RETRY_WITHIN_S = 20.0


class ClientBase:
    """The transport every resource module builds on: one origin, one identity (see
    `Client`), token renewal, retries with backoff, streaming."""

    def __init__(self, base_url: str, *, api_key: str | None = None, token: str | None = None,
                 timeout: float = 60.0, retries: int = 4, backoff_s: float = 0.5,
                 refresh_margin_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 transport: httpx.BaseTransport | None = None, headers: Mapping[str, str] | None = None,
                 tus_threshold: int = TUS_THRESHOLD_BYTES, tus_chunk: int = TUS_CHUNK_BYTES,
                 resume_dir: str | os.PathLike[str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.tus_threshold = tus_threshold
        self.tus_chunk = tus_chunk
        self.resume_dir = Path(resume_dir) if resume_dir else default_resume_dir()
        self.retries = retries
        self.backoff_s = backoff_s
        self.refresh_margin_s = refresh_margin_s
        self.clock = clock
        self._api_key = api_key
        self._refresh_token: str | None = None
        self._token = token
        self._expires_at = float("inf") if token else float("-inf")
        self._lock = threading.Lock()
        self._http = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(timeout, connect=10.0),
                                  transport=transport, headers=dict(headers or {}))

    # -- lifecycle
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- identity
    def login(self, email: str, password: str) -> None:
        """Storefront login: the client then holds a rotating refresh token."""
        pair = self._auth_call("/auth/login", json={"email": email, "password": password})
        self._api_key = None
        self._store(pair)

    def signup(self, email: str, password: str, display_name: str | None = None) -> dict[str, Any]:
        """Creates an account and signs in as it (like `login`); answers the new account
        ({id, email, display_name}). An existing email is TracepipeError 409."""
        body = {"email": email, "password": password, "display_name": display_name}
        r = self._once(lambda: self._http.post("/auth/signup", json={k: v for k, v in body.items()
                                                                      if v is not None}), "/auth/signup")
        _raise_for(r)
        pair = dict(r.json())
        self._api_key = None
        self._store(pair)
        return {k: pair.get(k) for k in ("id", "email", "display_name")}

    def logout(self) -> None:
        """Ends this login server side (the refresh token family too) and forgets the tokens."""
        body = {"refresh_token": self._refresh_token} if self._refresh_token else None
        r = self._send("POST", "/auth/logout", json=body)
        _raise_for(r)
        self._token, self._refresh_token, self._expires_at = None, None, float("-inf")

    @property
    def token(self) -> str:
        """A valid access token, renewed first when it is about to expire."""
        with self._lock:
            if self._token is None or self.clock() >= self._expires_at:
                self._renew()
            assert self._token is not None
            return self._token

    @property
    def token_expires_in(self) -> float:
        """Seconds (on `clock`) until the current token is renewed; negative when it is due."""
        return self._expires_at - self.clock()

    def _renew(self) -> None:
        if self._api_key:
            self._store(self._auth_call("/auth/token", headers={"Authorization": f"ApiKey {self._api_key}"}))
        elif self._refresh_token:
            self._store(self._auth_call("/auth/refresh", json={"refresh_token": self._refresh_token}))
        elif self._token is None:
            raise TracepipeError(401, "TP401", "no credentials", None,
                                 "Pass api_key= or token=, or call login(email, password).")
        else:  # a fixed token: nothing to renew it with
            self._expires_at = float("inf")

    def _store(self, body: dict[str, Any]) -> None:
        lifetime = float(body.get("expires_in") or 0)
        margin = min(self.refresh_margin_s, lifetime / 3)
        self._token = str(body["access_token"])
        self._expires_at = self.clock() + lifetime - margin
        if body.get("refresh_token"):
            self._refresh_token = str(body["refresh_token"])

    def _auth_call(self, path: str, *, json: Any = None, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Auth endpoints are safe to retry on 429/5xx/connection errors: a failed exchange
        changes nothing, and a refresh rotated server side whose answer was lost is answered
        again with the same pair within ext's grace (so its retries end inside the grace)."""
        within = REFRESH_RETRY_WITHIN_S if path == "/auth/refresh" else None
        r = self._retrying(lambda: self._http.post(path, json=json, headers=dict(headers or {})), path, within)
        _raise_for(r)
        return dict(r.json())

    # -- plumbing
    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **(extra or {})}

    def _send(self, method: str, path: str, *, params: Mapping[str, Any] | None = None, json: Any = None,
              headers: Mapping[str, str] | None = None, retry: bool = False) -> httpx.Response:
        """One authenticated request. A 401 with a token this client obtained itself gets one
        renewal and one more try (the key may have been rotated server side, or the clock
        jumped); `retry` also retries connection errors and 5xx (reads and idempotent calls)."""
        # None, not {}, when there are none: httpx rebuilds the URL for any params given (~35 µs)
        clean = {k: v for k, v in (params or {}).items() if v is not None} or None

        def once() -> httpx.Response:
            return self._http.request(method, path, params=clean, json=json, headers=self._headers(headers))

        r = self._retrying(once, path) if retry else self._once(once, path)
        if r.status_code == 401 and (self._api_key or self._refresh_token):
            with self._lock:
                self._expires_at = float("-inf")
            r = self._retrying(once, path) if retry else self._once(once, path)
        return r

    @staticmethod
    def _once(call: Callable[[], httpx.Response], what: str) -> httpx.Response:
        try:
            return call()
        except httpx.TransportError as e:
            raise _network_error(e, what) from e

    def _retrying(self, call: Callable[[], httpx.Response], what: str, within_s: float | None = None,
                  ) -> httpx.Response:
        """Calls `call` until it answers below 500 (and not 429), at most 1 + retries times,
        backing off exponentially (or as Retry-After says). Connection errors count too. An
        answer asking to wait longer than MAX_RETRY_WAIT_S is returned at once; with
        `within_s`, so is any whose next try would start later than that after the first."""
        started = time.monotonic()
        for attempt in range(self.retries + 1):
            try:
                r = call()
            except httpx.TransportError as e:
                delay = self._delay(attempt, None)
                if attempt == self.retries or self._past(started, delay, within_s):
                    raise _network_error(e, what) from e
                time.sleep(delay)
                continue
            retry_after = r.headers.get("retry-after")
            too_long = retry_after is not None and retry_after.isdigit() and float(retry_after) > MAX_RETRY_WAIT_S
            delay = self._delay(attempt, retry_after)
            if (attempt == self.retries or r.status_code not in RETRY_STATUSES or too_long
                    or self._past(started, delay, within_s)):
                return r
            r.close()
            time.sleep(delay)
        raise AssertionError("unreachable")

    @staticmethod
    def _past(started: float, delay: float, within_s: float | None) -> bool:
        return within_s is not None and time.monotonic() - started + delay > within_s

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = self.backoff_s * (2 ** attempt)
        if retry_after and retry_after.isdigit():
            delay = max(delay, float(retry_after))
        return min(delay, MAX_RETRY_WAIT_S)

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        time.sleep(self._delay(attempt, retry_after))

    def _json(self, method: str, path: str, *, params: Mapping[str, Any] | None = None, json: Any = None,
              headers: Mapping[str, str] | None = None) -> Any:
        r = self._send(method, path, params=params, json=json, headers=headers, retry=method in ("GET", "DELETE"))
        _raise_for(r)
        return r.json() if r.content else None

    def _create(self, path: str, body: Mapping[str, Any]) -> Any:
        return self._json("POST", path, json={k: v for k, v in body.items() if v is not None},
                          headers=CREATE_HEADERS)

    # -- streaming helpers
    @contextmanager
    def _stream(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                headers: Mapping[str, str] | None = None) -> Iterator[httpx.Response]:
        # None, not {}, when there are none: httpx rebuilds the URL for any params given (~35 µs)
        clean = {k: v for k, v in (params or {}).items() if v is not None} or None
        with self._http.stream(method, path, params=clean, headers=self._headers(headers)) as r:
            if r.status_code == 401 and (self._api_key or self._refresh_token):
                r.close()
                with self._lock:
                    self._expires_at = float("-inf")
                with self._http.stream(method, path, params=clean, headers=self._headers(headers)) as again:
                    yield again
                return
            yield r

    def _upload(self, path: str, source: Path | bytes, content_type: str, params: Mapping[str, Any], key: str,
                progress: Progress | None) -> httpx.Response:
        """POSTs a raw body streamed from a file (or given bytes) with an Idempotency-Key,
        retried on connection errors and 5xx; each attempt re-reads the source from the start."""
        total = len(source) if isinstance(source, bytes) else source.stat().st_size
        clean = {k: v for k, v in params.items() if v is not None}

        def chunks() -> Iterator[bytes]:
            if isinstance(source, bytes):
                for i in range(0, len(source), CHUNK_BYTES):
                    yield source[i:i + CHUNK_BYTES]
                return
            with open(source, "rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    yield chunk

        def body() -> Iterator[bytes]:
            sent = 0
            if progress:
                progress(0, total)
            for chunk in chunks():
                yield chunk
                sent += len(chunk)
                if progress:
                    progress(sent, total)

        def once() -> httpx.Response:
            headers = {"Content-Type": content_type, "Content-Length": str(total), "Idempotency-Key": key}
            r = self._http.post(path, params=clean, content=body(), headers=self._headers(headers))
            if r.status_code == 401 and (self._api_key or self._refresh_token):
                with self._lock:
                    self._expires_at = float("-inf")
                r = self._http.post(path, params=clean, content=body(), headers=self._headers(headers))
            return r

        r = self._retrying(once, f"POST {path}")
        _raise_for(r)
        return r
