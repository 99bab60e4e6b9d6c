drop table if exists app.tus_uploads;
