"""Data integrity (DESIGN.md §8, issue 6): every acknowledged upload's sha256 matches the
stored object, and `tracepipe scrub` re-verifies every object against its row — size and
sha256 — and reports orphans both ways, with exit code 1 when anything is off.

The objects are broken behind the API's back (boto3 straight to the bucket) and restored
afterwards. Other tests may have left rows without objects on purpose (the 1M-row scale
seed has no objects), so each report is compared with the one taken before this module
changed anything: what this module does must show up exactly, and nothing else."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest

from tests import bundles
from tests.conftest import User, create_suite, run_cli
from tracepipe import credentials
from tracepipe.stack import Stack

PROBLEMS = ("rows_without_object", "size_mismatch", "digest_mismatch", "objects_without_row")


def scrub(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    result = run_cli(env, "scrub", *args, check=False)
    assert result.returncode in (0, 1), (result.returncode, result.stderr)
    report = json.loads(result.stdout)
    assert set(report) == {"ok", "checked", *PROBLEMS}, report.keys()
    assert report["ok"] == (result.returncode == 0) == (not any(report[k] for k in PROBLEMS))
    return result.returncode, report


def problems(report: dict[str, Any]) -> dict[str, set[str]]:
    return {k: set(report[k]) for k in PROBLEMS}


@pytest.fixture(scope="module")
def s3(stack: Stack, secrets: credentials.StackSecrets) -> Any:
    return boto3.client("s3", endpoint_url=stack.s.s3_endpoint, aws_access_key_id=secrets.s3_access_key,
                        aws_secret_access_key=secrets.s3_secret_key, region_name=stack.s.s3_region)


@pytest.fixture(scope="module")
def baseline(stack_env: dict[str, str]) -> dict[str, Any]:
    """The scrub before this module uploads or breaks anything."""
    return scrub(stack_env)[1]


@pytest.fixture(scope="module")
def uploads(baseline: dict[str, Any], make_user: Callable[..., User]) -> Iterator[dict[str, Any]]:
    """Two sessions and two examples of a user of their own, with the bytes that were sent."""
    owner = make_user()
    suite = create_suite(owner)
    sent: dict[str, bytes] = {}
    rows: dict[str, dict[str, Any]] = {}
    for i in range(2):
        body = bundles.bundle(n_events=100 + i, screenshots=1)
        r = owner.client.post("/sessions", content=body, headers={"Content-Type": "application/zip"})
        assert r.status_code == 201, r.text
        key = f"sessions/{r.json()['id']}/bundle.zip"
        sent[key], rows[key] = body, r.json()
        lines = b"".join(json.dumps({"messages": [{"role": "user", "content": f"hello {i} {n}"},
                                                  {"role": "assistant", "content": "hi"}]}).encode() + b"\n"
                         for n in range(20 + i))
        r = owner.client.post("/examples", params={"suite_id": suite["id"], "model": "integrity-model"},
                              content=lines, headers={"Content-Type": "application/jsonl"})
        assert r.status_code == 201, r.text
        key = f"examples/{r.json()['id']}/messages.jsonl"
        sent[key], rows[key] = lines, r.json()
    yield {"owner": owner, "sent": sent, "rows": rows}
    for key, row in rows.items():
        path = f"/sessions/{row['id']}" if key.startswith("sessions/") else f"/examples/{row['id']}"
        owner.client.delete(path)


def test_every_acknowledged_upload_matches_its_object(uploads: dict[str, Any], s3: Any, stack: Stack) -> None:
    for key, body in uploads["sent"].items():
        row = uploads["rows"][key]
        digest = hashlib.sha256(body).hexdigest()
        assert (row["sha256"], row["size_bytes"]) == (digest, len(body)), key
        stored = s3.get_object(Bucket=stack.s.bucket, Key=key)["Body"].read()
        assert hashlib.sha256(stored).hexdigest() == digest, key


def test_after_uploads_the_scrub_finds_nothing_new(uploads: dict[str, Any], baseline: dict[str, Any],
                                                    stack_env: dict[str, str]) -> None:
    code, report = scrub(stack_env)
    assert report["checked"] >= baseline["checked"] + len(uploads["sent"])
    assert problems(report) == problems(baseline)
    if baseline["ok"]:
        assert code == 0 and report["ok"]


def test_the_scrub_reports_corruption_loss_and_strays(uploads: dict[str, Any], baseline: dict[str, Any],
                                                      stack_env: dict[str, str], s3: Any, stack: Stack) -> None:
    bucket = stack.s.bucket
    sessions = sorted(k for k in uploads["sent"] if k.startswith("sessions/"))
    examples = sorted(k for k in uploads["sent"] if k.startswith("examples/"))
    corrupted, lost = sessions
    resized, _ = examples
    strays = [f"sessions/{uuid.uuid4()}/bundle.zip", f"examples/{uuid.uuid4()}/messages.jsonl"]
    original = uploads["sent"][corrupted]
    flipped = original[:-1] + bytes([original[-1] ^ 0xFF])  # same size, one bit pattern off
    try:
        s3.put_object(Bucket=bucket, Key=corrupted, Body=flipped)
        s3.put_object(Bucket=bucket, Key=resized, Body=uploads["sent"][resized] + b"\n")
        s3.delete_object(Bucket=bucket, Key=lost)
        for stray in strays:
            s3.put_object(Bucket=bucket, Key=stray, Body=b"nobody's")

        code, report = scrub(stack_env)
        assert code == 1 and not report["ok"]
        new = {k: v - problems(baseline)[k] for k, v in problems(report).items()}
        assert new == {"digest_mismatch": {corrupted}, "size_mismatch": {resized},
                       "rows_without_object": {lost}, "objects_without_row": set(strays)}, new

        # without digests nothing is read: the same-size corruption goes unseen, the rest does not
        code, report = scrub(stack_env, "--no-digests")
        assert code == 1
        new = {k: v - problems(baseline)[k] for k, v in problems(report).items()}
        assert new == {"digest_mismatch": set(), "size_mismatch": {resized},
                       "rows_without_object": {lost}, "objects_without_row": set(strays)}, new
    finally:
        for key in (corrupted, resized, lost):
            s3.put_object(Bucket=bucket, Key=key, Body=uploads["sent"][key])
        for stray in strays:
            s3.delete_object(Bucket=bucket, Key=stray)

    code, report = scrub(stack_env)
    assert problems(report) == problems(baseline)
    if baseline["ok"]:
        assert code == 0
    # the restored objects stream back byte-identical through the API
    owner = uploads["owner"]
    for key in (corrupted, lost):
        r = owner.client.get(f"/sessions/{uploads['rows'][key]['id']}/bundle")
        assert r.status_code == 200 and r.content == uploads["sent"][key]
    r = owner.client.get(f"/examples/{uploads['rows'][resized]['id']}/messages")
    assert r.status_code == 200 and r.content == uploads["sent"][resized]
