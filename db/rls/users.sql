-- app.users: people see themselves and the people they share a suite with.
alter table app.users enable row level security;
alter table app.users force row level security;

drop policy if exists "people see themselves and who shares a suite with them" on app.users;
create policy "people see themselves and who shares a suite with them" on app.users
    for select to tp_user
    using (id = (select auth.uid())
           or id in (select m.user_id from app.suite_members m
                     where m.accepted and m.suite_id = any ((select auth.suites_with('viewer'))::uuid[])));

drop policy if exists "admins see every account" on app.users;
create policy "admins see every account" on app.users
    for select to tp_admin using (true);

drop policy if exists "pipeline accounts see themselves" on app.users;
create policy "pipeline accounts see themselves" on app.users
    for select to tp_pipeline using (id = (select auth.uid()));

drop policy if exists "people edit their own profile" on app.users;
create policy "people edit their own profile" on app.users
    for update to tp_user
    using (id = (select auth.uid()))
    with check (id = (select auth.uid()) and (select auth.token_reaches(null)));

drop policy if exists "admins edit every profile" on app.users;
create policy "admins edit every profile" on app.users
    for update to tp_admin using (true) with check ((select auth.token_reaches(null)));

drop policy if exists "analysts read the people of the suites they may read" on app.users;
create policy "analysts read the people of the suites they may read" on app.users
    for select to tp_analyst
    using ((select auth.analyst_sees_all())
           or id in (select m.user_id from app.suite_members m
                     where m.suite_id = any ((select auth.analyst_suites())::uuid[])));
