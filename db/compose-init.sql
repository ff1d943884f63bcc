-- Runs once, as the owner, when the compose database is created.
-- todo_api logs in and can do nothing by itself (NOINHERIT); it may only switch to todo_app,
-- the unprivileged role that the migration grants table privileges to.
CREATE ROLE todo_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOINHERIT;
CREATE ROLE todo_api LOGIN PASSWORD 'todo_api_password' NOINHERIT;
GRANT todo_app TO todo_api;
