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

-- Every stored object's expected size and digest, for `tracepipe scrub`: one page of one
-- kind at a time, in id order after `after` (keyset paging: each page is a short
-- transaction and an index range scan, however many rows there are).
drop function if exists auth.object_manifest();
create or replace function auth.object_manifest(kind text, after uuid, page_size integer)
    returns table (id uuid, size_bytes bigint, sha256 text, created_at timestamptz)
    language plpgsql stable security definer
    set search_path = ''
as $$
declare
    floor uuid := coalesce(after, '00000000-0000-0000-0000-000000000000');
begin
    if kind = 'sessions' then
        return query select s.id, s.size_bytes, s.sha256, s.created_at from app.sessions s
                     where s.id > floor order by s.id limit page_size;
    elsif kind = 'examples' then
        return query select e.id, e.size_bytes, e.sha256, e.created_at from app.examples e
                     where e.id > floor order by e.id limit page_size;
    else
        raise exception 'unknown kind %', kind using errcode = '22023';
    end if;
end
$$;
comment on function auth.object_manifest(text, uuid, integer) is
    'Expected size and sha256 of session bundles or examples (kind), a page after an id (for the scrub).';
revoke all on function auth.object_manifest(text, uuid, integer) from public;
grant execute on function auth.object_manifest(text, uuid, integer) to tp_auth;
