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
                and auth.token_reaches(null)) then
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
       and not ((to_jsonb(old) ->> tg_argv[0])::uuid = auth.uid()
                and auth.token_reaches((to_jsonb(old) ->> 'suite_id')::uuid)) then
        raise insufficient_privilege using message = 'only the uploader may delete this';
    end if;
    return old;
end
$$;
comment on function app.guard_delete_by_owner() is 'BEFORE DELETE: 42501 unless the caller owns the row.';

-- Ids are server-assigned (DESIGN §9): the API views give `id` this marker as their
-- default, and app.assign_id (BEFORE INSERT, first of each table's triggers) replaces it
-- with a fresh uuid. A marker that was not replaced means the body named an id, which is
-- refused: no write can probe another tenant's ids. ext inserts the tables it writes with
-- ids of its own straight into app.* and never meets this.
create or replace function app.unassigned_id() returns uuid
    language sql immutable parallel safe
    set search_path = ''
as $$ select '00000000-0000-0000-0000-000000000000'::pg_catalog.uuid $$;
comment on function app.unassigned_id() is 'The API views'' default id: "let the server choose".';
grant execute on function app.unassigned_id() to tp_user, tp_pipeline, tp_admin;

create or replace function app.assign_id() returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    if new.id = app.unassigned_id() then
        new.id := gen_random_uuid();
    elsif current_user in ('tp_user', 'tp_pipeline', 'tp_admin') and tg_argv[0] = 'api-only' then
        perform api_error.bad_request('id', 'id is assigned by the server', 'Leave id out of the body.');
    end if;
    return new;
end
$$;
comment on function app.assign_id() is 'BEFORE INSERT: a fresh id for rows inserted through the API; an id named in the body is refused.';

-- Whether this statement is a PostgREST upsert (Prefer: resolution=…): then ON CONFLICT,
-- not a friendly pre-check, decides what a taken natural key means.
create or replace function app.is_upsert() returns boolean
    language sql stable
    set search_path = ''
as $$
    select coalesce(nullif(pg_catalog.current_setting('request.headers', true), '')::pg_catalog.jsonb ->> 'prefer', '')
           ~ 'resolution=(merge|ignore)-duplicates'
$$;
comment on function app.is_upsert() is 'True inside a PostgREST upsert. Cost: one setting read.';

-- 403 unless the caller (a person) may change the suite's actions and bindings. An unknown
-- suite and another tenant's answer alike; the policies enforce it, this names the fix.
create or replace function app.require_editor(suite_id uuid) returns void
    language plpgsql
    set search_path = ''
as $$
begin
    if current_user = 'tp_user' and not (suite_id = any (auth.suites_with('editor')) and auth.token_reaches(suite_id)) then
        perform api_error.forbidden('you may not change this suite (or it does not exist)',
                                    'This needs the editor role in the suite and a token that may write to it.');
    end if;
end
$$;
comment on function app.require_editor(uuid) is 'Raises 403 unless the caller holds the editor role in the suite with a token that reaches it.';

-- A text field that must be present and within bounds: 422 naming it otherwise.
create or replace function app.require_text(field text, value text, max_length integer) returns void
    language plpgsql
    set search_path = ''
as $$
begin
    if value is null or pg_catalog.btrim(value) = '' then
        perform api_error.missing_field(field);
    elsif pg_catalog.length(value) > max_length then
        perform api_error.invalid_value(field, pg_catalog.format('at most %s characters', max_length));
    end if;
end
$$;
comment on function app.require_text(text, text, integer) is 'Raises 422 naming the field when it is missing, blank or too long.';

-- A lowercase slug of a name: letters and digits, runs of anything else as one dash.
create or replace function app.slugify(name text) returns text
    language sql immutable parallel safe
    set search_path = ''
as $$
    select coalesce(nullif(pg_catalog.left(pg_catalog.btrim(
               pg_catalog.regexp_replace(pg_catalog.lower(pg_catalog.regexp_replace(
                   pg_catalog.normalize(name, 'NFKD'), '[\u0300-\u036f]', '', 'g')), '[^a-z0-9]+', '-', 'g'),
               '-'), 100), ''), 'suite')
$$;
comment on function app.slugify(text) is 'The default slug of a name ("Café Checkout!" -> "cafe-checkout").';
grant execute on function app.is_upsert(), app.require_text(text, text, integer), app.slugify(text), app.require_editor(uuid)
    to tp_user, tp_pipeline, tp_admin;
