-- The pipeline's work queue (DESIGN §10): one job per committed session, leased by the
-- Session-to-Example pipeline's workers. Examples registered while holding a job name it
-- (job_id), so lineage reads example -> job -> session. Enqueueing is structural: the
-- AFTER INSERT trigger on app.sessions (db/schema/35_pipeline.sql) writes the job in the
-- session's own transaction, whatever path commits the session.
-- depends: 0005_consent

create table app.pipeline_jobs (
    id uuid primary key default gen_random_uuid(),
    session_id uuid not null references app.sessions (id) on delete cascade,
    suite_id uuid references app.suites (id) on delete set null,
    state text not null default 'queued'
        check (state in ('queued', 'leased', 'done', 'failed', 'dead')),
    generation integer not null default 1 check (generation >= 1),
    reason text not null default 'session committed' check (length(reason) between 1 and 500),
    attempt integer not null default 0 check (attempt >= 0),
    max_attempts integer check (max_attempts >= 1),
    run_after timestamptz not null default now(),
    lease_token uuid,
    leased_by uuid references app.users (id) on delete set null,
    leased_at timestamptz,
    lease_expires_at timestamptz,
    last_error text check (length(last_error) <= 8192),
    example_ids uuid[] not null default '{}',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    finished_at timestamptz,
    constraint pipeline_jobs_leased_has_lease
        check (state <> 'leased' or (lease_token is not null and lease_expires_at is not null)),
    constraint pipeline_jobs_finished_when_final
        check ((state in ('done', 'dead')) = (finished_at is not null))
);
-- What claim reads: the due jobs in order, and the leases that ran out.
create index pipeline_jobs_due_idx on app.pipeline_jobs (run_after, created_at) where state in ('queued', 'failed');
create index pipeline_jobs_suite_due_idx on app.pipeline_jobs (suite_id, run_after, created_at)
    where state in ('queued', 'failed');
create index pipeline_jobs_lease_idx on app.pipeline_jobs (lease_expires_at) where state = 'leased';
create index pipeline_jobs_session_idx on app.pipeline_jobs (session_id, generation);
create index pipeline_jobs_suite_idx on app.pipeline_jobs (suite_id, created_at desc);
create index pipeline_jobs_state_idx on app.pipeline_jobs (state, updated_at desc);
comment on table app.pipeline_jobs is
    'The Session-to-Example pipeline''s work queue: one job per committed session and per requeue (generation).';
comment on column app.pipeline_jobs.state is
    'queued (waiting), leased (a worker holds it until lease_expires_at), failed (waiting to retry after run_after), done, dead (out of attempts or not retried).';
comment on column app.pipeline_jobs.generation is 'Which run of the pipeline over the session: 1 at commit, +1 per requeue.';
comment on column app.pipeline_jobs.attempt is 'How many times the job was claimed (a lease that ran out counts).';
comment on column app.pipeline_jobs.lease_token is 'Secret of the current (or, once done, the last) lease: only its holder extends, completes or fails the job.';
comment on column app.pipeline_jobs.run_after is 'Not claimed before this time (backoff after a failure).';

alter table app.pipeline_jobs enable row level security;
alter table app.pipeline_jobs force row level security;

-- Every session committed before the queue existed gets its first job.
insert into app.pipeline_jobs (session_id, suite_id, created_at, run_after, reason)
select s.id, s.suite_id, s.created_at, s.created_at, 'backfilled when the queue was created'
from app.sessions s;

alter table app.examples add column job_id uuid references app.pipeline_jobs (id) on delete set null;
-- The same content registered twice for one job is one example (idempotent registration).
alter table app.examples add constraint examples_job_content_key unique (job_id, sha256);
comment on column app.examples.job_id is 'The pipeline job whose run registered the example (lineage: example -> job -> session).';
