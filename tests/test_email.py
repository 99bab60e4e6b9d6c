"""Emails: one normal form in Python and SQL, confusable duplicates refused, verification
over real SMTP (the stack's mail sink), and no database text with the password hash."""

from __future__ import annotations

import json
import re
import time
import unicodedata
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from yoyo import get_backend, read_migrations

from ext import emails
from tests.conftest import User, assert_error_body, create_key, key_client, run_cli
from tests.test_migrations import scratch_db  # noqa: F401 - the fixture
from tracepipe import mailsink, migrate
from tracepipe.settings import REPO_ROOT
from tracepipe.stack import Stack

PASSWORD = "correct horse battery staple"
CODE = re.compile(r"\btpv_[A-Za-z0-9_-]{20,}")

# (input, normal form): the spellings PostgreSQL's lower() and Python's lower() disagreed on.
TRICKY = [
    ("rt-\u212aim@example.test", "rt-kim@example.test"),      # KELVIN SIGN
    ("\u0130stanbul@example.test", "i\u0307stanbul@example.test"),  # İ: casefold keeps the dot
    ("\uff32\uff34-kim@\uff25xample.test", "rt-kim@example.test"),   # fullwidth
    ("Stra\u00dfe@example.test", "strasse@example.test"),      # ß
    ("STRA\u1e9eE@example.test", "strasse@example.test"),      # capital ß
    ("  Bob@Example.TEST  ", "bob@example.test"),               # surrounding spaces
    ("\u03a3\u03b1\u03c2@example.test", "\u03c3\u03b1\u03c3@example.test"),  # final sigma
    ("\ufb03x@example.test", "ffix@example.test"),              # ligature
    ("e\u0301@example.test", "\u00e9@example.test"),            # combining acute composes
]


def wait_for_mail(stack: Stack, to: str, after: set[str] | None = None) -> mailsink.StoredMail:
    """The first message to `to` the sink stored (not one of `after`): mail leaves ext in the
    background, so it may arrive a moment after the response."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for m in mailsink.messages(stack.mail_dir):
            if m.to == to and m.id not in (after or set()):
                return m
        time.sleep(0.1)
    raise AssertionError(f"no mail to {to} in {stack.mail_dir}")


def signup(base_url: str, email: str) -> httpx.Response:
    return httpx.post(f"{base_url}/auth/signup", json={"email": email, "password": PASSWORD}, timeout=30)


def login(base_url: str, email: str, password: str = PASSWORD) -> httpx.Response:
    return httpx.post(f"{base_url}/auth/login", json={"email": email, "password": password}, timeout=30)


def me(base_url: str, token: str) -> dict[str, Any]:
    r = httpx.get(f"{base_url}/users/me", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.test"


# --- one normal form ------------------------------------------------------------------------------

def test_python_and_sql_agree_on_the_tricky_spellings(su: psycopg.Connection[dict[str, Any]]) -> None:
    for raw, expected in TRICKY:
        assert emails.normalize(raw) == expected, raw
        row = su.execute("select app.normalize_email(%s) as n, app.email_skeleton(%s) as s",
                         [raw, expected]).fetchone()
        assert row is not None
        assert row["n"] == expected, (raw, row["n"])
        assert row["s"] == emails.skeleton(expected), raw
    # PostgreSQL's own lower() is what disagreed: it keeps ß and drops İ's dot.
    row = su.execute("select lower(%s) as l", ["Stra\u00dfe"]).fetchone()
    assert row is not None and row["l"] != emails.normal_form("Stra\u00dfe")


def test_python_and_sql_agree_on_every_assigned_code_point(su: psycopg.Connection[dict[str, Any]]) -> None:
    # Every assigned character (but NUL, which PostgreSQL text cannot hold), between
    # separators that compose with nothing, in chunks; both sides see the same strings.
    chars = [chr(cp) for cp in range(1, 0x110000) if unicodedata.category(chr(cp)) not in ("Cn", "Cs", "Co")]
    assert len(chars) > 140_000
    mismatches: list[tuple[str, Any, Any]] = []
    for i in range(0, len(chars), 8000):
        text = "\x01".join(chars[i:i + 8000])
        row = su.execute("select app.normalize_email(%(t)s) as n, app.email_skeleton(app.normalize_email(%(t)s)) as s",
                         {"t": text}).fetchone()
        assert row is not None
        python = emails.normal_form(text)
        if row["n"] != python:
            ours, theirs = python.split("\x01"), row["n"].split("\x01")
            mismatches += [(hex(ord(c)), a, b) for c, a, b in zip(chars[i:i + 8000], ours, theirs, strict=False)
                           if a != b][:5]
        elif row["s"] != emails.skeleton(python):
            mismatches.append(("skeleton", i, None))
    ascii_only = "".join(chr(cp) for cp in range(1, 128))  # app.casefold's ASCII fast path
    row = su.execute("select app.normalize_email(%s) as n", [ascii_only]).fetchone()
    assert row is not None and row["n"] == emails.normal_form(ascii_only)
    assert mismatches == []


def test_the_sql_table_is_the_generated_one() -> None:
    assert emails.casefold_sql() in (REPO_ROOT / "db" / "schema" / "05_email.sql").read_text()


def test_the_database_refuses_an_email_not_in_normal_form(su: psycopg.Connection[dict[str, Any]]) -> None:
    for bad in ("Upper@example.test", "a@example.test\n", "stra\u00dfe@example.test"):
        with pytest.raises(psycopg.errors.CheckViolation) as e:
            su.execute("insert into app.users (email, password_hash) values (%s, '$argon2id$v=19$secret')", [bad])
        assert "argon2" not in str(e.value) and "argon2" not in (e.value.diag.message_detail or "")


# --- one account per address ------------------------------------------------------------------------

def test_confusable_spellings_are_refused_and_sign_in_to_the_same_account(base_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    ascii_email = f"rt-kim-{tag}@example.test"
    r = signup(base_url, ascii_email)
    assert r.status_code == 201, r.text
    owner = r.json()["id"]
    taken = signup(base_url, ascii_email)
    assert taken.status_code == 409
    variants = [
        f"rt-\u212aim-{tag}@example.test",                                   # Kelvin sign
        "".join(chr(ord(c) + 0xFEE0) if c.isalnum() else c for c in f"RT-KIM-{tag}") + "@example.test",  # fullwidth
        f"RT-KIM-{tag}@EXAMPLE.test",
        f"rt-k\u0456m-{tag}@example.test",                                   # Cyrillic і
        f"rt-k\u00edm-{tag}@example.test",                                   # í
    ]
    for variant in variants:
        r = signup(base_url, variant)
        assert r.status_code == 409, (variant, r.text)
        assert r.json() == taken.json(), variant  # exactly as a taken email: no hint of which rule
    for variant in variants[:3]:  # the spellings of the same address sign in to the one account
        r = login(base_url, variant)
        assert r.status_code == 200, (variant, r.text)
        assert me(base_url, r.json()["access_token"])["id"] == owner
    assert login(base_url, variants[3]).status_code == 401  # a look-alike is another address


def test_every_spelling_of_an_address_shares_one_login_throttle(base_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    email = f"throttle-{tag}@example.test"
    assert signup(base_url, email).status_code == 201
    spellings = [email, email.upper(), f"throttle-{tag}@EXAMPLE.test", email.replace("t", "\uff54", 1),
                 email.replace("e", "\uff45", 1), email.replace("h", "\uff48", 1), email.replace("r", "\uff52", 1),
                 email.replace("o", "\uff4f", 1), email.replace("l", "\uff4c", 1), email.replace("x", "\uff58", 1)]
    for spelling in spellings:  # login_max_failures (10) wrong passwords, each spelt differently
        assert login(base_url, spelling, "wrong password!").status_code == 401, spelling
    r = login(base_url, email.replace("a", "\uff41", 1), "wrong password!")
    assert r.status_code == 429, r.text
    assert login(base_url, email).status_code == 429  # the owner's budget is the one that was spent


def test_an_email_with_a_newline_is_422_and_no_hash_reaches_body_or_logs(base_url: str, stack: Stack) -> None:
    logs = [stack.logfile("ext"), stack.logfile("postgres")]
    offsets = {p: p.stat().st_size for p in logs}
    r = signup(base_url, fresh("newline") + "\n")
    assert r.status_code == 422, r.text
    body = assert_error_body(r)
    assert "email" in body["message"], body
    assert "argon2" not in r.text and "Failing row" not in r.text
    r = login(base_url, "someone@example.test\n")
    assert r.status_code == 422 and "email" in assert_error_body(r)["message"]
    time.sleep(0.5)  # let the servers flush what they would have logged
    for path in logs:
        with open(path, "rb") as f:
            f.seek(offsets[path])
            written = f.read().decode(errors="replace")
        assert "argon2" not in written and "Failing row" not in written, (path, written[-2000:])


# --- verification over SMTP ---------------------------------------------------------------------

def test_signup_mails_a_code_that_verifies_the_address_once(base_url: str, stack: Stack,
                                                           stack_env: dict[str, str]) -> None:
    email = fresh("verify")
    r = signup(base_url, email)
    assert r.status_code == 201, r.text
    assert r.json()["email_verified"] is False
    token = r.json()["access_token"]
    assert me(base_url, token)["email_verified"] is False

    message = wait_for_mail(stack, email)
    code = CODE.search(message.text())
    assert code, message.text()
    # the operator's view of the same message
    listed = json.loads(run_cli(stack_env, "mail", "list", "--json").stdout)
    assert {"id": message.id, "to": email} in [{"id": m["id"], "to": m["to"]} for m in listed]
    shown = run_cli(stack_env, "mail", "show", message.id).stdout
    assert code.group(0) in shown and "Subject: Verify your Tracepipe email address" in shown

    r = httpx.post(f"{base_url}/auth/verify-email", json={"token": code.group(0)}, timeout=30)
    assert r.status_code == 200, r.text
    assert me(base_url, token)["email_verified"] is True

    again = httpx.post(f"{base_url}/auth/verify-email", json={"token": code.group(0)}, timeout=30)
    assert again.status_code == 400 and assert_error_body(again)["message"] == "verification code already used"
    r = httpx.post(f"{base_url}/auth/verify-email/resend", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 409, r.text


def test_an_international_address_gets_its_mail(base_url: str, stack: Stack) -> None:
    raw = f"J\u00d6RG-\u0130-{uuid.uuid4().hex[:8]}@b\u00fccher.example"
    r = signup(base_url, raw)
    assert r.status_code == 201, r.text
    email = r.json()["email"]
    assert email == emails.normalize(raw) and email != raw
    message = wait_for_mail(stack, email)  # over SMTPUTF8, to the normal form
    assert CODE.search(message.text())


def test_wrong_expired_and_replaced_codes_are_refused(base_url: str, stack: Stack,
                                                     su: psycopg.Connection[dict[str, Any]]) -> None:
    email = fresh("codes")
    r = signup(base_url, email)
    assert r.status_code == 201
    user_id, token = r.json()["id"], r.json()["access_token"]
    first = wait_for_mail(stack, email)
    first_code = CODE.search(first.text())
    assert first_code

    wrong = httpx.post(f"{base_url}/auth/verify-email", json={"token": "tpv_" + "x" * 43}, timeout=30)
    assert wrong.status_code == 400 and assert_error_body(wrong)["message"] == "invalid verification code"

    r = httpx.post(f"{base_url}/auth/verify-email/resend", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 202, r.text
    assert r.json() == {"sent_to": email}
    second = wait_for_mail(stack, email, after={first.id})
    second_code = CODE.search(second.text())
    assert second_code and second_code.group(0) != first_code.group(0)
    replaced = httpx.post(f"{base_url}/auth/verify-email", json={"token": first_code.group(0)}, timeout=30)
    assert replaced.status_code == 400, replaced.text  # one live code per account

    # the code's lifetime passes (set in the database: no test waits for a day)
    su.execute("update app.email_verifications set expires_at = now() - interval '1 second' where user_id = %s",
               [user_id])
    expired = httpx.post(f"{base_url}/auth/verify-email", json={"token": second_code.group(0)}, timeout=30)
    assert expired.status_code == 400 and assert_error_body(expired)["message"] == "verification code expired"
    assert me(base_url, token)["email_verified"] is False

    stored = su.execute("select token_hash from app.email_verifications where user_id = %s", [user_id]).fetchall()
    assert stored and all(second_code.group(0).encode() not in bytes(s["token_hash"]) for s in stored)


def test_resend_is_rate_limited_and_needs_a_session(base_url: str, stack: Stack) -> None:
    email = fresh("resend")
    r = signup(base_url, email)
    assert r.status_code == 201
    headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
    assert httpx.post(f"{base_url}/auth/verify-email/resend", timeout=30).status_code == 401
    statuses = [httpx.post(f"{base_url}/auth/verify-email/resend", headers=headers, timeout=30).status_code
                for _ in range(6)]
    assert statuses == [202] * 5 + [429], statuses  # verify_resend_max per throttle window


def test_resend_refuses_api_key_tokens(make_user: Callable[..., User], base_url: str) -> None:
    owner = make_user()
    with key_client(base_url, create_key(owner)["key"]) as client:
        r = client.post("/auth/verify-email/resend")
    assert r.status_code == 403 and assert_error_body(r)["message"] == "a session token is required"


def test_signup_succeeds_while_mail_is_down(base_url: str, stack: Stack) -> None:
    stack.stop_component("mail")
    try:
        email = fresh("nomail")
        r = signup(base_url, email)
        assert r.status_code == 201, r.text
        assert login(base_url, email).status_code == 200
    finally:
        stack.start_component("mail")
    # ext retries: the mail arrives once the server is back
    message = wait_for_mail(stack, email)
    assert CODE.search(message.text())


def test_the_sink_keeps_its_mail_private(stack: Stack) -> None:
    assert Path(stack.mail_dir).stat().st_mode & 0o077 == 0


# --- the upgrade ------------------------------------------------------------------------------------

def _migrate_to_0005_with(url: str, emails_before: list[str]) -> Any:
    backend = get_backend(migrate.yoyo_url(url))
    migrations = read_migrations(str(migrate.DB_DIR / "migrations"))
    with backend.lock():
        for m in migrations:
            if m.id == "0006_email_verification":
                break
            backend.apply_migrations(backend.to_apply(migrations.__class__([m])))
    with psycopg.connect(url) as conn:
        for email in emails_before:
            conn.execute("insert into app.users (email, password_hash) values (%s, 'x')", [email])
    return backend, migrations


def test_the_migration_rewrites_existing_emails(scratch_db: Callable[[str], str]) -> None:  # noqa: F811
    url = scratch_db("mail_upgrade")
    backend, migrations = _migrate_to_0005_with(url, ["Bob@Example.TEST", "Stra\u00dfe@example.test",
                                                       "\uff41nn@example.test"])
    with backend.lock():
        backend.apply_migrations(backend.to_apply(migrations))
    with psycopg.connect(url) as conn:
        rows = conn.execute("select email, email_skeleton from app.users order by email").fetchall()
    assert rows == [("ann@example.test", "ann@example.test"), ("bob@example.test", "bob@example.test"),
                    ("strasse@example.test", "strasse@example.test")]


def test_the_migration_stops_on_accounts_that_become_one(scratch_db: Callable[[str], str]) -> None:  # noqa: F811
    url = scratch_db("mail_clash")
    backend, migrations = _migrate_to_0005_with(url, ["strasse@example.test", "Stra\u00dfe@example.test"])
    with backend.lock(), pytest.raises(psycopg.errors.RaiseException, match="merge or rename"):
        backend.apply_migrations(backend.to_apply(migrations))
