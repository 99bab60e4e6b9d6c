-- Tools of an MCP server (/mcp-servers/{id}/tools).

create or replace view api.tools with (security_invoker = true) as
    select t.id, t.mcp_server_id, t.name, t.description, t.input_schema, t.created_at, t.updated_at
    from app.tools t;
comment on view api.tools is 'Tools of the MCP catalog: readable by every authenticated caller, changed by the server''s creator or an admin.';

revoke all on api.tools, app.tools from tp_user, tp_pipeline, tp_admin, anon;
grant select, delete on app.tools, api.tools to tp_user, tp_admin;
grant insert (id, mcp_server_id, name, description, input_schema), update (mcp_server_id, name, description, input_schema)
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

alter view api.tools alter column id set default app.unassigned_id();

create or replace function app.tools_check_write() returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    if new.mcp_server_id is null then
        perform api_error.missing_field('mcp_server_id', 'Send mcp_server_id, or use /mcp-servers/{id}/tools.');
    end if;
    if not exists (select from app.mcp_servers s where s.id = new.mcp_server_id) then
        perform api_error.raise(422, 'TP422', 'mcp_server_id names no MCP server of the catalog', '{"field": "mcp_server_id"}');
    end if;
    perform app.require_text('name', new.name, 200);
    if new.input_schema is null or jsonb_typeof(new.input_schema) <> 'object' then
        perform api_error.invalid_value('input_schema', 'a JSON Schema object');
    end if;
    if not app.is_upsert()
       and exists (select from app.tools t where t.mcp_server_id = new.mcp_server_id and t.name = new.name and t.id <> new.id) then
        perform api_error.conflict('name', pg_catalog.format('the server already has a tool named %s', new.name),
                                   'Choose another name, or upsert with on_conflict=mcp_server_id,name.');
    end if;
    return new;
end
$$;
comment on function app.tools_check_write() is 'BEFORE INSERT/UPDATE on tools: clear errors for missing or unknown servers, missing or taken names.';
drop trigger if exists a_assign_id on app.tools;
create trigger a_assign_id before insert on app.tools for each row execute function app.assign_id('api-only');
drop trigger if exists m_check_write on app.tools;
create trigger m_check_write before insert or update on app.tools for each row execute function app.tools_check_write();
drop trigger if exists guard_in_use on app.tools;
create trigger guard_in_use before update or delete on app.tools
    for each row execute function app.guard_catalog_in_use();
