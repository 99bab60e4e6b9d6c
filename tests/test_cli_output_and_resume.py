"""The CLI as its users meet it (issue 14): other people's strings cannot drive the terminal
(every human output escapes control characters), and `tracepipe session download`, killed
mid-transfer, resumes from its `.part` on the next run (Range + If-Range with the ETag)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.bundles import write_large_bundle
from tests.conftest import User, add_member, create_suite, run_cli, unique
from tracepipe.client import Client, TracepipeError
from tracepipe.stack import Stack

TRACEPIPE = str(Path(sys.executable).parent / "tracepipe")
ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202eevil"


@pytest.fixture(scope="module")
def env(stack_env: dict[str, str], base_url: str) -> dict[str, str]:
    clean = {k: v for k, v in stack_env.items() if not k.startswith("TRACEPIPE_")}
    return {**clean, "TRACEPIPE_URL": base_url}


def as_login(env: dict[str, str], user: User) -> dict[str, str]:
    return {**env, "TRACEPIPE_EMAIL": user.email, "TRACEPIPE_PASSWORD": user.password}


def test_other_peoples_strings_are_escaped_in_every_human_output(env: dict[str, str],
                                                                 make_user: Callable[..., User]) -> None:
    owner, member = make_user(), make_user()
    suite = create_suite(owner, name=f"Shared {ESCAPES}", description=f"line one\nforged line {ESCAPES}")
    add_member(owner, suite["id"], member, "viewer")
    r = owner.client.post(f"/suites/{suite['id']}/actions", json={"name": f"act {ESCAPES}"})
    assert r.status_code == 201, r.text
    login = as_login(env, member)
    for args in (("suite", "list"), ("suite", "show", suite["id"])):
        out = run_cli(login, *args)
        text = out.stdout + out.stderr
        for raw in ("\x1b", "\x07", "\x9b", "\u202e"):
            assert raw not in text, (args, text)
        assert "\\x1b]0;pwned\\x07" in out.stdout and "\\u202eevil" in out.stdout, out.stdout
        assert not [line for line in out.stdout.splitlines() if line.startswith("forged")], out.stdout
    assert "line one\\nforged line" in run_cli(login, "suite", "show", suite["id"]).stdout  # not a line of its own
    # --json stays the API's JSON: the same strings, C1 and bidi controls as \\u escapes
    shown = run_cli(login, "suite", "show", suite["id"], "--json").stdout
    assert "\x9b" not in shown and "\u202e" not in shown and "\x1b" not in shown
    assert json.loads(shown)["name"] == suite["name"]
    # an error carrying the server's text is escaped too
    r = subprocess.run([TRACEPIPE, "suite", "show", f"no-such-{unique('x')}\x1b[2J"], env=login, capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode != 0 and "\x1b" not in r.stderr, r.stderr


# --- download resume --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def large_session(tmp_path_factory: pytest.TempPathFactory, make_user: Callable[..., User],
                  base_url: str) -> dict[str, Any]:
    """A 96 MiB bundle of incompressible screenshots, uploaded."""
    owner = make_user()
    path = tmp_path_factory.mktemp("resume") / "large.zip"
    write_large_bundle(str(path), screenshots=24, screenshot_bytes=4 * 1024 * 1024)
    with Client(base_url, token=owner.token) as tp:
        session = tp.upload_session(path)
    return {"owner": owner, "path": path, "id": session["id"], "size": path.stat().st_size}


def bundle_requests(stack: Stack, session_id: str) -> list[dict[str, Any]]:
    lines = (stack.logs / "nginx-access.log").read_text(errors="replace").splitlines()
    entries = [json.loads(line) for line in lines if f"/sessions/{session_id}/bundle" in line]
    return [e for e in entries if e["method"] == "GET"]


def start_and_kill_midway(argv: list[str], env: dict[str, str], part: Path, total: int, sig: int) -> int:
    """Runs the CLI until its .part holds some bytes but not all, then sends `sig`; the bytes kept."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if part.exists() and part.stat().st_size >= 1024 * 1024:
                proc.send_signal(signal.SIGSTOP)  # hold it still while we look
                break
            time.sleep(0.001)
        assert proc.poll() is None, "the download finished before it could be interrupted"
        kept = part.stat().st_size
        assert 0 < kept < total, kept
        proc.send_signal(sig)
        if sig != signal.SIGKILL:
            proc.send_signal(signal.SIGCONT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return part.stat().st_size


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["crash", "ctrl-c"])
def test_interrupted_cli_download_resumes_from_its_part(env: dict[str, str], large_session: dict[str, Any],
                                                        stack: Stack, tmp_path: Path, sig: int) -> None:
    login = as_login(env, large_session["owner"])
    dest = tmp_path / "copy.zip"
    part = tmp_path / "copy.zip.part"
    argv = [TRACEPIPE, "session", "download", large_session["id"], "-o", str(dest), "--no-progress"]
    kept = start_and_kill_midway(argv, login, part, large_session["size"], sig)
    assert not dest.exists() and kept > 0
    assert (tmp_path / "copy.zip.part.etag").read_text().strip('"\n') != ""
    before = len(bundle_requests(stack, large_session["id"]))

    r = subprocess.run(argv, env=login, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert dest.read_bytes() == large_session["path"].read_bytes()
    assert not part.exists() and not (tmp_path / "copy.zip.part.etag").exists()
    resumed = bundle_requests(stack, large_session["id"])[before:]
    assert [e["status"] for e in resumed] == [206], resumed  # one request, for the rest only
    assert resumed[0]["bytes_sent"] < large_session["size"] - kept + 4096, (resumed[0], kept)


def test_a_part_of_another_object_is_started_over(large_session: dict[str, Any], base_url: str,
                                                  tmp_path: Path) -> None:
    """If-Range: a part whose ETag is not the bundle's is replaced by the whole bundle."""
    dest = tmp_path / "other.zip"
    (tmp_path / "other.zip.part").write_bytes(b"not this bundle" * 1000)
    (tmp_path / "other.zip.part.etag").write_text('"' + "0" * 64 + '"')
    with Client(base_url, token=large_session["owner"].token) as tp:
        try:
            tp.download_session(large_session["id"], dest)
        except TracepipeError as e:  # a server that ignores If-Range sends the rest: the check refuses it
            assert e.code == "TPCHECKSUM"
            assert not (tmp_path / "other.zip.part").exists()
            tp.download_session(large_session["id"], dest)
    assert dest.read_bytes() == large_session["path"].read_bytes()
    assert not (tmp_path / "other.zip.part").exists()


def test_a_corrupt_part_fails_the_check_and_is_removed(large_session: dict[str, Any], base_url: str,
                                                       tmp_path: Path) -> None:
    dest = tmp_path / "bad.zip"
    good = large_session["path"].read_bytes()
    (tmp_path / "bad.zip.part").write_bytes(b"\0" * 1024 + good[1024:2 * 1024 * 1024])
    with Client(base_url, token=large_session["owner"].token) as tp:
        etag = f'"{tp.get_session(large_session["id"])["sha256"]}"'
        (tmp_path / "bad.zip.part.etag").write_text(etag)
        with pytest.raises(TracepipeError) as e:
            tp.download_session(large_session["id"], dest)
        assert e.value.code == "TPCHECKSUM"
        assert not dest.exists() and not (tmp_path / "bad.zip.part").exists()
        tp.download_session(large_session["id"], dest)  # and the next call starts clean
    assert dest.read_bytes() == good
    assert os.path.getsize(dest) == large_session["size"]
