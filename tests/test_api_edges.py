"""Edges of ext's API found trying it as a new user would (issue 14, "also seen"): HEAD on the
stream paths, `lines=a-` meaning "from a to the end", and logout with an API key's token."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tests.bundles import bundle
from tests.conftest import User, assert_error_body, create_key, create_suite, key_client, unique

JSONL = {"Content-Type": "application/jsonl"}


@pytest.fixture(scope="module")
def example(person: User, suite: dict[str, Any]) -> dict[str, Any]:
    lines = b"".join(json.dumps({"messages": [{"role": "user", "content": f"line {i}"}]}).encode() + b"\n"
                     for i in range(1, 6))
    r = person.client.post("/examples", params={"suite_id": suite["id"], "model": "gpt-test"}, content=lines,
                           headers=JSONL)
    assert r.status_code == 201, r.text
    return {**r.json(), "lines": lines.splitlines(keepends=True)}


@pytest.fixture(scope="module")
def session(person: User) -> dict[str, Any]:
    r = person.client.post("/sessions", content=bundle(), headers={"Content-Type": "application/zip"})
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_lines_from_a_to_the_end(person: User, example: dict[str, Any]) -> None:
    url = f"/examples/{example['id']}/messages"
    lines = example["lines"]
    assert person.client.get(url, params={"lines": "2-"}).content == b"".join(lines[1:])
    assert person.client.get(url, params={"lines": "1-"}).content == b"".join(lines)
    assert person.client.get(url, params={"lines": "3"}).content == lines[2]  # one line alone, as before
    assert person.client.get(url, params={"lines": "2-3"}).content == b"".join(lines[1:3])
    r = person.client.get(url, params={"lines": "x-"})
    assert r.status_code == 400
    body = assert_error_body(r)
    assert body["details"] == "x-" and "a-" in body["hint"]


def test_head_answers_like_get_without_a_body(person: User, example: dict[str, Any],
                                              session: dict[str, Any]) -> None:
    paths = [f"/examples/{example['id']}/messages", f"/sessions/{session['id']}/bundle", "/examples/export",
             f"/sessions/{session['id']}/files/manifest.json"]
    for path in paths:
        get = person.client.get(path)
        head = person.client.head(path)
        assert get.status_code == 200, (path, get.status_code, get.text[:200])
        assert head.status_code == 200, (path, head.status_code, head.text[:200])
        assert head.content == b""
        for name in ("content-type", "etag", "content-length"):
            assert head.headers.get(name) == get.headers.get(name), (path, name)


def test_head_of_someone_elses_stream_is_refused_as_get_is(person: User, example: dict[str, Any],
                                                          make_user: Callable[..., User]) -> None:
    other = make_user()
    path = f"/examples/{example['id']}/messages"
    assert other.client.head(path).status_code == other.client.get(path).status_code == 404


def test_logout_with_an_api_key_token_is_refused_and_says_how_to_revoke(base_url: str,
                                                                        make_user: Callable[..., User]) -> None:
    owner = make_user()
    create_suite(owner)
    key = create_key(owner)
    with key_client(base_url, key["key"]) as keyed:
        r = keyed.post("/auth/logout")
        assert r.status_code == 400, r.text
        body = assert_error_body(r)
        assert "API key" in body["message"] and "DELETE /api-keys/{id}" in body["hint"]
        assert keyed.get("/suites").status_code == 200  # nothing was pretended: the token still works
        assert owner.client.delete(f"/api-keys/{key['id']}").status_code == 200  # what the hint says
        assert keyed.get("/suites").status_code == 401
    # a storefront session's logout is unchanged
    assert owner.client.post("/auth/logout").status_code == 204


def test_a_key_limited_to_too_many_suites_is_refused_naming_the_field(person: User) -> None:
    """A key's suites ride in every token exchanged for it: past MAX_KEY_SUITES the token would
    outgrow the proxy's header limit, so creating such a key is 422 naming `suites`, and no key
    is made."""
    from ext.routers.api_keys import MAX_KEY_SUITES

    before = person.client.get("/api-keys").json()
    r = person.client.post("/api-keys", json={"name": unique("key"),
                                             "suites": [str(uuid.uuid4()) for _ in range(MAX_KEY_SUITES + 1)]})
    assert r.status_code == 422, r.text
    body = assert_error_body(r)
    assert "suites" in json.dumps(body), body
    assert person.client.get("/api-keys").json() == before
