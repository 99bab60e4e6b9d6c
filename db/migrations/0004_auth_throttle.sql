-- Brute-force protection per account and per API-key prefix (the proxy limits per IP):
-- failures counted in a window, shared by every ext worker and instance.
-- depends: 0001_core

create table app.auth_throttle (
    subject text primary key check (length(subject) <= 400),
    window_start timestamptz not null default now(),
    failures integer not null default 0
);
comment on table app.auth_throttle is 'Failed sign-ins per subject (login:<email>, key:<prefix>) in the current window.';
alter table app.auth_throttle enable row level security;
alter table app.auth_throttle force row level security;
