-- Support for ext's uploads: idempotency records and the orphan sweep.

revoke all on app.idempotency_keys from tp_user, tp_pipeline, tp_admin, anon;
grant select, insert on app.idempotency_keys to tp_user, tp_pipeline, tp_admin;

-- Which of these object ids still have a row (sessions or examples)? The sweep deletes the
-- objects of the others. SECURITY DEFINER: the sweep must see every row, whoever owns it.
create or replace function auth.existing_objects(kind text, ids uuid[]) returns setof uuid
    language sql stable security definer
    set search_path = ''
as $$
    select s.id from app.sessions s where kind = 'sessions' and s.id = any (ids)
    union all
    select e.id from app.examples e where kind = 'examples' and e.id = any (ids)
$$;
comment on function auth.existing_objects(text, uuid[]) is 'Ids among `ids` that still have a session (or example) row. For the orphan sweep.';
revoke all on function auth.existing_objects(text, uuid[]) from public;
grant execute on function auth.existing_objects(text, uuid[]) to tp_auth;

-- Forget idempotency records older than `ttl`.
create or replace function auth.expire_idempotency_keys(ttl interval) returns integer
    language sql volatile security definer
    set search_path = ''
as $$
    with gone as (delete from app.idempotency_keys where created_at < now() - ttl returning 1)
    select count(*)::integer from gone
$$;
comment on function auth.expire_idempotency_keys(interval) is 'Deletes idempotency records older than ttl.';
revoke all on function auth.expire_idempotency_keys(interval) from public;
grant execute on function auth.expire_idempotency_keys(interval) to tp_auth;

-- Deleting a session or example row queues its objects for deletion (same transaction).
create or replace function app.queue_object_deletion() returns trigger
    language plpgsql security definer
    set search_path = ''
as $$
begin
    insert into app.object_deletions (prefix) values (tg_argv[0] || '/' || old.id || '/')
    on conflict do nothing;
    return old;
end
$$;
comment on function app.queue_object_deletion() is 'AFTER DELETE: records the row''s object prefix in app.object_deletions.';
drop trigger if exists queue_object_deletion on app.sessions;
create trigger queue_object_deletion after delete on app.sessions
    for each row execute function app.queue_object_deletion('sessions');
drop trigger if exists queue_object_deletion on app.examples;
create trigger queue_object_deletion after delete on app.examples
    for each row execute function app.queue_object_deletion('examples');

create or replace function auth.pending_object_deletions(max_count integer) returns setof text
    language sql stable security definer
    set search_path = ''
as $$
    select d.prefix from app.object_deletions d order by d.requested_at limit max_count
$$;
comment on function auth.pending_object_deletions(integer) is 'Object prefixes waiting for deletion, oldest first.';

create or replace function auth.finish_object_deletion(done text) returns void
    language sql volatile security definer
    set search_path = ''
as $$
    delete from app.object_deletions where prefix = done
$$;
comment on function auth.finish_object_deletion(text) is 'The objects under the prefix are gone: forget it.';
revoke all on function auth.pending_object_deletions(integer), auth.finish_object_deletion(text) from public;
grant execute on function auth.pending_object_deletions(integer), auth.finish_object_deletion(text) to tp_auth;

-- Every stored object's expected size and digest, for `tracepipe scrub`.
create or replace function auth.object_manifest()
    returns table (kind text, id uuid, size_bytes bigint, sha256 text)
    language sql stable security definer
    set search_path = ''
as $$
    select 'sessions', s.id, s.size_bytes, s.sha256 from app.sessions s
    union all
    select 'examples', e.id, e.size_bytes, e.sha256 from app.examples e
$$;
comment on function auth.object_manifest() is 'Expected size and sha256 of every session bundle and example (for the scrub).';
revoke all on function auth.object_manifest() from public;
grant execute on function auth.object_manifest() to tp_auth;
