"""Scale data: a million example rows across a thousand suites and twenty models, in SQL
(no objects: listing needs none). For the scale test, `make seed-examples` and the
listing benchmark. Idempotent per prefix: a second run adds nothing."""

from __future__ import annotations

import time

import psycopg

SEED_OWNER = "scale-owner@tracepipe.invalid"


def seed_examples(owner_url: str, rows: int = 1_000_000, suites: int = 1000, models: int = 20,
                  prefix: str = "scale") -> dict[str, float]:
    started = time.monotonic()
    with psycopg.connect(owner_url) as conn:
        conn.execute("set local synchronous_commit = off")
        owner = conn.execute(
            "insert into app.users (email, display_name) values (%s, 'Scale seed') "
            "on conflict (email) do update set display_name = excluded.display_name returning id",
            [SEED_OWNER]).fetchone()
        assert owner is not None
        conn.execute(
            "insert into app.suites (name, slug, created_by) "
            "select %(p)s || ' suite ' || i, %(p)s || '-suite-' || lpad(i::text, 4, '0'), %(owner)s "
            "from generate_series(0, %(n)s - 1) i "
            "where not exists (select from app.suites s where s.slug = %(p)s || '-suite-' || lpad(i::text, 4, '0'))",
            {"p": prefix, "owner": owner[0], "n": suites})
        have = conn.execute("select count(*) from app.examples e join app.suites s on s.id = e.suite_id "
                            "where s.slug like %s", [f"{prefix}-suite-%"]).fetchone()
        assert have is not None
        missing = max(rows - int(have[0]), 0)
        if missing:
            conn.execute(
                "with s as (select id, row_number() over (order by slug) - 1 as k from app.suites"
                "           where slug like %(like)s) "
                "insert into app.examples (suite_id, model, message_count, size_bytes, sha256, created_at) "
                "select s.id, 'model-' || lpad(((g / %(suites)s) %% %(models)s)::text, 2, '0'),"
                "       1 + g %% 40, 1000 + g %% 100000,"
                "       md5(g::text) || md5((g + 1)::text), now() - (g %% 31536000) * interval '1 second' "
                "from generate_series(1, %(rows)s) g join s on s.k = g %% %(suites)s",
                {"like": f"{prefix}-suite-%", "models": models, "rows": missing, "suites": suites})
        conn.commit()
        conn.execute("analyze app.examples")
        conn.execute("analyze app.suites")
        conn.execute("analyze app.suite_members")
    return {"rows_added": float(missing), "seconds": round(time.monotonic() - started, 1)}
