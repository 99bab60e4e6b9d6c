-- The pipeline's work queue (DESIGN §10): how a job is born, leased, extended, finished,
-- retried and requeued. The table is app.pipeline_jobs (migration 0007); its policies are
-- in db/rls/pipeline_jobs.sql.
--
-- Lifecycle:  queued --claim--> leased --complete--> done
--                                  |  \--fail(retry, attempts left)--> failed --(run_after)--> claim again
--                                  |   \-fail(no retry | out of attempts)--> dead
--                                  \--lease runs out--> claimed again (or dead when out of attempts)
--
-- The lease functions are SECURITY INVOKER: they run as the caller (ext sets the role and
-- claims exactly as PostgREST does), so the grants and policies decide who works the queue.
-- They live in app, not api: PostgREST does not expose them; ext's /pipeline/* routes call
-- them (the long-poll needs ext's LISTEN connection). Claiming follows procrastinate's
-- fetch (`FOR UPDATE SKIP LOCKED`): concurrent claims never wait on each other and never
-- take the same row; each lease gets a fresh random token that only its holder knows.

-- --- enqueue: one job in the session's own transaction ----------------------------------------

-- SECURITY DEFINER: the uploader (tp_user) may not write jobs; the trigger does it for them.
create or replace function app.enqueue_session_job() returns trigger
    language plpgsql security definer
    set search_path = ''
as $$
begin
    insert into app.pipeline_jobs (session_id, suite_id) values (new.id, new.suite_id);
    return null;
end
$$;
comment on function app.enqueue_session_job() is
    'AFTER INSERT on app.sessions: enqueues the session''s first pipeline job in the same transaction.';
revoke all on function app.enqueue_session_job() from public;
drop trigger if exists enqueue_pipeline_job on app.sessions;
create trigger enqueue_pipeline_job after insert on app.sessions
    for each row execute function app.enqueue_session_job();

-- Wakes ext's long-polling claims (LISTEN tp_pipeline_jobs) when a job becomes claimable
-- or gets a new due time. One payload-less notification: PostgreSQL folds duplicates of a
-- transaction, so a bulk insert wakes the listeners once, at commit.
create or replace function app.notify_pipeline_jobs() returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    notify tp_pipeline_jobs;  -- the command, not pg_notify(): that function is nobody's (02_builtins)
    return null;
end
$$;
comment on function app.notify_pipeline_jobs() is
    'AFTER INSERT/UPDATE of app.pipeline_jobs to queued or failed: NOTIFY tp_pipeline_jobs (wakes long-polling claims).';
grant execute on function app.notify_pipeline_jobs() to tp_pipeline, tp_admin;
drop trigger if exists notify_pipeline_jobs on app.pipeline_jobs;
create trigger notify_pipeline_jobs after insert or update of state, run_after on app.pipeline_jobs
    for each row when (new.state in ('queued', 'failed')) execute function app.notify_pipeline_jobs();

drop trigger if exists touch_updated_at on app.pipeline_jobs;
create trigger touch_updated_at before update on app.pipeline_jobs
    for each row execute function app.touch_updated_at();

-- --- the API view ----------------------------------------------------------------------------

create or replace view api.pipeline_jobs with (security_invoker = true) as
    select j.id, j.session_id, j.suite_id, j.state, j.generation, j.reason, j.attempt, j.max_attempts,
           j.run_after, j.leased_by, j.leased_at, j.lease_expires_at, j.last_error, j.example_ids,
           j.created_at, j.updated_at, j.finished_at
    from app.pipeline_jobs j;
comment on view api.pipeline_jobs is
    'Pipeline jobs (GET /pipeline/jobs): every job for the pipeline and admins, the jobs of their own sessions for people. Filter by state, session_id, suite_id, generation.';

revoke all on app.pipeline_jobs, api.pipeline_jobs from tp_user, tp_pipeline, tp_admin, anon;
grant select on app.pipeline_jobs, api.pipeline_jobs to tp_pipeline, tp_admin;
grant select (id, session_id, suite_id, state, generation, reason, attempt, max_attempts, run_after, leased_by,
              leased_at, lease_expires_at, last_error, example_ids, created_at, updated_at, finished_at)
    on app.pipeline_jobs to tp_user;
grant select on api.pipeline_jobs to tp_user;
grant update (state, attempt, max_attempts, run_after, lease_token, leased_by, leased_at, lease_expires_at,
              last_error, example_ids, finished_at)
    on app.pipeline_jobs to tp_pipeline, tp_admin;
grant insert (session_id, suite_id, generation, reason) on app.pipeline_jobs to tp_pipeline, tp_admin;
grant delete on app.pipeline_jobs, api.pipeline_jobs to tp_admin;

-- --- leasing -----------------------------------------------------------------------------------

-- Claims up to max_jobs jobs for lease_s seconds: first leases that ran out (their worker
-- died), then due queued or failed jobs, oldest first; only the suite's when p_suite_id is
-- given (a team's workers for its own suite). A lease that ran out on the last allowed
-- attempt ends the job dead instead.
create or replace function app.pipeline_claim(p_max_jobs integer, p_lease_s integer, p_max_attempts integer,
                                              p_suite_id uuid)
    returns setof app.pipeline_jobs
    language plpgsql volatile
    set search_path = ''
as $$
declare
    picked uuid[];
begin
    update app.pipeline_jobs j
    set state = 'dead', finished_at = now(), lease_token = null, lease_expires_at = null,
        last_error = format('the lease of attempt %s ran out (worker gone?); no attempt left', j.attempt)
    where j.id in (select x.id from app.pipeline_jobs x
                   where x.state = 'leased' and x.lease_expires_at < now() and x.attempt >= p_max_attempts
                   for update skip locked);

    -- Leases that ran out: few (at most the leases held), so one query serves both cases.
    select array_agg(c.id) into picked from (
        select x.id from app.pipeline_jobs x
        where x.state = 'leased' and x.lease_expires_at < now()
          and (p_suite_id is null or x.suite_id = p_suite_id)
        order by x.lease_expires_at
        limit p_max_jobs
        for update skip locked) c;
    -- Due jobs: one query per case, so each can have its own index plan (a generic plan for
    -- "p_suite_id is null or suite_id = p_suite_id" cannot use pipeline_jobs_suite_due_idx).
    -- Measured: with no statistics yet (a fresh bulk of sessions) this version claims ~500
    -- jobs/s sequentially where the single query managed 24. Known limit: with a few suites
    -- holding most of the backlog the planner may still walk the global due index for a
    -- suite's claim (it cannot know that suite's jobs come last in run_after order).
    if coalesce(cardinality(picked), 0) < p_max_jobs then
        if p_suite_id is null then
            select coalesce(picked, '{}') || coalesce(array_agg(c.id), '{}') into picked from (
                select x.id from app.pipeline_jobs x
                where x.state in ('queued', 'failed') and x.run_after <= now()
                order by x.run_after, x.created_at
                limit p_max_jobs - coalesce(cardinality(picked), 0)
                for update skip locked) c;
        else
            select coalesce(picked, '{}') || coalesce(array_agg(c.id), '{}') into picked from (
                select x.id from app.pipeline_jobs x
                where x.suite_id = p_suite_id and x.state in ('queued', 'failed') and x.run_after <= now()
                order by x.suite_id, x.run_after, x.created_at
                limit p_max_jobs - coalesce(cardinality(picked), 0)
                for update skip locked) c;
        end if;
    end if;

    return query
    update app.pipeline_jobs j
    set last_error = case when j.state = 'leased'
                          then format('the lease of attempt %s ran out (worker gone?)', j.attempt)
                          else j.last_error end,
        state = 'leased', attempt = j.attempt + 1, max_attempts = p_max_attempts,
        lease_token = gen_random_uuid(), leased_by = auth.uid(), leased_at = now(),
        lease_expires_at = now() + make_interval(secs => p_lease_s)
    where j.id = any (picked)
    returning j.*;
end
$$;
comment on function app.pipeline_claim(integer, integer, integer, uuid) is
    'Leases up to max_jobs due jobs (expired leases first) with FOR UPDATE SKIP LOCKED; each lease gets a new token. Cost: two index scans of the partial due/lease indexes.';
grant execute on function app.pipeline_claim(integer, integer, integer, uuid) to tp_pipeline, tp_admin;

-- When the next job becomes claimable without any new insert (a backoff ends, a lease runs
-- out): the long-poll sleeps until then at most, so no polling loop is needed.
create or replace function app.pipeline_next_due(p_suite_id uuid) returns timestamptz
    language sql stable
    set search_path = ''
as $$
    select least((select min(x.run_after) from app.pipeline_jobs x
                  where x.state in ('queued', 'failed') and (p_suite_id is null or x.suite_id = p_suite_id)),
                 (select min(x.lease_expires_at) from app.pipeline_jobs x
                  where x.state = 'leased' and (p_suite_id is null or x.suite_id = p_suite_id)))
$$;
comment on function app.pipeline_next_due(uuid) is
    'The earliest run_after of a waiting job or lease_expires_at of a lease, or null. Cost: two partial-index lookups.';
grant execute on function app.pipeline_next_due(uuid) to tp_pipeline, tp_admin;

-- The three lease operations answer the updated row, or nothing when the caller does not
-- hold the job's current lease (ext then answers 409, or 404 for a job it cannot see).
-- A lease past its expiry still counts until another worker claims the job.

create or replace function app.pipeline_extend(p_job_id uuid, p_token uuid, p_lease_s integer)
    returns setof app.pipeline_jobs
    language sql volatile
    set search_path = ''
as $$
    update app.pipeline_jobs j set lease_expires_at = now() + make_interval(secs => p_lease_s)
    where j.id = p_job_id and j.state = 'leased' and j.lease_token = p_token
    returning j.*
$$;
comment on function app.pipeline_extend(uuid, uuid, integer) is 'Extends the lease by lease_s from now, for the lease holder only.';
grant execute on function app.pipeline_extend(uuid, uuid, integer) to tp_pipeline, tp_admin;

create or replace function app.pipeline_complete(p_job_id uuid, p_token uuid, p_example_ids uuid[])
    returns setof app.pipeline_jobs
    language sql volatile
    set search_path = ''
as $$
    -- Idempotent for the holder: a done job keeps its last lease token, so a retried
    -- complete (its first answer lost) gets the same row.
    with finished as (
        update app.pipeline_jobs j
        set state = 'done', finished_at = now(), lease_expires_at = null, last_error = null,
            example_ids = coalesce(p_example_ids, '{}')
        where j.id = p_job_id and j.state = 'leased' and j.lease_token = p_token
        returning j.*
    )
    select * from finished
    union all
    select j.* from app.pipeline_jobs j
    where j.id = p_job_id and j.state = 'done' and j.lease_token = p_token and not exists (select from finished)
$$;
comment on function app.pipeline_complete(uuid, uuid, uuid[]) is 'Marks the job done (lease holder only), recording the example ids it reports.';
grant execute on function app.pipeline_complete(uuid, uuid, uuid[]) to tp_pipeline, tp_admin;

-- complete + claim in one call (POST /pipeline/jobs/{id}/complete with claim_next): a worker
-- finishing a job leases its next one in the same transaction and round trip. The first row
-- is the completed job; the leased ones follow. Nothing at all when the caller does not hold
-- the lease (then nothing is claimed either: ext answers 409/404 as for a plain complete).
create or replace function app.pipeline_complete_and_claim(p_job_id uuid, p_token uuid, p_example_ids uuid[],
                                                           p_max_jobs integer, p_lease_s integer,
                                                           p_max_attempts integer, p_suite_id uuid)
    returns setof app.pipeline_jobs
    language plpgsql volatile
    set search_path = ''
as $$
declare
    finished app.pipeline_jobs;
begin
    select * into finished from app.pipeline_complete(p_job_id, p_token, p_example_ids);
    if not found then
        return;
    end if;
    return next finished;
    return query select * from app.pipeline_claim(p_max_jobs, p_lease_s, p_max_attempts, p_suite_id);
end
$$;
comment on function app.pipeline_complete_and_claim(uuid, uuid, uuid[], integer, integer, integer, uuid) is
    'pipeline_complete, then (if the caller held the lease) pipeline_claim in the same transaction: the completed row first, then the new leases.';
grant execute on function app.pipeline_complete_and_claim(uuid, uuid, uuid[], integer, integer, integer, uuid)
    to tp_pipeline, tp_admin;

-- A failure with retry and attempts left waits backoff_base_s * 2^(attempt-1) (at most
-- backoff_max_s) as `failed`, then is claimable again; otherwise the job is dead.
create or replace function app.pipeline_fail(p_job_id uuid, p_token uuid, p_error text, p_retry boolean,
                                             p_max_attempts integer, p_backoff_base_s double precision,
                                             p_backoff_max_s double precision)
    returns setof app.pipeline_jobs
    language sql volatile
    set search_path = ''
as $$
    update app.pipeline_jobs j
    set state = case when p_retry and j.attempt < p_max_attempts then 'failed' else 'dead' end,
        run_after = case when p_retry and j.attempt < p_max_attempts
                         then now() + make_interval(secs => least(p_backoff_max_s,
                                                                  p_backoff_base_s * power(2, j.attempt - 1)))
                         else j.run_after end,
        finished_at = case when p_retry and j.attempt < p_max_attempts then null else now() end,
        max_attempts = p_max_attempts,
        last_error = left(p_error, 8192), lease_token = null, lease_expires_at = null
    where j.id = p_job_id and j.state = 'leased' and j.lease_token = p_token
    returning j.*
$$;
comment on function app.pipeline_fail(uuid, uuid, text, boolean, integer, double precision, double precision) is
    'Records a failure (lease holder only): back to the queue after an exponential backoff, or dead.';
grant execute on function app.pipeline_fail(uuid, uuid, text, boolean, integer, double precision, double precision)
    to tp_pipeline, tp_admin;

-- A new generation of jobs for one session or every session of a suite (e.g. after a new
-- pipeline version). Earlier generations are left as they are: their examples keep their
-- own job_id, so both runs stay apart.
create or replace function app.pipeline_requeue(p_session_id uuid, p_suite_id uuid, p_reason text)
    returns setof app.pipeline_jobs
    language sql volatile
    set search_path = ''
as $$
    insert into app.pipeline_jobs (session_id, suite_id, generation, reason)
    select s.id, s.suite_id,
           coalesce((select max(j.generation) from app.pipeline_jobs j where j.session_id = s.id), 0) + 1,
           p_reason
    from app.sessions s
    where (p_session_id is null or s.id = p_session_id)
      and (p_suite_id is null or s.suite_id = p_suite_id)
    returning *
$$;
comment on function app.pipeline_requeue(uuid, uuid, text) is
    'Enqueues the next generation of jobs for a session or a suite''s sessions. Cost: one job per session.';
grant execute on function app.pipeline_requeue(uuid, uuid, text) to tp_pipeline, tp_admin;

-- --- metrics -----------------------------------------------------------------------------------

-- For ext's Prometheus endpoint: jobs per state and the age of the oldest waiting job.
-- SECURITY DEFINER (run as tp_auth by ext's scrape): counts, never rows.
create or replace function auth.pipeline_queue_stats()
    returns table (state text, jobs bigint, oldest_waiting_s double precision)
    language sql stable security definer
    set search_path = ''
as $$
    select s.state, count(j.id),
           coalesce(extract(epoch from now() - min(j.run_after)
                                   filter (where j.state in ('queued', 'failed') and j.run_after <= now())), 0)::double precision
    from (values ('queued'), ('leased'), ('done'), ('failed'), ('dead')) s (state)
    left join app.pipeline_jobs j on j.state = s.state
    group by s.state
$$;
comment on function auth.pipeline_queue_stats() is
    'Jobs per state and the seconds the oldest queued/failed job has been due. Cost: one scan of app.pipeline_jobs (by state index).';
revoke all on function auth.pipeline_queue_stats() from public;
grant execute on function auth.pipeline_queue_stats() to tp_auth;
