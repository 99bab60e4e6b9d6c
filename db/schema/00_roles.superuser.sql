-- Cluster roles and memberships. Applied by the migrate command as a superuser (the only
-- file that is), before the migrations; everything else runs as tp_owner.
-- Idempotent: creates what is missing and (re)states every attribute.
do $$
declare
    r text;
begin
    foreach r in array array['tp_owner', 'authenticator', 'anon', 'tp_user', 'tp_pipeline',
                             'tp_admin', 'tp_auth', 'tp_analyst']
    loop
        if not exists (select from pg_roles where rolname = r) then
            execute format('create role %I nologin', r);
        end if;
    end loop;
end
$$;

-- Owns every table, view and function. BYPASSRLS so that the SECURITY DEFINER policy
-- helpers it owns can read memberships without recursing into policies. Never on the
-- request path: nobody is granted it.
alter role tp_owner login nosuperuser nocreatedb nocreaterole noreplication bypassrls;
comment on role tp_owner is 'Owner of the Tracepipe schema; runs migrations. Not on the request path.';

-- PostgREST and ext connect as authenticator and switch to the caller's role.
alter role authenticator login noinherit nosuperuser nocreatedb nocreaterole noreplication nobypassrls;
comment on role authenticator is 'Login role of PostgREST and ext; holds no privileges of its own (noinherit).';

alter role anon nologin noinherit nosuperuser nobypassrls;
alter role tp_user nologin noinherit nosuperuser nobypassrls;
alter role tp_pipeline nologin noinherit nosuperuser nobypassrls;
alter role tp_admin nologin noinherit nosuperuser nobypassrls;
alter role tp_auth nologin noinherit nosuperuser nobypassrls;
alter role tp_analyst nologin inherit nosuperuser nobypassrls;
comment on role anon is 'Requests without a token. Sees nothing.';
comment on role tp_user is 'People, through a storefront session token or an API-key token.';
comment on role tp_pipeline is 'The Session-to-Example pipeline (service accounts).';
comment on role tp_admin is 'Platform administrators.';
comment on role tp_auth is 'ext''s identity operations (signup, login, refresh, key exchange). Never in a token.';
comment on role tp_analyst is 'Group role of analysts'' own login roles. Read-only, no secrets.';

grant anon, tp_user, tp_pipeline, tp_admin, tp_auth to authenticator;
revoke tp_owner, tp_analyst from authenticator;

-- The analysts' watchdog (auth.stop_overrunning_analysts, SECURITY DEFINER, owned by
-- tp_owner) sees other sessions' state and cancels their queries: an analyst can SET its
-- own statement_timeout and idle_in_transaction_session_timeout away, the watchdog holds
-- them to the values on the analyst's role. Neither role lets tp_owner signal a superuser.
grant pg_signal_backend, pg_read_all_stats to tp_owner;
