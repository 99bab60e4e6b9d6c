-- app.examples: members of the suite read them; the pipeline and editors register them.
alter table app.examples enable row level security;
alter table app.examples force row level security;

drop policy if exists "members read their suites' examples" on app.examples;
create policy "members read their suites' examples" on app.examples
    for select to tp_user
    using (suite_id = any ((select auth.suites_with('viewer'))::uuid[]));

drop policy if exists "the pipeline and admins read every example" on app.examples;
create policy "the pipeline and admins read every example" on app.examples
    for select to tp_pipeline, tp_admin using (true);

drop policy if exists "editors register examples in their suites" on app.examples;
create policy "editors register examples in their suites" on app.examples
    for insert to tp_user
    with check (suite_id = any ((select auth.suites_with('editor'))::uuid[]) and auth.token_reaches(suite_id)
                and (session_id is null or exists (select from app.sessions s where s.id = session_id)));

drop policy if exists "the pipeline and admins register examples" on app.examples;
create policy "the pipeline and admins register examples" on app.examples
    for insert to tp_pipeline, tp_admin
    with check (auth.token_reaches(suite_id)
                and (session_id is null or exists (select from app.sessions s where s.id = session_id)));

drop policy if exists "editors delete their suites' examples" on app.examples;
create policy "editors delete their suites' examples" on app.examples
    for delete to tp_user
    using (suite_id = any ((select auth.suites_with('editor'))::uuid[]) and auth.token_reaches(suite_id));

drop policy if exists "the pipeline and admins delete examples" on app.examples;
create policy "the pipeline and admins delete examples" on app.examples
    for delete to tp_pipeline, tp_admin using (auth.token_reaches(suite_id));

drop policy if exists "analysts read the examples of the suites they may read" on app.examples;
create policy "analysts read the examples of the suites they may read" on app.examples
    for select to tp_analyst
    using ((select auth.analyst_sees_all()) or suite_id = any ((select auth.analyst_suites())::uuid[]));
