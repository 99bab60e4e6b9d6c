-- Built-in functions and languages PostgreSQL grants to PUBLIC, narrowed to the roles that
-- need them (issue 13: analysts escaped their limits through each of these). pg_language and
-- pg_proc are per database, so migrate runs this file as a superuser IN the Tracepipe
-- database, after creating it (`*.database.superuser.sql`). Idempotent.

-- Procedural code: only tp_owner (migrations and db/schema/ run as it) writes DO blocks and
-- plpgsql functions. Calling an existing plpgsql function needs no USAGE, so the API's
-- functions keep working. An analyst's DO loop catching query_canceled outlived its
-- statement_timeout and every cancel of the watchdog.
revoke usage on language plpgsql from public;
grant usage on language plpgsql to tp_owner;

do $$
declare
    f regprocedure;
begin
    -- Large objects: Tracepipe stores none, and a read-only transaction still writes them
    -- (lo_from_bytea, lo_create, lowrite, ...: unbounded disk). Nobody gets them back.
    -- pg_logical_emit_message writes WAL from a read-only transaction; pg_notify signals
    -- the services' channels (PostgREST reloads on pgrst); txid_current and
    -- pg_current_xact_id assign a transaction id even in a read-only transaction (a loop of
    -- them burns through the xid space towards wraparound). Nobody gets them back either.
    for f in select p.oid::regprocedure from pg_proc p
             where p.pronamespace = 'pg_catalog'::regnamespace
               and (p.proname ~ '^lo_' or p.proname in ('loread', 'lowrite', 'pg_logical_emit_message', 'pg_notify',
                                                        'txid_current', 'pg_current_xact_id'))
    loop
        execute format('revoke execute on function %s from public', f);
    end loop;
    -- Advisory locks: the service's must not be takeable by anyone else (an idle analyst
    -- holding the sweep's key stopped it). Taken by ext's sweep and lock pool
    -- (authenticator), a tus PATCH as the caller's role (tp_user, tp_pipeline, tp_admin:
    -- roles that run no SQL of their own, PostgREST calls only api.*), the tus expiry as
    -- tp_auth, and migrate as tp_owner.
    for f in select p.oid::regprocedure from pg_proc p
             where p.pronamespace = 'pg_catalog'::regnamespace and p.proname ~ '^pg_(try_)?advisory_'
    loop
        execute format('revoke execute on function %s from public', f);
        execute format('grant execute on function %s to authenticator, tp_owner, tp_auth, tp_user, tp_pipeline,'
                       ' tp_admin', f);
    end loop;
end
$$;
