-- Analysts: each one is a PostgreSQL login role in the group tp_analyst (created by
-- `tracepipe analyst create`, never by a migration: roles are cluster-wide). This table maps
-- an analyst's role to the suites it may read; the analyst policies in db/rls/*.sql key on
-- current_user through it (auth.analyst_sees_all(), auth.analyst_suites()), never on
-- settings the SQL session could write itself.
-- depends: 0001_core

create table app.analysts (
    role_name text primary key
        check (role_name ~ '^[a-z_][a-z0-9_]{0,62}$' and role_name !~ '^(pg_|tp_)'),
    suites uuid[] check (suites is null or cardinality(suites) > 0),
    created_at timestamptz not null default now()
);
comment on table app.analysts is
    'Analyst login roles (members of tp_analyst) and the suites each may read. No row: the role reads no suite''s data.';
comment on column app.analysts.role_name is 'The analyst''s PostgreSQL login role (current_user in its sessions).';
comment on column app.analysts.suites is 'Suites the analyst may read; null means every suite.';

alter table app.analysts enable row level security;
alter table app.analysts force row level security;
