-- One spelling per email address, the same in Python (ext/emails.py) and SQL: every email
-- that is stored or compared goes through app.normalize_email first.
create or replace function app.normalize_email(email text) returns text
    language sql immutable strict parallel safe
    set search_path = ''
as $$
    select pg_catalog.lower(pg_catalog.normalize(pg_catalog.btrim(email), 'NFKC'))
$$;
comment on function app.normalize_email(text) is 'NFKC, then lower case: the one form in which emails are stored and compared. Cost: constant.';
grant execute on function app.normalize_email(text) to tp_user, tp_pipeline, tp_admin, tp_auth;
