-- Example metadata (GET /examples, /examples/{id}); ext writes rows on registration
-- (POST /examples) as the caller's role, so the insert policy decides.

create or replace view api.examples with (security_invoker = true) as
    select e.id, e.session_id, e.suite_id, e.model, e.message_count, e.size_bytes, e.sha256,
           e.metadata, e.created_at, e.job_id
    from app.examples e;
comment on view api.examples is 'Training examples of the suites the caller belongs to; filter by session_id, suite_id, model, created_at, job_id.';
comment on column api.examples.job_id is 'The pipeline job that registered it (GET /pipeline/jobs?id=eq.…), or null.';

revoke all on api.examples, app.examples from tp_user, tp_pipeline, tp_admin, anon;
grant select on app.examples, api.examples to tp_user, tp_pipeline, tp_admin;
grant insert (id, session_id, suite_id, model, message_count, size_bytes, sha256, metadata, job_id)
    on app.examples to tp_user, tp_pipeline, tp_admin;
grant delete on app.examples to tp_user, tp_pipeline, tp_admin;
