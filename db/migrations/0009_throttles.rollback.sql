drop index if exists app.refresh_tokens_sealed_idx;
alter table app.refresh_tokens
    drop column if exists successor_sealed,
    drop column if exists successor_id;
drop index if exists app.auth_throttle_last_failure_idx;
alter table app.auth_throttle drop column if exists last_failure_at;
