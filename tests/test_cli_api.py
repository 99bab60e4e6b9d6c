"""The `tracepipe` commands for users of a running stack (key, suite, session, example, demo),
run as the real installed executable against the test stack over HTTP: what they print,
their exit codes (0 ok, 1 the server said no, 2 usage, 3 unreachable or not authenticated),
progress lines on stderr for transfers of a few MiB, `--help` everywhere, and the demo data
as seen through the API afterwards."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.bundles import bundle, write_large_bundle
from tests.conftest import User, create_key, run_cli, unique
from tracepipe import demo
from tracepipe.cli import build_parser
from tracepipe.client import Client
from tracepipe.progress import ProgressLine, human_bytes
from tracepipe.stack import Stack

Run = Callable[..., Any]
UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
PROGRESS = re.compile(r"\[#{20}\]\s+[\d.]+ MiB / [\d.]+ MiB\s+100%\s+[\d.]+ [KMG]?i?B/s\s+in \d+:\d\d")


@pytest.fixture(scope="module")
def env(stack_env: dict[str, str], base_url: str) -> dict[str, str]:
    """The test stack's TP_* settings and TRACEPIPE_URL, no credentials."""
    clean = {k: v for k, v in stack_env.items() if not k.startswith("TRACEPIPE_")}
    return {**clean, "TRACEPIPE_URL": base_url}


@pytest.fixture
def owner(make_user: Callable[..., User]) -> User:
    return make_user()


def as_key(env: dict[str, str], key: str) -> dict[str, str]:
    return {**env, "TRACEPIPE_API_KEY": key}


def as_login(env: dict[str, str], user: User) -> dict[str, str]:
    return {**env, "TRACEPIPE_EMAIL": user.email, "TRACEPIPE_PASSWORD": user.password}


def run_without_terminal(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """run_cli with stdin not a terminal whoever runs the tests (no password or confirmation prompt)."""
    return subprocess.run([str(Path(sys.executable).parent / "tracepipe"), *args], env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def fails(env: dict[str, str], *args: str, code: int) -> str:
    """Runs a command that must fail with `code` (stdin not a terminal); answers its last stderr line."""
    r = run_without_terminal(env, *args)
    assert r.returncode == code, (args, r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("tracepipe")]
    assert lines, r.stderr
    return lines[-1]


def fields(stdout: str) -> dict[str, str]:
    """`key  value` lines (print_fields) as a dict."""
    out = {}
    for line in stdout.splitlines():
        key, _, value = line.partition("  ")
        if key and value:
            out[key] = value.strip()
    return out


# --- help and usage -------------------------------------------------------------------------------

def command_paths() -> list[tuple[list[str], str]]:
    """Every command and subcommand of the API commands with its description."""
    out: list[tuple[list[str], str]] = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        out.append((path, parser.description or ""))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, [*path, name])

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name in ("key", "suite", "session", "example", "pipeline", "demo"):
                walk(action.choices[name], [name])
    return out


@pytest.mark.parametrize("path,description", command_paths(), ids=lambda v: " ".join(v) if isinstance(v, list)
                         else None)
def test_every_command_has_help(env: dict[str, str], path: list[str], description: str) -> None:
    r = run_cli(env, *path, "--help")
    assert r.stdout.startswith(f"usage: tracepipe {' '.join(path)}"), r.stdout
    assert description and " ".join(description.split()) in " ".join(r.stdout.split())


def test_top_level_help_documents_exit_codes(env: dict[str, str]) -> None:
    out = run_cli(env, "--help").stdout
    for command in ("key", "suite", "session", "example", "demo", "up", "status"):
        assert re.search(rf"^\s+{command}\s", out, re.M), command
    assert "exit codes:" in out
    for line in ("0  success", "1  the operation failed", "2  wrong usage", "3  the server cannot be reached"):
        assert line in out


def test_usage_errors_exit_2(env: dict[str, str], owner: User) -> None:
    r = run_cli(env, "suite", "bogus", check=False)
    assert r.returncode == 2 and "invalid choice" in r.stderr
    assert "no credentials" in fails(env, "suite", "list", code=2)
    assert "needs a login" in fails(as_key(env, create_key(owner)["key"]), "key", "create", "x", code=2)
    assert "--password" in fails({**env, "TRACEPIPE_EMAIL": owner.email}, "suite", "list", code=2)
    assert "no such file" in fails(as_login(env, owner), "session", "upload", "/nonexistent.zip", code=2)
    assert "not valid JSON" in fails(as_login(env, owner), "suite", "action", "add", "x", "y",
                                     "--input-schema", "{nope", code=2)


def test_unreachable_and_unauthenticated_exit_3(env: dict[str, str], owner: User) -> None:
    line = fails({**env, "TRACEPIPE_URL": "http://127.0.0.1:9"}, "suite", "list", "--api-key", "tp_x", code=3)
    assert "cannot reach the server" in line
    assert "ConnectError" in line
    bad_key = f"tp_{os.urandom(6).hex()}_" + "0" * 48  # a fresh prefix: test_tokens throttles the all-zero one
    assert "401" in fails(as_key(env, bad_key), "suite", "list", code=3)
    line = fails(env, "suite", "list", "--email", owner.email, "--password", "not the password", code=3)
    assert "authentication failed" in line and "401" in line


def test_options_beat_the_environment(env: dict[str, str], owner: User, make_user: Callable[..., User]) -> None:
    other = make_user()
    slug = unique("mine")
    run_cli(as_login(env, owner), "suite", "create", "Mine", "--slug", slug)
    # TRACEPIPE_API_KEY of another account in the environment; --email on the command line wins.
    listed = run_cli(as_key(env, create_key(other)["key"]), "suite", "list", "--email", owner.email,
                     "--password", owner.password).stdout
    assert slug in listed


# --- key ----------------------------------------------------------------------------------------------

def test_key_create_list_revoke(env: dict[str, str], owner: User, base_url: str) -> None:
    login = as_login(env, owner)
    slug = unique("keyed")
    suite_id = fields(run_cli(login, "suite", "create", "Keyed", "--slug", slug).stdout)["id"]
    r = run_cli(login, "key", "create", "ci", "--access", "read", "--suite", slug)
    created = fields(r.stdout)
    assert created["name"] == "ci" and created["access"] == "read" and created["suites"] == suite_id
    assert created["key"].startswith(created["prefix"] + "_")
    assert "shown only this once" in r.stderr
    token = httpx.post(f"{base_url}/auth/token", headers={"Authorization": f"ApiKey {created['key']}"})
    assert token.status_code == 200

    # A suite-scoped key never sees its owner's keys (DESIGN §9); the login does.
    assert created["prefix"] not in run_cli(as_key(env, created["key"]), "key", "list").stdout
    listed = run_cli(login, "key", "list").stdout
    row = next(line for line in listed.splitlines() if created["prefix"] in line)
    assert row.split()[:4] == [created["id"], "ci", created["prefix"], "read"] and row.endswith("active")
    assert created["key"] not in listed  # never the secret again
    as_json = json.loads(run_cli(login, "key", "list", "--json").stdout)
    assert {k["id"] for k in as_json} >= {created["id"]} and all("key" not in k for k in as_json)

    out = run_cli(login, "key", "revoke", created["prefix"]).stdout
    assert out.startswith(f"revoked ci ({created['prefix']}, {created['id']})")
    assert httpx.post(f"{base_url}/auth/token", headers={"Authorization": f"ApiKey {created['key']}"}
                      ).status_code == 401
    assert "no active API key" in fails(login, "key", "revoke", "ci", code=1)
    assert "401" in fails(as_key(env, created["key"]), "key", "list", code=3)


# --- suite ------------------------------------------------------------------------------------------

def test_suite_lifecycle(env: dict[str, str], owner: User, make_user: Callable[..., User]) -> None:
    login = as_login(env, owner)
    viewer = make_user()
    slug = unique("suite")
    created = fields(run_cli(login, "suite", "create", "Checkout Flow", "--slug", slug,
                             "--description", "buying things").stdout)
    assert UUID.fullmatch(created["id"]) and created["slug"] == slug and created["created_by"] == owner.id
    derived = json.loads(run_cli(login, "suite", "create", f"Derived {slug}!", "--json").stdout)
    assert derived["slug"] == f"derived-{slug}"

    listed = run_cli(login, "suite", "list").stdout.splitlines()
    assert listed[0].split() == ["id", "slug", "name", "role", "created"]
    assert any(line.startswith(created["id"]) and slug in line and " owner " in line for line in listed)

    schema = '{"type": "object", "properties": {"query": {"type": "string"}}}'
    action = fields(run_cli(login, "suite", "action", "add", slug, "search", "--description", "find",
                            "--input-schema", schema).stdout)
    assert action["suite_id"] == created["id"] and json.loads(action["input_schema"]) == json.loads(schema)
    actions = run_cli(login, "suite", "action", "list", created["id"]).stdout
    assert re.search(rf"^{action['id']}\s+search\s+find$", actions, re.M)

    out = run_cli(login, "suite", "member", "add", slug, viewer.id, "--role", "viewer").stdout
    assert out.strip() == f"{viewer.id} is invited as viewer of suite {created['id']}"
    # The invitation grants nothing until the viewer accepts it (DESIGN §9).
    as_viewer = as_login(env, viewer)
    assert slug not in run_cli(as_viewer, "suite", "list").stdout
    pending = run_cli(as_viewer, "suite", "member", "invitations").stdout
    assert created["id"] in pending and created["name"] in pending
    accepted = run_cli(as_viewer, "suite", "member", "accept", created["id"]).stdout
    assert accepted.strip() == f"you are viewer of suite {created['id']}"
    members = run_cli(login, "suite", "member", "list", slug).stdout
    assert re.search(rf"^{owner.id}\s+owner\b", members, re.M) and re.search(rf"^{viewer.id}\s+viewer\b", members,
                                                                              re.M)
    shown = run_cli(login, "suite", "show", slug).stdout
    assert "members (2)" in shown and "actions (1)" in shown and "search" in shown

    # The viewer sees the suite but may not add actions: the server's no, exit 1.
    assert slug in run_cli(as_viewer, "suite", "list").stdout
    line = fails(as_viewer, "suite", "action", "add", slug, "other", code=1)
    assert line.startswith("tracepipe: 403 TP403")
    assert "keep at least one owner" in fails(login, "suite", "member", "remove", slug, owner.id, code=1)
    run_cli(login, "suite", "member", "remove", slug, viewer.id)
    assert "no suite with slug" in fails(as_viewer, "suite", "show", slug, code=1)
    line = fails(as_viewer, "suite", "show", created["id"], code=1)
    assert line == "tracepipe: 404 PGRST116: not found (the row does not exist or you may not see it)"

    assert "pass --yes" in fails(login, "suite", "delete", slug, code=2)
    out = run_cli(login, "suite", "delete", slug, "--yes").stdout
    assert out.strip() == f"deleted suite {slug} ({created['id']})"
    assert "404" in fails(login, "suite", "show", created["id"], code=1)


# --- sessions and examples: transfers with progress ---------------------------------------------------

@pytest.fixture(scope="module")
def big_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "big.zip"
    write_large_bundle(str(path), screenshots=3, screenshot_bytes=2 * 1024 * 1024)
    return path


def test_session_upload_list_download(env: dict[str, str], owner: User, big_bundle: Path, tmp_path: Path) -> None:
    login = as_login(env, owner)
    small = tmp_path / "small.zip"
    small.write_bytes(bundle(n_events=300, screenshots=2))
    r = run_cli(login, "session", "upload", str(big_bundle), str(small))
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    big_id, small_id = (UUID.match(line).group(0) for line in lines)  # type: ignore[union-attr]
    size = human_bytes(big_bundle.stat().st_size)
    assert f"  {big_bundle}  {size}  " in lines[0] and "screenshots=3" in lines[0]
    assert "events=300" in lines[1] and "screenshots=2" in lines[1]
    assert re.search(rf"^big\.zip  {PROGRESS.pattern}", r.stderr, re.M), r.stderr  # bytes, 100%, rate, time
    assert re.search(rf"^big\.zip  \[\.{{20}}\]  0 B / {re.escape(size)}\s+0%  0 B/s  ETA --:--$", r.stderr,
                     re.M), r.stderr
    assert "small.zip" in r.stderr

    listed = run_cli(login, "session", "list").stdout
    assert big_id in listed and small_id in listed
    as_json = json.loads(run_cli(login, "session", "list", "--json", "--limit", "1").stdout)
    assert [s["id"] for s in as_json] == [small_id]

    dest = tmp_path / "copy.zip"
    r = run_cli(login, "session", "download", big_id, "-o", str(dest))
    assert dest.read_bytes() == big_bundle.read_bytes()
    assert r.stdout.strip() == f"{dest}  {size}  (sha256 checked)"
    assert re.search(rf"^copy\.zip  {PROGRESS.pattern}", r.stderr, re.M), r.stderr
    r = run_cli(login, "session", "download", small_id, "-o", str(tmp_path), "--no-progress")
    assert (tmp_path / f"{small_id}.zip").read_bytes() == small.read_bytes() and r.stderr == ""

    line = fails(login, "session", "download", "00000000-0000-0000-0000-000000000000", "-o", str(tmp_path / "x"),
                 code=1)
    assert line.startswith("tracepipe: 404 ") and not (tmp_path / "x").exists()


def test_session_upload_reports_each_bad_file(env: dict[str, str], owner: User, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.zip", tmp_path / "bad.zip"
    good.write_bytes(bundle(n_events=10, screenshots=1))
    bad.write_bytes(b"this is not a zip")
    r = run_cli(as_login(env, owner), "session", "upload", str(bad), str(good), check=False)
    assert r.returncode == 1
    assert len(r.stdout.splitlines()) == 1 and str(good) in r.stdout  # the good one still went up
    assert re.search(rf"^tracepipe: {re.escape(str(bad))}: 400 TP400: .*not a zip", r.stderr, re.M), r.stderr
    assert r.stderr.rstrip().endswith("tracepipe: 1 of 2 uploads failed")


def jsonl(n_lines: int, seed: int) -> bytes:
    filler = "x" * 2000
    return b"".join(json.dumps({"messages": [{"role": "user", "content": f"{seed}-{i} {filler}"},
                                             {"role": "assistant", "content": "ok"}]}).encode() + b"\n"
                    for i in range(n_lines))


def test_example_list_and_export(env: dict[str, str], owner: User, base_url: str, tmp_path: Path) -> None:
    login = as_login(env, owner)
    slug = unique("export")
    suite_id = fields(run_cli(login, "suite", "create", "Export", "--slug", slug).stdout)["id"]
    bodies = [jsonl(250, i) for i in range(6)]  # ~3 MiB
    with Client(base_url) as tp:
        tp.login(owner.email, owner.password)
        ids = [tp.register_example(suite_id, "model-a" if i % 2 else "model-b", body)["id"]
               for i, body in enumerate(bodies)]

    listed = run_cli(login, "example", "list", "--suite", slug, "--model", "model-a").stdout
    assert sum(1 for line in listed.splitlines() if UUID.match(line)) == 3
    assert all(i in listed for i in ids[1::2])

    dest = tmp_path / "all.jsonl"
    r = run_cli(login, "example", "export", "--suite", slug, "-o", str(dest))
    assert sorted(dest.read_bytes().splitlines()) == sorted(b"".join(bodies).splitlines())
    assert r.stdout.strip() == f"{dest}  6 examples  {human_bytes(dest.stat().st_size)}"
    # No total is known for an export: bytes and rate, then the closing line.
    assert re.search(r"^all\.jsonl  [\d.]+ MiB  [\d.]+ [KMG]?i?B/s  in \d+:\d\d$", r.stderr, re.M), r.stderr

    parts = []
    for split in ("train", "validation"):
        out = tmp_path / f"{split}.jsonl"
        summary = json.loads(run_cli(login, "example", "export", "--suite", suite_id, "--split", split,
                                     "--validation-percent", "50", "-o", str(out), "--json",
                                     "--no-progress").stdout)
        assert summary["path"] == str(out) and summary["bytes"] == out.stat().st_size
        parts.append(summary["examples"])
    assert sum(parts) == 6
    line = fails(login, "example", "export", "--suite", "no-such-suite", "-o", str(tmp_path / "n"), code=1)
    assert "no suite with slug 'no-such-suite'" in line and not (tmp_path / "n").exists()


# --- progress line ----------------------------------------------------------------------------------

class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_rate_eta_and_redraw() -> None:
    now = [0.0]
    out = Tty()
    bar = ProgressLine("f.zip", stream=out, clock=lambda: now[0])
    mib = 1024 * 1024
    for second in range(1, 5):
        now[0] = float(second)
        bar(second * 2 * mib, 10 * mib)
    assert bar.line() == "f.zip  [################....]  8.0 MiB / 10.0 MiB   80%  2.0 MiB/s  ETA 0:01"
    bar(mib, 10 * mib)  # a retry starts again from 0: the rate is measured anew
    assert bar.rate() == 0.0
    bar.finish()
    text = out.getvalue()
    assert text.startswith("\rf.zip") and text.endswith("in 0:00\x1b[K\n") and "\n" not in text[:-1]

    log = io.StringIO()  # not a terminal: whole lines, at most one per interval, and the last
    now[0] = 10.0
    bar = ProgressLine("e.jsonl", stream=log, clock=lambda: now[0], interval=1.0)
    for tenth in range(1, 31):
        now[0] = 10 + tenth / 10
        bar(tenth * 100_000, -1)
    bar.finish()
    lines = log.getvalue().splitlines()
    assert 3 <= len(lines) <= 5 and all("%" not in line and "ETA" not in line for line in lines)
    assert lines[-1].startswith("e.jsonl  2.9 MiB  ") and lines[-1].endswith("in 0:03")


# --- demo ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_run(env: dict[str, str]) -> Iterator[tuple[Any, str]]:
    r = run_cli(env, "demo")
    yield r, r.stdout


def test_demo_loads_a_living_sample(env: dict[str, str], demo_run: tuple[Any, str], base_url: str,
                                    tmp_path: Path) -> None:
    r, out = demo_run
    key = re.search(r"^  api key   (tp_\S+)$", out, re.M)
    password = re.search(r"^  password  (\S+)$", out, re.M)
    assert key and password, out
    assert f"email     {demo.DEMO_EMAIL}" in out and "demo: signed up as" in r.stderr
    assert re.search(r"rows added in [\d.]+ s", out)
    assert re.search(r"^  pipeline     9 jobs done by a worker this run, 9 examples$", out, re.M), out

    with Client(base_url, api_key=key.group(1)) as tp:
        suites = {s["slug"]: s for s in tp.list_suites({"slug": "like.demo-*"})}
        assert set(suites) == {s.slug for s in demo.SUITES}
        for spec in demo.SUITES:
            sid = suites[spec.slug]["id"]
            actions = tp.list_actions(sid)
            assert {a["name"] for a in actions} == {a.name for a in spec.actions}
            maps = tp.list_action_tool_maps(sid)
            assert {m["action_id"] for m in maps} == {a["id"] for a in actions}
            sessions = tp.list_sessions({"suite_id": f"eq.{sid}"})
            assert len(sessions) == demo.SESSIONS_PER_SUITE
            assert all(s["event_count"] >= 800 and s["screenshot_count"] >= 4 and s["network_count"] >= 20
                       for s in sessions)
            examples = tp.list_examples({"suite_id": f"eq.{sid}", "metadata->>source": "eq.demo"})
            assert len(examples) == demo.SESSIONS_PER_SUITE * demo.EXAMPLES_PER_SESSION
            assert {e["session_id"] for e in examples} == {s["id"] for s in sessions}
            # The demo's pipeline worker turned every session's job into one example with lineage.
            made = tp.list_examples({"suite_id": f"eq.{sid}", "metadata->>source": "eq.demo pipeline"})
            assert sorted(str(e["session_id"]) for e in made) == sorted(s["id"] for s in sessions)
            assert all(e["job_id"] for e in made)
        servers = tp.list_mcp_servers({"name": "like.demo-*"})
        assert {s["name"] for s in servers} == set(demo.SERVERS)
        assert sum(len(tp.list_tools(s["id"])) for s in servers) == sum(len(t[3]) for t in demo.SERVERS.values())
        examples = tp.list_examples({"metadata->>source": "eq.demo"})
        assert {e["model"] for e in examples} == set(demo.MODELS)
        record = next(tp.iter_messages(examples[0]["id"]))
        assert record["messages"][0]["role"] == "system" and record["tools"]
        session = tp.list_sessions({"limit": "1"})[0]
        copy = tp.download_session(session["id"], tmp_path / "demo.zip")
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == session["sha256"]

    # The CLI commands the demo suggests work with that key.
    suggested = as_key(env, key.group(1))
    assert "demo-checkout" in run_cli(suggested, "suite", "list").stdout
    assert "demo-shop-catalog/search_catalog" in run_cli(suggested, "suite", "show", "demo-checkout").stdout


def test_demo_twice_adds_nothing_but_a_key(env: dict[str, str], demo_run: tuple[Any, str], base_url: str) -> None:
    _, first = demo_run
    first_key = re.search(r"^  api key   (tp_\S+)$", first, re.M).group(1)  # type: ignore[union-attr]
    r = run_cli(env, "demo", "--json")
    report = json.loads(r.stdout)
    assert report["created"] == 0 and report["sessions"] == 9 and report["examples"] == 18
    assert report["pipeline_jobs"] == 0, "the demo sessions' jobs were done by the first run"
    assert report["password"] in first and report["api_key"] != first_key
    assert "signed in as" in r.stderr
    assert httpx.post(f"{base_url}/auth/token", headers={"Authorization": f"ApiKey {first_key}"}).status_code == 401
    with Client(base_url, api_key=report["api_key"]) as tp:
        assert len(tp.list_sessions({"metadata->>demo_key": "not.is.null"})) == 9
        assert len(tp.list_examples({"metadata->>source": "eq.demo"})) == 18
    line = fails(env, "demo", "--password", "not the demo password", code=3)
    assert "exists with another password" in line


def test_status_names_each_component_where_it_listens(stack: Stack, stack_env: dict[str, str]) -> None:
    """`tracepipe status` shows the address each component really listens on: PostgREST and
    ext on their unix sockets (TP_SERVICE_SOCKETS), not the loopback ports they no longer bind."""
    out = run_cli(stack_env, "status").stdout.splitlines()
    table = out[1:out.index(next(line for line in out if line.startswith("proxy:")))]  # then backup, replica lines
    rows = {line.split()[0]: line.split() for line in table if line and ":" not in line.split()[0]}
    assert {"postgres", "seaweedfs", "postgrest", "ext", "nginx"} <= set(rows), out
    assert all(row[1] == "up" for row in rows.values()), out
    for name in ("postgrest", "ext"):
        socket = stack.service_socket(name)
        assert socket is not None and socket.is_socket()
        assert rows[name][3] == str(socket), out
    assert rows["nginx"][3] == str(stack.s.proxy_port), out
