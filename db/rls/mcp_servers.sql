-- app.mcp_servers: a shared catalog. Every authenticated caller reads it; a full-access
-- token creates entries; the creator (or an admin) changes and deletes them.
alter table app.mcp_servers enable row level security;
alter table app.mcp_servers force row level security;

drop policy if exists "everyone signed in reads the catalog" on app.mcp_servers;
create policy "everyone signed in reads the catalog" on app.mcp_servers
    for select to tp_user, tp_pipeline, tp_admin using (true);

drop policy if exists "people add servers to the catalog" on app.mcp_servers;
create policy "people add servers to the catalog" on app.mcp_servers
    for insert to tp_user
    with check (created_by = (select auth.uid())
                and (select auth.token_reaches(null)));

drop policy if exists "creators change their servers" on app.mcp_servers;
create policy "creators change their servers" on app.mcp_servers
    for update to tp_user
    using (true)
    with check (created_by = (select auth.uid())
                and (select auth.token_reaches(null)));

drop policy if exists "everyone signed in reaches servers for deletion" on app.mcp_servers;
create policy "everyone signed in reaches servers for deletion" on app.mcp_servers
    for delete to tp_user using (true);

drop policy if exists "admins manage the catalog" on app.mcp_servers;
create policy "admins manage the catalog" on app.mcp_servers
    for all to tp_admin using (true) with check ((select auth.token_reaches(null)));

drop trigger if exists only_creators_delete on app.mcp_servers;
create trigger only_creators_delete before delete on app.mcp_servers
    for each row execute function app.guard_delete_by_catalog_creator('id');

drop policy if exists "analysts read the catalog" on app.mcp_servers;
create policy "analysts read the catalog" on app.mcp_servers
    for select to tp_analyst
    using (true);
