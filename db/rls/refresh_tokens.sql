-- app.refresh_tokens: secrets. No role on the request path reads or writes them; ext's
-- identity functions (SECURITY DEFINER, db/schema/30_identity.sql) are the only way in.
alter table app.refresh_tokens enable row level security;
alter table app.refresh_tokens force row level security;
-- Analysts included: no policy and no grant for tp_analyst (db/schema/40_analytics.sql).
