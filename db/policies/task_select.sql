-- A user sees only their own tasks. With no identity set, current_setting(..., true)
-- returns NULL or '' and nullif turns both into NULL, so no row matches.
-- The (select ...) wrapper makes PostgreSQL evaluate the identity once per statement.
CREATE POLICY task_select ON task
    AS PERMISSIVE FOR SELECT
    USING (user_id = (SELECT nullif(current_setting('app.current_user_id', true), '')));
