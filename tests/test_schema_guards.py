"""Guards over the whole database: the pitfalls of DESIGN.md §4 cannot come back unnoticed."""

from __future__ import annotations

from typing import Any

import psycopg

REQUEST_ROLES = ("authenticator", "anon", "tp_user", "tp_pipeline", "tp_admin", "tp_auth")


def test_every_table_has_rls_enabled_and_forced(su: psycopg.Connection[dict[str, Any]]) -> None:
    rows = su.execute("""
        select n.nspname || '.' || c.relname as name, c.relrowsecurity, c.relforcerowsecurity
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where c.relkind in ('r', 'p') and n.nspname in ('app', 'api', 'auth', 'analytics')
    """).fetchall()
    assert len(rows) >= 11, rows
    missing = [r["name"] for r in rows if not (r["relrowsecurity"] and r["relforcerowsecurity"])]
    assert missing == []


def test_every_exposed_view_is_security_invoker(su: psycopg.Connection[dict[str, Any]]) -> None:
    rows = su.execute("""
        select c.relname, coalesce(c.reloptions, '{}') as options
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where c.relkind = 'v' and n.nspname = 'api'
    """).fetchall()
    assert len(rows) >= 10, rows
    assert [r["relname"] for r in rows if "security_invoker=true" not in r["options"]] == []


def test_no_table_in_the_exposed_schema(su: psycopg.Connection[dict[str, Any]]) -> None:
    rows = su.execute("""
        select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where c.relkind in ('r', 'p', 'm', 'f') and n.nspname = 'api'
    """).fetchall()
    assert rows == []


def test_security_definer_functions_pin_search_path_and_deny_public(su: psycopg.Connection[dict[str, Any]]) -> None:
    rows = su.execute("""
        select p.oid::regprocedure::text as name, p.proconfig,
               has_function_privilege('public', p.oid, 'execute') as public_exec
        from pg_proc p join pg_namespace n on n.oid = p.pronamespace
        where p.prosecdef and n.nspname in ('app', 'api', 'auth', 'analytics')
    """).fetchall()
    assert rows, "expected SECURITY DEFINER helpers"
    unpinned = [r["name"] for r in rows if not any(c.startswith("search_path=") for c in (r["proconfig"] or []))]
    assert unpinned == []
    public = [r["name"] for r in rows if r["public_exec"]]
    assert public == []


def test_no_function_of_ours_is_executable_by_public(su: psycopg.Connection[dict[str, Any]]) -> None:
    rows = su.execute("""
        select p.oid::regprocedure::text as name from pg_proc p join pg_namespace n on n.oid = p.pronamespace
        where n.nspname in ('app', 'api', 'auth') and has_function_privilege('public', p.oid, 'execute')
    """).fetchall()
    assert rows == []


def test_request_path_roles_are_neither_superuser_nor_owner(su: psycopg.Connection[dict[str, Any]]) -> None:
    roles = su.execute("select rolname, rolsuper, rolbypassrls from pg_roles where rolname = any(%s)",
                       [list(REQUEST_ROLES)]).fetchall()
    assert len(roles) == len(REQUEST_ROLES)
    assert [r["rolname"] for r in roles if r["rolsuper"] or r["rolbypassrls"]] == []
    owners = su.execute("""
        select distinct pg_get_userbyid(c.relowner) as owner from pg_class c
        join pg_namespace n on n.oid = c.relnamespace where n.nspname in ('app', 'api', 'auth')
    """).fetchall()
    assert {r["owner"] for r in owners} == {"tp_owner"}
    member_of_owner = su.execute(
        "select r.rolname from pg_roles r where r.rolname = any(%s) and pg_has_role(r.oid, 'tp_owner', 'member')",
        [list(REQUEST_ROLES)]).fetchall()
    assert member_of_owner == []


def test_authenticator_cannot_become_owner_or_analyst(su: psycopg.Connection[dict[str, Any]]) -> None:
    for target in ("tp_owner", "tp_analyst", "postgres"):
        row = su.execute("select pg_has_role('authenticator', %s, 'member') as m", [target]).fetchone()
        assert row is not None and row["m"] is False, target


def test_every_request_role_has_a_statement_timeout(su: psycopg.Connection[dict[str, Any]]) -> None:
    rows = su.execute("""
        select r.rolname, s.setconfig from pg_roles r
        left join pg_db_role_setting s on s.setrole = r.oid and s.setdatabase = 0
        where r.rolname = any(%s)
    """, [["anon", "tp_user", "tp_pipeline", "tp_admin", "tp_analyst"]]).fetchall()
    assert len(rows) == 5
    for r in rows:
        assert any(c.startswith("statement_timeout=") for c in (r["setconfig"] or [])), r


def test_the_claims_helpers_policies_call_are_inlined_by_the_planner(su: psycopg.Connection[dict[str, Any]]) -> None:
    """A SET clause (or SECURITY DEFINER) on these keeps the planner from inlining them, and
    PostgreSQL 15 then parses and plans the body on every call of every request."""
    helpers = ["auth.claims()", "auth.uid()", "auth.can_write()", "auth.is_suite_scoped()",
               "auth.role_rank('editor')"]
    with su.transaction():
        su.execute("set local role tp_user")
        for helper in helpers:
            plan = su.execute(f"explain (verbose, costs off) select {helper}").fetchall()
            text = "\n".join(str(next(iter(r.values()))) for r in plan)
            assert "auth." not in text, (helper, text)
    rank = su.execute("select auth.role_rank('viewer') as v, auth.role_rank('owner') as o,"
                      " auth.role_rank('nobody') as n").fetchone()
    assert rank == {"v": 1, "o": 3, "n": 0}


PEOPLE = ("tp_user", "tp_pipeline", "tp_admin")
NARROWS = ("token_reaches", "can_write")  # auth.token_reaches composes auth.can_write


def test_every_write_policy_for_people_composes_the_token_narrowing(su: psycopg.Connection[dict[str, Any]]) -> None:
    """In the spirit of supabase/splinter: a write policy that forgets the token's narrowing
    lets a read-only or suite-scoped key write beyond it (issue 12). Every INSERT and UPDATE
    policy for people checks auth.token_reaches (or auth.can_write, for rows of no suite
    that every token of its person may write); every DELETE policy does, or its table has a
    BEFORE DELETE guard trigger that does."""
    policies = su.execute("""
        select tablename, policyname, cmd, roles::text[] as roles, coalesce(qual, '') as qual,
               coalesce(with_check, '') as with_check
        from pg_policies where schemaname = 'app'
    """).fetchall()
    guarded = {r["table"] for r in su.execute("""
        select c.relname as table from pg_trigger t
        join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace
        join pg_proc p on p.oid = t.tgfoid
        where n.nspname = 'app' and not t.tgisinternal and (t.tgtype & 8) = 8  -- DELETE
          and (p.prosrc ~ 'token_reaches|require_suite_role')
    """).fetchall()}
    forgetful = []
    for p in policies:
        if not set(p["roles"]) & set(PEOPLE) or p["cmd"] == "SELECT":
            continue
        texts = {"INSERT": [p["with_check"]], "UPDATE": [p["with_check"]], "DELETE": [p["qual"]],
                 "ALL": [p["with_check"]]}[p["cmd"]]
        if any(any(n in t for n in NARROWS) for t in texts):
            continue
        if p["cmd"] == "DELETE" and p["tablename"] in guarded:
            continue
        forgetful.append((p["tablename"], p["policyname"], p["cmd"]))
    assert forgetful == []


def test_no_table_is_writable_by_people_without_a_narrowing_policy(su: psycopg.Connection[dict[str, Any]]) -> None:
    """A write privilege on an app table (table- or column-level) comes with a policy for that
    command that narrows by the token: otherwise RLS (permissive policies) would leave the
    write to whatever other policy happens to match."""
    rows = su.execute("""
        select c.relname as table, r.rolname as role, priv
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        cross join (values ('tp_user'), ('tp_pipeline'), ('tp_admin')) r(rolname)
        cross join (values ('INSERT'), ('UPDATE'), ('DELETE')) v(priv)
        where n.nspname = 'app' and c.relkind = 'r'
          and (has_table_privilege(r.rolname, c.oid, priv)
               or (priv <> 'DELETE' and has_any_column_privilege(r.rolname, c.oid, priv)))
    """).fetchall()
    assert rows, "expected some writable tables"
    policies = su.execute("""
        select tablename, cmd, roles::text[] as roles, coalesce(qual, '') || coalesce(with_check, '') as text
        from pg_policies where schemaname = 'app'
    """).fetchall()
    missing = []
    for r in rows:
        mine = [p for p in policies if p["tablename"] == r["table"] and p["cmd"] in (r["priv"], "ALL")
                and (r["role"] in p["roles"] or "public" in p["roles"])]
        if mine and not any(any(n in p["text"] for n in NARROWS) for p in mine) and r["priv"] != "DELETE":
            missing.append((r["table"], r["role"], r["priv"]))
    assert missing == []
