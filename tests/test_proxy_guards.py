"""The proxy's guards cannot be walked around: body limits follow the route and the method
(chunked bodies included), uploads are refused before anyone reads an anonymous body, and
the services behind the proxy are not reachable except through it (SeaweedFS: only S3)."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import httpx
import pytest
from botocore.config import Config

from tests.bundles import bundle, write_large_bundle
from tests.conftest import User, assert_error_body, create_suite
from tracepipe import credentials
from tracepipe.procs import PeakRss, process_tree, rss_bytes
from tracepipe.stack import Stack

MiB = 1024 * 1024
# What one hostile request may add to a service's memory (the issue measured +696 MiB for
# PostgREST and +570 MiB for an ext worker); noise of a quiet stack is a few MiB.
RSS_SLACK = 40 * MiB


def raw_request(stack: Stack, method: str, path: str, size: int, *, chunked: bool = False,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes, int]:
    """Sends `size` body bytes (a JSON string) 1 MiB at a time, stopping as soon as the proxy
    answers: (status, headers, body, body bytes sent). httpx would insist on sending all."""
    host, port = stack.s.host, stack.s.proxy_port
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
             "Content-Type: application/json",
             "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    filler = b'{"name":"' + b"x" * (MiB - 11) + b'"}'
    sent = 0
    with socket.create_connection((host, port), timeout=120) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            while sent < size:
                if select.select([sock], [], [], 0)[0]:
                    break  # the answer came before the body was asked for
                piece = filler[: min(MiB, size - sent)]
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
            else:
                if chunked:
                    sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    response_headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    if response_headers.get("transfer-encoding") == "chunked":
        body = _unchunk(body)
    return int(status_line.split()[1]), response_headers, body, sent


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


def tree_rss(pid: int | None) -> int:
    assert pid is not None
    return max(rss_bytes(p) for p in process_tree(pid))


def access_log_entry(stack: Stack, request_id: str) -> dict[str, str]:
    """The request's access log line (nginx writes it once the connection is closed)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in (stack.logs / "nginx-access.log").read_text().splitlines():
            entry = json.loads(line)
            if entry["request_id"] == request_id:
                return dict(entry)
        time.sleep(0.2)
    raise AssertionError(f"no access log line for {request_id}")


# --- body limits follow the route and the method ---------------------------------------------

@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_patch_on_sessions_never_reaches_postgrest(stack: Stack, chunked: bool) -> None:
    # PATCH /sessions is PostgREST's: the upload limit of POST /sessions is not its limit.
    before = tree_rss(stack.pid_of("postgrest"))
    rid = f"guard-{uuid.uuid4().hex[:12]}"
    status, _, body, _ = raw_request(stack, "PATCH", "/sessions?id=eq.00000000-0000-0000-0000-000000000000",
                                     105 * MiB, chunked=chunked, headers={"X-Request-Id": rid})
    assert status == 413, body[:300]
    assert json.loads(body)["code"] == "TP413"
    assert access_log_entry(stack, rid)["upstream"] == ""  # answered by nginx alone
    assert tree_rss(stack.pid_of("postgrest")) - before < RSS_SLACK


def test_chunked_body_to_ext_json_endpoints_has_the_api_limit(stack: Stack, person: User) -> None:
    # POST /api-keys is ext's (through the internal /_ext/ door): a chunked body has no
    # Content-Length for nginx to check up front, so it is counted as it streams.
    before = tree_rss(stack.pid_of("ext"))
    with PeakRss(stack.pid_of("ext") or 0) as peak:
        status, _, body, _ = raw_request(stack, "POST", "/api-keys", 60 * MiB, chunked=True,
                                            headers={"Authorization": f"Bearer {person.token}"})
    assert status == 413, body[:300]
    assert json.loads(body)["code"] == "TP413"
    assert peak.peak - before < RSS_SLACK, (before, peak.peak)
    # a small body still goes through
    assert person.client.post("/api-keys", json={"name": f"k-{uuid.uuid4().hex[:8]}"}).status_code == 201


@pytest.mark.parametrize("path", ["/sessions", "/examples"])
def test_anonymous_upload_is_refused_before_ext_reads_it(stack: Stack, path: str) -> None:
    before = tree_rss(stack.pid_of("ext"))
    rid = f"guard-{uuid.uuid4().hex[:12]}"
    with PeakRss(stack.pid_of("ext") or 0) as peak:
        status, headers, body, sent = raw_request(stack, "POST", path, 50 * MiB, headers={"X-Request-Id": rid})
    assert status == 401, body[:300]
    assert json.loads(body)["code"] == "TP401"
    assert "bearer" in headers.get("www-authenticate", "").lower()
    assert access_log_entry(stack, rid)["upstream"] == ""  # ext never saw the request
    assert sent < 50 * MiB  # the answer came before the body was sent
    assert peak.peak - before < RSS_SLACK


@pytest.mark.parametrize("path", ["/sessions", "/examples"])
def test_upload_with_a_forged_token_is_refused_before_ext_reads_the_body(stack: Stack, path: str) -> None:
    forged = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    before = tree_rss(stack.pid_of("ext"))
    with PeakRss(stack.pid_of("ext") or 0) as peak:
        status, _, body, sent = raw_request(stack, "POST", path, 50 * MiB,
                                            headers={"Authorization": f"Bearer {forged}"})
    assert status == 401, body[:300]
    assert_error_body(httpx.Response(401, content=body, headers={"content-type": "application/json"}))
    assert sent < 50 * MiB  # ext answered from the headers
    assert peak.peak - before < RSS_SLACK


def test_large_uploads_still_work(stack: Stack, person: User) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "large.zip"
        size = write_large_bundle(path, screenshots=3, screenshot_bytes=2 * MiB)
        assert size > 5 * MiB
        data = path.read_bytes()
    r = person.client.post("/sessions", content=data, headers={"Content-Type": "application/zip"})
    assert r.status_code == 201, r.text

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), MiB):
            yield data[i:i + MiB]

    r = person.client.post("/sessions", content=chunks(), headers={"Content-Type": "application/zip"})
    assert r.status_code == 201, r.text  # chunked, no Content-Length
    assert person.client.get(f"/sessions/{r.json()['id']}/bundle").content == data

    suite = create_suite(person)
    line = json.dumps({"messages": [{"role": "user", "content": "y" * 100_000}]}).encode() + b"\n"
    lines = line * 30
    r = person.client.post("/examples", params={"suite_id": suite["id"], "model": "m"}, content=lines,
                           headers={"Content-Type": "application/jsonl"})
    assert r.status_code == 201, r.text
    assert r.json()["size_bytes"] == len(lines)


def test_small_limit_still_applies_to_postgrest_routes(stack: Stack, person: User) -> None:
    r = person.client.post("/suites", content=b'{"name":"' + b"x" * (2 * MiB) + b'"}',
                           headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert assert_error_body(r)["code"] == "TP413"


# --- SeaweedFS: only its S3 gateway, with the keys, is reachable ---------------------------------

@pytest.fixture(scope="module")
def stored_bundle(stack: Stack, person: User) -> tuple[str, bytes]:
    data = bundle(n_events=20)
    r = person.client.post("/sessions", content=data, headers={"Content-Type": "application/zip"})
    assert r.status_code == 201, r.text
    return f"sessions/{r.json()['id']}/bundle.zip", data


def _s3(stack: Stack, secrets: credentials.StackSecrets, **keys: str) -> Any:
    return boto3.client("s3", endpoint_url=stack.s.s3_endpoint, region_name=stack.s.s3_region,
                        aws_access_key_id=keys.get("access", secrets.s3_access_key),
                        aws_secret_access_key=keys.get("secret", secrets.s3_secret_key),
                        config=Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"}))


def _refused(method: str, url: str, **kw: Any) -> str:
    """'refused' when nothing answers; else the status (a guard's 401/403 would also do)."""
    try:
        r = httpx.request(method, url, timeout=5, **kw)
    except httpx.TransportError:
        return "refused"
    return "refused" if r.status_code in (401, 403) else f"{r.status_code} {r.text[:100]!r}"


def test_seaweedfs_filer_master_and_volume_refuse_everyone(stack: Stack, secrets: credentials.StackSecrets,
                                                           stored_bundle: tuple[str, bytes]) -> None:
    key, data = stored_bundle
    s, g = stack.s, stack.s.weed_grpc_offset
    filer = f"http://{s.host}:{s.weed_filer_port}/buckets/{s.bucket}/{key}"
    master = f"http://{s.host}:{s.weed_master_port}"
    volume = f"http://{s.host}:{s.weed_volume_port}"
    answers = {
        "filer GET": _refused("GET", filer),
        "filer POST": _refused("POST", filer, files={"file": ("bundle.zip", b"overwritten")}),
        "filer DELETE": _refused("DELETE", filer),
        "master GET lookup": _refused("GET", f"{master}/dir/lookup?volumeId=1"),
        "master POST assign": _refused("POST", f"{master}/dir/assign"),
        "master POST submit": _refused("POST", f"{master}/submit", files={"file": ("x", b"x")}),
        "master DELETE": _refused("DELETE", f"{master}/col/delete?collection={s.bucket}"),
        "volume GET": _refused("GET", f"{volume}/status"),
        "volume POST": _refused("POST", f"{volume}/1,01637037d6", files={"file": ("x", b"x")}),
        "volume DELETE": _refused("DELETE", f"{volume}/1,01637037d6"),
    }
    assert answers == dict.fromkeys(answers, "refused"), answers
    for port in (s.weed_master_port, s.weed_volume_port, s.weed_filer_port, s.s3_port):
        with socket.socket() as sock:  # gRPC: no listener outside SeaweedFS's own network
            assert sock.connect_ex((s.host, port + g)) != 0, port + g
    # S3 with the keys still works and the bundle is intact; without them it is refused
    assert _s3(stack, secrets).get_object(Bucket=s.bucket, Key=key)["Body"].read() == data
    with pytest.raises(botocore.exceptions.ClientError):
        _s3(stack, secrets, secret="wrong").get_object(Bucket=s.bucket, Key=key)
    assert httpx.get(f"{stack.s.s3_endpoint}/{s.bucket}/{key}").status_code == 403


def test_seaweedfs_files_are_not_readable_by_other_users(stack: Stack, stored_bundle: tuple[str, bytes]) -> None:
    data_dir = stack.state / "s3"
    # No other user may enter the data dir: that alone keeps every file below it private
    # (SeaweedFS writes its small .vif volume-info files 0644 whatever the umask).
    assert data_dir.stat().st_mode & 0o777 == 0o700
    # and what holds the bytes is the owner's alone too (the umask of the weed process)
    volumes = [p for p in data_dir.rglob("*") if p.suffix in (".dat", ".idx") or "filerldb" in str(p)]
    assert any(p.suffix == ".dat" for p in volumes)
    loose = [f"{oct(p.stat().st_mode & 0o777)} {p}" for p in volumes if not p.is_symlink() and p.stat().st_mode & 0o077]
    assert loose == []


# --- PostgREST and ext: reachable through the proxy only -------------------------------------------

def test_postgrest_and_ext_listen_where_only_the_proxy_reaches(stack: Stack, person: User) -> None:
    s = stack.s
    for port in (s.pgrst_port, s.ext_port):  # no loopback port around the proxy's guards
        with socket.socket() as sock:
            assert sock.connect_ex((s.host, port)) != 0, port
    sockets = [stack.service_socket("postgrest"), stack.service_socket("ext")]
    assert all(p is not None and p.is_socket() for p in sockets), sockets
    directory = stack.socket_dir
    assert directory.stat().st_mode & 0o777 == 0o700
    # another local user cannot connect to either socket
    probe = ("import socket, sys\n"
             "for path in sys.argv[1:]:\n"
             "    s = socket.socket(socket.AF_UNIX)\n"
             "    try:\n"
             "        s.connect(path)\n"
             "        print('connected', path)\n"
             "    except OSError as e:\n"
             "        print(type(e).__name__, path)\n")
    if os.geteuid() == 0:
        out = subprocess.run(["/usr/bin/python3", "-c", probe, *map(str, sockets)], user="nobody",
                             capture_output=True, text=True, check=True, cwd="/").stdout
        assert "connected" not in out and out.count("PermissionError") == 2, out
    # and the proxy still reaches both
    assert person.client.get("/suites").status_code == 200
    assert person.client.get("/health").status_code == 200


def test_tus_only_patch_gets_the_upload_limit(stack: Stack, person: User) -> None:
    # DELETE /uploads/{id} carries no bundle: the API limit (a chunked one ext answers from
    # its headers, before the proxy has counted the limit)
    rid = f"guard-{uuid.uuid4().hex[:12]}"
    status, _, body, _ = raw_request(stack, "DELETE", f"/uploads/{uuid.uuid4()}", 20 * MiB,
                                     headers={"Authorization": f"Bearer {person.token}", "X-Request-Id": rid,
                                              "Tus-Resumable": "1.0.0"})
    assert status == 413, body[:300]
    assert access_log_entry(stack, rid)["upstream"] == ""
    # PATCH /uploads/{id} is an upload: without a bearer token the proxy refuses it unread
    rid = f"guard-{uuid.uuid4().hex[:12]}"
    status, _, body, _ = raw_request(stack, "PATCH", f"/uploads/{uuid.uuid4()}", 20 * MiB,
                                     headers={"X-Request-Id": rid})
    assert status == 401, body[:300]
    assert access_log_entry(stack, rid)["upstream"] == ""
