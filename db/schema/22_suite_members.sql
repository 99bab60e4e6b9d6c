-- Suite membership: owners manage it (/suites/{id}/members).

create or replace view api.suite_members with (security_invoker = true) as
    select m.id, m.suite_id, m.user_id, m.role, m.created_at, m.updated_at
    from app.suite_members m;
comment on view api.suite_members is 'Members of the suites the caller belongs to; owners add, change and remove them.';
comment on column api.suite_members.role is 'viewer, editor or owner.';

revoke all on api.suite_members, app.suite_members from tp_user, tp_pipeline, tp_admin, anon;
grant select, delete on app.suite_members, api.suite_members to tp_user, tp_admin;
grant insert (id, suite_id, user_id, role), update (role) on app.suite_members, api.suite_members to tp_user, tp_admin;
grant select on app.suite_members, api.suite_members to tp_pipeline;

drop trigger if exists enforce_path_parent on app.suite_members;
create trigger enforce_path_parent before insert or update on app.suite_members
    for each row execute function app.enforce_path_parent('suite_id');
drop trigger if exists touch_updated_at on app.suite_members;
create trigger touch_updated_at before update on app.suite_members
    for each row execute function app.touch_updated_at();

-- A suite always keeps an owner: refuse removing or demoting its last one.
create or replace function app.keep_an_owner() returns trigger
    language plpgsql security definer
    set search_path = ''
as $$
begin
    if old.role = 'owner' and (tg_op = 'DELETE' or new.role <> 'owner')
       and exists (select from app.suites s where s.id = old.suite_id)
       and not exists (select from app.suite_members m
                       where m.suite_id = old.suite_id and m.role = 'owner' and m.id <> old.id) then
        raise exception using errcode = '23514',
            message = 'a suite must keep at least one owner',
            hint = 'Make another member owner first, or delete the suite.';
    end if;
    return coalesce(new, old);
end
$$;
comment on function app.keep_an_owner() is 'AFTER UPDATE/DELETE on suite_members: a suite keeps at least one owner.';
drop trigger if exists keep_an_owner on app.suite_members;
create trigger keep_an_owner after update or delete on app.suite_members
    for each row execute function app.keep_an_owner();
