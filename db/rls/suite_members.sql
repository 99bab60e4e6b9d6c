-- app.suite_members: members see who else is in their suites; owners manage membership.
alter table app.suite_members enable row level security;
alter table app.suite_members force row level security;

drop policy if exists "members see their suites' members" on app.suite_members;
create policy "members see their suites' members" on app.suite_members
    for select to tp_user
    using (suite_id = any ((select auth.suites_with('viewer'))::uuid[]));

drop policy if exists "the pipeline and admins see every membership" on app.suite_members;
create policy "the pipeline and admins see every membership" on app.suite_members
    for select to tp_pipeline, tp_admin using (true);

drop policy if exists "owners add members" on app.suite_members;
create policy "owners add members" on app.suite_members
    for insert to tp_user
    with check (suite_id = any ((select auth.suites_with('owner'))::uuid[]));

drop policy if exists "owners change members' roles" on app.suite_members;
create policy "owners change members' roles" on app.suite_members
    for update to tp_user
    using (suite_id = any ((select auth.suites_with('viewer'))::uuid[]))
    with check (suite_id = any ((select auth.suites_with('owner'))::uuid[]));

drop policy if exists "members reach memberships for removal" on app.suite_members;
create policy "members reach memberships for removal" on app.suite_members
    for delete to tp_user
    using (suite_id = any ((select auth.suites_with('viewer'))::uuid[]));

drop policy if exists "admins manage every membership" on app.suite_members;
create policy "admins manage every membership" on app.suite_members
    for all to tp_admin using (true) with check (true);

-- Only owners remove members: others get 403, not a silent 404.
drop trigger if exists only_owners_remove on app.suite_members;
create trigger only_owners_remove before delete on app.suite_members
    for each row execute function app.guard_delete_by_suite_role('suite_id', 'owner');

drop policy if exists "analysts read the members of the suites they may read" on app.suite_members;
create policy "analysts read the members of the suites they may read" on app.suite_members
    for select to tp_analyst
    using ((select auth.analyst_sees_all()) or suite_id = any ((select auth.analyst_suites())::uuid[]));
