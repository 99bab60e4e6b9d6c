-- app.sessions: uploaders own their sessions; members of the suite a session is tagged
-- with read its metadata; the pipeline and admins read all.
alter table app.sessions enable row level security;
alter table app.sessions force row level security;

drop policy if exists "uploaders and suite members read sessions" on app.sessions;
create policy "uploaders and suite members read sessions" on app.sessions
    for select to tp_user
    using ((user_id = (select auth.uid()) and not (select auth.is_suite_scoped()))
           or suite_id = any ((select auth.suites_with('viewer'))::uuid[]));

drop policy if exists "the pipeline and admins read every session" on app.sessions;
create policy "the pipeline and admins read every session" on app.sessions
    for select to tp_pipeline, tp_admin using (true);

drop policy if exists "people upload their own sessions" on app.sessions;
create policy "people upload their own sessions" on app.sessions
    for insert to tp_user, tp_admin
    with check (user_id = (select auth.uid()) and auth.token_reaches(suite_id)
                and (suite_id is null or suite_id = any ((select auth.suites_with('viewer'))::uuid[])));

drop policy if exists "uploaders annotate their sessions" on app.sessions;
create policy "uploaders annotate their sessions" on app.sessions
    for update to tp_user, tp_admin
    using ((user_id = (select auth.uid()) and not (select auth.is_suite_scoped()))
           or suite_id = any ((select auth.suites_with('viewer'))::uuid[]))
    with check (user_id = (select auth.uid()) and auth.token_reaches(suite_id)
                and (suite_id is null or suite_id = any ((select auth.suites_with('viewer'))::uuid[])));

drop policy if exists "uploaders delete their sessions" on app.sessions;
drop policy if exists "admins delete every session" on app.sessions;
create policy "admins delete every session" on app.sessions
    for delete to tp_admin using (auth.token_reaches(suite_id));

-- Whoever may read a session reaches it for deletion; only its uploader (with a token
-- that may write) deletes it: the others get 403, not a silent 404.
drop policy if exists "readers reach sessions for deletion" on app.sessions;
create policy "readers reach sessions for deletion" on app.sessions
    for delete to tp_user
    using ((user_id = (select auth.uid()) and not (select auth.is_suite_scoped()))
           or suite_id = any ((select auth.suites_with('viewer'))::uuid[]));

drop trigger if exists only_uploaders_delete on app.sessions;
create trigger only_uploaders_delete before delete on app.sessions
    for each row execute function app.guard_delete_by_owner('user_id');

drop policy if exists "analysts read the sessions tagged with the suites they may read" on app.sessions;
create policy "analysts read the sessions tagged with the suites they may read" on app.sessions
    for select to tp_analyst
    using ((select auth.analyst_sees_all()) or suite_id = any ((select auth.analyst_suites())::uuid[]));
