-- app.analysts: which suites each analyst login role may read. Only operators change it
-- (`tracepipe analyst`, as a superuser); an analyst reads its own row, which is what
-- auth.analyst_sees_all() and auth.analyst_suites() look up as the analyst.
alter table app.analysts enable row level security;
alter table app.analysts force row level security;

drop policy if exists "analysts read their own entry" on app.analysts;
create policy "analysts read their own entry" on app.analysts
    for select to tp_analyst
    using (role_name = current_user::text);
