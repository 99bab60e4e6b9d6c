-- app.api_keys: each person sees, creates and revokes their own keys. A key cannot mint
-- keys, and a key can only be limited to suites its owner belongs to.
alter table app.api_keys enable row level security;
alter table app.api_keys force row level security;

drop policy if exists "people see their own keys" on app.api_keys;
create policy "people see their own keys" on app.api_keys
    for select to tp_user, tp_pipeline, tp_admin
    using (user_id = (select auth.uid()) and not (select auth.is_suite_scoped()));

drop policy if exists "people create their own keys with a session token" on app.api_keys;
create policy "people create their own keys with a session token" on app.api_keys
    for insert to tp_user, tp_pipeline, tp_admin
    with check (user_id = (select auth.uid())
                and not ((select auth.claims()) ? 'key_id') and (select auth.token_reaches(null))
                and (suites is null or suites <@ (select auth.suites_with('viewer'))));

drop policy if exists "people revoke their own keys" on app.api_keys;
create policy "people revoke their own keys" on app.api_keys
    for update to tp_user, tp_pipeline, tp_admin
    using (user_id = (select auth.uid()) and not (select auth.is_suite_scoped()))
    with check (user_id = (select auth.uid()) and (select auth.token_reaches(null)));

drop policy if exists "analysts read the keys of the people they may read" on app.api_keys;
create policy "analysts read the keys of the people they may read" on app.api_keys
    for select to tp_analyst
    using ((select auth.analyst_sees_all())
           or user_id in (select m.user_id from app.suite_members m
                          where m.suite_id = any ((select auth.analyst_suites())::uuid[])));
