"""One request id from nginx through ext and PostgREST into PostgreSQL; JSON logs and
Prometheus metrics from ext; /ready reporting each dependency."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

import httpx

from tests.conftest import User, as_role
from tracepipe.stack import Stack


def test_ext_logs_one_json_line_per_request_with_the_request_id(stack: Stack, make_user: Callable[..., User]) -> None:
    person = make_user()
    rid = f"obs-{uuid.uuid4().hex[:12]}"
    r = person.client.post("/api-keys", json={"name": "observed"}, headers={"X-Request-Id": rid})
    assert r.status_code == 201 and r.headers["x-request-id"] == rid
    deadline = time.monotonic() + 5
    entries: list[dict[str, object]] = []
    while not entries and time.monotonic() < deadline:
        for line in stack.logfile("ext").read_text(errors="replace").splitlines():
            if rid in line and line.startswith("{"):
                entries.append(json.loads(line))
        time.sleep(0.1)
    access = [e for e in entries if e.get("logger") == "ext.access"]
    assert access, entries
    assert access[0]["request_id"] == rid and access[0]["route"] == "/api-keys" and access[0]["status"] == 201
    assert isinstance(access[0]["duration_ms"], float)
    nginx_log = stack.logs / "nginx-access.log"
    assert any(json.loads(line)["request_id"] == rid for line in nginx_log.read_text().splitlines() if rid in line)


def test_the_pre_request_hook_puts_the_request_id_into_application_name(superuser_dsn: str) -> None:
    with as_role(superuser_dsn, "tp_user", {"role": "anon"}) as conn:
        conn.execute("select set_config('request.headers', %s, true)", [json.dumps({"x-request-id": "abc-123"})])
        conn.execute("select auth.check_request()")
        row = conn.execute("select current_setting('application_name') as app").fetchone()
    assert row == {"app": "tracepipe abc-123"}
    with as_role(superuser_dsn, "tp_user", {"role": "anon"}) as conn:
        conn.execute("select set_config('request.headers', %s, true)", [json.dumps({"x-request-id": "x'; drop"})])
        conn.execute("select auth.check_request()")
        row = conn.execute("select current_setting('application_name') as app").fetchone()
    assert row is not None and "drop" not in str(row["app"])


def test_ext_metrics_count_requests_on_ext_port_only(stack: Stack, anon: httpx.Client) -> None:
    for _ in range(3):
        anon.get("/.well-known/jwks.json")
    sock = stack.service_socket("ext")  # ext's own socket (or port): not through the proxy
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)) if sock else None) as direct:
        metrics = direct.get(f"{stack.ext_url()}/metrics").text
    line = next(m for m in metrics.splitlines()
                if m.startswith("tracepipe_ext_requests_total{") and 'route="/.well-known/jwks.json"' in m)
    assert float(line.rsplit(" ", 1)[1]) >= 3
    assert "tracepipe_ext_request_seconds_bucket" in metrics
    routed = anon.get("/metrics")
    assert "tracepipe_ext_requests_total" not in routed.text  # the proxy does not expose it
