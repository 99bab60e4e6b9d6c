"""Resumable uploads (tus 1.0.0, DESIGN.md §11) through the proxy, against the real stack:
raw HTTP for the protocol's edges, tuspy and tus-js-client (in node) for real clients that
are killed mid-upload and resume from the server's offset; ext restarted mid-PATCH; an
upload spread over two ext instances; bad bundles, termination and expiry leave nothing
(no row, no object, no multipart upload)."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.bundles import bundle, write_large_bundle
from tests.conftest import User, assert_error_body, create_key, create_suite, key_client, run_cli
from tests.test_sessions import Bucket, PeakRss, ext_workers, make_bucket, sha256_of
from tracepipe import credentials
from tracepipe.settings import REPO_ROOT
from tracepipe.stack import Stack

MiB = 1024 * 1024
TRANSFER_BOUND = 48 * MiB  # one 8 MiB part twice over, the streamed copy and httpx/boto3 buffers
RSS_CEILING = 200 * MiB
TUS = {"Tus-Resumable": "1.0.0"}
JS_DIR = REPO_ROOT / "tests" / "js"


@pytest.fixture(scope="module")
def bucket(stack: Stack) -> Bucket:
    return make_bucket(stack)


@pytest.fixture(scope="module")
def big_bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A valid ≥ 100 MiB bundle of random (incompressible, stored) screenshots."""
    path = tmp_path_factory.mktemp("tus") / "big.zip"
    write_large_bundle(str(path), screenshots=26, screenshot_bytes=4 * MiB)
    assert path.stat().st_size >= 100 * MiB
    yield path
    path.unlink()


def metadata_header(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


def create(user: User, length: int, **metadata: str) -> str:
    r = user.client.post("/uploads", headers={**TUS, "Upload-Length": str(length),
                                              "Upload-Metadata": metadata_header(filename="b.zip", **metadata)})
    assert r.status_code == 201, r.text
    assert r.headers["tus-resumable"] == "1.0.0" and r.headers["upload-expires"]
    location = r.headers["location"]
    assert location.startswith("/uploads/")
    return location


def patch(client: httpx.Client, url: str, offset: int, data: Any, **headers: str) -> httpx.Response:
    return client.patch(url, content=data, timeout=120, headers={
        **TUS, "Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset), **headers})


def head_offset(client: httpx.Client, url: str) -> int:
    r = client.head(url, headers=TUS)
    assert r.status_code == 200, r.status_code
    return int(r.headers["upload-offset"])


def upload_row(su: psycopg.Connection[dict[str, Any]], url: str) -> dict[str, Any] | None:
    return su.execute("select * from app.tus_uploads where id = %s", [url.rsplit("/", 1)[1]]).fetchone()


def assert_nothing_left(su: psycopg.Connection[dict[str, Any]], bucket: Bucket, upload_id: str,
                        session_id: str) -> None:
    assert su.execute("select 1 from app.tus_uploads where id = %s", [upload_id]).fetchone() is None
    assert su.execute("select 1 from app.sessions where id = %s", [session_id]).fetchone() is None
    assert not bucket.keys(f"sessions/{session_id}/")
    assert not bucket.keys(f"uploads/{upload_id}/")
    assert not bucket.open_uploads(f"sessions/{session_id}/"), "ListMultipartUploads still lists the upload"


def test_options_lists_version_extensions_and_limit(anon: httpx.Client) -> None:
    r = anon.options("/uploads", headers={"Origin": "http://localhost:5173"})
    assert r.status_code == 204
    assert r.headers["tus-version"] == "1.0.0" and r.headers["tus-resumable"] == "1.0.0"
    assert set(r.headers["tus-extension"].split(",")) == {"creation", "termination", "expiration", "checksum"}
    assert r.headers["tus-checksum-algorithm"] == "sha256"
    assert int(r.headers["tus-max-size"]) > 0
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {"upload-offset", "upload-length", "location", "tus-resumable", "tus-version", "tus-extension",
            "tus-max-size", "tus-checksum-algorithm", "upload-expires", "upload-session-id"} <= exposed
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"tus-resumable", "upload-length", "upload-metadata", "upload-offset"} <= allowed


def test_chunks_below_the_minimum_part_wait_as_a_tail_and_the_last_byte_commits_the_session(
        person: User, su: psycopg.Connection[dict[str, Any]], bucket: Bucket, tmp_path: Path) -> None:
    path = tmp_path / "b.zip"
    write_large_bundle(str(path), screenshots=3, screenshot_bytes=4 * MiB)
    data = path.read_bytes()
    url = create(person, len(data), note="twelve mebibytes")
    row = upload_row(su, url)
    assert row is not None and row["upload_offset"] == 0 and row["state"] == "receiving"
    upload_id, session_id = str(row["id"]), str(row["session_id"])

    offset = 0
    for size in (3 * MiB, 1, 3 * MiB - 1):  # 6 MiB in three PATCHes: a tail, a longer tail, a part
        r = patch(person.client, url, offset, data[offset:offset + size])
        assert r.status_code == 204, r.text
        offset += size
        assert int(r.headers["upload-offset"]) == offset == head_offset(person.client, url)
        row = upload_row(su, url)
        assert row is not None and row["upload_offset"] == offset
        if offset < 5 * MiB:  # below S3's minimum part: nothing in a part yet, the bytes wait in a tail object
            assert row["parts"] == [] and row["tail_bytes"] == offset
            assert bucket.read(row["tail_key"]) == data[:offset]
        else:
            assert [p["size"] for p in row["parts"]] == [offset] and row["tail_key"] is None
    assert bucket.keys(f"uploads/{upload_id}/") == set(), "a consumed tail object stays behind"

    r = patch(person.client, url, offset, data[offset:])
    assert r.status_code == 204, r.text
    assert int(r.headers["upload-offset"]) == len(data)
    assert r.headers["upload-session-id"] == session_id
    session = person.client.get(f"/sessions/{session_id}").json()
    assert session["sha256"] == hashlib.sha256(data).hexdigest() and session["size_bytes"] == len(data)
    assert session["screenshot_count"] == 3 and session["metadata"]["note"] == "twelve mebibytes"
    assert person.client.get(f"/sessions/{session_id}/bundle").content == data
    state = person.client.get(url).json()
    assert state == {**state, "offset": len(data), "length": len(data), "state": "done", "session_id": session_id}
    assert not bucket.open_uploads(f"sessions/{session_id}/") and not bucket.keys(f"uploads/{upload_id}/")

    # The final PATCH again (its answer was lost): the same session, never a second one.
    again = patch(person.client, url, len(data), b"")
    assert again.status_code == 204 and again.headers["upload-session-id"] == session_id
    assert su.execute("select count(*) as n from app.sessions where id = %s", [session_id]).fetchone() == {"n": 1}


def test_protocol_errors_name_the_header_and_change_nothing(person: User,
                                                            su: psycopg.Connection[dict[str, Any]]) -> None:
    r = person.client.post("/uploads", headers={"Upload-Length": "10"})
    assert r.status_code == 412 and r.headers["tus-version"] == "1.0.0"
    assert assert_error_body(r)["details"] == {"header": "Tus-Resumable"}
    r = person.client.post("/uploads", headers={**TUS, "Upload-Metadata": metadata_header(filename="x.zip")})
    assert r.status_code == 400 and assert_error_body(r)["details"] == {"header": "Upload-Length"}
    r = person.client.post("/uploads", headers={**TUS, "Upload-Length": str(10**15),
                                                "Upload-Metadata": metadata_header(filename="x.zip")})
    assert r.status_code == 413 and "tus-max-size" in r.headers
    r = person.client.post("/uploads", headers={**TUS, "Upload-Length": "10"})
    assert r.status_code == 422 and assert_error_body(r)["details"] == {"field": "filename"}
    r = person.client.post("/uploads", headers={**TUS, "Upload-Length": "10", "Upload-Metadata": "filename !!"})
    assert r.status_code == 400 and assert_error_body(r)["details"] == {"key": "filename"}

    url = create(person, 100)
    r = patch(person.client, url, 0, b"x" * 10, **{"Content-Type": "application/zip"})
    assert r.status_code == 415
    r = patch(person.client, url, 5, b"x" * 10)
    assert r.status_code == 409 and r.headers["upload-offset"] == "0"
    assert assert_error_body(r)["details"] == {"offset": 0}
    r = patch(person.client, url, 0, b"x" * 101)
    assert r.status_code == 413
    r = person.client.patch(url, content=b"x", headers={**TUS, "Content-Type": "application/offset+octet-stream"})
    assert r.status_code == 400 and assert_error_body(r)["details"] == {"header": "Upload-Offset"}
    assert head_offset(person.client, url) == 0
    assert person.client.head("/uploads/not-a-uuid", headers=TUS).status_code == 404


def test_checksummed_chunks_are_kept_only_when_the_sha256_matches(person: User,
                                                                 su: psycopg.Connection[dict[str, Any]]) -> None:
    def checksum(data: bytes) -> str:
        return "sha256 " + base64.b64encode(hashlib.sha256(data).digest()).decode()

    url = create(person, 20 * MiB)
    first, second = os.urandom(3 * MiB), os.urandom(6 * MiB)
    r = patch(person.client, url, 0, first, **{"Upload-Checksum": checksum(first)})
    assert r.status_code == 204 and r.headers["upload-offset"] == str(3 * MiB)
    r = patch(person.client, url, 3 * MiB, second, **{"Upload-Checksum": checksum(second[:-1] + b"x")})
    assert r.status_code == 460 and assert_error_body(r)["details"] == {"header": "Upload-Checksum"}
    row = upload_row(su, url)
    assert row is not None and row["upload_offset"] == 3 * MiB and row["parts"] == []  # nothing kept
    r = patch(person.client, url, 3 * MiB, second, **{"Upload-Checksum": checksum(second)})
    assert r.status_code == 204 and r.headers["upload-offset"] == str(9 * MiB)
    row = upload_row(su, url)
    assert row is not None and [p["size"] for p in row["parts"]] == [8 * MiB] and row["tail_bytes"] == MiB
    r = patch(person.client, url, 9 * MiB, b"x", **{"Upload-Checksum": "md5 " + base64.b64encode(b"0" * 16).decode()})
    assert r.status_code == 400 and r.headers["tus-checksum-algorithm"] == "sha256"
    r = patch(person.client, url, 9 * MiB, os.urandom(9 * MiB), **{"Upload-Checksum": checksum(b"")})
    assert r.status_code == 413 and assert_error_body(r)["details"] == {"header": "Content-Length"}
    assert head_offset(person.client, url) == 9 * MiB
    assert person.client.delete(url, headers=TUS).status_code == 204


def test_another_callers_head_patch_get_and_delete_are_404(person: User, make_user: Callable[..., User],
                                                            base_url: str) -> None:
    url = create(person, 10)
    assert patch(person.client, url, 0, b"12345").status_code == 204
    other = make_user()
    assert other.client.head(url, headers=TUS).status_code == 404
    assert other.client.get(url).status_code == 404
    r = patch(other.client, url, 5, b"67890")
    assert r.status_code == 404 and assert_error_body(r)["code"] == "PGRST116"
    assert other.client.delete(url, headers=TUS).status_code == 404
    assert head_offset(person.client, url) == 5  # untouched
    # A read-only key of the uploader sees the upload but writes nothing to it.
    with key_client(base_url, create_key(person, access="read")["key"]) as reader:
        assert head_offset(reader, url) == 5
        assert patch(reader, url, 5, b"67890").status_code == 403
        assert reader.delete(url, headers=TUS).status_code == 403
    assert head_offset(person.client, url) == 5
    assert person.client.delete(url, headers=TUS).status_code == 204


def test_a_suite_tag_needs_membership(person: User, make_user: Callable[..., User]) -> None:
    foreign = create_suite(make_user())
    r = person.client.post("/uploads", headers={**TUS, "Upload-Length": "10", "Upload-Metadata": metadata_header(
        filename="x.zip", suite_id=foreign["id"])})
    assert r.status_code == 403, r.text
    assert_error_body(r)


def test_two_concurrent_patches_of_one_upload_one_gets_409(person: User) -> None:
    url = create(person, 20 * MiB)
    started, release = threading.Event(), threading.Event()
    results: list[httpx.Response] = []

    def slow_body() -> Iterator[bytes]:
        yield b"a" * MiB
        started.set()
        release.wait(30)
        yield b"b" * MiB

    def first() -> None:
        with httpx.Client(base_url=str(person.client.base_url), headers=person.client.headers, timeout=60) as c:
            results.append(patch(c, url, 0, slow_body()))

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(30)
    time.sleep(0.5)  # the first PATCH holds the upload's lock (its body is being read)
    second = patch(person.client, url, 0, b"c" * MiB)
    release.set()
    thread.join()
    assert second.status_code == 409, second.text
    assert "another request" in assert_error_body(second)["message"]
    assert results[0].status_code == 204 and results[0].headers["upload-offset"] == str(2 * MiB)
    assert head_offset(person.client, url) == 2 * MiB
    assert person.client.delete(url, headers=TUS).status_code == 204


def test_a_bad_bundle_through_tus_leaves_nothing(person: User, su: psycopg.Connection[dict[str, Any]],
                                                 bucket: Bucket) -> None:
    data = b"PK\x03\x04" + os.urandom(7 * MiB)  # a part, then a tail, then the rest: not a zip
    url = create(person, len(data))
    row = upload_row(su, url)
    assert row is not None
    upload_id, session_id = str(row["id"]), str(row["session_id"])
    assert patch(person.client, url, 0, data[:6 * MiB]).status_code == 204
    assert patch(person.client, url, 6 * MiB, data[6 * MiB:6 * MiB + 1000]).status_code == 204
    assert bucket.open_uploads(f"sessions/{session_id}/") and bucket.keys(f"uploads/{upload_id}/")
    r = patch(person.client, url, 6 * MiB + 1000, data[6 * MiB + 1000:])
    assert r.status_code == 400, r.text
    assert assert_error_body(r)["code"] == "TP400" and "zip" in r.json()["message"]
    assert_nothing_left(su, bucket, upload_id, session_id)
    assert person.client.head(url, headers=TUS).status_code == 404

    invalid = bundle(manifest_data={"format_version": 1})  # a zip whose manifest lacks started_at
    url = create(person, len(invalid))
    row = upload_row(su, url)
    assert row is not None
    r = patch(person.client, url, 0, invalid)
    assert r.status_code == 422 and "manifest" in assert_error_body(r)["message"]
    assert_nothing_left(su, bucket, str(row["id"]), str(row["session_id"]))


def test_termination_aborts_the_parts(person: User, su: psycopg.Connection[dict[str, Any]], bucket: Bucket) -> None:
    url = create(person, 20 * MiB)
    row = upload_row(su, url)
    assert row is not None
    assert patch(person.client, url, 0, os.urandom(9 * MiB)).status_code == 204  # a part and a tail
    assert bucket.open_uploads(f"sessions/{row['session_id']}/") and bucket.keys(f"uploads/{row['id']}/")
    r = person.client.delete(url, headers=TUS)
    assert r.status_code == 204 and r.headers["tus-resumable"] == "1.0.0"
    assert_nothing_left(su, bucket, str(row["id"]), str(row["session_id"]))
    assert person.client.head(url, headers=TUS).status_code == 404


def test_an_abandoned_upload_is_aborted_after_it_expires(person: User, su: psycopg.Connection[dict[str, Any]],
                                                         bucket: Bucket) -> None:
    url = create(person, 20 * MiB)
    row = upload_row(su, url)
    assert row is not None
    assert patch(person.client, url, 0, os.urandom(6 * MiB)).status_code == 204  # a part
    assert patch(person.client, url, 6 * MiB, os.urandom(MiB)).status_code == 204  # a tail
    assert bucket.open_uploads(f"sessions/{row['session_id']}/") and bucket.keys(f"uploads/{row['id']}/")
    su.execute("update app.tus_uploads set expires_at = now() - interval '1 second' where id = %s", [row["id"]])
    deadline = time.monotonic() + 60  # the maintenance loop runs every cleanup_retry_s (5 s)
    while upload_row(su, url) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert_nothing_left(su, bucket, str(row["id"]), str(row["session_id"]))
    assert person.client.head(url, headers=TUS).status_code == 404


# --- real clients, killed and resumed -----------------------------------------------------------
TUSPY = """
import sys
from tusclient import client
from tusclient.storage.filestorage import FileStorage
endpoint, token, path, store, chunk = sys.argv[1:]
tus = client.TusClient(endpoint, headers={"Authorization": f"Bearer {token}"})
uploader = tus.uploader(path, chunk_size=int(chunk), metadata={"filename": "big.zip"}, store_url=True,
                        url_storage=FileStorage(store), retries=10, retry_delay=1)
uploader.upload()
print(uploader.request.response_headers.get("upload-session-id"))
"""


@pytest.fixture(scope="module")
def tus_js() -> Path:
    """tus-js-client from tests/js/package-lock.json (npm ci when absent)."""
    if not (JS_DIR / "node_modules" / "tus-js-client").is_dir():
        npm = shutil.which("npm")
        assert npm, "npm is needed (scripts/bootstrap.sh installs it)"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True, timeout=300)
    return JS_DIR / "upload.mjs"


def the_upload(su: psycopg.Connection[dict[str, Any]], user: User) -> dict[str, Any] | None:
    """The user's one tus upload (a resumed client that started another would show two)."""
    rows = su.execute("select id, upload_offset, upload_length, state, session_id from app.tus_uploads"
                      " where user_id = %s", [user.id]).fetchall()
    assert len(rows) <= 1, rows
    return rows[0] if rows else None


def kill_mid_upload_and_resume(argv: list[str], user: User, su: psycopg.Connection[dict[str, Any]], path: Path,
                               sig: signal.Signals = signal.SIGKILL,
                               env: dict[str, str] | None = None) -> tuple[str, int]:
    """Runs the client until the server holds at least 24 MiB, stops it with `sig`, checks
    the server's offset, runs a new client process to the end; (its last stdout line, the
    offset at the kill). The second process continued the same upload (one row, one session)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        row = the_upload(su, user)
        if row is not None and row["upload_offset"] >= 24 * MiB:
            break
        time.sleep(0.05)
    assert proc.poll() is None, ("the client ended before it was stopped", proc.communicate())
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    row = the_upload(su, user)
    assert row is not None
    offset = head_offset(user.client, f"/uploads/{row['id']}")
    assert 0 < offset < path.stat().st_size, offset
    resumed = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, (resumed.stdout, resumed.stderr)
    after = the_upload(su, user)
    assert after is not None and after["id"] == row["id"] and after["state"] == "done"
    return resumed.stdout.strip().splitlines()[-1], offset


def check_session(user: User, session_id: str, path: Path) -> None:
    r = user.client.get(f"/sessions/{session_id}")
    assert r.status_code == 200, r.text
    assert r.json()["sha256"] == sha256_of(path) and r.json()["size_bytes"] == path.stat().st_size
    assert r.json()["screenshot_count"] == 26


@pytest.mark.slow
@pytest.mark.parametrize("client", ["tuspy", "tus-js-client"])
def test_a_client_killed_mid_upload_resumes_from_the_servers_offset(
        stack: Stack, make_user: Callable[..., User], su: psycopg.Connection[dict[str, Any]], bucket: Bucket,
        big_bundle: Path, tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str],
        client: str) -> None:
    user = make_user()
    url, size = f"{stack.s.proxy_url}/uploads", big_bundle.stat().st_size
    if client == "tuspy":
        argv = [sys.executable, "-c", TUSPY, url, user.token, str(big_bundle), str(tmp_path / "urls.json"),
                str(8 * MiB)]
    else:
        node = shutil.which("node")
        assert node, "node is needed (scripts/bootstrap.sh installs npm, which brings it)"
        # One PATCH for the whole file (tus-js-client's default chunkSize is the whole file):
        # the server keeps what arrived before the kill, part by part.
        argv = [node, str(request.getfixturevalue("tus_js")), url, user.token, str(big_bundle),
                str(tmp_path / "urls.json"), str(size)]
    with PeakRss(ext_workers(stack)) as rss:
        session_id, offset = kill_mid_upload_and_resume(argv, user, su, big_bundle)
    assert session_id == str(the_upload(su, user)["session_id"])  # type: ignore[index]
    check_session(user, session_id, big_bundle)
    assert not bucket.open_uploads(f"sessions/{session_id}/")
    with capsys.disabled():
        print(f"\n[{client}, {size / MiB:.0f} MiB, killed at {offset / MiB:.0f} MiB] ext peak RSS: {rss.report()}")
    # What the upload adds to a worker stays within one part and its buffers; the absolute bound
    # holds on a fresh worker (other tests' work on the shared stack can raise a worker's baseline).
    assert rss.grown < TRANSFER_BOUND, rss.report()
    assert rss.peak < RSS_CEILING, rss.report()


# --- ext restarted, two ext instances ----------------------------------------------------------------
@pytest.mark.slow
def test_ext_restarted_mid_patch_the_upload_continues(stack: Stack, make_user: Callable[..., User],
                                                      su: psycopg.Connection[dict[str, Any]],
                                                      big_bundle: Path) -> None:
    user = make_user()
    size = big_bundle.stat().st_size
    url = create(user, size)
    paused, go_on = threading.Event(), threading.Event()
    outcome: list[Any] = []

    def body() -> Iterator[bytes]:
        with big_bundle.open("rb") as f:
            sent = 0
            while chunk := f.read(MiB):
                yield chunk
                sent += len(chunk)
                if sent == 40 * MiB:
                    paused.set()
                    go_on.wait(120)

    def send() -> None:
        try:
            outcome.append(patch(user.client, url, 0, body(), **{"Content-Length": str(size)}))
        except httpx.HTTPError as e:
            outcome.append(e)

    thread = threading.Thread(target=send)
    thread.start()
    assert paused.wait(120)
    deadline = time.monotonic() + 60
    while (upload_row(su, url) or {}).get("upload_offset", 0) < 32 * MiB and time.monotonic() < deadline:
        time.sleep(0.1)
    stack.stop_component("ext", grace=0)  # SIGTERM then SIGKILL: the PATCH dies with ext
    stack.start_component("ext")
    go_on.set()
    thread.join(120)
    # The PATCH failed with ext (a 502 that nginx's error page, whose location keeps the API body
    # limit, turns into an HTML 413 for a body this large; or a transport error).
    assert outcome and (isinstance(outcome[0], httpx.HTTPError) or outcome[0].status_code >= 400), outcome
    deadline = time.monotonic() + 30
    while True:  # the proxy's keep-alive connections to the old ext may still fail once
        try:
            offset = head_offset(user.client, url)
            break
        except (AssertionError, httpx.HTTPError):
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert 32 * MiB <= offset <= 40 * MiB, offset  # the parts committed before the kill
    with big_bundle.open("rb") as f:
        f.seek(offset)
        r = patch(user.client, url, offset, f.read())
    assert r.status_code == 204, r.text
    check_session(user, r.headers["upload-session-id"], big_bundle)


@pytest.fixture(scope="module")
def second_ext(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Another ext instance on a port of its own, sharing the stack's database and store."""
    with socket.socket() as s:
        s.bind((stack.s.host, 0))
        port = s.getsockname()[1]
    metrics = tmp_path_factory.mktemp("ext2-metrics")
    env = {**os.environ, **stack.ext_env(credentials.load_or_create(stack.state)),
           "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
    log = (tmp_path_factory.mktemp("ext2") / "ext.log").open("wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "uvicorn"), "ext.main:app", "--host", stack.s.host,
                             "--port", str(port), "--app-dir", str(REPO_ROOT)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://{stack.s.host}:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "the second ext did not start"
        time.sleep(0.3)
    yield base
    proc.terminate()
    proc.wait(30)
    log.close()


def test_an_upload_spread_over_two_ext_instances(person: User, second_ext: str,
                                                 su: psycopg.Connection[dict[str, Any]], tmp_path: Path) -> None:
    path = tmp_path / "b.zip"
    write_large_bundle(str(path), screenshots=8, screenshot_bytes=4 * MiB)
    data = path.read_bytes()
    url = create(person, len(data))
    with httpx.Client(base_url=second_ext, headers=person.client.headers, timeout=60) as other:
        clients = [person.client, other]  # the proxy's ext, then the second instance, in turn
        offset, turn = 0, 0
        for size in (6 * MiB, 3 * MiB, 7 * MiB, 2 * MiB, 9 * MiB):
            r = patch(clients[turn % 2], url, offset, data[offset:offset + size])
            assert r.status_code == 204, r.text
            offset += size
            turn += 1
            assert head_offset(clients[turn % 2], url) == offset  # the other instance knows it at once
        r = patch(clients[turn % 2], url, offset, data[offset:])
    assert r.status_code == 204, r.text
    row = upload_row(su, url)
    assert row is not None and row["state"] == "done"
    session = person.client.get(f"/sessions/{r.headers['upload-session-id']}").json()
    assert session["sha256"] == hashlib.sha256(data).hexdigest()


def test_cli_session_upload_resumes_after_ctrl_c(stack: Stack, stack_env: dict[str, str],
                                                 make_user: Callable[..., User],
                                                 su: psycopg.Connection[dict[str, Any]], big_bundle: Path,
                                                 tmp_path: Path) -> None:
    user = make_user()
    env = {**{k: v for k, v in stack_env.items() if not k.startswith("TRACEPIPE_")},
           "TRACEPIPE_URL": stack.s.proxy_url, "TRACEPIPE_EMAIL": user.email, "TRACEPIPE_PASSWORD": user.password,
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    argv = [str(Path(sys.executable).parent / "tracepipe"), "session", "upload", "--no-progress",
            "--tus-threshold", str(MiB), str(big_bundle)]
    line, _ = kill_mid_upload_and_resume(argv, user, su, big_bundle, signal.SIGINT, env)
    session_id = line.split()[0]
    assert session_id == str(the_upload(su, user)["session_id"])  # type: ignore[index]
    check_session(user, session_id, big_bundle)
    assert not list((tmp_path / "cache" / "tracepipe" / "uploads").iterdir()), "the resume file stays behind"


def test_the_orphan_sweep_leaves_live_tus_uploads_alone(stack_env: dict[str, str], person: User,
                                                      su: psycopg.Connection[dict[str, Any]], bucket: Bucket,
                                                      tmp_path: Path) -> None:
    path = tmp_path / "b.zip"
    write_large_bundle(str(path), screenshots=2, screenshot_bytes=4 * MiB)
    data = path.read_bytes()
    url = create(person, len(data))
    row = upload_row(su, url)
    assert row is not None
    assert patch(person.client, url, 0, data[:6 * MiB]).status_code == 204
    # No grace: every multipart upload and every object without a session row is "old".
    run_cli(stack_env, "sweep", "--grace-seconds", "0")
    assert bucket.open_uploads(f"sessions/{row['session_id']}/"), "the sweep aborted a live tus upload"
    r = patch(person.client, url, 6 * MiB, data[6 * MiB:])
    assert r.status_code == 204, r.text
    assert person.client.get(f"/sessions/{row['session_id']}").json()["sha256"] == hashlib.sha256(data).hexdigest()
