"""One migrate command: roles, then yoyo migrations, then the API surface and policies.

1. `db/schema/*.superuser.sql` as a superuser (cluster roles; the only superuser step),
   plus role passwords and per-role statement timeouts from the settings, and the guards of
   every existing analyst login role (`tracepipe.analysts`); then, in the Tracepipe
   database itself, `db/schema/*.database.superuser.sql` (privileges on built-ins, which
   are per database).
2. `db/migrations/` with yoyo as tp_owner, under yoyo's lock (each migration is its own
   transaction, as yoyo applies them).
3. Every other `db/schema/*.sql`, then every `db/rls/*.sql`, as tp_owner in ONE
   transaction, then `NOTIFY pgrst, 'reload schema'` so PostgREST picks the change up
   without a restart. These files are idempotent and re-applied on every run.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from yoyo import get_backend, read_migrations

from tracepipe import analysts
from tracepipe.credentials import StackSecrets
from tracepipe.settings import REPO_ROOT, StackSettings

DB_DIR = REPO_ROOT / "db"
DATABASE_SUPERUSER_SUFFIX = ".database.superuser.sql"
MIGRATION_LOCK = 7_340_001  # advisory lock key: one migrate at a time for schema + rls


def superuser_files() -> list[Path]:
    """Cluster-wide superuser files, run in the maintenance database."""
    return [p for p in sorted((DB_DIR / "schema").glob("*.superuser.sql"))
            if not p.name.endswith(DATABASE_SUPERUSER_SUFFIX)]


def database_superuser_files() -> list[Path]:
    """Superuser files run in the Tracepipe database (built-ins' privileges are per database)."""
    return sorted((DB_DIR / "schema").glob("*" + DATABASE_SUPERUSER_SUFFIX))


def surface_files() -> list[Path]:
    schema = [p for p in sorted((DB_DIR / "schema").glob("*.sql")) if not p.name.endswith(".superuser.sql")]
    return schema + sorted((DB_DIR / "rls").glob("*.sql"))


def bootstrap(superuser_conninfo: str, settings: StackSettings, secrets: StackSecrets) -> None:
    """Roles, their passwords and limits, and the database itself (owned by tp_owner)."""
    with psycopg.connect(superuser_conninfo, autocommit=True) as conn:
        for path in superuser_files():
            conn.execute(path.read_text())
        conn.execute(sql.SQL("alter role tp_owner password {}").format(secrets.owner_password))
        conn.execute(sql.SQL("alter role authenticator password {}").format(secrets.authenticator_password))
        timeouts = {
            "anon": settings.statement_timeout_anon,
            "tp_user": settings.statement_timeout_user,
            "tp_pipeline": settings.statement_timeout_pipeline,
            "tp_admin": settings.statement_timeout_admin,
            "tp_auth": settings.statement_timeout_user,
            "tp_analyst": settings.statement_timeout_analyst,
            "authenticator": settings.statement_timeout_authenticator,
        }
        for role, timeout in timeouts.items():
            conn.execute(sql.SQL("alter role {} set statement_timeout = {}").format(sql.Identifier(role), timeout))
        conn.execute(sql.SQL("alter role tp_user set plan_cache_mode = {}").format(settings.plan_cache_mode_user))
        exists = conn.execute("select 1 from pg_database where datname = %s", [settings.db_name]).fetchone()
        if not exists:
            conn.execute(sql.SQL("create database {} owner tp_owner").format(sql.Identifier(settings.db_name)))
        conn.execute(sql.SQL("alter database {} owner to tp_owner").format(sql.Identifier(settings.db_name)))
        db = sql.Identifier(settings.db_name)
        conn.execute(sql.SQL("revoke all on database {} from public").format(db))
        conn.execute(sql.SQL("grant connect on database {} to authenticator, tp_analyst").format(db))
        conn.execute(sql.SQL("alter database {} set tp.jwt_issuer = {}").format(db, settings.jwt_issuer))
        conn.execute(sql.SQL("alter database {} set tp.jwt_audience = {}").format(db, settings.jwt_audience))
        # Logins reach the Tracepipe database only: PUBLIC keeps no CONNECT or TEMP on the
        # cluster's maintenance databases (an analyst could otherwise create temp tables there).
        for other in ("postgres", "template1"):
            if other != settings.db_name:
                conn.execute(sql.SQL("revoke connect, temporary on database {} from public")
                             .format(sql.Identifier(other)))
        # ALTER ROLE settings of the tp_analyst group do not reach its members: each analyst's
        # login role carries its own, brought to the current settings here.
        analysts.reapply_guards(conn, settings)
    with psycopg.connect(make_conninfo(superuser_conninfo, dbname=settings.db_name), autocommit=True) as conn:
        for path in database_superuser_files():
            conn.execute(path.read_text())


def yoyo_url(owner_url: str) -> str:
    return owner_url.replace("postgresql://", "postgresql+psycopg://", 1)


def apply_migrations(owner_url: str) -> list[str]:
    backend = get_backend(yoyo_url(owner_url))
    migrations = read_migrations(str(DB_DIR / "migrations"))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    return [m.id for m in pending]


def rollback_migrations(owner_url: str, count: int | None = None) -> list[str]:
    """Roll back the newest `count` migrations (all when None). The API surface depends on
    the tables, so it is dropped first; `migrate` re-creates it."""
    drop_surface(owner_url)
    backend = get_backend(yoyo_url(owner_url))
    migrations = read_migrations(str(DB_DIR / "migrations"))
    with backend.lock():
        applied = backend.to_rollback(migrations)
        chosen = applied[:count] if count is not None else applied
        backend.rollback_migrations(chosen)
    return [m.id for m in chosen]


def drop_surface(owner_url: str) -> None:
    """Drop the re-creatable API surface (schemas api, auth and analytics, and the trigger functions
    db/schema/ puts in app, with their triggers). Development and rollback only: a deploy
    re-applies the surface in place, never through this."""
    with psycopg.connect(owner_url) as conn:
        conn.execute("drop schema if exists api cascade")
        conn.execute("drop schema if exists auth cascade")
        conn.execute("drop schema if exists analytics cascade")
        functions = conn.execute(
            "select p.oid::regprocedure::text from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
            " where n.nspname = 'app'").fetchall()
        for (signature,) in functions:
            conn.execute(f"drop function if exists {signature} cascade")


def apply_surface(owner_url: str) -> None:
    with psycopg.connect(owner_url) as conn, conn.transaction():
        conn.execute("select pg_advisory_xact_lock(%s)", [MIGRATION_LOCK])
        for path in surface_files():
            try:
                conn.execute(path.read_text())
            except psycopg.Error as e:
                raise RuntimeError(f"{path.relative_to(REPO_ROOT)}: {e}") from e
        conn.execute("notify pgrst, 'reload schema'")


def migrate(owner_url: str) -> list[str]:
    """Pending migrations, then the API surface; returns the ids of migrations applied."""
    applied = apply_migrations(owner_url)
    apply_surface(owner_url)
    return applied
