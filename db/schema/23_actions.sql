-- Actions of a suite (/suites/{id}/actions and /actions?suite_id=eq.{id}).

create or replace view api.actions with (security_invoker = true) as
    select a.id, a.suite_id, a.name, a.description, a.input_schema, a.created_at, a.updated_at
    from app.actions a;
comment on view api.actions is 'Actions of the suites the caller belongs to; editors and owners change them.';
comment on column api.actions.input_schema is 'JSON Schema (an object) of the action''s input.';

revoke all on api.actions, app.actions from tp_user, tp_pipeline, tp_admin, anon;
grant select, delete on app.actions, api.actions to tp_user, tp_admin;
grant insert (id, suite_id, name, description, input_schema), update (name, description, input_schema)
    on app.actions, api.actions to tp_user, tp_admin;
grant select on app.actions, api.actions to tp_pipeline;

drop trigger if exists enforce_path_parent on app.actions;
create trigger enforce_path_parent before insert or update on app.actions
    for each row execute function app.enforce_path_parent('suite_id');
drop trigger if exists touch_updated_at on app.actions;
create trigger touch_updated_at before update on app.actions
    for each row execute function app.touch_updated_at();
