-- People: the API shows a caller their own profile (GET /users/me) and the people they
-- share a suite with (GET /users), never password hashes.

create or replace view api.users with (security_invoker = true) as
    select u.id, u.email, u.display_name, u.account_role, u.created_at, u.updated_at
    from app.users u;
comment on view api.users is 'The caller and the people who share a suite with them.';

revoke all on api.users, app.users from tp_user, tp_pipeline, tp_admin, anon;
grant select (id, email, display_name, account_role, disabled_at, created_at, updated_at) on app.users to tp_user, tp_pipeline, tp_admin;
grant update (display_name) on app.users to tp_user, tp_admin;
grant select on api.users to tp_user, tp_pipeline, tp_admin;
grant update (display_name) on api.users to tp_user, tp_admin;

drop trigger if exists touch_updated_at on app.users;
create trigger touch_updated_at before update on app.users
    for each row execute function app.touch_updated_at();

-- GET /users/me: the caller's profile and suite memberships (as narrowed by an API key).
create or replace function api.me() returns json
    language sql stable
    set search_path = ''
as $$
    select json_build_object(
        'id', u.id,
        'email', u.email,
        'display_name', u.display_name,
        'account_role', u.account_role,
        'email_verified', u.email_verified_at is not null,
        'created_at', u.created_at,
        'updated_at', u.updated_at,
        'memberships', coalesce((
            select json_agg(json_build_object('suite_id', s.id, 'name', s.name, 'slug', s.slug,
                                              'role', m.role) order by s.name)
            from app.suite_members m join app.suites s on s.id = m.suite_id
            where m.user_id = u.id
        ), '[]'::json))
    from app.users u
    where u.id = auth.uid()
$$;
comment on function api.me() is 'The caller''s profile and suite memberships (what GET /users/me answers).';
grant execute on function api.me() to tp_user, tp_pipeline, tp_admin;
grant select (email_verified_at) on app.users to tp_user, tp_pipeline, tp_admin;
