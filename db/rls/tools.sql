-- app.tools: part of the shared catalog; the server's creator (or an admin) changes them.
alter table app.tools enable row level security;
alter table app.tools force row level security;

drop policy if exists "everyone signed in reads tools" on app.tools;
create policy "everyone signed in reads tools" on app.tools
    for select to tp_user, tp_pipeline, tp_admin using (true);

drop policy if exists "server creators add tools" on app.tools;
create policy "server creators add tools" on app.tools
    for insert to tp_user
    with check (mcp_server_id = any ((select auth.my_mcp_servers())::uuid[])
                and (select auth.token_reaches(null)));

drop policy if exists "server creators change tools" on app.tools;
create policy "server creators change tools" on app.tools
    for update to tp_user
    using (true)
    with check (mcp_server_id = any ((select auth.my_mcp_servers())::uuid[])
                and (select auth.token_reaches(null)));

drop policy if exists "everyone signed in reaches tools for deletion" on app.tools;
create policy "everyone signed in reaches tools for deletion" on app.tools
    for delete to tp_user using (true);

drop policy if exists "admins manage every tool" on app.tools;
create policy "admins manage every tool" on app.tools
    for all to tp_admin using (true) with check ((select auth.token_reaches(null)));

drop trigger if exists only_creators_delete on app.tools;
create trigger only_creators_delete before delete on app.tools
    for each row execute function app.guard_delete_by_catalog_creator('mcp_server_id');

drop policy if exists "analysts read the catalog's tools" on app.tools;
create policy "analysts read the catalog's tools" on app.tools
    for select to tp_analyst
    using (true);
