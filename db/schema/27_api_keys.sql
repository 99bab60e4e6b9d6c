-- API keys: created by POST /api-keys (ext calls api.create_api_key as the caller), listed
-- and revoked through PostgREST. The secret is shown once; only its sha256 is stored.

create or replace view api.api_keys with (security_invoker = true) as
    select k.id, k.name, k.prefix, k.suites, k.access, k.expires_at, k.last_used_at, k.revoked_at, k.created_at
    from app.api_keys k
    where k.revoked_at is null;
comment on view api.api_keys is 'The caller''s active API keys (never the secret or its hash). DELETE revokes a key at once.';
comment on column api.api_keys.prefix is 'The visible start of the key (tp_…), to recognise it.';
comment on column api.api_keys.suites is 'Suites the key is limited to; null means all of the owner''s suites.';
comment on column api.api_keys.access is 'read or write.';

revoke all on api.api_keys, app.api_keys from tp_user, tp_pipeline, tp_admin, anon;
grant select (id, user_id, name, prefix, suites, access, expires_at, last_used_at, revoked_at, created_at)
    on app.api_keys to tp_user, tp_pipeline, tp_admin;
grant update (revoked_at) on app.api_keys to tp_user, tp_pipeline, tp_admin;
grant insert (user_id, name, prefix, key_hash, suites, access, expires_at) on app.api_keys to tp_user, tp_pipeline, tp_admin;
grant select, delete on api.api_keys to tp_user, tp_pipeline, tp_admin;

-- DELETE /api-keys/{id} keeps the row (for audit) and stamps revoked_at; the pre-request
-- hook refuses tokens of revoked keys from the next request on.
create or replace function api.revoke_api_key() returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    update app.api_keys set revoked_at = now() where id = old.id and revoked_at is null;
    if not found then
        return null;
    end if;
    return old;
end
$$;
comment on function api.revoke_api_key() is 'INSTEAD OF DELETE on api.api_keys: revoke instead of delete.';
drop trigger if exists revoke_instead_of_delete on api.api_keys;
create trigger revoke_instead_of_delete instead of delete on api.api_keys
    for each row execute function api.revoke_api_key();

-- Creates a key for the caller. Needs a storefront session token: a key cannot mint keys.
-- Runs as the caller: the insert policy on app.api_keys is what allows it; the checks
-- here only turn the common mistakes into clear messages.
-- The secret is tp_<prefix>_<secret>; returned once, stored as sha256.
create or replace function api.create_api_key(
    name text,
    suites uuid[] default null,
    access text default 'write',
    expires_at timestamptz default null
) returns json
    language plpgsql volatile
    set search_path = ''
as $$
declare
    caller uuid := auth.uid();
    prefix text := 'tp_' || encode(extensions.gen_random_bytes(6), 'hex');
    secret text;
    key_id uuid;
    not_member uuid[];
begin
    if caller is null then
        raise insufficient_privilege using message = 'creating an API key needs a signed-in user';
    end if;
    if auth.claims() ? 'key_id' then
        raise insufficient_privilege using message = 'an API-key token cannot create API keys',
            hint = 'Sign in with the storefront (POST /auth/login) to manage keys.';
    end if;
    if access is null or access not in ('read', 'write') then
        raise exception using errcode = '22023', message = 'access must be "read" or "write"';
    end if;
    if expires_at is not null and expires_at <= now() then
        raise exception using errcode = '22023', message = 'expires_at must be in the future';
    end if;
    if suites is not null then
        select array_agg(s) into not_member from unnest(suites) s
        where not s = any (auth.suites_with('viewer'));
        if not_member is not null then  -- 403, and the same whether the suite exists or not
            perform api_error.forbidden('a key can only be limited to suites you are a member of',
                                        'Limit the key to suites listed in GET /users/me.');
        end if;
    end if;
    secret := prefix || '_' || encode(extensions.gen_random_bytes(24), 'hex');
    insert into app.api_keys (user_id, name, prefix, key_hash, suites, access, expires_at)
    values (caller, name, prefix, sha256(convert_to(secret, 'UTF8')), suites, access, expires_at)
    returning id into key_id;
    return (select json_build_object('id', k.id, 'name', k.name, 'prefix', k.prefix, 'key', secret,
                                     'suites', k.suites, 'access', k.access, 'expires_at', k.expires_at,
                                     'created_at', k.created_at)
            from app.api_keys k where k.id = key_id);
end
$$;
comment on function api.create_api_key(text, uuid[], text, timestamptz) is
    'Creates an API key for the caller (session tokens only) and returns its secret once.';
revoke all on function api.create_api_key(text, uuid[], text, timestamptz) from public;
grant execute on function api.create_api_key(text, uuid[], text, timestamptz) to tp_user, tp_pipeline, tp_admin;
