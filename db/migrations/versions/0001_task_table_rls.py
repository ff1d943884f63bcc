"""The task table, its application role, and row-level security from db/policies/.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from service.posture import policy_files

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def app_role() -> str:
    # Validated by Settings against ^[a-z_][a-z0-9_]{0,62}$, and quoted as an identifier.
    name: str = context.config.attributes["app_role"]
    return op.get_bind().dialect.identifier_preparer.quote(name)


def upgrade() -> None:
    op.create_table(
        "task",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("completed", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.CheckConstraint("char_length(title) BETWEEN 1 AND 200", name="task_title_length"),
        sa.CheckConstraint("char_length(description) <= 1000", name="task_description_length"),
        sa.CheckConstraint("char_length(user_id) BETWEEN 1 AND 255", name="task_user_id_length"),
    )
    # Serves "WHERE user_id = ? ORDER BY created_at DESC, id DESC" and lookups by (user_id, id).
    op.create_index(
        "task_user_id_created_at_idx",
        "task",
        ["user_id", sa.text("created_at DESC"), sa.text("id DESC")],
    )
    op.execute(
        """
        CREATE FUNCTION task_touch() RETURNS trigger
        LANGUAGE plpgsql SET search_path = pg_catalog AS $$
        BEGIN
            NEW.updated_at := now();
            NEW.created_at := OLD.created_at;
            RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER task_touch BEFORE UPDATE ON task FOR EACH ROW EXECUTE FUNCTION task_touch()"
    )
    _create_app_role()
    op.execute("ALTER TABLE task ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE task FORCE ROW LEVEL SECURITY")
    for path in policy_files():
        op.execute(path.read_text())


def _create_app_role() -> None:
    name = context.config.attributes["app_role"]
    role = app_role()
    exists = op.get_bind().scalar(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": name})
    if not exists:
        op.execute(f"CREATE ROLE {role} NOLOGIN NOSUPERUSER NOBYPASSRLS NOINHERIT")
    # The service logs in as the migrating user (or another member) and switches per transaction.
    op.execute(f"GRANT {role} TO current_user")
    op.execute(f"GRANT USAGE ON SCHEMA {_schema()} TO {role}")
    op.execute(f"GRANT SELECT, DELETE ON task TO {role}")
    # Column-level: the app can never write id, created_at or updated_at itself.
    op.execute(f"GRANT INSERT (title, description, completed, user_id) ON task TO {role}")
    op.execute(f"GRANT UPDATE (title, description, completed) ON task TO {role}")


def _schema() -> str:
    schema = op.get_bind().scalar(sa.text("SELECT current_schema()"))
    return op.get_bind().dialect.identifier_preparer.quote(schema)


def downgrade() -> None:
    role = app_role()
    op.drop_table("task")
    op.execute("DROP FUNCTION task_touch()")
    op.execute(f"REVOKE USAGE ON SCHEMA {_schema()} FROM {role}")
    # The role is cluster-wide: keep it if another database still grants it something.
    op.execute(
        f"""
        DO $$
        BEGIN
            DROP ROLE {role};
        EXCEPTION WHEN dependent_objects_still_exist THEN
            RAISE NOTICE 'role % is still used by another database; kept', '{role}';
        END
        $$
        """
    )
