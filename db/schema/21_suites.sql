-- Suites: CRUD through PostgREST; the creator becomes owner.

alter table app.suites alter column created_by set default auth.uid();

create or replace view api.suites with (security_invoker = true) as
    select s.id, s.name, s.slug, s.description, s.created_by, s.created_at, s.updated_at
    from app.suites s;
comment on view api.suites is 'Suites the caller is a member of. Creating one makes the caller its owner.';
comment on column api.suites.slug is 'Unique, lowercase letters, digits and dashes.';

revoke all on api.suites, app.suites from tp_user, tp_pipeline, tp_admin, anon;
grant select, delete on app.suites, api.suites to tp_user, tp_admin;
grant insert (id, name, slug, description), update (name, slug, description) on app.suites, api.suites to tp_user, tp_admin;
grant select on app.suites, api.suites to tp_pipeline;

-- The creator becomes owner. BEFORE the suite row (the membership FK is deferred), so that
-- INSERT ... RETURNING already sees the new suite through the members-only SELECT policy.
-- SECURITY DEFINER: nobody may insert an owner row for a suite they do not own yet.
create or replace function app.make_creator_owner() returns trigger
    language plpgsql security definer
    set search_path = ''
as $$
begin
    -- BEFORE triggers run before ON CONFLICT is resolved: when the id exists (an upsert of
    -- an existing suite) there is no new suite and so no new owner. A taken slug still gets
    -- its owner row here, so the statement fails on the unique slug (409), not on the
    -- members-only read policy of INSERT ... RETURNING (403); the row goes with it.
    if new.created_by is not null
       and not exists (select from app.suites s where s.id = new.id) then
        insert into app.suite_members (suite_id, user_id, role) values (new.id, new.created_by, 'owner');
    end if;
    return new;
end
$$;
comment on function app.make_creator_owner() is 'BEFORE INSERT on suites: the creator becomes owner.';

drop trigger if exists make_creator_owner on app.suites;
create trigger make_creator_owner before insert on app.suites
    for each row execute function app.make_creator_owner();
drop trigger if exists touch_updated_at on app.suites;
create trigger touch_updated_at before update on app.suites
    for each row execute function app.touch_updated_at();
