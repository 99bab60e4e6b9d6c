-- app.auth_throttle: no request role reads or writes it; ext's identity functions
-- (tp_auth, SECURITY DEFINER, db/schema/30_identity.sql) are the only way in.
alter table app.auth_throttle enable row level security;
alter table app.auth_throttle force row level security;
