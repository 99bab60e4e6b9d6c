-- Suites: CRUD through PostgREST; the creator becomes owner.

alter table app.suites alter column created_by set default auth.uid();

create or replace view api.suites with (security_invoker = true) as
    select s.id, s.name, s.slug, s.description, s.created_by, s.created_at, s.updated_at
    from app.suites s;
comment on view api.suites is 'Suites the caller is a member of. Creating one makes the caller its owner.';
comment on column api.suites.slug is 'Lowercase letters, digits and dashes; defaults to a slug of the name; unique among the suites of its creator.';
comment on column api.suites.created_by is 'The creator (the caller): upsert by natural key with on_conflict=created_by,slug.';
alter view api.suites alter column id set default app.unassigned_id();

revoke all on api.suites, app.suites from tp_user, tp_pipeline, tp_admin, anon;
grant select, delete on app.suites, api.suites to tp_user, tp_admin;
grant insert (id, name, slug, description, created_by), update (name, slug, description) on app.suites, api.suites to tp_user, tp_admin;
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
    -- An upsert that will meet its (created_by, slug) conflict updates that suite instead.
    if new.created_by is not null
       and not exists (select from app.suites s where s.id = new.id)
       and not exists (select from app.suites s where s.created_by = new.created_by and s.slug = new.slug) then
        insert into app.suite_members (suite_id, user_id, invitee, role, accepted, accepted_at)
        values (new.id, new.created_by, new.created_by, 'owner', true, now());
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

-- Derived fields and errors a person can act on (DESIGN §9): the slug defaults to a slug of
-- the name; a taken slug among the caller's own suites is 409 naming it (another tenant's
-- slug never clashes: uniqueness is per creator).
create or replace function app.suites_check_write() returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    perform app.require_text('name', new.name, 200);
    if tg_op = 'INSERT' and current_user in ('tp_user', 'tp_admin') and new.created_by is distinct from auth.uid() then
        perform api_error.forbidden('created_by is always the caller', 'Leave created_by out of the body.');
    end if;
    if new.slug is null then
        new.slug := app.slugify(new.name);
    elsif new.slug !~ '^[a-z0-9][a-z0-9-]{0,99}$' then
        perform api_error.invalid_value('slug', 'lowercase letters, digits and dashes, starting with a letter or digit, at most 100 characters',
                                        'Leave slug out to derive it from the name.');
    end if;
    -- An upsert that meets its (created_by, slug) conflict proposes that suite's own id: the
    -- proposed row must pass the members-only read policy, and the caller is a member of it.
    if tg_op = 'INSERT' and app.is_upsert() then
        new.id := coalesce((select s.id from app.suites s where s.created_by = new.created_by and s.slug = new.slug),
                           new.id);
    end if;
    if new.created_by is not null and not app.is_upsert()
       and exists (select from app.suites s where s.created_by = new.created_by and s.slug = new.slug and s.id <> new.id) then
        perform api_error.conflict('slug', pg_catalog.format('you already have a suite with the slug %s', new.slug),
                                   'Choose another slug, or update that suite (upsert with on_conflict=created_by,slug).');
    end if;
    return new;
end
$$;
comment on function app.suites_check_write() is 'BEFORE INSERT/UPDATE on suites: slug from name, clear errors for missing, invalid and taken values.';

drop trigger if exists a_assign_id on app.suites;
create trigger a_assign_id before insert on app.suites
    for each row execute function app.assign_id('api-only');
drop trigger if exists m_check_write on app.suites;
create trigger m_check_write before insert or update on app.suites
    for each row execute function app.suites_check_write();
