-- app.tus_uploads: an upload belongs to its creator, and to no one else (another caller's
-- HEAD, PATCH or DELETE finds no row: 404). A suite-scoped key reaches only the uploads
-- tagged with its suites; writes need a token that may write, as for sessions.
alter table app.tus_uploads enable row level security;
alter table app.tus_uploads force row level security;

drop policy if exists "uploaders read their uploads" on app.tus_uploads;
create policy "uploaders read their uploads" on app.tus_uploads
    for select to tp_user, tp_admin
    using (user_id = (select auth.uid())
           and (not (select auth.is_suite_scoped()) or suite_id = any ((select auth.suites_with('viewer'))::uuid[])));

drop policy if exists "people start their own uploads" on app.tus_uploads;
create policy "people start their own uploads" on app.tus_uploads
    for insert to tp_user, tp_admin
    with check (user_id = (select auth.uid()) and (select auth.can_write())
                and ((suite_id is null and not (select auth.is_suite_scoped()))
                     or suite_id = any ((select auth.suites_with('viewer'))::uuid[])));

drop policy if exists "uploaders continue their uploads" on app.tus_uploads;
create policy "uploaders continue their uploads" on app.tus_uploads
    for update to tp_user, tp_admin
    using (user_id = (select auth.uid())
           and (not (select auth.is_suite_scoped()) or suite_id = any ((select auth.suites_with('viewer'))::uuid[])))
    with check (user_id = (select auth.uid()) and (select auth.can_write()));

drop policy if exists "uploaders end their uploads" on app.tus_uploads;
create policy "uploaders end their uploads" on app.tus_uploads
    for delete to tp_user, tp_admin
    using (user_id = (select auth.uid()) and (select auth.can_write())
           and (not (select auth.is_suite_scoped()) or suite_id = any ((select auth.suites_with('viewer'))::uuid[])));
