-- app.idempotency_keys: each caller reads and records only their own keys.
alter table app.idempotency_keys enable row level security;
alter table app.idempotency_keys force row level security;

drop policy if exists "callers read their own idempotency keys" on app.idempotency_keys;
create policy "callers read their own idempotency keys" on app.idempotency_keys
    for select to tp_user, tp_pipeline, tp_admin
    using (user_id = (select auth.uid()));

drop policy if exists "callers record their own idempotency keys" on app.idempotency_keys;
create policy "callers record their own idempotency keys" on app.idempotency_keys
    for insert to tp_user, tp_pipeline, tp_admin
    with check (user_id = (select auth.uid()) and (select auth.can_write()));
