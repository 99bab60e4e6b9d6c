-- Resumable uploads (tus, DESIGN.md §11): ext reads and writes app.tus_uploads as the
-- caller (RLS in db/rls/tus_uploads.sql decides); the maintenance loop aborts expired
-- uploads through the tp_auth functions below. Not exposed through PostgREST: /uploads is ext's.

revoke all on app.tus_uploads from tp_user, tp_pipeline, tp_admin, anon;
grant select, delete on app.tus_uploads to tp_user, tp_admin;
grant insert (user_id, suite_id, upload_length, metadata, session_id, s3_upload_id, expires_at)
    on app.tus_uploads
    to tp_user, tp_admin;
grant update (upload_offset, s3_upload_id, parts, tail_key, tail_bytes, state, error, expires_at)
    on app.tus_uploads
    to tp_user, tp_admin;

alter table app.tus_uploads alter column user_id set default auth.uid();
drop trigger if exists touch_updated_at on app.tus_uploads;
create trigger touch_updated_at before update on app.tus_uploads
    for each row execute function app.touch_updated_at();

-- Uploads past their expiry, oldest first, with what aborting them needs. SECURITY
-- DEFINER: the maintenance loop works for every user.
create or replace function auth.expired_tus_uploads(max_count integer)
    returns table (id uuid, session_id uuid, s3_upload_id text, state text)
    language sql stable security definer
    set search_path = ''
as $$
    select u.id, u.session_id, u.s3_upload_id, u.state from app.tus_uploads u
    where u.expires_at < now() order by u.expires_at limit max_count
$$;
comment on function auth.expired_tus_uploads(integer) is
    'tus uploads past expires_at (oldest first, at most max_count). Cost: an index range scan.';

-- The expired upload's parts and objects are gone: forget it (a done upload's session stays).
create or replace function auth.forget_tus_upload(upload uuid) returns void
    language sql volatile security definer
    set search_path = ''
as $$
    delete from app.tus_uploads where id = upload and expires_at < now()
$$;
comment on function auth.forget_tus_upload(uuid) is 'Deletes an expired tus upload''s row (after ext aborted its parts).';

-- Multipart uploads that belong to live tus uploads: the orphan sweep must not abort them
-- however old they are (a tus upload may take longer than the sweep's grace period).
create or replace function auth.live_tus_multipart_ids() returns setof text
    language sql stable security definer
    set search_path = ''
as $$
    select u.s3_upload_id from app.tus_uploads u where u.s3_upload_id is not null and u.expires_at >= now()
$$;
comment on function auth.live_tus_multipart_ids() is 'S3 multipart upload ids of unexpired tus uploads (for the orphan sweep).';

revoke all on function auth.expired_tus_uploads(integer), auth.forget_tus_upload(uuid),
    auth.live_tus_multipart_ids() from public;
grant execute on function auth.expired_tus_uploads(integer), auth.forget_tus_upload(uuid),
    auth.live_tus_multipart_ids() to tp_auth;
