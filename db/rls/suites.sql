-- app.suites: members read; owners update and delete; anyone with a full-access token
-- creates one (and becomes its owner).
alter table app.suites enable row level security;
alter table app.suites force row level security;

drop policy if exists "members read their suites" on app.suites;
create policy "members read their suites" on app.suites
    for select to tp_user
    using (id = any ((select auth.suites_with('viewer'))::uuid[])
           -- a suite this statement created: the once-per-statement list above was read before
           -- the owner rows of a bulk insert's later suites (per row, and only for one's own)
           or (created_by = (select auth.uid()) and id = any (auth.suites_with('viewer'))));

drop policy if exists "the pipeline and admins read every suite" on app.suites;
create policy "the pipeline and admins read every suite" on app.suites
    for select to tp_pipeline, tp_admin using (true);

drop policy if exists "people create suites they will own" on app.suites;
create policy "people create suites they will own" on app.suites
    for insert to tp_user, tp_admin
    with check (created_by = (select auth.uid()) and (select auth.token_reaches(null)));

drop policy if exists "owners update their suites" on app.suites;
create policy "owners update their suites" on app.suites
    for update to tp_user
    using (id = any ((select auth.suites_with('viewer'))::uuid[]))
    with check (id = any ((select auth.suites_with('owner'))::uuid[]) and auth.token_reaches(id));

drop policy if exists "admins update every suite" on app.suites;
create policy "admins update every suite" on app.suites
    for update to tp_admin using (true) with check (auth.token_reaches(id));

drop policy if exists "members reach their suites for deletion" on app.suites;
create policy "members reach their suites for deletion" on app.suites
    for delete to tp_user
    using (id = any ((select auth.suites_with('viewer'))::uuid[]));

drop policy if exists "admins delete every suite" on app.suites;
create policy "admins delete every suite" on app.suites
    for delete to tp_admin using (auth.token_reaches(id));

-- Only owners delete a suite: a viewer or editor gets 403, not a silent 404.
drop trigger if exists only_owners_delete on app.suites;
create trigger only_owners_delete before delete on app.suites
    for each row execute function app.guard_delete_by_suite_role('id', 'owner');

drop policy if exists "analysts read the suites they may read" on app.suites;
create policy "analysts read the suites they may read" on app.suites
    for select to tp_analyst
    using ((select auth.analyst_sees_all()) or id = any ((select auth.analyst_suites())::uuid[]));
