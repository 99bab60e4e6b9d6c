-- Core entities: people and their credentials, the Capability Surface, sessions and examples.
-- Tables live in the private schema `app`; the API exposes views in `api` (db/schema/).
-- Every table gets RLS enabled and forced here, in the same change that creates it;
-- its policies live in db/rls/<table>.sql.
-- depends:

create schema if not exists extensions;
comment on schema extensions is 'Extensions, kept out of the API and app schemas.';
create extension if not exists pgcrypto schema extensions;

create schema if not exists app;
comment on schema app is 'Private tables of Tracepipe. Not exposed by PostgREST; reached through api.* views.';

create domain app.member_role as text check (value in ('viewer', 'editor', 'owner'));
create domain app.key_access as text check (value in ('read', 'write'));
create domain app.account_role as text check (value in ('tp_user', 'tp_pipeline', 'tp_admin'));

create table app.users (
    id uuid primary key default gen_random_uuid(),
    email text not null check (email ~ '^[^@\s]+@[^@\s]+$' and length(email) <= 320),
    display_name text check (length(display_name) <= 200),
    password_hash text,
    account_role app.account_role not null default 'tp_user',
    disabled_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create unique index users_email_key on app.users (lower(email));
comment on table app.users is 'People and service accounts. account_role is the database role their tokens carry.';
comment on column app.users.password_hash is 'argon2id hash; secret: never exposed to the API or analysts.';

create table app.refresh_tokens (
    id uuid primary key default gen_random_uuid(),
    user_id uuid not null references app.users (id) on delete cascade,
    family_id uuid not null,
    token_hash bytea not null unique,
    created_at timestamptz not null default now(),
    expires_at timestamptz not null,
    rotated_at timestamptz,
    revoked_at timestamptz
);
create index refresh_tokens_family_idx on app.refresh_tokens (family_id);
comment on table app.refresh_tokens is 'Rotating storefront refresh tokens (sha256 of the secret). A family is one login; reuse of a rotated token revokes the family.';

create table app.api_keys (
    id uuid primary key default gen_random_uuid(),
    user_id uuid not null references app.users (id) on delete cascade,
    name text not null check (length(name) between 1 and 200),
    prefix text not null unique,
    key_hash bytea not null,
    suites uuid[],
    access app.key_access not null default 'write',
    expires_at timestamptz,
    last_used_at timestamptz,
    revoked_at timestamptz,
    created_at timestamptz not null default now()
);
create index api_keys_user_idx on app.api_keys (user_id);
comment on table app.api_keys is 'API keys: narrow their owner''s rights to a list of suites and read or write access. Only the sha256 of the secret is stored.';
comment on column app.api_keys.key_hash is 'sha256 of the secret; secret: never exposed.';

create table app.suites (
    id uuid primary key default gen_random_uuid(),
    name text not null check (length(name) between 1 and 200),
    slug text not null unique check (slug ~ '^[a-z0-9][a-z0-9-]{0,99}$'),
    description text,
    created_by uuid references app.users (id) on delete set null,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
comment on table app.suites is 'A suite of actions; the unit of permission (suite_members).';

create table app.suite_members (
    id uuid primary key default gen_random_uuid(),
    suite_id uuid not null references app.suites (id) on delete cascade deferrable initially deferred,
    user_id uuid not null references app.users (id) on delete cascade,
    role app.member_role not null,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    unique (suite_id, user_id)
);
create index suite_members_user_idx on app.suite_members (user_id, suite_id, role);
comment on table app.suite_members is 'Who may do what in a suite: viewer < editor < owner.';
comment on constraint suite_members_suite_id_fkey on app.suite_members is
    'Deferred so the creator''s owner row can be written before the suite row in the same statement.';

create table app.actions (
    id uuid primary key default gen_random_uuid(),
    suite_id uuid not null references app.suites (id) on delete cascade,
    name text not null check (length(name) between 1 and 200),
    description text,
    input_schema jsonb not null default '{}'::jsonb check (jsonb_typeof(input_schema) = 'object'),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    unique (suite_id, name),
    unique (id, suite_id)
);
comment on table app.actions is 'An action a suite offers; input_schema is a JSON Schema object.';

create table app.mcp_servers (
    id uuid primary key default gen_random_uuid(),
    name text not null unique check (length(name) between 1 and 200),
    url text not null check (length(url) between 1 and 2000),
    transport text not null check (transport in ('stdio', 'sse', 'streamable-http')),
    description text,
    created_by uuid references app.users (id) on delete set null,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
comment on table app.mcp_servers is 'Shared catalog of MCP servers: every authenticated user reads it, the creator or an admin changes it.';

create table app.tools (
    id uuid primary key default gen_random_uuid(),
    mcp_server_id uuid not null references app.mcp_servers (id) on delete cascade,
    name text not null check (length(name) between 1 and 200),
    description text,
    input_schema jsonb not null default '{}'::jsonb check (jsonb_typeof(input_schema) = 'object'),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    unique (mcp_server_id, name),
    unique (id, mcp_server_id)
);
comment on table app.tools is 'A tool an MCP server offers.';

create table app.action_tool_maps (
    id uuid primary key default gen_random_uuid(),
    suite_id uuid not null references app.suites (id) on delete cascade,
    action_id uuid not null,
    mcp_server_id uuid not null,
    tool_id uuid not null,
    argument_mapping jsonb not null default '{}'::jsonb check (jsonb_typeof(argument_mapping) = 'object'),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    unique (action_id, tool_id),
    foreign key (action_id, suite_id) references app.actions (id, suite_id) on delete cascade,
    foreign key (tool_id, mcp_server_id) references app.tools (id, mcp_server_id) on delete cascade
);
create index action_tool_maps_suite_idx on app.action_tool_maps (suite_id);
create index action_tool_maps_tool_idx on app.action_tool_maps (tool_id, mcp_server_id);
comment on table app.action_tool_maps is 'Binds a suite''s action to an MCP server''s tool. The composite keys make the database refuse an action of another suite or a tool of another server.';

create table app.sessions (
    id uuid primary key default gen_random_uuid(),
    user_id uuid not null references app.users (id) on delete cascade,
    suite_id uuid references app.suites (id) on delete set null,
    size_bytes bigint not null check (size_bytes >= 0),
    sha256 text not null check (sha256 ~ '^[0-9a-f]{64}$'),
    started_at timestamptz,
    ended_at timestamptz,
    event_count integer not null default 0 check (event_count >= 0),
    network_count integer not null default 0 check (network_count >= 0),
    screenshot_count integer not null default 0 check (screenshot_count >= 0),
    files jsonb not null default '[]'::jsonb,
    metadata jsonb not null default '{}'::jsonb,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index sessions_user_idx on app.sessions (user_id, created_at desc);
create index sessions_suite_idx on app.sessions (suite_id, created_at desc);
comment on table app.sessions is 'An uploaded trace bundle; the bytes live in object storage at sessions/{id}/bundle.zip.';

create table app.examples (
    id uuid primary key default gen_random_uuid(),
    session_id uuid references app.sessions (id) on delete cascade,
    suite_id uuid not null references app.suites (id) on delete cascade,
    model text not null check (length(model) between 1 and 200),
    message_count integer not null check (message_count >= 0),
    size_bytes bigint not null check (size_bytes >= 0),
    sha256 text not null check (sha256 ~ '^[0-9a-f]{64}$'),
    metadata jsonb not null default '{}'::jsonb,
    created_at timestamptz not null default now()
);
create index examples_suite_model_idx on app.examples (suite_id, model, created_at desc, id);
create index examples_session_idx on app.examples (session_id);
create index examples_model_idx on app.examples (model, created_at desc);
comment on table app.examples is 'A training example; the JSONL lives in object storage at examples/{id}/messages.jsonl.';

alter table app.users enable row level security;
alter table app.users force row level security;
alter table app.refresh_tokens enable row level security;
alter table app.refresh_tokens force row level security;
alter table app.api_keys enable row level security;
alter table app.api_keys force row level security;
alter table app.suites enable row level security;
alter table app.suites force row level security;
alter table app.suite_members enable row level security;
alter table app.suite_members force row level security;
alter table app.actions enable row level security;
alter table app.actions force row level security;
alter table app.mcp_servers enable row level security;
alter table app.mcp_servers force row level security;
alter table app.tools enable row level security;
alter table app.tools force row level security;
alter table app.action_tool_maps enable row level security;
alter table app.action_tool_maps force row level security;
alter table app.sessions enable row level security;
alter table app.sessions force row level security;
alter table app.examples enable row level security;
alter table app.examples force row level security;
