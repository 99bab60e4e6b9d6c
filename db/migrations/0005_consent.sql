-- Membership needs consent (DESIGN §9): a row in suite_members is an invitation until the
-- invitee accepts it; only accepted rows grant anything. An invitation names the invitee by
-- account id (invitee) or by email (invitee_email, normalised); user_id is the account
-- that holds the membership, known once it is accepted (or from the start for a suite's
-- creator). Emails reach invitations only once verified (users.email_verified_at).
-- Slugs are unique among the suites of their creator, not across all accounts (a clash
-- with a suite the caller cannot see is never reported); upserts use (created_by, slug).
-- depends: 0004_auth_throttle

alter table app.suites drop constraint suites_slug_key;
create unique index suites_created_by_slug_key on app.suites (created_by, slug);

alter table app.users add column email_verified_at timestamptz;
comment on column app.users.email_verified_at is
    'When the account proved it receives mail at its address; invitations by email reach only verified accounts.';

alter table app.suite_members alter column user_id drop not null;
alter table app.suite_members
    add column invitee uuid,
    add column invitee_email text check (length(invitee_email) <= 320),
    add column invited_by uuid references app.users (id) on delete set null,
    add column accepted boolean not null default false,
    add column accepted_at timestamptz;
-- Every membership that exists before this migration was granted without an invitation.
update app.suite_members set accepted = true, accepted_at = created_at, invitee = user_id;
alter table app.suite_members
    add constraint suite_members_names_someone check (user_id is not null or invitee is not null or invitee_email is not null),
    add constraint suite_members_accepted_has_account check (not accepted or (user_id is not null and accepted_at is not null));
create unique index suite_members_invitee_key on app.suite_members (suite_id, invitee) where invitee is not null;
create unique index suite_members_invitee_email_key on app.suite_members (suite_id, invitee_email) where invitee_email is not null;
create index suite_members_invitee_idx on app.suite_members (invitee) where not accepted;
create index suite_members_invitee_email_idx on app.suite_members (invitee_email) where not accepted;
comment on column app.suite_members.invitee is 'The account id an invitation names (it may not exist: nothing tells the inviter).';
comment on column app.suite_members.invitee_email is 'The normalised email an invitation names; it reaches the account that verified it.';
comment on column app.suite_members.accepted is 'False for an invitation: it grants nothing until the invitee accepts.';
