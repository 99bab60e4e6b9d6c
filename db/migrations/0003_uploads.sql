-- Uploads: idempotency keys of POST /sessions and POST /examples (a retry with the same key
-- and caller gets the first result; the same key with another body is refused), and the
-- outbox of object deletions.
-- depends: 0001_core

create table app.idempotency_keys (
    user_id uuid not null references app.users (id) on delete cascade,
    scope text not null check (scope in ('sessions', 'examples')),
    key text not null check (length(key) between 1 and 255),
    request_sha256 text not null check (request_sha256 ~ '^[0-9a-f]{64}$'),
    resource_id uuid not null,
    response jsonb not null,
    created_at timestamptz not null default now(),
    primary key (user_id, scope, key)
);
create index idempotency_keys_created_idx on app.idempotency_keys (created_at);
comment on table app.idempotency_keys is 'First results of uploads sent with an Idempotency-Key, per caller; swept after a day.';

alter table app.idempotency_keys enable row level security;
alter table app.idempotency_keys force row level security;

-- Outbox of object deletions: deleting a session or an example row (directly or by
-- cascade) records its object prefix in the same transaction; ext deletes the objects and
-- then the record. Nothing is lost if ext stops in between.
create table app.object_deletions (
    prefix text primary key check (prefix ~ '^(sessions|examples)/[0-9a-f-]{36}/$'),
    requested_at timestamptz not null default now()
);
comment on table app.object_deletions is 'Object prefixes whose rows were deleted; ext removes the objects, then the record.';
alter table app.object_deletions enable row level security;
alter table app.object_deletions force row level security;
