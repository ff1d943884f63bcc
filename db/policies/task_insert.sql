-- A task can only be created for the current user.
CREATE POLICY task_insert ON task
    AS PERMISSIVE FOR INSERT
    WITH CHECK (user_id = (SELECT nullif(current_setting('app.current_user_id', true), '')));
