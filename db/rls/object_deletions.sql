-- app.object_deletions: no request role touches it; row triggers (SECURITY DEFINER) write
-- it and ext's service functions (tp_auth) drain it (db/schema/31_uploads.sql).
alter table app.object_deletions enable row level security;
alter table app.object_deletions force row level security;
