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

-- GET /users/me: the caller's profile, suite memberships (as narrowed by an API key) and
-- the invitations addressed to them (accepted: false, with the suite's name and the inviter).
-- SECURITY DEFINER so the invitee reads the name of a suite they cannot read yet; every
-- row is filtered on the caller explicitly.
create or replace function api.me() returns json
    language sql stable security definer
    set search_path = ''
as $$
    select json_build_object(
        'id', u.id,
        'email', u.email,
        'email_verified', u.email_verified_at is not null,
        'display_name', u.display_name,
        'account_role', u.account_role,
        'created_at', u.created_at,
        'updated_at', u.updated_at,
        'memberships', coalesce((
            select json_agg(json_build_object('suite_id', s.id, 'name', s.name, 'slug', s.slug,
                                              'role', m.role, 'accepted', m.accepted,
                                              'invited_by', m.invited_by,
                                              'invited_by_name', case when not m.accepted then coalesce(i.display_name, i.email) end)
                            order by m.accepted desc, s.name)
            from app.suite_members m
            join app.suites s on s.id = m.suite_id
            left join app.users i on i.id = m.invited_by
            where (auth.token_suites() is null or m.suite_id = any (auth.token_suites()))
              and ((m.accepted and m.user_id = u.id)
                   or (not m.accepted and (m.invitee = u.id
                                           or (u.email_verified_at is not null and m.invitee_email = u.email))))
        ), '[]'::json))
    from app.users u
    where u.id = auth.uid()
$$;
comment on function api.me() is 'The caller''s profile, memberships and pending invitations (what GET /users/me answers).';
grant execute on function api.me() to tp_user, tp_pipeline, tp_admin;
grant select (email_verified_at) on app.users to tp_user, tp_pipeline, tp_admin;
