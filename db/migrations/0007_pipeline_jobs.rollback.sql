alter table if exists app.examples drop constraint if exists examples_job_content_key;
alter table if exists app.examples drop column if exists job_id;
drop table if exists app.pipeline_jobs;
