"""Structured logs and Prometheus metrics of ext.

Every request is logged as one JSON line with the proxy's request id, and counted in
Prometheus metrics (requests, latency, bytes streamed, upload failures). With several
uvicorn workers the metrics use prometheus_client's multiprocess mode (directory in
PROMETHEUS_MULTIPROC_DIR), so GET /metrics on ext's own port — never routed by the proxy
— reports all workers.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

REQUESTS = Counter("tracepipe_ext_requests_total", "HTTP requests answered by ext", ["method", "route", "status"])
LATENCY = Histogram("tracepipe_ext_request_seconds", "Time to answer a request (until the last byte)", ["route"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
BYTES = Counter("tracepipe_ext_bytes_total", "Body bytes received and sent", ["direction", "route"])
UPLOAD_FAILURES = Counter("tracepipe_ext_upload_failures_total", "Uploads refused or failed", ["route", "status"])

# The pipeline's queue (DESIGN §10). The gauges are read from the database at every scrape
# (refresh_pipeline_gauges); "mostrecent" keeps the scraping worker's value in multiprocess mode.
PIPELINE_JOBS = Gauge("tracepipe_pipeline_jobs", "Pipeline jobs per state", ["state"], multiprocess_mode="mostrecent")
PIPELINE_OLDEST_WAITING = Gauge("tracepipe_pipeline_oldest_waiting_seconds",
                                "How long the oldest due (queued or failed) job has waited",
                                multiprocess_mode="mostrecent")
PIPELINE_CLAIMED = Counter("tracepipe_pipeline_claimed_total", "Jobs leased by POST /pipeline/claim")
PIPELINE_CLAIM_TO_COMPLETE = Histogram(
    "tracepipe_pipeline_claim_to_complete_seconds", "Time from a job's claim to its completion",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": request_id.get(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


async def refresh_pipeline_gauges(identity_pool: Any) -> None:
    """Queue depth per state and the oldest due job's age, as of now (one query as tp_auth).
    A database that does not answer leaves the last values (the scrape itself must not fail)."""
    try:
        async with identity_pool.connection(timeout=1.0) as conn:
            cur = await conn.execute("select state, jobs, oldest_waiting_s from auth.pipeline_queue_stats()")
            rows = await cur.fetchall()
    except Exception as e:  # any failure: keep the previous values
        logging.getLogger("ext.observability").warning("pipeline gauges not refreshed: %s", e)
        return
    for row in rows:
        PIPELINE_JOBS.labels(row["state"]).set(row["jobs"])
    PIPELINE_OLDEST_WAITING.set(max((row["oldest_waiting_s"] for row in rows), default=0.0))


def metrics_response() -> tuple[bytes, str]:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


class RequestLog:
    """ASGI middleware (streaming-safe): request id, one JSON log line, metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.log = logging.getLogger("ext.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or None
        token = request_id.set(rid)
        started = time.monotonic()
        status = 500
        sent = received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            elapsed = time.monotonic() - started
            method = scope["method"]
            REQUESTS.labels(method, template, str(status)).inc()
            LATENCY.labels(template).observe(elapsed)
            BYTES.labels("in", template).inc(received)
            BYTES.labels("out", template).inc(sent)
            if method == "POST" and template in ("/sessions", "/examples") and status >= 400:
                UPLOAD_FAILURES.labels(template, str(status)).inc()
            if template not in ("/health", "/metrics"):
                self.log.info("%s %s %s", method, scope["path"], status, extra={"fields": {
                    "method": method, "path": scope["path"], "route": template, "status": status,
                    "duration_ms": round(elapsed * 1000, 1), "bytes_in": received, "bytes_out": sent}})
            request_id.reset(token)
