-- Throttles an attacker cannot turn against the owner, kept bounded; and a grace for a
-- retried refresh. auth_throttle rows are now per source (login:<email>|<ip>,
-- key:<prefix>|<ip>, src-login:<ip>, src-key:<ip>): a row is forgotten throttle_window_s
-- after its last failure (the sweep deletes it) and the sweep caps the table.
-- refresh_tokens remember, for a short grace, the successor of a rotated token sealed with
-- a key only the old token's holder can derive: a retry gets the same pair back.
-- depends: 0005_consent

alter table app.auth_throttle add column last_failure_at timestamptz not null default now();
create index auth_throttle_last_failure_idx on app.auth_throttle (last_failure_at);
comment on column app.auth_throttle.last_failure_at is
    'The latest failure: the delay runs from it, and the row expires a window after it.';

alter table app.refresh_tokens
    add column successor_id uuid references app.refresh_tokens (id) on delete set null,
    add column successor_sealed bytea check (length(successor_sealed) <= 256);
create index refresh_tokens_sealed_idx on app.refresh_tokens (rotated_at) where successor_sealed is not null;
comment on column app.refresh_tokens.successor_id is 'The token this one was rotated into.';
comment on column app.refresh_tokens.successor_sealed is
    'The successor secret, AES-GCM under a key derived from THIS token''s secret (never stored): '
    'lets a retry within the grace get the same pair; cleared by the sweep after the grace.';
