-- app.suite_members: accepted members see who else is in their suites; owners also see the
-- suite's pending invitations and invite; an invitation is visible to its invitee (by id or
-- verified email), who accepts or declines it. Writes compose auth.token_reaches.
alter table app.suite_members enable row level security;
alter table app.suite_members force row level security;

drop policy if exists "members see their suites' members" on app.suite_members;
create policy "members see their suites' members" on app.suite_members
    for select to tp_user
    using ((accepted and suite_id = any ((select auth.suites_with('viewer'))::uuid[]))
           or suite_id = any ((select auth.suites_with('owner'))::uuid[])
           or ((user_id = (select auth.uid()) or (not accepted and auth.is_my_invitation(invitee, invitee_email)))
               and ((select auth.token_suites()) is null or suite_id = any ((select auth.token_suites())::uuid[]))));

drop policy if exists "the pipeline and admins see every membership" on app.suite_members;
create policy "the pipeline and admins see every membership" on app.suite_members
    for select to tp_pipeline, tp_admin using (true);

drop policy if exists "owners add members" on app.suite_members;
drop policy if exists "owners invite people" on app.suite_members;
create policy "owners invite people" on app.suite_members
    for insert to tp_user
    with check (suite_id = any ((select auth.suites_with('owner'))::uuid[])
                and auth.token_reaches(suite_id)
                and not accepted and user_id is null and invited_by = (select auth.uid()));

drop policy if exists "owners change members' roles" on app.suite_members;
drop policy if exists "owners change roles and invitees accept" on app.suite_members;
create policy "owners change roles and invitees accept" on app.suite_members
    for update to tp_user
    using ((accepted and suite_id = any ((select auth.suites_with('viewer'))::uuid[]))
           or suite_id = any ((select auth.suites_with('owner'))::uuid[])
           or (not accepted and auth.is_my_invitation(invitee, invitee_email)))
    with check (auth.token_reaches(suite_id)
                and (suite_id = any ((select auth.suites_with('owner'))::uuid[])
                     or (accepted and user_id = (select auth.uid()))));

drop policy if exists "members reach memberships for removal" on app.suite_members;
create policy "members reach memberships for removal" on app.suite_members
    for delete to tp_user
    using ((accepted and suite_id = any ((select auth.suites_with('viewer'))::uuid[]))
           or suite_id = any ((select auth.suites_with('owner'))::uuid[])
           or (not accepted and auth.is_my_invitation(invitee, invitee_email)));

drop policy if exists "admins manage every membership" on app.suite_members;
drop policy if exists "admins change every membership" on app.suite_members;
create policy "admins change every membership" on app.suite_members
    for update to tp_admin using (true) with check (auth.token_reaches(suite_id));
drop policy if exists "admins invite to every suite" on app.suite_members;
create policy "admins invite to every suite" on app.suite_members
    for insert to tp_admin with check (auth.token_reaches(suite_id) and not accepted and user_id is null);
drop policy if exists "admins remove every membership" on app.suite_members;
create policy "admins remove every membership" on app.suite_members
    for delete to tp_admin using (auth.token_reaches(suite_id));

drop trigger if exists only_owners_remove on app.suite_members;

drop policy if exists "analysts read the members of the suites they may read" on app.suite_members;
create policy "analysts read the members of the suites they may read" on app.suite_members
    for select to tp_analyst
    using ((select auth.analyst_sees_all()) or suite_id = any ((select auth.analyst_suites())::uuid[]));
