-- Actions of a suite (/suites/{id}/actions and /actions?suite_id=eq.{id}).

create or replace view api.actions with (security_invoker = true) as
    select a.id, a.suite_id, a.name, a.description, a.input_schema, a.created_at, a.updated_at
    from app.actions a;
comment on view api.actions is 'Actions of the suites the caller belongs to; editors and owners change them.';
comment on column api.actions.input_schema is 'JSON Schema (an object) of the action''s input.';

revoke all on api.actions, app.actions from tp_user, tp_pipeline, tp_admin, anon;
grant select, delete on app.actions, api.actions to tp_user, tp_admin;
grant insert (id, suite_id, name, description, input_schema), update (suite_id, name, description, input_schema)
    on app.actions, api.actions to tp_user, tp_admin;
grant select on app.actions, api.actions to tp_pipeline;

drop trigger if exists enforce_path_parent on app.actions;
create trigger enforce_path_parent before insert or update on app.actions
    for each row execute function app.enforce_path_parent('suite_id');
drop trigger if exists touch_updated_at on app.actions;
create trigger touch_updated_at before update on app.actions
    for each row execute function app.touch_updated_at();

alter view api.actions alter column id set default app.unassigned_id();

-- Errors a person can act on: the suite must be one the caller can see (an unknown suite
-- and another tenant's answer alike), the name present and free within the suite.
create or replace function app.actions_check_write() returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    if new.suite_id is null then
        perform api_error.missing_field('suite_id', 'Send suite_id, or use /suites/{id}/actions.');
    end if;
    perform app.require_editor(new.suite_id);
    perform app.require_text('name', new.name, 200);
    if new.input_schema is null or jsonb_typeof(new.input_schema) <> 'object' then
        perform api_error.invalid_value('input_schema', 'a JSON Schema object');
    end if;
    if not app.is_upsert()
       and exists (select from app.actions a where a.suite_id = new.suite_id and a.name = new.name and a.id <> new.id) then
        perform api_error.conflict('name', pg_catalog.format('the suite already has an action named %s', new.name),
                                   'Choose another name, or upsert with on_conflict=suite_id,name.');
    end if;
    return new;
end
$$;
comment on function app.actions_check_write() is 'BEFORE INSERT/UPDATE on actions: clear errors for a missing or unknown suite, missing or taken names.';
drop trigger if exists a_assign_id on app.actions;
create trigger a_assign_id before insert on app.actions for each row execute function app.assign_id('api-only');
drop trigger if exists m_check_write on app.actions;
create trigger m_check_write before insert or update on app.actions for each row execute function app.actions_check_write();
