-- Undo 0001_core: drops every core table. Data is lost; this exists for the
-- apply/rollback/re-apply test and for development.
drop table if exists app.examples;
drop table if exists app.sessions;
drop table if exists app.action_tool_maps;
drop table if exists app.tools;
drop table if exists app.mcp_servers;
drop table if exists app.actions;
drop table if exists app.suite_members;
drop table if exists app.suites;
drop table if exists app.api_keys;
drop table if exists app.refresh_tokens;
drop table if exists app.users;
drop domain if exists app.account_role;
drop domain if exists app.key_access;
drop domain if exists app.member_role;
drop schema if exists app;
drop extension if exists pgcrypto;
drop schema if exists extensions;
