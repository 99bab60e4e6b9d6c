-- Schemas and the default privileges every later file relies on.
create schema if not exists api;
create schema if not exists auth;
comment on schema api is 'The HTTP API: PostgREST serves exactly this schema. Views are security_invoker, so RLS on app.* decides.';
comment on schema auth is 'Claims helpers, policy helpers, the pre-request hook and ext''s identity functions.';

revoke all on schema public from public;
revoke all on schema app, api, auth from public;
grant usage on schema api to anon, tp_user, tp_pipeline, tp_admin;
-- security_invoker views need the caller to hold privileges on the base tables as well.
grant usage on schema app to tp_user, tp_pipeline, tp_admin;
grant usage on schema auth to anon, tp_user, tp_pipeline, tp_admin, tp_auth, authenticator;

-- Functions are created without EXECUTE for PUBLIC; every file grants what it means to.
alter default privileges for role tp_owner revoke execute on functions from public;
alter default privileges for role tp_owner in schema api, auth, app revoke execute on functions from public;

revoke all on schema extensions from public;
grant usage on schema extensions to tp_user, tp_pipeline, tp_admin;
