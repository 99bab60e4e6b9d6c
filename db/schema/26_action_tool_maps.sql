-- Bindings of a suite's action to an MCP server's tool (/action-tool-maps).

create or replace view api.action_tool_maps with (security_invoker = true) as
    select b.id, b.suite_id, b.action_id, b.mcp_server_id, b.tool_id, b.argument_mapping,
           b.created_at, b.updated_at
    from app.action_tool_maps b;
comment on view api.action_tool_maps is 'Bindings of the caller''s suites: editors and owners change them. The action must belong to the suite and the tool to the server (foreign keys).';
comment on column api.action_tool_maps.argument_mapping is 'JSON object mapping the action''s input to the tool''s arguments.';

revoke all on api.action_tool_maps, app.action_tool_maps from tp_user, tp_pipeline, tp_admin, anon;
grant select, delete on app.action_tool_maps, api.action_tool_maps to tp_user, tp_admin;
grant insert (id, suite_id, action_id, mcp_server_id, tool_id, argument_mapping),
      update (action_id, mcp_server_id, tool_id, argument_mapping)
    on app.action_tool_maps, api.action_tool_maps to tp_user, tp_admin;
grant select on app.action_tool_maps, api.action_tool_maps to tp_pipeline;

drop trigger if exists touch_updated_at on app.action_tool_maps;
create trigger touch_updated_at before update on app.action_tool_maps
    for each row execute function app.touch_updated_at();

alter view api.action_tool_maps alter column id set default app.unassigned_id();
comment on column api.action_tool_maps.mcp_server_id is 'Derived from tool_id (the tool''s server); may be left out.';

-- Derived fields and errors a person can act on: mcp_server_id comes from the tool; the
-- action must be one of the suite's (an unknown id and another tenant's answer alike).
create or replace function app.action_tool_maps_check_write() returns trigger
    language plpgsql
    set search_path = ''
as $$
declare
    server uuid;
begin
    if new.suite_id is null then
        perform api_error.missing_field('suite_id');
    elsif new.action_id is null then
        perform api_error.missing_field('action_id');
    elsif new.tool_id is null then
        perform api_error.missing_field('tool_id');
    end if;
    perform app.require_editor(new.suite_id);
    select t.mcp_server_id into server from app.tools t where t.id = new.tool_id;
    if server is null then
        perform api_error.raise(422, 'TP422', 'tool_id names no tool of the catalog', '{"field": "tool_id"}');
    elsif new.mcp_server_id is null then
        new.mcp_server_id := server;
    elsif new.mcp_server_id <> server then
        perform api_error.raise(422, 'TP422', 'mcp_server_id is not the server of tool_id', '{"field": "mcp_server_id"}',
                                'Leave mcp_server_id out: it is derived from tool_id.');
    end if;
    if not exists (select from app.actions a where a.id = new.action_id and a.suite_id = new.suite_id) then
        perform api_error.raise(422, 'TP422', 'action_id names no action of this suite that you can see', '{"field": "action_id"}');
    end if;
    if new.argument_mapping is null or jsonb_typeof(new.argument_mapping) <> 'object' then
        perform api_error.invalid_value('argument_mapping', 'a JSON object');
    end if;
    if not app.is_upsert()
       and exists (select from app.action_tool_maps b where b.action_id = new.action_id and b.tool_id = new.tool_id and b.id <> new.id) then
        perform api_error.conflict('tool_id', 'this action is already bound to this tool',
                                   'Update that binding, or upsert with on_conflict=action_id,tool_id.');
    end if;
    return new;
end
$$;
comment on function app.action_tool_maps_check_write() is 'BEFORE INSERT/UPDATE on bindings: server from the tool, clear errors.';
drop trigger if exists a_assign_id on app.action_tool_maps;
create trigger a_assign_id before insert on app.action_tool_maps for each row execute function app.assign_id('api-only');
drop trigger if exists m_check_write on app.action_tool_maps;
create trigger m_check_write before insert or update on app.action_tool_maps for each row execute function app.action_tool_maps_check_write();
