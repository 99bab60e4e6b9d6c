-- app.pipeline_jobs: the pipeline works the queue; people see the jobs of their own sessions;
-- analysts read the jobs of the suites they may read; admins do everything the pipeline does.
-- Jobs are born by trigger (app.enqueue_session_job) and die with their session (cascade).
alter table app.pipeline_jobs enable row level security;
alter table app.pipeline_jobs force row level security;

drop policy if exists "the pipeline and admins read every job" on app.pipeline_jobs;
create policy "the pipeline and admins read every job" on app.pipeline_jobs
    for select to tp_pipeline, tp_admin using (true);

-- Own sessions only (not the sessions of co-members of a suite); a suite-scoped key sees
-- the jobs of its suites' sessions among them.
drop policy if exists "people read the jobs of their own sessions" on app.pipeline_jobs;
create policy "people read the jobs of their own sessions" on app.pipeline_jobs
    for select to tp_user
    using (session_id in (select s.id from app.sessions s where s.user_id = (select auth.uid()))
           and (not (select auth.is_suite_scoped())
                or suite_id = any ((select auth.suites_with('viewer'))::uuid[])));

drop policy if exists "the pipeline and admins lease and finish jobs" on app.pipeline_jobs;
create policy "the pipeline and admins lease and finish jobs" on app.pipeline_jobs
    for update to tp_pipeline, tp_admin
    using ((select auth.can_write()))
    with check ((select auth.can_write()));

drop policy if exists "the pipeline and admins requeue sessions" on app.pipeline_jobs;
create policy "the pipeline and admins requeue sessions" on app.pipeline_jobs
    for insert to tp_pipeline, tp_admin
    with check ((select auth.can_write()));

drop policy if exists "admins delete jobs" on app.pipeline_jobs;
create policy "admins delete jobs" on app.pipeline_jobs
    for delete to tp_admin using ((select auth.can_write()));

drop policy if exists "analysts read the jobs of the suites they may read" on app.pipeline_jobs;
create policy "analysts read the jobs of the suites they may read" on app.pipeline_jobs
    for select to tp_analyst
    using ((select auth.analyst_sees_all()) or suite_id = any ((select auth.analyst_suites())::uuid[]));
