-- Undo 0002_analysts. The analysts' login roles stay (roles are cluster-wide); without
-- their mapping rows they read no suite's data. `tracepipe analyst revoke` drops them.
drop table if exists app.analysts;
