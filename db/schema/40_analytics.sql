-- SQL access for analysts: the `analytics` schema.
--
-- Analysts connect with a login role of their own (`tracepipe analyst create`), member of
-- the group tp_analyst, and read through these views. Every view is security_invoker, so
-- the same RLS policies as the API decide which rows an analyst sees (the analyst policies
-- in db/rls/*.sql: every suite, or only the suites app.analysts lists for that role); no
-- view filters rows itself. Secrets are left out twice: the views never select them, and
-- tp_analyst holds SELECT only on the non-secret columns of app.* (column privileges), so
-- users.password_hash, api_keys.key_hash and api_keys.prefix (what an exchange at
-- /auth/token names, and what a lockout would target) and all of app.refresh_tokens are
-- refused even when queried directly. Timestamps are timestamptz; the per-day views count UTC days.
--
-- tp_analyst gets USAGE on analytics (these views), app (security_invoker views read the
-- base tables as the analyst) and auth (the two analyst policy helpers), SELECT on the
-- views and on the listed columns, and nothing else: no write, no CREATE anywhere, no TEMP
-- (the database grants neither to PUBLIC), no other schema.

create schema if not exists analytics;
comment on schema analytics is
    'Read-only views for analysts (tp_analyst). security_invoker: RLS on app.* decides the rows; secrets are never exposed.';
revoke all on schema analytics from public;

-- --- one view per data table, secret columns left out ------------------------------------------

create or replace view analytics.users with (security_invoker = true) as
    select u.id, u.email, u.display_name, u.account_role, u.disabled_at, u.created_at, u.updated_at
    from app.users u;
comment on view analytics.users is 'People and service accounts (never their password hashes).';

-- Dropped first: an upgraded database still has the view with the key prefix column, which
-- create or replace cannot remove (nothing depends on it; the grants below are re-applied).
drop view if exists analytics.api_keys;
create or replace view analytics.api_keys with (security_invoker = true) as
    select k.id, k.user_id, k.name, k.suites, k.access, k.expires_at, k.last_used_at,
           k.revoked_at, k.created_at
    from app.api_keys k;
comment on view analytics.api_keys is
    'API keys, revoked ones included (never the secret, its hash or its public prefix: the prefix names the key at /auth/token).';

create or replace view analytics.suites with (security_invoker = true) as
    select s.id, s.name, s.slug, s.description, s.created_by, s.created_at, s.updated_at
    from app.suites s;
comment on view analytics.suites is 'Suites: every suite, or only those the analyst is limited to.';

create or replace view analytics.suite_members with (security_invoker = true) as
    select m.id, m.suite_id, m.user_id, m.role, m.created_at, m.updated_at, m.accepted, m.accepted_at
    from app.suite_members m;
comment on view analytics.suite_members is 'Suite memberships (viewer, editor, owner); accepted is false for a pending invitation, which grants nothing.';

create or replace view analytics.actions with (security_invoker = true) as
    select a.id, a.suite_id, a.name, a.description, a.input_schema, a.created_at, a.updated_at
    from app.actions a;
comment on view analytics.actions is 'Actions of the suites.';

create or replace view analytics.mcp_servers with (security_invoker = true) as
    select s.id, s.name, s.url, s.transport, s.description, s.created_by, s.created_at, s.updated_at
    from app.mcp_servers s;
comment on view analytics.mcp_servers is 'The shared MCP server catalog (every analyst reads all of it).';

create or replace view analytics.tools with (security_invoker = true) as
    select t.id, t.mcp_server_id, t.name, t.description, t.input_schema, t.created_at, t.updated_at
    from app.tools t;
comment on view analytics.tools is 'Tools of the MCP catalog (every analyst reads all of them).';

create or replace view analytics.action_tool_maps with (security_invoker = true) as
    select b.id, b.suite_id, b.action_id, b.mcp_server_id, b.tool_id, b.argument_mapping,
           b.created_at, b.updated_at
    from app.action_tool_maps b;
comment on view analytics.action_tool_maps is 'Bindings of suites'' actions to MCP tools.';

create or replace view analytics.sessions with (security_invoker = true) as
    select s.id, s.user_id, s.suite_id, s.size_bytes, s.sha256, s.started_at, s.ended_at,
           s.event_count, s.network_count, s.screenshot_count, s.files, s.metadata,
           s.created_at, s.updated_at
    from app.sessions s;
comment on view analytics.sessions is
    'Uploaded trace bundles (metadata). A suite-limited analyst sees the sessions tagged with its suites only.';

create or replace view analytics.examples with (security_invoker = true) as
    select e.id, e.session_id, e.suite_id, e.model, e.message_count, e.size_bytes, e.sha256,
           e.metadata, e.created_at
    from app.examples e;
comment on view analytics.examples is 'Training examples (metadata; the JSONL lives in object storage).';

-- --- convenience views -----------------------------------------------------------------------------

create or replace view analytics.example_details with (security_invoker = true) as
    select e.id, e.created_at, (e.created_at at time zone 'UTC')::date as day,
           e.suite_id, s.slug as suite_slug, s.name as suite_name,
           e.model, e.message_count, e.size_bytes,
           e.session_id, ss.user_id as session_user_id, ss.started_at as session_started_at,
           ss.ended_at as session_ended_at, ss.size_bytes as session_size_bytes
    from app.examples e
    join app.suites s on s.id = e.suite_id
    left join app.sessions ss on ss.id = e.session_id;
comment on view analytics.example_details is
    'Examples joined with their suite and the session they came from (null when not visible or not from a session).';

create or replace view analytics.examples_per_day with (security_invoker = true) as
    select e.suite_id, s.slug as suite_slug, e.model, (e.created_at at time zone 'UTC')::date as day,
           count(*) as examples, sum(e.message_count) as messages, sum(e.size_bytes) as bytes
    from app.examples e
    join app.suites s on s.id = e.suite_id
    group by e.suite_id, s.slug, e.model, (e.created_at at time zone 'UTC')::date;
comment on view analytics.examples_per_day is 'Example counts, messages and bytes per suite, model and UTC day.';

create or replace view analytics.models with (security_invoker = true) as
    select e.model, count(*) as examples, count(distinct e.suite_id) as suites,
           sum(e.message_count) as messages, sum(e.size_bytes) as bytes,
           min(e.created_at) as first_example_at, max(e.created_at) as last_example_at
    from app.examples e
    group by e.model;
comment on view analytics.models is 'Every model with examples: how many, in how many suites, first and last seen.';

create or replace view analytics.sessions_per_day with (security_invoker = true) as
    select ss.suite_id, s.slug as suite_slug, (ss.created_at at time zone 'UTC')::date as day,
           count(*) as sessions, sum(ss.size_bytes) as bytes, avg(ss.size_bytes)::bigint as avg_bytes,
           max(ss.size_bytes) as max_bytes, sum(ss.event_count) as events,
           sum(ss.network_count) as network_requests, sum(ss.screenshot_count) as screenshots,
           count(distinct ss.user_id) as uploaders
    from app.sessions ss
    left join app.suites s on s.id = ss.suite_id
    group by ss.suite_id, s.slug, (ss.created_at at time zone 'UTC')::date;
comment on view analytics.sessions_per_day is
    'Session counts and sizes (bytes, events, network requests, screenshots) per suite and UTC upload day; suite_id null for untagged sessions.';

create or replace view analytics.suite_overview with (security_invoker = true) as
    select s.id as suite_id, s.slug, s.name, s.created_at,
           (select count(*) from app.suite_members m where m.suite_id = s.id) as members,
           (select count(*) from app.actions a where a.suite_id = s.id) as actions,
           (select count(*) from app.action_tool_maps b where b.suite_id = s.id) as bindings,
           (select count(*) from app.sessions ss where ss.suite_id = s.id) as sessions,
           (select coalesce(sum(ss.size_bytes), 0) from app.sessions ss where ss.suite_id = s.id) as session_bytes,
           (select count(*) from app.examples e where e.suite_id = s.id) as examples,
           (select max(e.created_at) from app.examples e where e.suite_id = s.id) as last_example_at
    from app.suites s;
comment on view analytics.suite_overview is 'One row per suite: members, actions, bindings, sessions (and their bytes), examples.';

create or replace view analytics.my_access with (security_invoker = true) as
    select a.role_name, a.suites is null as all_suites, a.suites, a.created_at
    from app.analysts a;
comment on view analytics.my_access is 'The connected analyst''s own entry: every suite, or the suites it is limited to.';

-- --- privileges ------------------------------------------------------------------------------------

grant usage on schema analytics, app, auth to tp_analyst;

-- Column privileges on the base tables (security_invoker views read them as the analyst).
-- Listed column by column, so a column a later migration adds stays hidden until granted here.
revoke all on app.users, app.api_keys, app.refresh_tokens, app.suites, app.suite_members, app.actions,
    app.mcp_servers, app.tools, app.action_tool_maps, app.sessions, app.examples, app.analysts
    from tp_analyst;
grant select (id, email, display_name, account_role, disabled_at, created_at, updated_at)
    on app.users to tp_analyst;
grant select (id, user_id, name, suites, access, expires_at, last_used_at, revoked_at, created_at)
    on app.api_keys to tp_analyst;
grant select (id, name, slug, description, created_by, created_at, updated_at) on app.suites to tp_analyst;
grant select (id, suite_id, user_id, role, created_at, updated_at, accepted, accepted_at) on app.suite_members to tp_analyst;
grant select (id, suite_id, name, description, input_schema, created_at, updated_at) on app.actions to tp_analyst;
grant select (id, name, url, transport, description, created_by, created_at, updated_at)
    on app.mcp_servers to tp_analyst;
grant select (id, mcp_server_id, name, description, input_schema, created_at, updated_at) on app.tools to tp_analyst;
grant select (id, suite_id, action_id, mcp_server_id, tool_id, argument_mapping, created_at, updated_at)
    on app.action_tool_maps to tp_analyst;
grant select (id, user_id, suite_id, size_bytes, sha256, started_at, ended_at, event_count, network_count,
              screenshot_count, files, metadata, created_at, updated_at)
    on app.sessions to tp_analyst;
grant select (id, session_id, suite_id, model, message_count, size_bytes, sha256, metadata, created_at)
    on app.examples to tp_analyst;
grant select (role_name, suites, created_at) on app.analysts to tp_analyst;

revoke all on all tables in schema analytics from public, tp_analyst;
grant select on all tables in schema analytics to tp_analyst;

-- A duration setting stored on a role (ALTER ROLE ... SET, all databases) as an interval:
-- '30s', '5min', or a bare number of milliseconds; null when the role has none.
create or replace function auth.role_duration_setting(role_id oid, setting text) returns interval
    language sql stable
    set search_path = ''
as $$
    select case when v ~ '^[0-9]+$' then (v || ' ms')::interval else v::interval end
    from (select pg_catalog.split_part(c, '=', 2) as v
          from pg_catalog.pg_db_role_setting s, pg_catalog.unnest(s.setconfig) c
          where s.setrole = role_id and s.setdatabase = 0
            and pg_catalog.split_part(c, '=', 1) = setting) found
$$;
comment on function auth.role_duration_setting(oid, text) is 'A role''s own duration setting (e.g. statement_timeout) as an interval.';
revoke all on function auth.role_duration_setting(oid, text) from public;

-- The analysts' watchdog, a backstop behind tp_guard (db/ext/tp_guard), which already keeps
-- analysts from raising statement_timeout and idle_in_transaction_session_timeout. It holds
-- every analyst session to the values on its login role (set by `tracepipe analyst create`
-- and every migrate; the tp_analyst group's when the login role has none): a query running
-- longer is cancelled, one still running `grace` after its limit (it caught the cancel, or
-- ignores it) is terminated, a transaction idle longer is ended. ext calls it every
-- TP_EXT_CLEANUP_RETRY_S (5 s) with TP_EXT_ANALYST_CANCEL_GRACE_S. Returns how many
-- sessions it signalled.
drop function if exists auth.stop_overrunning_analysts();
create or replace function auth.stop_overrunning_analysts(grace interval default interval '10 seconds')
    returns integer
    language sql volatile security definer
    set search_path = ''
as $$
    -- MATERIALIZED and CASE: the signals must only ever be evaluated for analyst sessions
    -- past their limit (an inlined CTE let the planner test them on every backend first).
    with analyst_sessions as materialized (
        select a.pid, a.state, a.query_start, a.state_change,
               coalesce(auth.role_duration_setting(a.usesysid, 'statement_timeout'),
                        auth.role_duration_setting('tp_analyst'::pg_catalog.regrole, 'statement_timeout'))
                   as max_runtime,
               coalesce(auth.role_duration_setting(a.usesysid, 'idle_in_transaction_session_timeout'),
                        auth.role_duration_setting('tp_analyst'::pg_catalog.regrole,
                                                   'idle_in_transaction_session_timeout')) as max_idle
        from pg_catalog.pg_stat_activity a
        where a.backend_type = 'client backend' and a.pid <> pg_catalog.pg_backend_pid()
          and a.usesysid in (select m.member from pg_catalog.pg_auth_members m
                             where m.roleid = 'tp_analyst'::pg_catalog.regrole)
    )
    select count(*) filter (where stopped)::integer
    from (
        select case
                   when l.state in ('active', 'fastpath function call') and l.max_runtime > interval '0'
                        and l.query_start < now() - l.max_runtime - greatest(grace, interval '0')
                       then pg_catalog.pg_terminate_backend(l.pid)
                   when l.state in ('active', 'fastpath function call') and l.max_runtime > interval '0'
                        and l.query_start < now() - l.max_runtime
                       then pg_catalog.pg_cancel_backend(l.pid)
                   when l.state in ('idle in transaction', 'idle in transaction (aborted)')
                        and l.max_idle > interval '0' and l.state_change < now() - l.max_idle
                       then pg_catalog.pg_terminate_backend(l.pid)
                   else false
               end as stopped
        from analyst_sessions l
    ) signalled
$$;
comment on function auth.stop_overrunning_analysts(interval) is
    'Cancels analyst queries running past their role''s statement_timeout, terminates those still running grace later, and ends transactions idle past its idle_in_transaction_session_timeout.';
revoke all on function auth.stop_overrunning_analysts(interval) from public;
grant execute on function auth.stop_overrunning_analysts(interval) to tp_auth;

-- --- the pipeline's work queue (app.pipeline_jobs, DESIGN §10) ---------------------------------
-- Lineage reads example -> job -> session: analytics.example_lineage names the job and the
-- session of every example; analytics.pipeline_jobs joins to analytics.sessions by session_id.

create or replace view analytics.pipeline_jobs with (security_invoker = true) as
    select j.id, j.session_id, j.suite_id, j.state, j.generation, j.reason, j.attempt, j.max_attempts,
           j.run_after, j.leased_by, j.leased_at, j.lease_expires_at, j.last_error, j.example_ids,
           j.created_at, j.updated_at, j.finished_at,
           extract(epoch from j.finished_at - j.leased_at)::double precision as claim_to_finish_s
    from app.pipeline_jobs j;
comment on view analytics.pipeline_jobs is
    'Pipeline jobs (never their lease tokens); claim_to_finish_s is the last lease''s time from claim to done or dead.';

create or replace view analytics.pipeline_throughput with (security_invoker = true) as
    select j.suite_id, date_trunc('hour', j.finished_at at time zone 'UTC') as hour,
           count(*) filter (where j.state = 'done') as done,
           count(*) filter (where j.state = 'dead') as dead,
           sum(j.attempt) as attempts,
           percentile_cont(0.5) within group (order by extract(epoch from j.finished_at - j.leased_at))
               filter (where j.state = 'done') as p50_claim_to_complete_s,
           percentile_cont(0.99) within group (order by extract(epoch from j.finished_at - j.leased_at))
               filter (where j.state = 'done') as p99_claim_to_complete_s
    from app.pipeline_jobs j
    where j.finished_at is not null
    group by j.suite_id, date_trunc('hour', j.finished_at at time zone 'UTC');
comment on view analytics.pipeline_throughput is
    'Finished jobs per suite and UTC hour: done, dead, attempts spent, claim-to-complete latency p50/p99.';

create or replace view analytics.pipeline_failures with (security_invoker = true) as
    select j.id, j.session_id, j.suite_id, j.state, j.generation, j.attempt, j.max_attempts,
           j.last_error, j.run_after as retry_at, j.updated_at
    from app.pipeline_jobs j
    where j.state in ('failed', 'dead') or (j.last_error is not null and j.state <> 'done');
comment on view analytics.pipeline_failures is
    'Jobs waiting to retry (failed) or out of attempts (dead), with their last error.';

create or replace view analytics.pipeline_queue with (security_invoker = true) as
    select s.state, count(j.id) as jobs,
           coalesce(extract(epoch from now() - min(j.run_after)
                    filter (where j.state in ('queued', 'failed') and j.run_after <= now())), 0)::double precision
               as oldest_waiting_s
    from (values ('queued'), ('leased'), ('done'), ('failed'), ('dead')) s (state)
    left join app.pipeline_jobs j on j.state = s.state
    group by s.state;
comment on view analytics.pipeline_queue is 'Queue depth per state and how long the oldest due job has waited (the Prometheus gauges as SQL).';

create or replace view analytics.example_lineage with (security_invoker = true) as
    select e.id as example_id, e.created_at, e.suite_id, e.model, e.sha256,
           e.job_id, j.generation, j.reason, j.state as job_state, j.finished_at as job_finished_at,
           coalesce(j.session_id, e.session_id) as session_id
    from app.examples e
    left join app.pipeline_jobs j on j.id = e.job_id;
comment on view analytics.example_lineage is 'Example -> job (generation, reason) -> session.';

revoke all on app.pipeline_jobs from tp_analyst;
grant select (id, session_id, suite_id, state, generation, reason, attempt, max_attempts, run_after, leased_by,
              leased_at, lease_expires_at, last_error, example_ids, created_at, updated_at, finished_at)
    on app.pipeline_jobs to tp_analyst;
grant select (job_id) on app.examples to tp_analyst;
grant select on analytics.pipeline_jobs, analytics.pipeline_throughput, analytics.pipeline_failures,
    analytics.pipeline_queue, analytics.example_lineage to tp_analyst;
