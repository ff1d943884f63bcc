-- A user can change only their own tasks, and cannot hand one to somebody else.
CREATE POLICY task_update ON task
    AS PERMISSIVE FOR UPDATE
    USING (user_id = (SELECT nullif(current_setting('app.current_user_id', true), '')))
    WITH CHECK (user_id = (SELECT nullif(current_setting('app.current_user_id', true), '')));
