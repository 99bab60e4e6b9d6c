-- app.email_verifications: no request role reads or writes it; ext's identity functions
-- (tp_auth, SECURITY DEFINER, db/schema/30_identity.sql) are the only way in.
alter table app.email_verifications enable row level security;
alter table app.email_verifications force row level security;
