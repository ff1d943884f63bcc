"""Row-level security holds at the database level, whatever the routes and queries do.

Most tests log in as the owner, then switch to the application role for one transaction
(`set_config('role', ..., true)`, exactly as service.db does) and run plain SQL with no WHERE
on the owner: only the policies stand between one user and another's rows.
"""

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg import sql
from psycopg.pq import Trace
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import create_async_engine

import service.db as service_db
from service.db import IdentityTransactions, returns_without_io
from service.pipeline import Statement, statement_names
from service.queries import CREATE, DELETE, GET, LIST, LOCK, update_sql
from service.settings import sqlalchemy_url
from service.testing import TestDatabase, app_client

USERS = ("alice", "bob")
TASKS_PER_USER = 2
RLS_VIOLATION = 'new row violates row-level security policy for table "task"'
PERMISSION_DENIED = "permission denied for table task"

Connection = psycopg.Connection[Any]
T = TypeVar("T")


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


# --- the transaction every task request runs in (service.db.IdentityTransactions) -------------


def in_transactions(
    database: TestDatabase, body: Callable[[IdentityTransactions], Awaitable[T]], **overrides: Any
) -> T:
    """Run `body` with the service's request pool: one connection that cannot overflow."""
    defaults = {"db_pool_size": 1, "db_max_overflow": 0, "db_pool_timeout_seconds": 1}
    settings = database.settings(**(defaults | overrides))
    role = overrides.get("app_db_role", database.app_role)

    async def run() -> T:
        transactions = IdentityTransactions.from_settings(
            sqlalchemy_url(database.url), settings, role
        )
        try:
            return await body(transactions)
        finally:
            await transactions.dispose()

    return asyncio.run(run())


STATE = (
    "SELECT current_user, session_user, current_setting('app.current_user_id', true), "
    "pg_backend_pid(), current_setting('statement_timeout') AS statement_timeout"
)


async def fetch(conn: psycopg.AsyncConnection[Any], query: str) -> list[tuple[Any, ...]]:
    cursor = await conn.execute(query)
    return await cursor.fetchall()


def test_a_request_transaction_sees_only_its_users_rows_with_no_where(database, seeded):
    async def body(transactions: IdentityTransactions) -> tuple[Any, ...]:
        async with transactions.as_user("alice") as tx:
            rows = tx.queue("SELECT id FROM task")
            state = tx.queue(STATE)
        return {row["id"] for row in rows.rows}, tuple(state.rows[0].values())

    ids, state = in_transactions(database, body)
    assert ids == set(seeded["alice"])
    current, login, identity, _pid, _timeout = state
    assert (current, identity) == (database.app_role, "alice")
    assert login != database.app_role


def test_identity_and_role_end_with_the_request_transaction(database, seeded):
    """The next transaction on the same pooled connection is the login role with no user."""

    async def body(transactions: IdentityTransactions) -> tuple[Any, Any]:
        async with transactions.as_user("alice") as tx:
            during = tx.queue(STATE)
        async with transactions.engine.connect() as pooled:  # the pool's only connection
            raw = await pooled.get_raw_connection()
            driver: psycopg.AsyncConnection[Any] = raw.driver_connection  # type: ignore[assignment]
            async with driver.transaction():
                after = await fetch(driver, STATE)
        return tuple(during.rows[0].values()), after[0]

    during, after = in_transactions(database, body, db_statement_timeout_seconds=1.5)
    assert during[:3] == (database.app_role, during[1], "alice")
    assert during[4] == "1500ms"
    current, login, identity, pid, statement_timeout = after
    assert current == login != database.app_role
    assert identity in ("", None)
    assert statement_timeout == "0"
    if not database.pooled:  # behind PgBouncer another server connection may serve it
        assert pid == during[3]


def test_the_identity_comes_before_anything_else_in_the_transaction(database, admin):
    """If the identity cannot be set, nothing queued behind it runs: no row is written."""

    async def body(transactions: IdentityTransactions) -> None:
        async with transactions.as_user("alice") as tx:
            tx.queue("INSERT INTO task (title, user_id) VALUES ('sneaked', 'alice')")

    with pytest.raises(psycopg.errors.InvalidParameterValue, match="does not exist"):
        in_transactions(database, body, app_db_role="no_such_role_anywhere")
    assert owner_rows(admin) == []


def test_a_failed_request_transaction_rolls_back_and_its_connection_serves_the_next(
    database, admin
):
    async def body(transactions: IdentityTransactions) -> Any:
        with pytest.raises(psycopg.errors.DivisionByZero):
            async with transactions.as_user("alice") as tx:
                tx.queue("INSERT INTO task (title, user_id) VALUES ('half', 'alice')")
                tx.queue("SELECT 1 / 0")
        with pytest.raises(RuntimeError, match="refused in the block"):
            async with transactions.as_user("alice") as tx:
                tx.queue("INSERT INTO task (title, user_id) VALUES ('late', 'alice')")
                raise RuntimeError("refused in the block")
        async with transactions.as_user("bob") as tx:
            state = tx.queue(STATE)
        return tuple(state.rows[0].values())

    current, _login, identity, _pid, _timeout = in_transactions(database, body)
    assert (current, identity) == (database.app_role, "bob")
    assert owner_rows(admin) == []


@pytest.mark.parametrize("overflow", [0, 1])
def test_returned_connections_stay_pooled_and_overflow_ones_are_closed(
    fresh_database: TestDatabase,
    overflow: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    """A connection goes back to the pool without a greenlet hand-off when the pool cannot
    overflow; an overflow connection is closed on its return (which awaits the driver)."""
    database = fresh_database  # no other app's pool on it; connected to directly below
    settings = database.settings(db_pool_size=1, db_max_overflow=overflow)
    if not overflow:

        def no_hand_off(*_args: Any) -> Any:
            raise AssertionError("a greenlet hand-off on a plain return")

        monkeypatch.setattr("service.db.greenlet_spawn", no_hand_off)

    async def app_connections() -> int:
        async with await psycopg.AsyncConnection.connect(database.url) as admin:
            cursor = await admin.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = %s AND application_name = 'todo-api'",
                (database.name,),
            )
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    async def hold(transactions: IdentityTransactions, entered: asyncio.Event) -> None:
        async with transactions.as_user("alice") as tx:
            entered.set()
            await tx.read("SELECT pg_sleep(0.2)")

    async def run() -> tuple[int, int, int]:
        transactions = IdentityTransactions.from_settings(
            sqlalchemy_url(database.url), settings, database.app_role
        )
        try:
            events = [asyncio.Event() for _ in range(1 + overflow)]
            held = [asyncio.create_task(hold(transactions, e)) for e in events]
            await asyncio.gather(*(e.wait() for e in events))
            during = await app_connections()
            await asyncio.gather(*held)
            after = await app_connections()
            async with transactions.as_user("bob") as tx:
                tx.queue("SELECT 1")
            return during, after, transactions.engine.pool.checkedin()
        finally:
            await transactions.dispose()

    with caplog.at_level(logging.ERROR, logger="sqlalchemy.pool"):
        during, after, idle = asyncio.run(run())
    assert (during, after, idle) == (1 + overflow, 1, 1)
    assert not caplog.records  # e.g. "Exception closing connection": a close that failed


def test_only_a_pool_that_neither_overflows_nor_resets_takes_connections_back_without_io():
    url = "postgresql+psycopg://nobody@127.0.0.1:1/none"  # engines connect lazily: never here
    plain = create_async_engine(url, max_overflow=0, pool_reset_on_return=None)
    overflowing = create_async_engine(url, max_overflow=1, pool_reset_on_return=None)
    resetting = create_async_engine(url, max_overflow=0)  # rolls back on return
    assert returns_without_io(plain)
    assert not returns_without_io(overflowing)
    assert not returns_without_io(resetting)


def test_a_rollback_cut_short_by_cancellation_drops_the_connection(database, admin, monkeypatch):
    """A plain asyncio cancel can land during the ROLLBACK of a failed request (uvicorn's
    shutdown timeout cancels that way, and anyio's shield does not stop it). The connection,
    still inside the failed transaction, must not go back to the pool: the next request on it
    would commit the half-done work."""
    real_execute = psycopg.AsyncConnection.execute

    async def cancelled_at_rollback(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        if query == "ROLLBACK":
            raise asyncio.CancelledError  # as if the task were cancelled while it ran
        return await real_execute(self, query, *args, **kwargs)

    async def body(transactions: IdentityTransactions) -> tuple[int, tuple[Any, ...]]:
        monkeypatch.setattr(psycopg.AsyncConnection, "execute", cancelled_at_rollback)
        with pytest.raises(asyncio.CancelledError):
            async with transactions.as_user("alice") as tx:
                tx.queue("INSERT INTO task (title, user_id) VALUES ('cut short', 'alice')")
                before = await tx.read("SELECT pg_backend_pid() AS pid")
                raise RuntimeError("the request failed after its write")
        async with transactions.as_user("bob") as tx:
            state = tx.queue(STATE)
        return before[0]["pid"], tuple(state.rows[0].values())

    before, (current, _login, identity, pid, _timeout) = in_transactions(database, body)
    assert (current, identity) == (database.app_role, "bob")
    assert owner_rows(admin) == []
    if not database.pooled:
        assert pid != before  # a new connection replaced the one the cancel cut short


async def pooled_driver(transactions: IdentityTransactions) -> psycopg.AsyncConnection[Any]:
    """The psycopg connection of the pool's only connection (opened first if need be)."""
    async with transactions.engine.connect() as pooled:
        raw = await pooled.get_raw_connection()
        return raw.driver_connection  # type: ignore[return-value]


@contextmanager
def traced(driver: psycopg.AsyncConnection[Any], path: Any) -> Iterator[None]:
    """libpq's trace of what `driver` sends and receives in the block, written to `path`."""
    with path.open("w") as trace:
        driver.pgconn.trace(trace.fileno())
        driver.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield
        finally:
            driver.pgconn.untrace()


def test_a_request_transaction_is_one_round_trip(database, admin, tmp_path):
    """BEGIN, the identity, the statement and COMMIT are sent together, behind one Sync."""
    trace_path = tmp_path / "libpq.trace"

    async def body(transactions: IdentityTransactions) -> None:
        driver = await pooled_driver(transactions)
        with traced(driver, trace_path):
            async with transactions.as_user("alice") as tx:
                listed = tx.queue("SELECT id FROM task")
        assert listed.rows == []

    in_transactions(database, body)
    messages = [line.split("\t") for line in trace_path.read_text().splitlines()]
    sent = [fields[2] for fields in messages if fields[0] == "F"]
    received = [fields[2] for fields in messages if fields[0] == "B"]
    assert sent.count("Sync") == 1 and received.count("ReadyForQuery") == 1, messages
    parsed = [fields[3] for fields in messages if fields[0] == "F" and fields[2] == "Parse"]
    statements = [text.split('"')[3] for text in parsed]
    assert [s.split()[0] for s in statements] == ["BEGIN", "SELECT", "SELECT", "COMMIT"]
    assert statements[1].startswith("SELECT set_config('role'")


def test_prepared_statements_are_parsed_once_per_connection(database, seeded, tmp_path):
    """With DB_PREPARED_STATEMENTS, a connection's later transactions send no Parse: BEGIN, the
    identity, the statement and COMMIT run as statements the first transaction prepared, still
    in one round trip, and still as the caller."""
    trace_path = tmp_path / "libpq.trace"
    the_task = {"p_task_id": seeded["alice"][0], "p_owner": "alice"}

    async def body(transactions: IdentityTransactions) -> tuple[list[Any], list[Any]]:
        async with transactions.as_user("alice") as tx:
            first = tx.queue(GET, the_task)
        driver = await pooled_driver(transactions)
        with traced(driver, trace_path):
            async with transactions.as_user("alice") as tx:
                again = tx.queue(GET, the_task)
                names = tx.queue("SELECT name FROM pg_prepared_statements")
        return [first.rows, again.rows], [row["name"] for row in names.rows]

    (first, again), names = in_transactions(database, body, db_prepared_statements=True)
    assert first == again and [row["id"] for row in again] == [seeded["alice"][0]]
    messages = [line.split("\t") for line in trace_path.read_text().splitlines()]
    sent = [fields[2] for fields in messages if fields[0] == "F"]
    # The catalogue query is new to this connection, so it alone is parsed.
    assert sent.count("Parse") == 1 and sent.count("Sync") == 1, messages
    assert sent.count("Bind") == 5, messages  # BEGIN, identity, GET, the catalogue, COMMIT
    assert len(names) == 5 and all(name.startswith("todo_api_") for name in names)


def test_a_forked_worker_names_its_prepared_statements_afresh():
    """`serve --workers N` forks its workers from one process. A worker going on with its
    parent's names would share them with its siblings: behind a pooler that cannot keep
    prepared statements apart, it could run a sibling's statement under the same name."""
    before = statement_names.next()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing that could wait on a lock another thread held
        try:
            os.write(write, statement_names.next())
        finally:
            os._exit(0)  # never back into pytest
    os.close(write)
    in_child = os.read(read, 200)
    os.close(read)
    os.waitpid(pid, 0)
    after = statement_names.next()

    def prefix(name: bytes) -> bytes:
        return name.rsplit(b"_", 1)[0]

    assert in_child.startswith(b"todo_api_") and in_child.endswith(b"_1"), in_child
    assert prefix(in_child) != prefix(before) == prefix(after)


def test_a_statement_whose_prepare_was_skipped_is_prepared_again(database, seeded):
    """An error earlier in the pipeline makes the server skip the Parse queued behind it. The
    statement must not be taken as prepared, or the connection's next use of it would fail."""
    the_task = {"p_task_id": seeded["alice"][0], "p_owner": "alice"}

    async def body(transactions: IdentityTransactions) -> list[Any]:
        with pytest.raises(psycopg.errors.DivisionByZero):
            async with transactions.as_user("alice") as tx:
                tx.queue("SELECT 1 / 0")
                tx.queue(GET, the_task)
        async with transactions.as_user("alice") as tx:
            got = tx.queue(GET, the_task)
        return got.rows

    rows = in_transactions(database, body, db_prepared_statements=True)
    assert [row["id"] for row in rows] == [seeded["alice"][0]]


def test_a_prepared_statement_takes_values_of_every_integer_size(database, seeded):
    """psycopg sends a small int as int2 and a large one as int8: each gets its own prepared
    statement, so a task id past 2**31 is a miss, not a malformed value."""

    async def body(transactions: IdentityTransactions) -> list[list[Any]]:
        found = []
        for task_id in (seeded["alice"][0], 2**40, seeded["alice"][0]):
            async with transactions.as_user("alice") as tx:
                got = tx.queue(GET, {"p_task_id": task_id, "p_owner": "alice"})
            found.append([row["id"] for row in got.rows])
        return found

    found = in_transactions(database, body, db_prepared_statements=True)
    assert found == [[seeded["alice"][0]], [], [seeded["alice"][0]]]


def test_a_prepared_statement_that_vanished_is_prepared_afresh(database, seeded):
    """A pooler's DISCARD ALL or a DBA's DEALLOCATE removes a connection's prepared statements.
    The request that finds one gone fails; the connection's next requests prepare it again."""
    the_task = {"p_task_id": seeded["alice"][0], "p_owner": "alice"}

    async def body(transactions: IdentityTransactions) -> list[Any]:
        async with transactions.as_user("alice") as tx:
            tx.queue(GET, the_task)
        async with transactions.engine.connect() as pooled:  # the pool's only connection
            raw = await pooled.get_raw_connection()
            driver: psycopg.AsyncConnection[Any] = raw.driver_connection  # type: ignore[assignment]
            await driver.execute("DEALLOCATE ALL")
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            async with transactions.as_user("alice") as tx:
                tx.queue(GET, the_task)
        async with transactions.as_user("alice") as tx:
            got = tx.queue(GET, the_task)
        return got.rows

    rows = in_transactions(database, body, db_prepared_statements=True)
    assert [row["id"] for row in rows] == [seeded["alice"][0]]


def test_a_large_result_and_a_large_statement_in_one_pipeline_do_not_deadlock(database, admin):
    """While this side is still writing a large statement, the server may be blocked writing a
    large result back: the sender must read meanwhile, or each waits for the other."""
    large = "y" * 20_000_000

    async def body(transactions: IdentityTransactions) -> tuple[Any, Any]:
        async with asyncio.timeout(20):  # stuck, it would last until tcp_user_timeout or forever
            async with transactions.as_user("alice") as tx:
                result = tx.queue("SELECT 20000000 AS n, repeat('x', 20000000)")
                sent = tx.queue(Statement("SELECT length($1) AS n", ("text",)), {"text": large})
        return result.rows[0]["n"], sent.rows[0]["n"]

    assert in_transactions(database, body) == (20_000_000, 20_000_000)


def test_a_corrupt_reply_breaks_the_connection_instead_of_hanging_the_worker(database, admin):
    """libpq stops being busy for good once it finds the stream out of step; waiting for the
    results still owed would spin on the event loop forever. A proxy corrupts one reply."""
    outcome: list[BaseException | None] = []

    async def body(transactions: IdentityTransactions) -> None:
        server_url = make_url(database.url)

        relays: list[asyncio.Task[Any]] = []

        async def proxy(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
            relays.append(asyncio.current_task())  # type: ignore[arg-type]
            server_r, server_w = await asyncio.open_connection(
                server_url.host or "127.0.0.1", server_url.port or 5432
            )
            marked = asyncio.Event()

            async def to_server() -> None:
                while data := await client_r.read(65536):
                    if b"corrupt me" in data:
                        marked.set()
                    server_w.write(data)
                    await server_w.drain()
                server_w.close()

            async def to_client() -> None:
                try:
                    while data := await server_r.read(65536):
                        if marked.is_set():
                            marked.clear()
                            data = b"D\x00\x00\x00\x01" + data  # a DataRow too short
                        client_w.write(data)
                        await client_w.drain()
                finally:
                    client_w.close()

            await asyncio.gather(to_server(), to_client(), return_exceptions=True)
            for writer in (server_w, client_w):
                writer.close()
                with suppress(OSError):
                    await writer.wait_closed()

        listener = await asyncio.start_server(proxy, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        settings = database.settings(db_pool_size=1, db_max_overflow=0)
        url = sqlalchemy_url(database.url).set(port=port)
        proxied = IdentityTransactions.from_settings(url, settings, database.app_role)
        try:
            async with proxied.as_user("alice") as tx:
                tx.queue("SELECT 'corrupt me' AS text")
            outcome.append(None)
        except psycopg.Error as error:
            outcome.append(error)
        finally:
            await proxied.dispose()
            listener.close()
            await asyncio.wait(relays, timeout=5)  # each ends once its client has gone

    # In a thread: a spinning loop cannot be interrupted, only outlived.
    worker = threading.Thread(target=in_transactions, args=(database, body), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the request never ended"
    assert len(outcome) == 1 and isinstance(outcome[0], psycopg.OperationalError), outcome


def test_an_empty_statement_is_refused_before_anything_is_sent(database, admin):
    """The server answers an empty statement with no error, so a COMMIT behind it would commit
    what came before: it is refused before it is queued, and the transaction rolls back."""

    async def body(transactions: IdentityTransactions) -> tuple[Any, ...]:
        with pytest.raises(ValueError, match="empty"):
            async with transactions.as_user("alice") as tx:
                tx.queue("INSERT INTO task (title, user_id) VALUES ('half', 'alice')")
                tx.queue("  ")
        async with transactions.as_user("bob") as tx:
            state = tx.queue(STATE)
        return tuple(state.rows[0].values())

    current, _login, identity, _pid, _timeout = in_transactions(database, body)
    assert (current, identity) == (database.app_role, "bob")
    assert owner_rows(admin) == []


def test_values_must_match_the_statements_parameters(database):
    """A value the statement does not name, or a name with no value, is refused before anything
    is sent, rather than left for the server to reject with a confusing count."""

    async def body(transactions: IdentityTransactions) -> None:
        with pytest.raises(TypeError, match="without parameters"):
            async with transactions.as_user("alice") as tx:
                tx.queue("SELECT 1", {"stray": 1})
        with pytest.raises(KeyError, match="p_owner"):
            async with transactions.as_user("alice") as tx:
                tx.queue(GET, {"p_task_id": 1})

    in_transactions(database, body)


def test_every_task_statement_filters_by_the_owner():
    statements = {"list": LIST, "get": GET, "lock": LOCK, "delete": DELETE}
    statements["update"] = update_sql(("completed", "description", "title"))
    for name, statement in statements.items():
        owner = f"${statement.names.index('p_owner') + 1}::VARCHAR"
        assert f"task.user_id = {owner}" in statement.sql, name
    assert "user_id" in CREATE.sql and "p_owner" in CREATE.names


def test_requests_waiting_for_a_connection_get_one_in_the_order_they_asked(database):
    """A request that asks just as a connection comes back goes behind those already waiting.

    SQLAlchemy's async pool alone hands the connection to whoever asks next; under load the
    unlucky ones starve. The listener makes a late request ask at the worst moment: while the
    connection is being checked in, before the longest waiter has woken up.
    """
    order: list[str] = []

    async def request(name: str, transactions: IdentityTransactions) -> None:
        async with transactions.as_user(name) as tx:
            order.append(name)
            tx.queue("SELECT 1")

    async def body(transactions: IdentityTransactions) -> None:
        late: list[asyncio.Task[None]] = []

        def ask_at_checkin(*_args: Any) -> None:
            if not late and len(order) == 1:
                late.append(asyncio.get_running_loop().create_task(request("late", transactions)))

        event.listen(transactions.engine.sync_engine.pool, "checkin", ask_at_checkin)
        async with transactions.as_user("holder") as tx:
            order.append("holder")
            waiting = [asyncio.create_task(request(n, transactions)) for n in ("a", "b", "c")]
            await asyncio.sleep(0.05)  # all three are queued behind the holder
            tx.queue("SELECT 1")
        await asyncio.gather(*waiting)
        await asyncio.gather(*late)
        assert late, "the checkin listener never ran"

    in_transactions(database, body)
    assert order == ["holder", "a", "b", "c", "late"]


def test_no_identity_leaks_across_requests_on_a_single_pooled_connection(
    database, admin, auth: Callable[..., dict[str, str]]
):
    settings = database.settings(db_pool_size=1, db_max_overflow=0)
    with app_client(settings) as client:
        transactions: IdentityTransactions = client.app.state.transactions
        pids: set[int] = set()
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
            pids.add(client.portal.call(backend_pid, transactions))
        assert transactions.engine.pool.size() == 1
        assert transactions.engine.pool.checkedout() == 0
    if not database.pooled:
        assert len(pids) == 1  # the one pooled connection served every request
    assert len(owner_rows(admin)) == 2 * len(USERS)


async def backend_pid(transactions: IdentityTransactions) -> int:
    async with transactions.as_user("nobody") as tx:
        queued = tx.queue("SELECT pg_backend_pid() AS pid")
    return int(queued.rows[0]["pid"])


# --- reads that share a round trip (IdentityTransactions.read_as) ------------------------------

WHO_AND_WHAT = Statement(
    "SELECT current_user AS role, current_setting('app.current_user_id', true) AS user_id,"
    " (SELECT array_agg(id ORDER BY id) FROM task) AS ids"
)
BOOM = Statement("SELECT 1 / 0 AS boom")


def read(transactions: IdentityTransactions, user: str, statement: Statement = WHO_AND_WHAT):
    return asyncio.ensure_future(transactions.read_as(user, statement, {}))


@pytest.mark.parametrize("prepared", [False, True], ids=["unprepared", "prepared"])
def test_reads_waiting_together_share_one_round_trip_each_as_its_own_user(
    database, seeded, tmp_path, prepared
):
    """Four reads for two users, on the pool's one connection: one write carries them all,
    each is its own transaction (its own Sync) that sees its user's rows and no one else's,
    and nothing of them is left on the connection afterwards."""
    trace_path = tmp_path / "libpq.trace"

    async def body(transactions: IdentityTransactions) -> tuple[list[Any], tuple[Any, ...]]:
        driver = await pooled_driver(transactions)
        with traced(driver, trace_path):
            rows = await asyncio.gather(*(read(transactions, user) for user in USERS * 2))
        cursor = await driver.execute(STATE)  # the session itself, after the reads
        after = await cursor.fetchone()
        assert after is not None
        return rows, tuple(after)

    rows, after = in_transactions(database, body, db_prepared_statements=prepared)
    for user, found in zip(USERS * 2, rows, strict=True):
        assert found == [{"role": database.app_role, "user_id": user, "ids": seeded[user]}]
    current, login, identity, _pid, _timeout = after
    assert (current, identity) == (login, "")
    messages = [line.split("\t") for line in trace_path.read_text().splitlines()]
    directions = [fields[0] for fields in messages]
    kinds = [fields[2] for fields in messages]
    assert kinds.count("Sync") == 4 and kinds.count("ReadyForQuery") == 4, messages
    last_sent = len(directions) - directions[::-1].index("F")
    assert "B" not in directions[:last_sent], "a reply came before everything was sent"
    assert "BEGIN" not in trace_path.read_text()  # implicit transactions, each ended by a Sync


def test_the_identity_comes_before_each_read_that_shares_a_round_trip(database, admin):
    """If the identity cannot be set, the statement behind it in the same implicit
    transaction does not run: here two writes sent as reads, which would otherwise insert."""
    sneak = Statement("INSERT INTO task (title, user_id) VALUES ('sneaked', 'alice') RETURNING id")

    async def body(transactions: IdentityTransactions) -> list[Any]:
        return await asyncio.gather(
            read(transactions, "alice", sneak),
            read(transactions, "bob", sneak),
            return_exceptions=True,
        )

    outcomes = in_transactions(database, body, app_db_role="no_such_role_anywhere")
    assert [type(outcome) for outcome in outcomes] == [psycopg.errors.InvalidParameterValue] * 2
    assert owner_rows(admin) == []


def test_a_read_cannot_write(database, admin):
    """Each read's transaction is read-only: a write sent as a read, with a valid identity, is
    refused and leaves nothing behind."""
    sneak = Statement("INSERT INTO task (title, user_id) VALUES ('sneaked', 'alice') RETURNING id")

    async def body(transactions: IdentityTransactions) -> list[Any]:
        return await asyncio.gather(
            read(transactions, "alice", sneak), read(transactions, "alice"), return_exceptions=True
        )

    refused, after = in_transactions(database, body)
    assert isinstance(refused, psycopg.errors.ReadOnlySqlTransaction)
    assert after == [{"role": database.app_role, "user_id": "alice", "ids": None}]
    assert owner_rows(admin) == []


def test_reads_that_wait_past_the_pool_timeout_get_a_timeout(database, seeded):
    """As a request waiting at the gate would: a read still waiting for its turn after
    DB_POOL_TIMEOUT_SECONDS is answered with the pool's timeout, not served late."""
    sleepy = Statement("SELECT pg_sleep(0.05) AS slept")

    async def body(transactions: IdentityTransactions) -> tuple[list[Any], float]:
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(read(transactions, "alice", sleepy) for _ in range(60)), return_exceptions=True
        )
        return outcomes, time.monotonic() - started

    outcomes, seconds = in_transactions(database, body, db_pool_timeout_seconds=0.5)
    served = [outcome for outcome in outcomes if isinstance(outcome, list)]
    late = [outcome for outcome in outcomes if isinstance(outcome, PoolTimeoutError)]
    assert len(served) + len(late) == 60, outcomes
    assert 8 <= len(served) <= 24 and late, (len(served), len(late))
    assert seconds < 2.5  # 60 reads one after another would take 3 s


def test_reads_sharing_a_round_trip_prepare_each_statement_once(database, seeded):
    """With DB_PREPARED_STATEMENTS, a batch of reads new to a connection parses the identity
    and each statement once, not once per read."""
    the_task = {"p_task_id": seeded["alice"][0], "p_owner": "alice"}

    async def body(transactions: IdentityTransactions) -> tuple[list[Any], list[Any]]:
        driver = await pooled_driver(transactions)
        found = await asyncio.gather(
            *(asyncio.ensure_future(transactions.read_as("alice", GET, the_task)) for _ in range(8))
        )
        cursor = await driver.execute("SELECT statement FROM pg_prepared_statements")
        return found, [row[0] for row in await cursor.fetchall()]

    found, statements = in_transactions(database, body, db_prepared_statements=True)
    assert [[row["id"] for row in rows] for rows in found] == [[seeded["alice"][0]]] * 8
    assert len(statements) == 2, statements  # the identity and GET


def test_an_error_in_one_read_rolls_back_that_read_alone(database, seeded):
    async def body(transactions: IdentityTransactions) -> list[Any]:
        return await asyncio.gather(
            read(transactions, "alice"),
            read(transactions, "bob", BOOM),
            read(transactions, "bob"),
            return_exceptions=True,
        )

    before, failed, after = in_transactions(database, body)
    assert before == [{"role": database.app_role, "user_id": "alice", "ids": seeded["alice"]}]
    assert isinstance(failed, psycopg.errors.DivisionByZero)
    assert after == [{"role": database.app_role, "user_id": "bob", "ids": seeded["bob"]}]


def test_a_read_whose_request_gave_up_is_not_sent(database, seeded, tmp_path):
    """A request cancelled while its read waits for a connection: the read is dropped, the
    reads behind it are served, and the connection goes back to the pool."""

    async def body(transactions: IdentityTransactions) -> tuple[Any, Any, int, int]:
        async with transactions.as_user("holder") as tx:
            given_up, served = read(transactions, "alice"), read(transactions, "bob")
            await asyncio.sleep(0.05)  # both wait behind the holder
            given_up.cancel()
            tx.queue("SELECT 1")
        with pytest.raises(asyncio.CancelledError):
            await given_up
        rows = await served
        await asyncio.gather(*transactions._readers)  # the reader returns its connection
        return (
            rows,
            transactions._reads,
            transactions.engine.pool.checkedout(),
            transactions._serving,
        )

    served, waiting, checked_out, serving = in_transactions(database, body)
    assert served == [{"role": database.app_role, "user_id": "bob", "ids": seeded["bob"]}]
    assert (list(waiting), checked_out, serving) == ([], 0, 0)


def test_a_connection_lost_under_reads_fails_them_and_is_not_used_again(database, seeded, admin):
    """The server ends the connection while a batch of reads waits on it: every read of the
    batch gets an error (none hangs), and the next read gets a new connection."""
    sleepy = Statement("SELECT pg_sleep(5) AS slept, pg_backend_pid() AS pid")

    async def body(transactions: IdentityTransactions) -> tuple[list[Any], Any]:
        batch = [read(transactions, "alice", sleepy), read(transactions, "bob")]
        await asyncio.sleep(0.3)  # sent, and the first is sleeping
        ended = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = %s AND application_name = 'todo-api' AND state = 'active'",
            (database.name,),
        ).fetchone()
        assert ended == (1,)
        async with asyncio.timeout(10):
            outcomes = await asyncio.gather(*batch, return_exceptions=True)
        return outcomes, await read(transactions, "bob")

    outcomes, after = in_transactions(database, body)
    assert all(isinstance(outcome, psycopg.OperationalError) for outcome in outcomes), outcomes
    assert after == [{"role": database.app_role, "user_id": "bob", "ids": seeded["bob"]}]


def test_a_stream_of_reads_does_not_starve_a_write(database, seeded):
    """Reads that keep coming, some always waiting, must not keep the pool's one connection
    from a write waiting at the gate: the reader goes back through the gate after every batch."""

    async def body(transactions: IdentityTransactions) -> int:
        stop, reads = asyncio.Event(), []

        async def keep_asking() -> None:
            while not stop.is_set():  # more than a batch at a time: some are always waiting
                reads.extend(read(transactions, USERS[n % 2]) for n in range(12))
                await asyncio.sleep(0.001)

        asking = asyncio.create_task(keep_asking())
        await asyncio.sleep(0.1)
        try:
            async with transactions.as_user("alice") as tx:  # the gate's wait is 1 s
                tx.queue("SELECT 1")
            during = sum(task.done() for task in reads)
        finally:
            stop.set()
            await asking
            await asyncio.gather(*reads)
        return during

    assert in_transactions(database, body) > 0


def test_a_connection_left_inside_a_transaction_by_a_read_is_dropped(database):
    """Each Sync must end its read's transaction. A statement that opens a transaction block
    (here a BEGIN sent as a read) would keep the next reads inside it: the next read in the
    batch still runs as its own user, and the connection is not used again."""
    who = Statement(
        "SELECT pg_backend_pid() AS pid, current_setting('app.current_user_id', true) AS user_id"
    )

    async def body(transactions: IdentityTransactions) -> tuple[Any, Any]:
        batch = await asyncio.gather(
            read(transactions, "alice", Statement("BEGIN")), read(transactions, "bob", who)
        )
        return batch[1][0], (await read(transactions, "carol", who))[0]

    during, after = in_transactions(database, body)
    assert (during["user_id"], after["user_id"]) == ("bob", "carol")
    assert during["pid"] != after["pid"]


def test_reads_of_a_reader_stopped_at_shutdown_get_an_error(database, monkeypatch):
    """A reader still busy when the pool closes is cancelled: its reads, and those waiting,
    are answered with an error that becomes a 503, not with a cancellation their requests
    never asked for."""
    monkeypatch.setattr(service_db, "READERS_STOP_SECONDS", 0.2)
    stuck = Statement("SELECT pg_sleep(5) AS slept")

    async def body(transactions: IdentityTransactions) -> tuple[list[Any], float]:
        reads = [read(transactions, "alice", stuck), read(transactions, "bob")]
        await asyncio.sleep(0.1)  # sent, and the first is sleeping
        started = time.monotonic()
        await transactions.dispose()
        outcomes = await asyncio.gather(*reads, return_exceptions=True)
        return outcomes, time.monotonic() - started

    outcomes, seconds = in_transactions(database, body)
    for outcome in outcomes:
        assert isinstance(outcome, psycopg.OperationalError), outcomes
        assert "stopped before this read was answered" in str(outcome)
    assert seconds < 2


def test_many_reads_on_few_connections_each_see_their_own_users_rows(database, seeded):
    """Forty reads for alternating users on two connections: batches form, every read gets
    its own user's rows, and no more connections are taken than the pool has."""
    most_checked_out = 0

    async def body(transactions: IdentityTransactions) -> list[Any]:
        nonlocal most_checked_out

        def watch(*_args: Any) -> None:
            nonlocal most_checked_out
            most_checked_out = max(most_checked_out, transactions.engine.pool.checkedout())

        event.listen(transactions.engine.sync_engine.pool, "checkout", watch)
        return await asyncio.gather(*(read(transactions, USERS[n % 2]) for n in range(40)))

    rows = in_transactions(database, body, db_pool_size=2)
    for n, found in enumerate(rows):
        user = USERS[n % 2]
        assert found == [{"role": database.app_role, "user_id": user, "ids": seeded[user]}]
    assert 1 <= most_checked_out <= 2


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
