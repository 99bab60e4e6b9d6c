-- Session metadata (GET /sessions, /sessions/{id}); ext writes rows on upload (POST /sessions)
-- as the caller's role, so the insert policy decides.

create or replace view api.sessions with (security_invoker = true) as
    select s.id, s.user_id, s.suite_id, s.size_bytes, s.sha256, s.started_at, s.ended_at,
           s.event_count, s.network_count, s.screenshot_count, s.files, s.metadata,
           s.created_at, s.updated_at
    from app.sessions s;
comment on view api.sessions is 'Sessions the caller uploaded, and those tagged with a suite the caller belongs to.';
comment on column api.sessions.files is 'Index of the bundle''s members: [{name, size, compressed_size, crc}].';

revoke all on api.sessions, app.sessions from tp_user, tp_pipeline, tp_admin, anon;
grant select on app.sessions, api.sessions to tp_user, tp_pipeline, tp_admin;
grant insert (id, user_id, suite_id, size_bytes, sha256, started_at, ended_at, event_count, network_count,
              screenshot_count, files, metadata) on app.sessions to tp_user, tp_admin;
grant update (metadata) on app.sessions, api.sessions to tp_user, tp_admin;
grant delete on app.sessions to tp_user, tp_admin;

alter table app.sessions alter column user_id set default auth.uid();
drop trigger if exists touch_updated_at on app.sessions;
create trigger touch_updated_at before update on app.sessions
    for each row execute function app.touch_updated_at();
