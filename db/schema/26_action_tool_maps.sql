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
