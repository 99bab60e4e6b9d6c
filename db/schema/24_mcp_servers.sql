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

alter view api.mcp_servers alter column id set default app.unassigned_id();
comment on column api.mcp_servers.transport is 'stdio, sse or streamable-http; defaults to streamable-http for http(s) URLs.';

-- Derived fields and errors a person can act on: transport defaults from the URL.
create or replace function app.mcp_servers_check_write() returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    perform app.require_text('name', new.name, 200);
    perform app.require_text('url', new.url, 2000);
    if new.transport is null and new.url ~* '^https?://' then
        new.transport := 'streamable-http';
    elsif new.transport is null then
        perform api_error.missing_field('transport', 'transport is one of stdio, sse, streamable-http (streamable-http is the default for http(s) URLs).');
    elsif new.transport not in ('stdio', 'sse', 'streamable-http') then
        perform api_error.invalid_value('transport', 'one of stdio, sse, streamable-http');
    end if;
    if not app.is_upsert() and exists (select from app.mcp_servers s where s.name = new.name and s.id <> new.id) then
        perform api_error.conflict('name', pg_catalog.format('the catalog already has an MCP server named %s', new.name),
                                   'Choose another name: the catalog is shared by everyone.');
    end if;
    return new;
end
$$;
comment on function app.mcp_servers_check_write() is 'BEFORE INSERT/UPDATE on mcp_servers: transport from the URL, clear errors.';
drop trigger if exists a_assign_id on app.mcp_servers;
create trigger a_assign_id before insert on app.mcp_servers for each row execute function app.assign_id('api-only');
drop trigger if exists m_check_write on app.mcp_servers;
create trigger m_check_write before insert or update on app.mcp_servers for each row execute function app.mcp_servers_check_write();

-- Catalog changes never reach into suites the caller cannot change (DESIGN §4, §9): a
-- server or tool bound by such suites cannot be deleted, nor can what those bindings call
-- (a server's url or transport, a tool's name or input schema) change under them. The
-- answer says how many bindings, never where. SECURITY DEFINER: counts bindings of every
-- suite; returns only a number.
create or replace function app.bindings_beyond_caller(server_id uuid, tool_id uuid) returns bigint
    language sql stable security definer
    set search_path = ''
as $$
    select count(*) from app.action_tool_maps b
    where (b.mcp_server_id = server_id or b.tool_id = bindings_beyond_caller.tool_id)
      and not (b.suite_id = any (auth.suites_with('editor')) and auth.token_reaches(b.suite_id))
$$;
comment on function app.bindings_beyond_caller(uuid, uuid) is
    'How many bindings of suites the caller cannot change use this server or tool. Cost: one index scan of the bindings.';
grant execute on function app.bindings_beyond_caller(uuid, uuid) to tp_user, tp_admin;

create or replace function app.guard_catalog_in_use() returns trigger
    language plpgsql
    set search_path = ''
as $$
declare
    is_server boolean := tg_table_name = 'mcp_servers';
    n bigint;
begin
    if current_user <> 'tp_user' then
        return coalesce(new, old);
    end if;
    if tg_op = 'UPDATE' and (select bool_and((to_jsonb(new) -> k) is not distinct from (to_jsonb(old) -> k))
                             from unnest(case when is_server then array['url', 'transport']
                                              else array['name', 'input_schema'] end) k) then
        return new;
    end if;
    n := case when is_server then app.bindings_beyond_caller(old.id, null) else app.bindings_beyond_caller(null, old.id) end;
    if n > 0 then
        perform api_error.raise(409, 'TP409',
            pg_catalog.format('this %s is used by %s binding(s) in suites you cannot change',
                              case when is_server then 'MCP server' else 'tool' end, n),
            pg_catalog.json_build_object('bindings', n)::text,
            case when tg_op = 'DELETE' then 'Those suites must unbind it first; add a new entry instead of changing this one.'
                 else 'Add a new entry (a new version) instead of changing what existing bindings call.' end);
    end if;
    return coalesce(new, old);
end
$$;
comment on function app.guard_catalog_in_use() is 'BEFORE UPDATE/DELETE on mcp_servers and tools: 409 when suites the caller cannot change depend on it.';
drop trigger if exists guard_in_use on app.mcp_servers;
create trigger guard_in_use before update or delete on app.mcp_servers
    for each row execute function app.guard_catalog_in_use();
