-- Errors a person can act on (DESIGN §9), raised from SQL with PostgREST's documented
-- mechanism: `raise sqlstate 'PGRST'` with the JSON body as the message and the status
-- (and headers) as the detail. PostgREST answers exactly that body and status; ext maps the
-- same sqlstate to the same answer (ext/db.py), so SQL, PostgREST and ext callers agree.
-- One helper per kind of error: triggers and functions say
-- `perform api_error.conflict('slug', …)`, never literal JSON.
create schema if not exists api_error;
comment on schema api_error is 'Helpers that end a statement with a documented API error (code, message, details, hint).';
revoke all on schema api_error from public;
grant usage on schema api_error to anon, tp_user, tp_pipeline, tp_admin, tp_auth, authenticator;

create or replace function api_error.raise(status integer, code text, message text, details text default null,
                                           hint text default null) returns void
    language plpgsql volatile
    set search_path = ''
as $$
begin
    raise sqlstate 'PGRST'
        using message = pg_catalog.json_build_object('code', code, 'message', message, 'details', details,
                                                     'hint', hint)::text,
              detail = pg_catalog.json_build_object('status', status, 'headers', pg_catalog.json_build_object())::text;
end
$$;
comment on function api_error.raise(integer, text, text, text, text) is 'Ends the statement with this HTTP status and error body. Cost: constant.';

-- 422: a required field is missing.
create or replace function api_error.missing_field(field text, hint text default null) returns void
    language sql volatile
    set search_path = ''
as $$
    select api_error.raise(422, 'TP422', pg_catalog.format('%s is required', field),
                           pg_catalog.json_build_object('field', field)::text,
                           coalesce(hint, pg_catalog.format('Send %s in the body.', field)))
$$;

-- 422: a value outside the allowed ones.
create or replace function api_error.invalid_value(field text, allowed text, hint text default null) returns void
    language sql volatile
    set search_path = ''
as $$
    select api_error.raise(422, 'TP422', pg_catalog.format('%s must be %s', field, allowed),
                           pg_catalog.json_build_object('field', field, 'allowed', allowed)::text, hint)
$$;

-- 409: the value is taken (among the rows the caller may see: never another tenant's).
create or replace function api_error.conflict(field text, message text, hint text default null) returns void
    language sql volatile
    set search_path = ''
as $$
    select api_error.raise(409, 'TP409', message, pg_catalog.json_build_object('field', field)::text, hint)
$$;

-- 403: the caller sees the row but may not do this.
create or replace function api_error.forbidden(message text, hint text default null) returns void
    language sql volatile
    set search_path = ''
as $$
    select api_error.raise(403, 'TP403', message, null, hint)
$$;

-- 400: the request itself is wrong (a field that may not be sent, a filter missing).
create or replace function api_error.bad_request(field text, message text, hint text default null) returns void
    language sql volatile
    set search_path = ''
as $$
    select api_error.raise(400, 'TP400', message, pg_catalog.json_build_object('field', field)::text, hint)
$$;

revoke all on all functions in schema api_error from public;
grant execute on all functions in schema api_error to anon, tp_user, tp_pipeline, tp_admin, tp_auth, authenticator;
