-- Suite membership (/suites/{id}/members): owners invite, invitees accept (DESIGN §9).
--
-- A row of app.suite_members is an invitation until its invitee accepts it: it names the
-- invitee by account id (invitee) or by email (invitee_email) and grants nothing
-- (auth.suites_with counts accepted rows only). Inviting an id or an email that has no
-- account answers exactly as for one that has: nothing in the answer tells them apart.
-- An invitation by email reaches an account only once that account has verified the
-- email. The invitee sees it (here with the suite's name, and in /users/me) and accepts
-- with PATCH /suites/{id}/members?user_id=eq.<self> {"accepted": true}; only then is
-- user_id the member's account.

-- The caller's email, if the account has verified it (what email invitations match).
-- SECURITY DEFINER: reads the caller's own row whatever the users policies say.
create or replace function auth.my_verified_email() returns text
    language sql stable security definer
    set search_path = ''
as $$
    select u.email from app.users u where u.id = auth.uid() and u.email_verified_at is not null
$$;
comment on function auth.my_verified_email() is
    'The caller''s verified email, or null. Cost: one primary-key lookup; call as (select auth.my_verified_email()).';
grant execute on function auth.my_verified_email() to tp_user, tp_pipeline, tp_admin;

-- Whether this invitation row is addressed to the caller (by id or by verified email).
create or replace function auth.is_my_invitation(invitee uuid, invitee_email text) returns boolean
    language sql stable
as $$
    select coalesce(invitee = auth.uid(), false)
           or coalesce(invitee_email = auth.my_verified_email(), false)
$$;
comment on function auth.is_my_invitation(uuid, text) is 'Whether an invitation names the caller. Cost: inlined; one lookup of the caller.';
grant execute on function auth.is_my_invitation(uuid, text) to tp_user, tp_pipeline, tp_admin;

-- The name of a suite the caller is invited to (the invitee cannot read the suite yet).
create or replace function auth.invited_suite_name(suite_id uuid) returns text
    language sql stable security definer
    set search_path = ''
as $$
    select s.name from app.suites s
    where s.id = invited_suite_name.suite_id
      and exists (select from app.suite_members m
                  where m.suite_id = s.id and not m.accepted
                    and (m.invitee = auth.uid() or m.invitee_email = auth.my_verified_email()
                         or s.id = any (auth.suites_with('owner'))))
$$;
comment on function auth.invited_suite_name(uuid) is
    'The suite''s name for its invitees and owners; null for anyone else. Cost: one lookup per pending invitation.';
grant execute on function auth.invited_suite_name(uuid) to tp_user, tp_pipeline, tp_admin;

create or replace view api.suite_members with (security_invoker = true) as
    select m.id, m.suite_id,
           coalesce(m.user_id, m.invitee,
                    case when m.invitee_email = (select auth.my_verified_email()) then (select auth.uid()) end) as user_id,
           m.invitee_email as email,
           m.role::text as role, m.accepted, m.accepted_at, m.invited_by,
           case when not m.accepted then auth.invited_suite_name(m.suite_id) end as suite_name,
           m.created_at, m.updated_at
    from app.suite_members m;
comment on view api.suite_members is
    'Members of the caller''s suites, pending invitations of the suites they own, and the invitations addressed to them. Owners invite with {user_id | email, role}; the invitee accepts with {"accepted": true}; any member may leave (DELETE of their own row) except the last owner.';
comment on column api.suite_members.user_id is 'The member''s account; for an invitation by email, shown only to the invitee.';
comment on column api.suite_members.email is 'The email an invitation was sent to (invitations by email only).';
comment on column api.suite_members.role is 'viewer, editor or owner.';
comment on column api.suite_members.accepted is 'False for an invitation: it grants nothing until the invitee accepts.';
comment on column api.suite_members.suite_name is 'The suite''s name, for the invitee of a pending invitation.';

revoke all on api.suite_members, app.suite_members from tp_user, tp_pipeline, tp_admin, anon;
grant select, delete on app.suite_members to tp_user, tp_admin;
grant insert (suite_id, invitee, invitee_email, role, invited_by),
      update (role, accepted, user_id, accepted_at) on app.suite_members to tp_user, tp_admin;
grant select, insert (id, suite_id, user_id, email, role, accepted), update (role, accepted), delete
    on api.suite_members to tp_user, tp_admin;
grant select on app.suite_members, api.suite_members to tp_pipeline;

create or replace function app.check_member_role(role text) returns void
    language plpgsql immutable
    set search_path = ''
as $$
begin
    if role is null or role not in ('viewer', 'editor', 'owner') then
        perform api_error.invalid_value('role', 'one of viewer, editor, owner');
    end if;
end
$$;
grant execute on function app.check_member_role(text) to tp_user, tp_admin;

-- The view's writes, as the caller (SECURITY INVOKER): RLS on app.suite_members decides.
create or replace function api.suite_members_write() returns trigger
    language plpgsql volatile
    set search_path = ''
as $$
declare
    r app.suite_members;
begin
    if tg_op = 'INSERT' then
        if new.id is not null then
            perform api_error.bad_request('id', 'id is assigned by the server', 'Leave id out of the body.');
        end if;
        if new.user_id is null and nullif(btrim(new.email), '') is null then
            perform api_error.missing_field('user_id', 'Invite by {"user_id": …} or {"email": …}.');
        elsif new.user_id is not null and new.email is not null then
            perform api_error.bad_request('email', 'invite by user_id or by email, not both');
        end if;
        if new.role is null then
            perform api_error.missing_field('role', 'role is viewer, editor or owner.');
        end if;
        perform app.check_member_role(new.role);
        if new.accepted is not null and new.accepted then
            perform api_error.bad_request('accepted', 'only the invitee can accept an invitation',
                                          'Leave accepted out: the invitation waits for its invitee.');
        end if;
        insert into app.suite_members (suite_id, invitee, invitee_email, role, invited_by)
        values (new.suite_id, new.user_id, app.normalize_email(new.email), new.role, auth.uid())
        returning * into r;
    elsif tg_op = 'UPDATE' then
        if new.suite_id is distinct from old.suite_id or new.user_id is distinct from old.user_id
           or new.email is distinct from old.email then
            perform api_error.bad_request('user_id', 'only role and accepted can change',
                                          'Remove the member and invite someone else instead.');
        end if;
        perform app.check_member_role(new.role);
        update app.suite_members m set role = new.role, accepted = new.accepted
        where m.id = old.id
        returning * into r;
        if not found then
            return null;
        end if;
    else
        delete from app.suite_members m where m.id = old.id;
        if not found then
            return null;
        end if;
        return old;
    end if;
    new.id := r.id;
    new.suite_id := r.suite_id;
    new.user_id := coalesce(r.user_id, r.invitee, case when r.invitee_email = auth.my_verified_email() then auth.uid() end);
    new.email := r.invitee_email;
    new.role := r.role;
    new.accepted := r.accepted;
    new.accepted_at := r.accepted_at;
    new.invited_by := r.invited_by;
    new.suite_name := case when not r.accepted then auth.invited_suite_name(r.suite_id) end;
    new.created_at := r.created_at;
    new.updated_at := r.updated_at;
    return new;
end
$$;
comment on function api.suite_members_write() is 'INSTEAD OF INSERT/UPDATE/DELETE on api.suite_members: invitations, acceptance, roles, leaving.';
grant execute on function api.suite_members_write() to tp_user, tp_admin;
drop trigger if exists write_memberships on api.suite_members;
create trigger write_memberships instead of insert or update or delete on api.suite_members
    for each row execute function api.suite_members_write();

drop trigger if exists enforce_path_parent on app.suite_members;
create trigger enforce_path_parent before insert or update on app.suite_members
    for each row execute function app.enforce_path_parent('suite_id');
drop trigger if exists touch_updated_at on app.suite_members;
create trigger touch_updated_at before update on app.suite_members
    for each row execute function app.touch_updated_at();

-- Who may change what in a membership row. The invitee (and only the invitee) accepts:
-- accepting fills user_id with the caller's account. Owners change roles. Nobody else
-- changes anything (the policies have already kept out who may not see the row).
create or replace function app.guard_membership_change() returns trigger
    language plpgsql volatile
    set search_path = ''
as $$
declare
    is_owner boolean := old.suite_id = any (auth.suites_with('owner')) and auth.token_reaches(old.suite_id);
    is_invitee boolean := not old.accepted and auth.is_my_invitation(old.invitee, old.invitee_email);
begin
    if current_user not in ('tp_user', 'tp_admin') then
        return new;
    end if;
    if new.accepted is distinct from old.accepted then
        if not (is_invitee and new.accepted) then
            perform api_error.forbidden(
                case when old.accepted then 'an accepted membership cannot be un-accepted'
                     else 'only the invitee can accept an invitation' end,
                case when old.accepted then 'Leave the suite with DELETE instead.' end);
        end if;
        if not auth.token_reaches(old.suite_id) then
            perform api_error.forbidden('this token may not accept invitations',
                                        'Use a session token or a write key that reaches this suite.');
        end if;
        new.user_id := auth.uid();
        new.invitee := auth.uid();
        new.accepted_at := now();
    end if;
    if new.role is distinct from old.role and not is_owner and current_user <> 'tp_admin' then
        perform api_error.forbidden('only owners of the suite change roles',
                                    'Ask an owner of the suite for a higher role.');
    end if;
    return new;
end
$$;
comment on function app.guard_membership_change() is 'BEFORE UPDATE on suite_members: the invitee accepts, owners change roles.';
drop trigger if exists guard_membership_change on app.suite_members;
create trigger guard_membership_change before update on app.suite_members
    for each row execute function app.guard_membership_change();

-- Who may remove a row: owners remove anyone; a member leaves (their own row); an invitee
-- declines. The last owner cannot go (app.keep_an_owner).
create or replace function app.guard_membership_removal() returns trigger
    language plpgsql volatile
    set search_path = ''
as $$
begin
    if current_user = 'tp_user'
       and not (auth.token_reaches(old.suite_id)
                and (old.suite_id = any (auth.suites_with('owner'))
                     or old.user_id = auth.uid()
                     or (not old.accepted and auth.is_my_invitation(old.invitee, old.invitee_email)))) then
        perform api_error.forbidden('only owners remove other members',
                                    'Any member may leave: remove your own membership.');
    end if;
    return old;
end
$$;
comment on function app.guard_membership_removal() is 'BEFORE DELETE on suite_members: owners remove anyone, members leave, invitees decline.';
drop trigger if exists only_owners_remove on app.suite_members;
drop trigger if exists guard_membership_removal on app.suite_members;
create trigger guard_membership_removal before delete on app.suite_members
    for each row execute function app.guard_membership_removal();

-- A suite always keeps an accepted owner: refuse removing or demoting its last one. The
-- suite's row is locked first (FOR NO KEY UPDATE: it does not block the foreign keys'
-- KEY SHARE), so two owners demoting themselves at once are serialised and the second
-- sees the first's change: a lock, not a check-then-act.
create or replace function app.keep_an_owner() returns trigger
    language plpgsql security definer
    set search_path = ''
as $$
begin
    if old.role = 'owner' and old.accepted
       and (tg_op = 'DELETE' or new.role <> 'owner') then
        perform from app.suites s where s.id = old.suite_id for no key update;
        if found and not exists (select from app.suite_members m
                                 where m.suite_id = old.suite_id and m.role = 'owner' and m.accepted
                                   and m.id <> old.id) then
            perform api_error.conflict('role', 'a suite must keep at least one owner',
                                       'Make another member owner first, or delete the suite.');
        end if;
    end if;
    return coalesce(new, old);
end
$$;
comment on function app.keep_an_owner() is 'AFTER UPDATE/DELETE on suite_members: a suite keeps at least one accepted owner (suite row locked).';
drop trigger if exists keep_an_owner on app.suite_members;
create trigger keep_an_owner after update or delete on app.suite_members
    for each row execute function app.keep_an_owner();
