drop table if exists app.auth_throttle;
