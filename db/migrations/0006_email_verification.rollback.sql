-- Emails stay in their normal form (the rewrite cannot be undone, nor needs to be).
drop table if exists app.email_verifications;
drop index if exists app.users_email_skeleton_key;
drop index if exists app.users_email_key;
alter table app.users drop column if exists email_skeleton;
create unique index if not exists users_email_key on app.users (lower(email));
