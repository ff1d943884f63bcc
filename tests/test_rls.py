"""Row-level security holds at the database level, whatever the routes and queries do.

Most tests log in as the owner, then switch to the application role for one transaction
(`set_config('role', ..., true)`, exactly as service.db does) and run plain SQL with no WHERE
on the owner: only the policies stand between one user and another's rows.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import text
from sqlmodel import select

from service.db import Database, make_engine
from service.models import Task
from service.settings import sqlalchemy_url
from service.testing import TestDatabase, app_client

USERS = ("alice", "bob")
TASKS_PER_USER = 2
RLS_VIOLATION = 'new row violates row-level security policy for table "task"'
PERMISSION_DENIED = "permission denied for table task"

Connection = psycopg.Connection[Any]


@pytest.fixture
def seeded(admin: Connection) -> dict[str, list[int]]:
    """Two tasks each for alice and bob, inserted by the owner; their ids by user."""
    ids: dict[str, list[int]] = {user: [] for user in USERS}
    for user in USERS:
        for n in range(TASKS_PER_USER):
            row = admin.execute(
                "INSERT INTO task (title, user_id) VALUES (%s, %s) RETURNING id",
                (f"{user} {n}", user),
            ).fetchone()
            assert row is not None
            ids[user].append(row[0])
    return ids


@pytest.fixture
def conn(database: TestDatabase) -> Iterator[Connection]:
    """A connection as the owner, not in autocommit: each test opens its own transactions."""
    with database.connect() as connection:
        yield connection


@contextmanager
def acting_as(conn: Connection, role: str, user_id: str | None = None) -> Iterator[Connection]:
    """One transaction run as `role`, with `user_id` as the identity if given; rolled back."""
    try:
        conn.execute("SELECT set_config('role', %s, true)", (role,))
        if user_id is not None:
            conn.execute("SELECT set_config('app.current_user_id', %s, true)", (user_id,))
        assert one(conn, "SELECT current_user") == role
        yield conn
    finally:
        conn.rollback()


def one(conn: Connection, query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def visible_ids(conn: Connection) -> set[int]:
    return {row[0] for row in conn.execute("SELECT id FROM task").fetchall()}


def owner_rows(admin: Connection) -> list[tuple[Any, ...]]:
    return admin.execute("SELECT id, user_id, title, completed FROM task ORDER BY id").fetchall()


# --- the role the service switches to ---------------------------------------------------------


def test_app_role_is_neither_superuser_nor_bypassrls(conn, database):
    with acting_as(conn, database.app_role, "alice"):
        row = conn.execute(
            "SELECT current_user, session_user, r.rolsuper, r.rolbypassrls "
            "FROM pg_roles r WHERE r.rolname = current_user"
        ).fetchone()
    assert row is not None
    current, login, is_super, bypasses = row
    assert current == database.app_role
    assert login != database.app_role
    assert is_super is False
    assert bypasses is False


# --- reading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("user", USERS)
def test_select_without_where_returns_only_the_callers_rows(conn, database, seeded, user):
    with acting_as(conn, database.app_role, user):
        assert visible_ids(conn) == set(seeded[user])
        assert one(conn, "SELECT count(*) FROM task") == TASKS_PER_USER
        users = conn.execute("SELECT DISTINCT user_id FROM task").fetchall()
        assert users == [(user,)]


@pytest.mark.parametrize("identity", [None, ""], ids=["identity-unset", "identity-empty"])
def test_select_without_identity_returns_no_rows_and_no_error(
    conn, database, admin, seeded, identity
):
    assert len(owner_rows(admin)) == len(USERS) * TASKS_PER_USER
    with acting_as(conn, database.app_role, identity):
        assert visible_ids(conn) == set()
        assert one(conn, "SELECT count(*) FROM task") == 0


# --- inserting ---------------------------------------------------------------------------------


def test_insert_of_own_row_is_allowed(conn, database, admin):
    with acting_as(conn, database.app_role, "alice"):
        new_id = one(
            conn, "INSERT INTO task (title, user_id) VALUES ('mine', 'alice') RETURNING id"
        )
        conn.commit()
    assert owner_rows(admin) == [(new_id, "alice", "mine", False)]


@pytest.mark.parametrize(
    ("identity", "owner"),
    [("alice", "bob"), (None, "alice"), ("", "alice")],
    ids=["for-another-user", "identity-unset", "identity-empty"],
)
def test_insert_not_for_the_current_user_is_refused(conn, database, admin, identity, owner):
    with (
        acting_as(conn, database.app_role, identity),
        pytest.raises(psycopg.errors.InsufficientPrivilege, match=RLS_VIOLATION),
    ):
        conn.execute("INSERT INTO task (title, user_id) VALUES ('planted', %s)", (owner,))
    assert owner_rows(admin) == []


# --- updating and deleting ---------------------------------------------------------------------


def test_moving_own_row_to_another_user_is_refused(conn, database, admin, seeded):
    mine, theirs = seeded["alice"][0], seeded["bob"][0]
    move = "UPDATE task SET user_id = 'bob' WHERE id = %s"

    # As granted by the migration, user_id is not even an updatable column.
    with (
        acting_as(conn, database.app_role, "alice"),
        pytest.raises(psycopg.errors.InsufficientPrivilege, match=PERMISSION_DENIED),
    ):
        conn.execute(move, (mine,))

    # Even with the column privilege, the policy's WITH CHECK refuses the move.
    role = sql.Identifier(database.app_role)
    admin.execute(sql.SQL("GRANT UPDATE (user_id) ON task TO {}").format(role))
    try:
        with acting_as(conn, database.app_role, "alice"):
            # The privilege is really there: a no-op "move" to oneself goes through...
            keep = "UPDATE task SET user_id = 'alice' WHERE id = %s"
            assert conn.execute(keep, (mine,)).rowcount == 1
            # ...taking somebody else's row finds nothing to update...
            assert conn.execute(keep, (theirs,)).rowcount == 0
            # ...and handing one's own row over violates the policy.
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=RLS_VIOLATION):
                conn.execute(move, (mine,))
    finally:
        admin.execute(sql.SQL("REVOKE UPDATE (user_id) ON task FROM {}").format(role))

    owners = {task_id: user for task_id, user, *_ in owner_rows(admin)}
    assert owners[mine] == "alice"
    assert owners[theirs] == "bob"


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO task (id, title, user_id) OVERRIDING SYSTEM VALUE"
        " VALUES (999999, 't', 'alice')",
        "INSERT INTO task (title, user_id, created_at) VALUES ('t', 'alice', '2000-01-01')",
        "INSERT INTO task (title, user_id, updated_at) VALUES ('t', 'alice', '2000-01-01')",
        "UPDATE task SET created_at = '2000-01-01' WHERE user_id = 'alice'",
        "UPDATE task SET updated_at = '2000-01-01' WHERE user_id = 'alice'",
        "UPDATE task SET id = 999999 WHERE user_id = 'alice'",
    ],
)
def test_server_owned_columns_cannot_be_written_by_the_app_role(
    conn, database, admin, seeded, statement
):
    before = owner_rows(admin)
    with (
        acting_as(conn, database.app_role, "alice"),
        # Column privileges refuse them; id is GENERATED ALWAYS besides.
        pytest.raises((psycopg.errors.InsufficientPrivilege, psycopg.errors.GeneratedAlways)),
    ):
        conn.execute(statement)
    assert owner_rows(admin) == before


def test_update_and_delete_of_another_users_row_affect_no_rows(conn, database, admin, seeded):
    before = owner_rows(admin)
    theirs = seeded["bob"][0]
    with acting_as(conn, database.app_role, "alice"):
        updated = conn.execute("UPDATE task SET title = 'stolen' WHERE id = %s", (theirs,))
        assert updated.rowcount == 0
        deleted = conn.execute("DELETE FROM task WHERE id = %s", (theirs,))
        assert deleted.rowcount == 0
        assert conn.execute("DELETE FROM task WHERE user_id = 'bob'").rowcount == 0
        conn.commit()
    assert owner_rows(admin) == before


def test_update_and_delete_without_where_reach_only_own_rows(conn, database, admin, seeded):
    bobs = [row for row in owner_rows(admin) if row[1] == "bob"]
    with acting_as(conn, database.app_role, "alice"):
        assert conn.execute("UPDATE task SET completed = true").rowcount == TASKS_PER_USER
        assert conn.execute("DELETE FROM task").rowcount == TASKS_PER_USER
        conn.commit()
    assert owner_rows(admin) == bobs


@pytest.mark.parametrize("identity", [None, ""], ids=["identity-unset", "identity-empty"])
def test_update_and_delete_without_identity_affect_no_rows(conn, database, admin, seeded, identity):
    before = owner_rows(admin)
    with acting_as(conn, database.app_role, identity):
        assert conn.execute("UPDATE task SET completed = true").rowcount == 0
        assert conn.execute("DELETE FROM task").rowcount == 0
        conn.commit()
    assert owner_rows(admin) == before


def test_truncate_is_refused_to_the_app_role(conn, database, admin, seeded):
    before = owner_rows(admin)
    with (
        acting_as(conn, database.app_role, "alice"),
        pytest.raises(psycopg.errors.InsufficientPrivilege, match=PERMISSION_DENIED),
    ):
        conn.execute("TRUNCATE task")
    assert owner_rows(admin) == before


# --- the identity lives for one transaction ---------------------------------------------------


@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_role_and_identity_end_with_the_transaction(conn, database, seeded, end):
    with acting_as(conn, database.app_role, "alice"):
        assert one(conn, "SELECT current_setting('app.current_user_id', true)") == "alice"
        getattr(conn, end)()
        # A new transaction on the same connection: nothing of the last one is left.
        row = conn.execute(
            "SELECT current_user, session_user, current_setting('app.current_user_id', true)"
        ).fetchone()
    assert row is not None
    current, login, identity = row
    assert current == login != database.app_role
    assert identity in ("", None)

    # Switching to the app role again without an identity shows nothing: alice did not stick.
    with acting_as(conn, database.app_role):
        assert one(conn, "SELECT current_setting('app.current_user_id', true)") in ("", None)
        assert visible_ids(conn) == set()


# --- the ORM session the routes use ------------------------------------------------------------


@pytest.fixture
def orm(database: TestDatabase) -> Iterator[Database]:
    """service.db.Database on a pool of one connection that cannot overflow."""
    settings = database.settings(db_max_overflow=0, db_pool_timeout_seconds=1)
    db = Database(
        make_engine(sqlalchemy_url(database.url), settings, pool_size=1), database.app_role
    )
    try:
        yield db
    finally:
        db.dispose()


def session_state(session: Any) -> tuple[str, str]:
    row = session.connection().execute(
        text("SELECT current_user, current_setting('app.current_user_id', true)")
    )
    current, identity = row.one()
    return current, identity


def test_orm_select_without_where_sees_only_the_sessions_user(orm, database, seeded):
    with orm.session_for("alice") as session:
        assert {task.id for task in session.exec(select(Task)).all()} == set(seeded["alice"])
        assert session_state(session) == (database.app_role, "alice")


def test_orm_identity_is_bound_again_after_commit(orm, database, seeded):
    with orm.session_for("alice") as session:
        task = Task(title="written", user_id="alice")
        session.add(task)
        session.commit()
        # A new transaction: it must begin as alice too, or the refresh would find no row.
        session.refresh(task)
        assert task.user_id == "alice"
        assert task.created_at is not None
        assert session_state(session) == (database.app_role, "alice")
        tasks = session.exec(select(Task)).all()
        assert {t.user_id for t in tasks} == {"alice"}
        assert {t.id for t in tasks} == {*seeded["alice"], task.id}
        session.commit()
        assert session_state(session) == (database.app_role, "alice")


@pytest.mark.parametrize(
    "info", [{}, {"identity": "alice"}, {"identity": None}], ids=["none", "a-string", "null"]
)
def test_orm_session_without_an_identity_refuses_to_begin(orm, database, seeded, info):
    with (
        orm._sessions(info=info) as session,
        pytest.raises(RuntimeError, match="without an identity"),
    ):
        session.exec(select(Task)).all()
    # The refused transaction gave its connection back to the pool of one.
    assert orm.engine.pool.checkedout() == 0
    with orm.session_for("bob") as session:
        assert {task.id for task in session.exec(select(Task)).all()} == set(seeded["bob"])


# --- a pooled connection carries nothing from one request to the next ------------------------


def connection_state(db: Database) -> tuple[Any, int, str, str, str | None]:
    """The pooled DBAPI connection, and what a new transaction on it finds."""
    with db.engine.connect() as connection:
        row = connection.execute(
            text(
                "SELECT pg_backend_pid(), current_user, session_user, "
                "current_setting('app.current_user_id', true)"
            )
        ).one()
        dbapi_connection = connection.connection.dbapi_connection
        connection.rollback()
    pid, current, login, identity = row
    return dbapi_connection, pid, current, login, identity


def test_no_identity_leaks_across_requests_on_a_single_pooled_connection(
    database, admin, auth: Callable[..., dict[str, str]]
):
    settings = database.settings(db_pool_size=1, db_max_overflow=0)
    with app_client(settings) as client:
        db: Database = client.app.state.db
        connection_before, pid_before, *_ = connection_state(db)
        created: dict[str, set[int]] = {user: set() for user in USERS}
        for user in ("alice", "bob", "alice", "bob"):
            response = client.post(
                f"/api/{user}/tasks", json={"title": f"{user}'s"}, headers=auth(user)
            )
            assert response.status_code == 201, response.text
            created[user].add(response.json()["id"])
            listed = client.get(f"/api/{user}/tasks", headers=auth(user))
            assert listed.status_code == 200, listed.text
            assert {task["user_id"] for task in listed.json()} == {user}
            assert {task["id"] for task in listed.json()} == created[user]

        assert db.engine.pool.size() == 1
        assert db.engine.pool.checkedout() == 0
        connection_after, pid_after, current, login, identity = connection_state(db)
    assert connection_after is connection_before  # the one connection served every request
    if not database.pooled:
        assert pid_after == pid_before  # and so did one server process
    # Behind a transaction pooler each transaction may run on any of its server connections
    # (another pid); either way, the next transaction finds nothing of the last user's.
    assert current == login != database.app_role
    assert identity in ("", None)
    assert len(owner_rows(admin)) == 2 * len(USERS)


# --- timestamps --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        "title = 'renamed'",
        "completed = true",
        "created_at = now() - interval '10 years'",
        "created_at = now() + interval '1 day', title = 'renamed'",
        "updated_at = timestamptz '2000-01-01 00:00:00+00'",
    ],
    ids=["title", "completed", "created-at-backdated", "created-at-with-title", "updated-at"],
)
def test_trigger_keeps_created_at_and_advances_updated_at(admin, changes):
    created = admin.execute(
        "INSERT INTO task (title, user_id, created_at, updated_at) "
        "VALUES ('old', 'alice', now() - interval '1 day', now() - interval '1 day') "
        "RETURNING id, created_at, updated_at"
    ).fetchone()
    assert created is not None
    task_id, created_at, updated_at = created
    updated = admin.execute(
        f"UPDATE task SET {changes} WHERE id = %s RETURNING created_at, updated_at, now()",
        (task_id,),
    ).fetchone()
    assert updated is not None
    new_created_at, new_updated_at, now = updated
    assert new_created_at == created_at
    assert new_updated_at == now
    assert new_updated_at > updated_at
