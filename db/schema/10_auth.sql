-- Claims helpers, policy helpers and the pre-request hook.
-- Every permission decision reads the caller through these functions; policies call them
-- as (select auth.fn(...)) so they run once per statement (an InitPlan), not once per row.
--
-- The claims helpers are one-expression SQL functions WITHOUT a SET clause, so the planner
-- inlines them (a SET clause, search_path included, forbids inlining, and PostgreSQL 15
-- then parses and plans the body again on every call: 33 µs for auth.claims and 18 µs for
-- auth.role_rank per request under load). They are not SECURITY DEFINER, read no table, and
-- use only pg_catalog functions and operators (always searched first) and pg_catalog-qualified
-- types, so a search_path cannot redirect them. SECURITY DEFINER functions keep
-- `set search_path = ''`.

-- The verified JWT claims of this request ('{}' when there are none).
-- PostgREST and ext both set request.jwt.claims transaction-locally.
create or replace function auth.claims() returns jsonb
    language sql stable
as $$
    select coalesce(nullif(pg_catalog.current_setting('request.jwt.claims', true), ''), '{}')::pg_catalog.jsonb
$$;
comment on function auth.claims() is 'The request''s verified JWT claims as jsonb. Cost: one setting read (inlined).';
grant execute on function auth.claims() to anon, tp_user, tp_pipeline, tp_admin, tp_auth, authenticator;

-- The caller's user id (the sub claim).
create or replace function auth.uid() returns uuid
    language sql stable
as $$
    select nullif(auth.claims() ->> 'sub', '')::pg_catalog.uuid
$$;
comment on function auth.uid() is 'The caller''s user id from the sub claim, or null. Cost: one setting read (inlined).';
grant execute on function auth.uid() to anon, tp_user, tp_pipeline, tp_admin, tp_auth, authenticator;

-- Whether the caller's token allows writes: API keys may be read-only.
create or replace function auth.can_write() returns boolean
    language sql stable
as $$
    select coalesce(auth.claims() ->> 'key_access', 'write') = 'write'
$$;
comment on function auth.can_write() is 'False for tokens of read-only API keys. Cost: one setting read (inlined).';
grant execute on function auth.can_write() to tp_user, tp_pipeline, tp_admin;

-- Whether the caller's token is limited to a list of suites (a suite-scoped API key).
create or replace function auth.is_suite_scoped() returns boolean
    language sql stable
as $$
    select coalesce(pg_catalog.jsonb_typeof(auth.claims() -> 'key_suites') = 'array', false)
$$;
comment on function auth.is_suite_scoped() is 'True for tokens of API keys limited to some suites. Cost: one setting read (inlined).';
grant execute on function auth.is_suite_scoped() to tp_user, tp_pipeline, tp_admin;

-- The suites a suite-scoped API key is limited to; null for every other token.
create or replace function auth.token_suites() returns uuid[]
    language sql stable
as $$
    select case when pg_catalog.jsonb_typeof(auth.claims() -> 'key_suites') = 'array'
                then array(select x::pg_catalog.uuid from pg_catalog.jsonb_array_elements_text(auth.claims() -> 'key_suites') x)
           end
$$;
comment on function auth.token_suites() is 'Suites a suite-scoped key is limited to; null for unscoped tokens. Cost: one setting read (inlined).';
grant execute on function auth.token_suites() to tp_user, tp_pipeline, tp_admin;

-- THE narrowing rule of every write (DESIGN §9 "Tokens narrow every write"): whether the
-- caller's token may write a row that belongs to suite_id. A null suite_id is a row of no
-- suite: the caller's profile, keys, untagged sessions, catalog entries — only a token that
-- may write and is not limited to some suites reaches those. Every INSERT/UPDATE policy for
-- people composes it (and every DELETE policy or its guard trigger), whatever else the
-- policy checks, so a new table cannot forget the token: tests/test_schema_guards.py
-- fails a policy that does not.
create or replace function auth.token_reaches(suite_id uuid) returns boolean
    language sql stable
as $$
    select auth.can_write()
           and case when not auth.is_suite_scoped() then true
                    when suite_id is null then false
                    else coalesce(suite_id = any (auth.token_suites()), false)
               end
$$;
comment on function auth.token_reaches(uuid) is
    'Whether the token may write a row of this suite (null: a row of no suite). Read-only keys reach nothing; suite-scoped keys only their suites. Cost: one setting read (inlined); call as (select auth.token_reaches(null)) for rows of no suite.';
grant execute on function auth.token_reaches(uuid) to tp_user, tp_pipeline, tp_admin;

-- Rank of a suite role, so roles compare: viewer 1 < editor 2 < owner 3.
create or replace function auth.role_rank(role text) returns integer
    language sql immutable
as $$
    select coalesce(pg_catalog.array_position(array['viewer', 'editor', 'owner']::pg_catalog.text[], role), 0)
$$;
comment on function auth.role_rank(text) is 'viewer=1, editor=2, owner=3, anything else 0. Cost: constant (inlined).';
grant execute on function auth.role_rank(text) to tp_user, tp_pipeline, tp_admin, tp_auth;

-- The suites in which the caller holds at least min_role, after the token's narrowing
-- (a read-only key acts as viewer; a suite-scoped key sees only its suites).
-- SECURITY DEFINER: reads suite_members without recursing into its policies.
-- PL/pgSQL reading the claims once: the SQL version re-read them per membership row and was
-- re-planned on every statement (measured: 237 µs a call for a member of 10 suites).
-- VOLATILE on purpose: it must see the owner row the suites insert trigger wrote earlier
-- in the same statement (a STABLE function would use the statement's snapshot).
create or replace function auth.suites_with(min_role text) returns uuid[]
    language plpgsql volatile security definer
    set search_path = ''
as $$
declare
    c jsonb := auth.claims();
    caller uuid := nullif(c ->> 'sub', '')::uuid;
    wanted integer := auth.role_rank(min_role);
    scoped uuid[];
    found_suites uuid[];
begin
    if caller is null or (coalesce(c ->> 'key_access', 'write') <> 'write' and wanted > 1) then
        return '{}'::uuid[];  -- nobody, or a read-only key asked for more than viewer
    end if;
    if jsonb_typeof(c -> 'key_suites') = 'array' then
        select coalesce(array_agg(x::uuid), '{}'::uuid[]) into scoped
        from jsonb_array_elements_text(c -> 'key_suites') x;
    end if;
    select coalesce(array_agg(m.suite_id), '{}'::uuid[]) into found_suites
    from app.suite_members m
    where m.user_id = caller and m.accepted
      and (case m.role::text when 'owner' then 3 when 'editor' then 2 else 1 end) >= wanted
      and (scoped is null or m.suite_id = any (scoped));
    return found_suites;
end
$$;
comment on function auth.suites_with(text) is
    'Suite ids where the caller has accepted a membership with effective role >= min_role (invitations grant nothing). Cost: one index scan of suite_members by user; call as (select auth.suites_with(...)).';
grant execute on function auth.suites_with(text) to tp_user, tp_pipeline, tp_admin;

-- Analysts (tp_analyst) hold a real SQL session and can SET request.jwt.claims to anything,
-- so their policies never read claims: they key on current_user, the login role, through
-- app.analysts. Neither helper is SECURITY DEFINER (that would make current_user the owner):
-- an analyst reads its own app.analysts row under the policy in db/rls/analysts.sql. A role
-- without a row (the bare group after SET ROLE tp_analyst, say) sees no suite's data.

-- Whether the analyst of this session may read every suite.
create or replace function auth.analyst_sees_all() returns boolean
    language sql stable
    set search_path = ''
as $$
    select coalesce((select a.suites is null from app.analysts a where a.role_name = current_user::text), false)
$$;
comment on function auth.analyst_sees_all() is
    'True when the analyst (current_user) is not limited to some suites. Cost: one primary-key lookup; call as (select auth.analyst_sees_all()).';
grant execute on function auth.analyst_sees_all() to tp_analyst;

-- The suites the analyst of this session is limited to ('{}' when unlimited or unknown).
create or replace function auth.analyst_suites() returns uuid[]
    language sql stable
    set search_path = ''
as $$
    select coalesce((select a.suites from app.analysts a where a.role_name = current_user::text), '{}'::uuid[])
$$;
comment on function auth.analyst_suites() is
    'Suite ids the analyst (current_user) is limited to; empty when unlimited or not an analyst. Cost: one primary-key lookup; call as (select auth.analyst_suites()).';
grant execute on function auth.analyst_suites() to tp_analyst;

-- Raise 403 (42501) unless the caller holds min_role in the suite. Used by the delete guards
-- (db/rls/*.sql): DELETE policies only filter, so "visible but not allowed" needs a raise.
create or replace function auth.require_suite_role(suite_id uuid, min_role text) returns void
    language plpgsql volatile
    set search_path = ''
as $$
begin
    if not (suite_id = any (auth.suites_with(min_role)) and auth.token_reaches(suite_id)) then
        raise insufficient_privilege
            using message = format('this needs the %s role in the suite', min_role),
                  hint = 'Ask an owner of the suite for a higher role, or use a key with write access to it.';
    end if;
end
$$;
comment on function auth.require_suite_role(uuid, text) is 'Raises 42501 unless the caller holds min_role in the suite. Cost: one auth.suites_with call.';
grant execute on function auth.require_suite_role(uuid, text) to tp_user, tp_pipeline, tp_admin;

-- Answer 401 with the error body and a WWW-Authenticate header (PostgREST's PGRST sqlstate).
create or replace function auth.reject(reason text) returns void
    language plpgsql volatile
    set search_path = ''
as $$
begin
    raise sqlstate 'PGRST'
        using message = json_build_object('code', 'TP401', 'message', 'invalid or revoked credentials',
                                          'details', reason,
                                          'hint', case when reason like '%expired%'
                                                       then 'Refresh it (POST /auth/refresh), or exchange your API key again (POST /auth/token).'
                                                       else 'Send Authorization: Bearer <access_token>: sign in with POST /auth/login, or exchange your API key at POST /auth/token.'
                                                  end)::text,
              detail = json_build_object('status', 401,
                                         'headers', json_build_object('WWW-Authenticate', 'Bearer error="invalid_token"',
                                                                      'X-Tp-Reason', reason))::text;
end
$$;
comment on function auth.reject(text) is 'Ends the request with 401 and the error body. Cost: constant.';
grant execute on function auth.reject(text) to anon, tp_user, tp_pipeline, tp_admin, tp_auth, authenticator;

-- PostgREST's pre-request hook (db-pre-request); ext calls it too after switching role.
-- PostgREST has checked the signature and exp. This adds what PostgREST does not check:
-- aud must be present (PostgREST accepts a token without aud), iss must match, the role
-- must be one a token may carry and match the account, and the user, the API key or the
-- login (refresh family) behind the token must not be disabled or revoked — so revocation
-- works on the very next request, even for tokens already issued.
create or replace function auth.check_request() returns void
    language plpgsql volatile security definer
    set search_path = ''
    set plan_cache_mode = force_generic_plan
as $$
declare
    c jsonb := auth.claims();
    claimed_role text := c ->> 'role';
    request_id text := left(nullif(current_setting('request.headers', true), '')::jsonb ->> 'x-request-id', 64);
    uuid_text constant text := '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$';
    key_id uuid;
    login_id uuid;
    problem text;
begin
    -- The proxy's request id reaches pg_stat_activity and the server log (%a).
    if request_id ~ '^[A-Za-z0-9._-]+$' then
        perform set_config('application_name', 'tracepipe ' || request_id, true);
    end if;
    if (c - 'role') = '{}'::jsonb and coalesce(claimed_role, 'anon') = 'anon' then
        -- anonymous: anon holds no privileges, so say what is missing (not "permission denied");
        -- PostgREST's root (its OpenAPI description, which ext merges into /openapi.json) is public
        if coalesce(current_setting('request.path', true), '/') not in ('/', '') then
            perform auth.reject('credentials are required');
        end if;
        return;
    end if;
    if claimed_role is null or claimed_role not in ('tp_user', 'tp_pipeline', 'tp_admin') then
        perform auth.reject('the token''s role is not one a token may carry');
    end if;
    if c ->> 'iss' is distinct from current_setting('tp.jwt_issuer', true) then
        perform auth.reject('the token''s issuer is missing or not accepted');
    end if;
    if not coalesce(c -> 'aud' ? current_setting('tp.jwt_audience', true), false) then
        perform auth.reject('the token''s audience is missing or not accepted');
    end if;
    -- PostgREST caches verified tokens (jwt-cache-max-lifetime) and 12.0.2 answers a cached
    -- one after its exp: the hook checks exp on every request, as ext does.
    if coalesce((c ->> 'exp') ~ '^[0-9]+(\.[0-9]+)?$', false)
       and (c ->> 'exp')::numeric <= extract(epoch from clock_timestamp()) then
        perform auth.reject('the token has expired');
    end if;
    if (c ->> 'sub') !~ uuid_text then
        perform auth.reject('the token has no valid subject');
    end if;
    if c ? 'key_id' then
        if (c ->> 'key_id') !~ uuid_text then
            perform auth.reject('the API key is revoked or expired');
        end if;
        key_id := (c ->> 'key_id')::uuid;
    elsif c ? 'sid' then
        if (c ->> 'sid') !~ uuid_text then
            perform auth.reject('the login session has ended');
        end if;
        login_id := (c ->> 'sid')::uuid;
    else
        perform auth.reject('the token names neither a login session nor an API key');
    end if;
    -- One query (one plan, kept generic: every lookup is by key) for the account and the
    -- key or login behind the token.
    select case
               when u.id is null or u.disabled_at is not null or u.account_role::text <> claimed_role
                   then 'the account is unknown or disabled'
               when key_id is not null and not exists (
                   select from app.api_keys k
                   where k.id = key_id and k.user_id = u.id
                     and k.revoked_at is null and (k.expires_at is null or k.expires_at > now()))
                   then 'the API key is revoked or expired'
               when login_id is not null and (
                   exists (select from app.refresh_tokens t where t.family_id = login_id and t.revoked_at is not null)
                   or not exists (select from app.refresh_tokens t where t.family_id = login_id and t.user_id = u.id))
                   then 'the login session has ended'
           end
    into problem
    from (select (c ->> 'sub')::uuid as id) caller
    left join app.users u on u.id = caller.id;
    if problem is not null then
        perform auth.reject(problem);
    end if;
    -- Memberships are invitations written through an INSTEAD OF trigger (api.suite_members):
    -- PostgreSQL has no ON CONFLICT for such a view, so an upsert would end in a raw 42P10.
    if current_setting('request.path', true) = '/suite_members' and app.is_upsert() then
        perform api_error.bad_request('Prefer', 'memberships cannot be upserted (Prefer: resolution=...)',
            'Invite with POST without resolution=; change a role with PATCH ?user_id=eq.<id>.');
    end if;
end
$$;
comment on function auth.check_request() is
    'Pre-request hook: rejects tokens without aud/iss, with a role a token may not carry, or of a disabled user, revoked key or ended login. Cost: one query of two key lookups (generic plan).';
-- tp_auth too: a token claiming it (authenticator may switch to it) must meet the 401 here.
grant execute on function auth.check_request() to anon, tp_user, tp_pipeline, tp_admin, tp_auth, authenticator;
