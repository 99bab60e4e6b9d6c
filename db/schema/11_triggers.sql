-- Row triggers shared by several tables.

-- Keeps updated_at true on every UPDATE.
create or replace function app.touch_updated_at() returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    new.updated_at := now();
    return new;
end
$$;
comment on function app.touch_updated_at() is 'BEFORE UPDATE: sets updated_at to now().';

-- Nested REST paths (/suites/{id}/actions, /mcp-servers/{id}/tools, /suites/{id}/members)
-- name the parent in the path. The proxy passes it to PostgREST as the request header
-- x-tp-parent-<column> (it strips any such header a client sends). This trigger fills the
-- parent column from it when the body leaves it out, and refuses a body that names
-- another parent. TG_ARGV[0] is the parent column.
create or replace function app.enforce_path_parent() returns trigger
    language plpgsql
    set search_path = ''
as $$
declare
    col text := tg_argv[0];
    parent text := nullif(current_setting('request.headers', true), '')::jsonb
                   ->> ('x-tp-parent-' || replace(col, '_', '-'));
    given text := to_jsonb(new) ->> col;
begin
    if parent is null then
        return new;
    end if;
    if given is null then
        new := jsonb_populate_record(new, jsonb_build_object(col, parent));
    elsif given <> parent then
        raise exception using errcode = '22023',
            message = format('%s in the body (%s) does not match the path (%s)', col, given, parent),
            hint = format('Leave %s out of the body on a nested path, or use the same id.', col);
    end if;
    return new;
end
$$;
comment on function app.enforce_path_parent() is 'BEFORE INSERT/UPDATE: fills or checks the parent column named by the nested REST path.';

-- DELETE policies can only filter rows, which would answer a member who may see a row but
-- not delete it with 404. These guards, attached in db/rls/<table>.sql next to the
-- policies, raise 42501 (403) instead. They act on tp_user only: admins are allowed, and
-- cascades run as the table owner.

-- TG_ARGV[0]: the column holding the suite id; TG_ARGV[1]: the least role that may delete.
create or replace function app.guard_delete_by_suite_role() returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    if current_user = 'tp_user' then
        perform auth.require_suite_role((to_jsonb(old) ->> tg_argv[0])::uuid, tg_argv[1]);
    end if;
    return old;
end
$$;
comment on function app.guard_delete_by_suite_role() is 'BEFORE DELETE: 42501 unless the caller holds the given suite role.';

-- TG_ARGV[0]: the column holding the MCP server id. Only the server's creator (with a
-- token that may write the catalog) deletes it or its tools.
create or replace function app.guard_delete_by_catalog_creator() returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    if current_user = 'tp_user'
       and not ((to_jsonb(old) ->> tg_argv[0])::uuid = any (auth.my_mcp_servers())
                and auth.can_write() and not auth.is_suite_scoped()) then
        raise insufficient_privilege
            using message = 'only the creator of an MCP server (or an admin) may delete it or its tools';
    end if;
    return old;
end
$$;
comment on function app.guard_delete_by_catalog_creator() is 'BEFORE DELETE: 42501 unless the caller created the MCP server.';

-- TG_ARGV[0]: the column holding the row's owner. Only the owner (with a token that may
-- write) deletes the row.
create or replace function app.guard_delete_by_owner() returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    if current_user = 'tp_user'
       and not ((to_jsonb(old) ->> tg_argv[0])::uuid = auth.uid() and auth.can_write()) then
        raise insufficient_privilege using message = 'only the uploader may delete this';
    end if;
    return old;
end
$$;
comment on function app.guard_delete_by_owner() is 'BEFORE DELETE: 42501 unless the caller owns the row.';
