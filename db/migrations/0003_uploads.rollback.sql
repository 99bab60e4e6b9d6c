drop table if exists app.object_deletions;
drop table if exists app.idempotency_keys;
