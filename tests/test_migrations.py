"""Migrations: a fresh database and an upgraded one end identical; every migration rolls
back and re-applies; migrating twice changes nothing. Each case uses a database of its own
in the test cluster (roles are cluster-wide and already bootstrapped)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from yoyo import get_backend, read_migrations

from tracepipe import migrate
from tracepipe.credentials import StackSecrets
from tracepipe.stack import Stack


@pytest.fixture
def scratch_db(stack: Stack, secrets: StackSecrets) -> Iterator[Callable[[str], str]]:
    """Creates empty databases owned by tp_owner; returns their owner URLs; drops them after."""
    made: list[str] = []

    def make(name: str) -> str:
        with psycopg.connect(stack.superuser_conninfo("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("create database {} owner tp_owner").format(sql.Identifier(name)))
            conn.execute(sql.SQL("alter database {} set tp.jwt_issuer = {}").format(sql.Identifier(name),
                                                                                   stack.s.jwt_issuer))
            conn.execute(sql.SQL("alter database {} set tp.jwt_audience = {}").format(sql.Identifier(name),
                                                                                     stack.s.jwt_audience))
        made.append(name)
        return stack.owner_url(secrets).rsplit("/", 1)[0] + f"/{name}"

    yield make
    with psycopg.connect(stack.superuser_conninfo("postgres"), autocommit=True) as conn:
        for name in made:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def schema_dump(stack: Stack, db: str) -> str:
    out = subprocess.run(
        [str(stack.pg_bindir / "pg_dump"), "--schema-only", "--no-owner", "--exclude-schema=public",
         "-h", str(stack.socket_dir), "-p", str(stack.s.pg_port), "-U", "postgres", db],
        capture_output=True, text=True, check=True,
    ).stdout
    noise = ("--", "\\restrict", "\\unrestrict")  # comments; pg_dump's per-run random restrict key
    lines = [ln for ln in out.splitlines() if not ln.startswith(noise) and ln.strip()]
    return "\n".join(lines)


def test_fresh_and_upgraded_databases_are_identical(stack: Stack, scratch_db: Callable[[str], str]) -> None:
    fresh = scratch_db("mig_fresh")
    migrate.migrate(fresh)

    upgraded = scratch_db("mig_upgraded")
    backend = get_backend(migrate.yoyo_url(upgraded))
    migrations = read_migrations(str(migrate.DB_DIR / "migrations"))
    assert len(migrations) >= 1
    with backend.lock():
        for m in migrations:  # one release at a time, as deploys would apply them
            backend.apply_migrations(backend.to_apply(migrations.__class__([m])))
    migrate.apply_surface(upgraded)

    fresh_dump, upgraded_dump = schema_dump(stack, "mig_fresh"), schema_dump(stack, "mig_upgraded")
    assert "CREATE TABLE app.suites" in fresh_dump
    assert "CREATE POLICY" in fresh_dump
    assert fresh_dump == upgraded_dump


def test_rollback_and_reapply_every_migration(stack: Stack, scratch_db: Callable[[str], str]) -> None:
    url = scratch_db("mig_roundtrip")
    migrate.migrate(url)
    before = schema_dump(stack, "mig_roundtrip")
    undone = migrate.rollback_migrations(url)
    assert len(undone) == len(read_migrations(str(migrate.DB_DIR / "migrations")))
    with psycopg.connect(url) as conn:
        left = conn.execute("select count(*) from pg_tables where schemaname in ('app', 'api', 'auth')").fetchone()
    assert left == (0,)
    migrate.migrate(url)
    assert schema_dump(stack, "mig_roundtrip") == before


def test_migrating_twice_changes_nothing(stack: Stack, scratch_db: Callable[[str], str]) -> None:
    url = scratch_db("mig_twice")
    assert migrate.migrate(url)
    first = schema_dump(stack, "mig_twice")
    assert migrate.migrate(url) == []
    assert schema_dump(stack, "mig_twice") == first


def test_migrate_on_the_serving_database_keeps_data(stack: Stack, secrets: StackSecrets,
                                                    su: psycopg.Connection[dict[str, Any]]) -> None:
    before = su.execute("select count(*) as n from app.users").fetchone()
    assert migrate.migrate(stack.owner_url(secrets)) == []
    assert su.execute("select count(*) as n from app.users").fetchone() == before
