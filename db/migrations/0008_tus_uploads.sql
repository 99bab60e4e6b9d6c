-- Resumable uploads (tus 1.0.0, DESIGN.md §11): one row per upload, holding what any ext
-- instance needs to take the next PATCH: the offset, the S3 multipart upload and its parts'
-- ETags, and the "incomplete part" object that keeps a tail smaller than S3's minimum part.
-- depends: 0005_consent

create table app.tus_uploads (
    id uuid primary key default gen_random_uuid(),
    user_id uuid not null references app.users (id) on delete cascade,
    suite_id uuid references app.suites (id) on delete cascade,
    upload_length bigint not null check (upload_length > 0),
    upload_offset bigint not null default 0,
    metadata jsonb not null default '{}' check (jsonb_typeof(metadata) = 'object'),
    session_id uuid not null unique default gen_random_uuid(),
    s3_upload_id text,
    parts jsonb not null default '[]' check (jsonb_typeof(parts) = 'array'),
    tail_key text,
    tail_bytes bigint not null default 0 check (tail_bytes >= 0),
    state text not null default 'receiving' check (state in ('receiving', 'assembled', 'done')),
    error jsonb,
    expires_at timestamptz not null,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    check (upload_offset between 0 and upload_length),
    check ((tail_key is null) = (tail_bytes = 0))
);
create index tus_uploads_user_idx on app.tus_uploads (user_id);
create index tus_uploads_expires_idx on app.tus_uploads (expires_at);
comment on table app.tus_uploads is
    'tus uploads in progress (and done ones until they expire). Bytes live in S3; this row is the offset of truth.';
comment on column app.tus_uploads.session_id is
    'The session this upload becomes: its multipart upload targets sessions/{session_id}/bundle.zip; the session row exists once state = done.';
comment on column app.tus_uploads.parts is 'Uploaded S3 parts in order: [{n, etag, size}].';
comment on column app.tus_uploads.tail_key is
    'Object holding the last tail_bytes received (less than S3''s minimum part), prepended to the next PATCH.';
comment on column app.tus_uploads.state is
    'receiving (bytes arriving), assembled (multipart upload completed, not yet committed), done (session committed).';
comment on column app.tus_uploads.error is 'The last failed commit''s error body (a retried final PATCH tries again).';

alter table app.tus_uploads enable row level security;
alter table app.tus_uploads force row level security;
