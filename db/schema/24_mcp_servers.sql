-- The shared MCP server catalog (/mcp-servers).

alter table app.mcp_servers alter column created_by set default auth.uid();

create or replace view api.mcp_servers with (security_invoker = true) as
    select s.id, s.name, s.url, s.transport, s.description, s.created_by, s.created_at, s.updated_at
    from app.mcp_servers s;
comment on view api.mcp_servers is 'Catalog of MCP servers: every authenticated caller reads it; its creator or an admin changes an entry.';
comment on column api.mcp_servers.transport is 'stdio, sse or streamable-http.';

revoke all on api.mcp_servers, app.mcp_servers from tp_user, tp_pipeline, tp_admin, anon;
grant select, delete on app.mcp_servers, api.mcp_servers to tp_user, tp_admin;
grant insert (id, name, url, transport, description), update (name, url, transport, description)
    on app.mcp_servers, api.mcp_servers to tp_user, tp_admin;
grant select on app.mcp_servers, api.mcp_servers to tp_pipeline;

drop trigger if exists touch_updated_at on app.mcp_servers;
create trigger touch_updated_at before update on app.mcp_servers
    for each row execute function app.touch_updated_at();
