-- app.action_tool_maps: members of the suite read its bindings; editors and owners change them.
alter table app.action_tool_maps enable row level security;
alter table app.action_tool_maps force row level security;

drop policy if exists "members read their suites' bindings" on app.action_tool_maps;
create policy "members read their suites' bindings" on app.action_tool_maps
    for select to tp_user
    using (suite_id = any ((select auth.suites_with('viewer'))::uuid[]));

drop policy if exists "the pipeline and admins read every suite's bindings" on app.action_tool_maps;
create policy "the pipeline and admins read every suite's bindings" on app.action_tool_maps
    for select to tp_pipeline, tp_admin using (true);

drop policy if exists "editors add bindings to their suites" on app.action_tool_maps;
create policy "editors add bindings to their suites" on app.action_tool_maps
    for insert to tp_user
    with check (suite_id = any ((select auth.suites_with('editor'))::uuid[]) and auth.token_reaches(suite_id));

drop policy if exists "editors change their suites' bindings" on app.action_tool_maps;
create policy "editors change their suites' bindings" on app.action_tool_maps
    for update to tp_user
    using (suite_id = any ((select auth.suites_with('viewer'))::uuid[]))
    with check (suite_id = any ((select auth.suites_with('editor'))::uuid[]) and auth.token_reaches(suite_id));

drop policy if exists "members reach their suites' bindings for deletion" on app.action_tool_maps;
create policy "members reach their suites' bindings for deletion" on app.action_tool_maps
    for delete to tp_user
    using (suite_id = any ((select auth.suites_with('viewer'))::uuid[]));

drop policy if exists "admins change every suite's bindings" on app.action_tool_maps;
create policy "admins change every suite's bindings" on app.action_tool_maps
    for all to tp_admin using (true) with check (auth.token_reaches(suite_id));

-- Only editors and owners delete: a viewer gets 403, not a silent 404.
drop trigger if exists only_editors_delete on app.action_tool_maps;
create trigger only_editors_delete before delete on app.action_tool_maps
    for each row execute function app.guard_delete_by_suite_role('suite_id', 'editor');

drop policy if exists "analysts read the bindings of the suites they may read" on app.action_tool_maps;
create policy "analysts read the bindings of the suites they may read" on app.action_tool_maps
    for select to tp_analyst
    using ((select auth.analyst_sees_all()) or suite_id = any ((select auth.analyst_suites())::uuid[]));
