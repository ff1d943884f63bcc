"""Alembic runs as the table owner: DATABASE_ADMIN_URL, else DATABASE_URL (or -x url=...).

`todo-api migrate` and the tests pass the URL and the application role name through
`Config.attributes`; plain `alembic upgrade head` reads them from the environment.
"""

from alembic import context
from sqlalchemy import create_engine, func, select

from service.settings import get_settings, sqlalchemy_url

MIGRATION_LOCK_KEY = 0x70D0A91  # any constant shared by every instance of this service


def database_url() -> str:
    given = context.config.attributes.get("url") or context.get_x_argument(True).get("url")
    settings = get_settings()
    raw = given or settings.database_admin_url or settings.database_url
    if raw is None:
        raise SystemExit("no database: set DATABASE_ADMIN_URL or DATABASE_URL")
    return sqlalchemy_url(raw).render_as_string(hide_password=False)


def run_migrations_online() -> None:
    context.config.attributes.setdefault("app_role", get_settings().app_db_role)
    engine = create_engine(database_url(), connect_args={"prepare_threshold": None})
    with engine.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=False)
        with context.begin_transaction():
            # Several workers or replicas may migrate at once; a transaction-level lock
            # serialises them (and, unlike a session lock, works through a pooler).
            connection.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) mode is not supported: migrations read the live catalog")
run_migrations_online()
