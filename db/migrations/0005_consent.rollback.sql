drop index if exists app.suite_members_invitee_email_idx;
drop index if exists app.suite_members_invitee_idx;
drop index if exists app.suite_members_invitee_email_key;
drop index if exists app.suite_members_invitee_key;
delete from app.suite_members where user_id is null or not accepted;
alter table app.suite_members
    drop constraint if exists suite_members_accepted_has_account,
    drop constraint if exists suite_members_names_someone,
    drop column if exists accepted_at,
    drop column if exists accepted,
    drop column if exists invited_by,
    drop column if exists invitee_email,
    drop column if exists invitee;
alter table app.suite_members alter column user_id set not null;
alter table app.users drop column if exists email_verified_at;
drop index if exists app.suites_created_by_slug_key;
alter table app.suites add constraint suites_slug_key unique (slug);
