"""A million example rows across 1,000 suites and 20 models: a member's first page of one
suite's examples for one model uses an index with RLS on, and RLS helpers run once per
statement (InitPlans), not per row. Plans are read with EXPLAIN as the caller's role."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import User, as_role, run_cli

ROWS = 1_000_000


@pytest.fixture(scope="module")
def seeded(stack_env: dict[str, str], superuser_dsn: str, make_user: Callable[..., User]) -> Iterator[dict[str, Any]]:
    run_cli(stack_env, "seed-examples", "--rows", str(ROWS), "--suites", "1000", "--models", "20")
    member = make_user()
    with psycopg.connect(superuser_dsn, autocommit=True, row_factory=dict_row) as su:
        suite = su.execute("select id from app.suites where slug = 'scale-suite-0042'").fetchone()
        assert suite is not None
        su.execute("insert into app.suite_members (suite_id, user_id, invitee, role, accepted, accepted_at)"
                     " values (%s, %s, %s, 'viewer', true, now())",
                   [suite["id"], member.id, member.id])
    yield {"member": member, "suite_id": str(suite["id"])}


def _plan(dsn: str, member: User, sql: str, params: list[Any]) -> dict[str, Any]:
    claims = {"sub": member.id, "role": "tp_user"}
    with as_role(dsn, "tp_user", claims) as conn:
        row = conn.execute(f"explain (format json) {sql}", params).fetchone()
    assert row is not None
    plan: dict[str, Any] = row["QUERY PLAN"][0]["Plan"]
    return plan


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def test_the_seed_holds_a_million_rows(seeded: dict[str, Any], su: psycopg.Connection[dict[str, Any]]) -> None:
    row = su.execute("select count(*) as n, count(distinct suite_id) as suites, count(distinct model) as models"
                     " from app.examples e join app.suites s on s.id = e.suite_id"
                     " where s.slug like 'scale-suite-%'").fetchone()
    assert row == {"n": ROWS, "suites": 1000, "models": 20}


def test_first_page_of_a_suite_and_model_uses_the_index(seeded: dict[str, Any], superuser_dsn: str) -> None:
    plan = _plan(superuser_dsn, seeded["member"],
                 "select * from api.examples where suite_id = %s and model = %s order by created_at desc limit 20",
                 [seeded["suite_id"], "model-07"])
    nodes = list(_nodes(plan))
    scans = [n for n in nodes if n.get("Relation Name") == "examples"]
    assert scans and all(n["Node Type"] in ("Index Scan", "Index Only Scan") for n in scans), json.dumps(plan)
    assert scans[0]["Index Name"] == "examples_suite_model_idx"
    # The policy's helper is an InitPlan (evaluated once), not a per-row SubPlan.
    assert any(n.get("Parent Relationship") == "InitPlan" for n in nodes), json.dumps(plan)
    assert not any(n.get("Parent Relationship") == "SubPlan" for n in nodes), json.dumps(plan)


def test_listing_across_the_member_suites_uses_an_index_too(seeded: dict[str, Any], superuser_dsn: str) -> None:
    plan = _plan(superuser_dsn, seeded["member"],
                 "select * from api.examples where model = %s order by created_at desc limit 20", ["model-03"])
    scans = [n for n in _nodes(plan) if n.get("Relation Name") == "examples"]
    assert scans and all("Seq Scan" not in n["Node Type"] for n in scans), json.dumps(plan)


def test_the_member_sees_exactly_their_suite_through_the_proxy(seeded: dict[str, Any]) -> None:
    c = seeded["member"].client
    r = c.get("/examples", params={"suite_id": f"eq.{seeded['suite_id']}", "model": "eq.model-07",
                                   "order": "created_at.desc", "limit": 20}, headers={"Prefer": "count=exact"})
    assert r.status_code == 206, r.text
    assert len(r.json()) == 20 and r.headers["content-range"].endswith("/50")
    dates = [e["created_at"] for e in r.json()]
    assert dates == sorted(dates, reverse=True)
    everything = c.get("/examples", params={"select": "suite_id", "limit": 2000})
    assert {e["suite_id"] for e in everything.json()} == {seeded["suite_id"]}
