-- Identity operations of ext (signup, login, refresh rotation, logout, key exchange).
-- ext runs them as tp_auth, a role no token may carry; they are SECURITY DEFINER because
-- they read what no caller may read (password hashes, refresh and key hashes).
-- Passwords are hashed (argon2id) and secrets compared (constant time) in ext; these
-- functions only store and fetch.

create or replace function auth.signup(email text, password_hash text, display_name text)
    returns uuid
    language sql volatile security definer
    set search_path = ''
as $$
    insert into app.users (email, password_hash, display_name)
    values (email, password_hash, display_name)
    returning id
$$;
comment on function auth.signup(text, text, text) is 'Creates a person (tp_user). The email must be normalised (app.normalize_email; the trigger refuses others); a taken email or skeleton raises 23505.';

create or replace function auth.login_lookup(email text)
    returns table (id uuid, password_hash text, account_role text, disabled boolean)
    language sql stable security definer
    set search_path = ''
as $$
    select u.id, u.password_hash, u.account_role, u.disabled_at is not null
    from app.users u where u.email = app.normalize_email(login_lookup.email)
$$;
comment on function auth.login_lookup(text) is 'The account and password hash for an email, for ext to verify.';

create or replace function auth.start_login(user_id uuid, token_hash bytea, ttl interval)
    returns uuid
    language sql volatile security definer
    set search_path = ''
as $$
    insert into app.refresh_tokens (user_id, family_id, token_hash, expires_at)
    values (user_id, gen_random_uuid(), token_hash, now() + ttl)
    returning family_id
$$;
comment on function auth.start_login(uuid, bytea, interval) is 'Starts a login (a refresh-token family) and returns its id (the sid claim).';

-- Rotates a refresh token. A token that was already rotated is a reuse: the whole family
-- (the login) is revoked and 'reused' returned.
create or replace function auth.rotate_refresh(old_hash bytea, new_hash bytea, ttl interval)
    returns table (status text, user_id uuid, family_id uuid, account_role text)
    language plpgsql volatile security definer
    set search_path = ''
as $$
declare
    t app.refresh_tokens%rowtype;
    u app.users%rowtype;
begin
    select * into t from app.refresh_tokens r where r.token_hash = old_hash for update;
    if not found then
        return query select 'invalid', null::uuid, null::uuid, null::text;
        return;
    end if;
    if t.rotated_at is not null then
        update app.refresh_tokens r set revoked_at = coalesce(r.revoked_at, now()) where r.family_id = t.family_id;
        return query select 'reused', t.user_id, t.family_id, null::text;
        return;
    end if;
    select * into u from app.users x where x.id = t.user_id;
    if t.revoked_at is not null or t.expires_at <= now() or u.disabled_at is not null then
        return query select 'invalid', t.user_id, t.family_id, null::text;
        return;
    end if;
    update app.refresh_tokens r set rotated_at = now() where r.id = t.id;
    insert into app.refresh_tokens (user_id, family_id, token_hash, expires_at)
    values (t.user_id, t.family_id, new_hash, now() + ttl);
    return query select 'ok', t.user_id, t.family_id, u.account_role::text;
end
$$;
comment on function auth.rotate_refresh(bytea, bytea, interval) is 'Refresh-token rotation with reuse detection.';

create or replace function auth.end_login(user_id uuid, family_id uuid, token_hash bytea)
    returns integer
    language sql volatile security definer
    set search_path = ''
as $$
    with ended as (
        update app.refresh_tokens r set revoked_at = coalesce(r.revoked_at, now())
        where r.user_id = end_login.user_id
          and (r.family_id = end_login.family_id
               or r.family_id in (select x.family_id from app.refresh_tokens x
                                  where x.token_hash = end_login.token_hash and x.user_id = end_login.user_id))
        returning 1
    )
    select count(*)::integer from ended
$$;
comment on function auth.end_login(uuid, uuid, bytea) is 'Logout: revokes the login of the access token and of the refresh token given.';

create or replace function auth.key_lookup(prefix text)
    returns table (id uuid, user_id uuid, key_hash bytea, suites uuid[], access text,
                   expires_at timestamptz, revoked_at timestamptz, account_role text, disabled boolean)
    language sql stable security definer
    set search_path = ''
as $$
    select k.id, k.user_id, k.key_hash, k.suites, k.access, k.expires_at, k.revoked_at,
           u.account_role, u.disabled_at is not null
    from app.api_keys k join app.users u on u.id = k.user_id
    where k.prefix = key_lookup.prefix
$$;
comment on function auth.key_lookup(text) is 'The key record behind a prefix, for ext to compare the secret in constant time.';

create or replace function auth.touch_key(key_id uuid) returns void
    language sql volatile security definer
    set search_path = ''
as $$
    update app.api_keys set last_used_at = now() where id = key_id
$$;
comment on function auth.touch_key(uuid) is 'Records the use of a key (on token exchange).';

revoke all on function auth.signup(text, text, text), auth.login_lookup(text),
    auth.start_login(uuid, bytea, interval), auth.rotate_refresh(bytea, bytea, interval),
    auth.end_login(uuid, uuid, bytea), auth.key_lookup(text), auth.touch_key(uuid) from public;
grant execute on function auth.signup(text, text, text), auth.login_lookup(text),
    auth.start_login(uuid, bytea, interval), auth.rotate_refresh(bytea, bytea, interval),
    auth.end_login(uuid, uuid, bytea), auth.key_lookup(text), auth.touch_key(uuid) to tp_auth;

-- Email verification: ext mails a one-time code; only its sha256 is stored.
create or replace function auth.start_email_verification(account uuid, token_hash bytea, ttl interval)
    returns text
    language plpgsql volatile security definer
    set search_path = ''
as $$
declare
    address text;
begin
    select u.email into address from app.users u
    where u.id = account and u.email_verified_at is null and u.disabled_at is null;
    if address is null then
        return null;
    end if;
    -- one live code per account: a new one replaces the unused ones
    delete from app.email_verifications v where v.user_id = account and v.used_at is null;
    insert into app.email_verifications (user_id, email, token_hash, expires_at)
    values (account, address, start_email_verification.token_hash, now() + ttl);
    return address;
end
$$;
comment on function auth.start_email_verification(uuid, bytea, interval) is 'Records a verification code for the account''s address and returns the address to mail it to (null: already verified or disabled).';

-- 'ok', or why not: 'invalid' (unknown code, or the account's address changed since),
-- 'used', 'expired'.
create or replace function auth.verify_email(token_hash bytea)
    returns table (status text, user_id uuid)
    language plpgsql volatile security definer
    set search_path = ''
as $$
declare
    v app.email_verifications%rowtype;
begin
    select * into v from app.email_verifications x where x.token_hash = verify_email.token_hash for update;
    if not found then
        return query select 'invalid', null::uuid;
        return;
    end if;
    if v.used_at is not null then
        return query select 'used', v.user_id;
        return;
    end if;
    if v.expires_at <= now() then
        return query select 'expired', v.user_id;
        return;
    end if;
    update app.email_verifications x set used_at = now() where x.id = v.id;
    update app.users u set email_verified_at = coalesce(u.email_verified_at, now())
    where u.id = v.user_id and u.email = v.email;
    if not found then
        return query select 'invalid', v.user_id;
        return;
    end if;
    return query select 'ok', v.user_id;
end
$$;
comment on function auth.verify_email(bytea) is 'Spends a verification code (single use, before it expires): the account''s email is verified.';

revoke all on function auth.start_email_verification(uuid, bytea, interval), auth.verify_email(bytea) from public;
grant execute on function auth.start_email_verification(uuid, bytea, interval), auth.verify_email(bytea) to tp_auth;

-- Brute-force throttle. Seconds the subject must wait before trying again (0: go ahead).
create or replace function auth.throttle_wait(subject text, max_failures integer, time_window interval)
    returns integer
    language sql stable security definer
    set search_path = ''
as $$
    select coalesce((
        select greatest(ceil(extract(epoch from (t.window_start + time_window - now())))::integer, 1)
        from app.auth_throttle t
        where t.subject = throttle_wait.subject and t.failures >= max_failures
          and t.window_start + time_window > now()), 0)
$$;
comment on function auth.throttle_wait(text, integer, interval) is 'Seconds until the subject may try again.';

-- Records a failure (a new window starts when the last one has passed).
create or replace function auth.throttle_fail(subject text, time_window interval) returns void
    language sql volatile security definer
    set search_path = ''
as $$
    insert into app.auth_throttle as t (subject, failures) values (subject, 1)
    on conflict (subject) do update
        set failures = case when t.window_start + time_window > now() then t.failures + 1 else 1 end,
            window_start = case when t.window_start + time_window > now() then t.window_start else now() end
$$;
comment on function auth.throttle_fail(text, interval) is 'Counts a failed sign-in for the subject.';

create or replace function auth.throttle_clear(subject text) returns void
    language sql volatile security definer
    set search_path = ''
as $$
    delete from app.auth_throttle where auth_throttle.subject = throttle_clear.subject
$$;
comment on function auth.throttle_clear(text) is 'A successful sign-in forgets the failures.';

revoke all on function auth.throttle_wait(text, integer, interval), auth.throttle_fail(text, interval),
    auth.throttle_clear(text) from public;
grant execute on function auth.throttle_wait(text, integer, interval), auth.throttle_fail(text, interval),
    auth.throttle_clear(text) to tp_auth;
