-- Tools of an MCP server (/mcp-servers/{id}/tools).

create or replace view api.tools with (security_invoker = true) as
    select t.id, t.mcp_server_id, t.name, t.description, t.input_schema, t.created_at, t.updated_at
    from app.tools t;
comment on view api.tools is 'Tools of the MCP catalog: readable by every authenticated caller, changed by the server''s creator or an admin.';

revoke all on api.tools, app.tools from tp_user, tp_pipeline, tp_admin, anon;
grant select, delete on app.tools, api.tools to tp_user, tp_admin;
grant insert (id, mcp_server_id, name, description, input_schema), update (name, description, input_schema)
    on app.tools, api.tools to tp_user, tp_admin;
grant select on app.tools, api.tools to tp_pipeline;

drop trigger if exists enforce_path_parent on app.tools;
create trigger enforce_path_parent before insert or update on app.tools
    for each row execute function app.enforce_path_parent('mcp_server_id');
drop trigger if exists touch_updated_at on app.tools;
create trigger touch_updated_at before update on app.tools
    for each row execute function app.touch_updated_at();

-- The MCP servers the caller created (policy helper for tools).
-- SECURITY DEFINER so it reads the catalog regardless of the caller's policies.
create or replace function auth.my_mcp_servers() returns uuid[]
    language sql stable security definer
    set search_path = ''
as $$
    select coalesce(array_agg(s.id), '{}'::uuid[]) from app.mcp_servers s where s.created_by = auth.uid()
$$;
comment on function auth.my_mcp_servers() is 'Ids of the MCP servers the caller created. Cost: one scan of mcp_servers by creator; call as (select auth.my_mcp_servers()).';
grant execute on function auth.my_mcp_servers() to tp_user, tp_admin;
