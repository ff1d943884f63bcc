-- A user can delete only their own tasks.
CREATE POLICY task_delete ON task
    AS PERMISSIVE FOR DELETE
    USING (user_id = (SELECT nullif(current_setting('app.current_user_id', true), '')));
