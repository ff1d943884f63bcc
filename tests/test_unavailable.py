"""When the database cannot be reached or the pool is exhausted: 503, never a hang or a 500.

Behind a pooler (TEST_POOLER_URL) the app talks to PgBouncer, which stays up while the database
refuses connections: it fails the query that was waiting for a server connection after its
query_wait_timeout, fails new ones at once while logins keep failing, and retries the login
server_login_retry (1 s) later. So there the outage test runs behind a PgBouncer of its own with
a 1 s query_wait_timeout, and recovery is awaited for a few seconds, 503s only meanwhile.
"""

import dataclasses
import os
import resource
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql

from service.db import IdentityTransactions
from service.testing import TestDatabase, app_client, bearer, pgbouncer

RECOVERY_SECONDS = 10  # behind a pooler: its 1 s server_login_retry, with a wide margin


@pytest.fixture
def small_app(fresh_database: TestDatabase) -> Iterator[TestClient]:
    with ExitStack() as stack:
        database = fresh_database
        if database.pooled:
            pooler = stack.enter_context(pgbouncer(database.server_url, query_wait_timeout=1))
            database = dataclasses.replace(database, pooler_url=pooler)
        settings = database.settings(
            db_pool_size=1,
            db_max_overflow=0,
            db_pool_timeout_seconds=0.5,
            db_connect_attempts=2,
            retry_after_seconds=7,
        )
        yield stack.enter_context(app_client(settings))


def set_connections_allowed(database: TestDatabase, allowed: bool) -> None:
    """Refuse (or allow) new connections to the database and cut the open ones."""
    with psycopg.connect(database.server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                sql.Identifier(database.name), sql.Literal(allowed)
            )
        )
        if not allowed:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (database.name,),
            )


def assert_unavailable(response: Any) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "7"
    assert response.headers["content-type"] == "application/problem+json"
    assert "psycopg" not in response.text and "SELECT" not in response.text


def test_database_down_is_503_then_recovers_without_restart(small_app, fresh_database):
    created = small_app.post("/api/alice/tasks", json={"title": "t"}, headers=bearer("alice"))
    assert created.status_code == 201
    set_connections_allowed(fresh_database, False)
    try:
        assert_unavailable(small_app.get("/api/alice/tasks", headers=bearer("alice")))
        assert_unavailable(
            small_app.post("/api/alice/tasks", json={"title": "u"}, headers=bearer("alice"))
        )
        assert small_app.get("/readyz").status_code == 503
        assert small_app.get("/healthz").status_code == 200
    finally:
        set_connections_allowed(fresh_database, True)
    listed = small_app.get("/api/alice/tasks", headers=bearer("alice"))
    deadline = time.monotonic() + RECOVERY_SECONDS
    while fresh_database.pooled and listed.status_code == 503 and time.monotonic() < deadline:
        assert_unavailable(listed)  # PgBouncer has not retried the server login yet
        time.sleep(0.2)
        listed = small_app.get("/api/alice/tasks", headers=bearer("alice"))
    assert listed.status_code == 200
    assert [task["title"] for task in listed.json()] == ["t"]
    assert small_app.get("/readyz").status_code == 200


def test_exhausted_pool_is_503_after_the_pool_timeout(small_app):
    engine = small_app.app.state.transactions.engine
    held = small_app.portal.call(engine.connect().start)  # the only pooled connection
    try:
        started = time.monotonic()
        assert_unavailable(small_app.get("/api/alice/tasks", headers=bearer("alice")))
        assert 0.5 <= time.monotonic() - started < 5  # db_pool_timeout_seconds, then 503
    finally:
        small_app.portal.call(held.close)
    assert small_app.get("/api/alice/tasks", headers=bearer("alice")).status_code == 200


def test_a_request_queued_behind_busy_transactions_is_503_after_the_pool_timeout(small_app):
    """The gate in front of the pool bounds the wait too, not only the pool itself."""
    transactions = small_app.app.state.transactions
    with small_app.portal.wrap_async_context_manager(transactions.as_user("bob")):
        started = time.monotonic()
        assert_unavailable(small_app.get("/api/alice/tasks", headers=bearer("alice")))
        assert 0.5 <= time.monotonic() - started < 5
    assert small_app.get("/api/alice/tasks", headers=bearer("alice")).status_code == 200


def test_a_pooled_connection_the_server_ended_while_idle_is_replaced_unseen(
    fresh_database: TestDatabase,
):
    """What pool pre-ping did, without its round trip: the next request finds the socket
    readable (the server's FATAL message and end of stream) and takes a new connection."""
    settings = fresh_database.settings(db_pool_size=2, db_max_overflow=0)
    with app_client(settings) as client:
        for _ in range(3):
            assert client.get("/api/alice/tasks", headers=bearer("alice")).status_code == 200
            with psycopg.connect(fresh_database.server_url, autocommit=True) as admin:
                ended = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = %s AND application_name = 'todo-api' AND state = 'idle'",
                    (fresh_database.name,),
                ).fetchone()
            assert ended is not None and ended[0] >= 1
            time.sleep(0.2)  # the server's goodbye reaches the pooled socket
            created = client.post("/api/alice/tasks", json={"title": "t"}, headers=bearer("alice"))
            assert created.status_code == 201, created.text


def test_pooled_connections_on_high_file_descriptors_are_checked_too(
    fresh_database: TestDatabase,
):
    """A busy process hands out descriptors above 1024, where select() cannot look."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2048
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    with ExitStack() as held:
        held.callback(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        while (fd := os.open(os.devnull, os.O_RDONLY)) < 1100:
            held.callback(os.close, fd)
        held.callback(os.close, fd)
        settings = fresh_database.settings(db_pool_size=1, db_max_overflow=0)
        with app_client(settings) as client:
            pool = client.app.state.transactions.engine.pool
            for _ in range(3):  # the first checkout opens the connection, the others reuse it
                response = client.get("/api/alice/tasks", headers=bearer("alice"))
                assert response.status_code == 200, response.text
            assert pool.size() == 1 and pool.checkedin() == 1


def test_a_lock_wait_cut_short_by_the_database_is_503_busy_and_changes_nothing(
    fresh_database: TestDatabase,
):
    """The database answered, but could not take the row lock within its lock_timeout."""
    with psycopg.connect(fresh_database.server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} SET lock_timeout = '200ms'").format(
                sql.Identifier(fresh_database.name)
            )
        )
    with app_client(fresh_database.settings()) as client:
        created = client.post("/api/alice/tasks", json={"title": "t"}, headers=bearer("alice"))
        task_id = created.json()["id"]
        with fresh_database.connect() as holder:  # a DBA's open transaction holds the row
            holder.execute("SELECT 1 FROM task WHERE id = %s FOR UPDATE", (task_id,))
            response = client.put(
                f"/api/alice/tasks/{task_id}", json={"title": "u"}, headers=bearer("alice")
            )
            holder.rollback()
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "5"
        assert response.json()["detail"].startswith("The database could not finish")
        assert "lock" not in response.text.lower()
        after = client.get(f"/api/alice/tasks/{task_id}", headers=bearer("alice"))
        assert after.json()["title"] == "t"


def test_a_request_waiting_on_a_row_lock_gives_up_after_the_statement_timeout(
    fresh_database: TestDatabase,
):
    """DB_STATEMENT_TIMEOUT_SECONDS: a DBA's forgotten transaction cannot hold requests (and
    their pooled connections) forever."""
    settings = fresh_database.settings(db_statement_timeout_seconds=0.5)
    with app_client(settings) as client:
        created = client.post("/api/alice/tasks", json={"title": "t"}, headers=bearer("alice"))
        task_id = created.json()["id"]
        with fresh_database.connect() as holder:
            holder.execute("SELECT 1 FROM task WHERE id = %s FOR UPDATE", (task_id,))
            started = time.monotonic()
            response = client.patch(f"/api/alice/tasks/{task_id}/complete", headers=bearer("alice"))
            waited = time.monotonic() - started
            holder.rollback()
        assert response.status_code == 503, response.text
        assert response.json()["detail"].startswith("The database could not finish")
        assert 0.5 <= waited < 3
        after = client.get(f"/api/alice/tasks/{task_id}", headers=bearer("alice"))
        assert after.json()["completed"] is False
        # The bound is per transaction: the next request on the same pool is served.
        done = client.patch(f"/api/alice/tasks/{task_id}/complete", headers=bearer("alice"))
        assert done.status_code == 200 and done.json()["completed"] is True


def test_a_prepared_statement_that_vanished_is_503_once_then_served(database, auth):
    """A pooler's DISCARD ALL or a DBA's DEALLOCATE removes the connection's prepared statements:
    the request that finds one gone is a 503 to retry, not a 500, and the next one is served."""
    direct = dataclasses.replace(database, pooler_url=None)  # prepared statements need it
    settings = direct.settings(db_prepared_statements=True, db_pool_size=1, db_max_overflow=0)
    with app_client(settings) as client:
        assert client.get("/api/alice/tasks", headers=auth("alice")).status_code == 200
        client.portal.call(deallocate_all, client.app.state.transactions)
        gone = client.get("/api/alice/tasks", headers=auth("alice"))
        assert gone.status_code == 503, gone.text
        assert gone.headers["retry-after"] and "try again" in gone.json()["detail"]
        assert "todo_api_" not in gone.text and "SELECT" not in gone.text
        assert client.get("/api/alice/tasks", headers=auth("alice")).status_code == 200


async def deallocate_all(transactions: IdentityTransactions) -> None:
    async with transactions.engine.connect() as pooled:  # the pool's only connection
        raw = await pooled.get_raw_connection()
        driver: psycopg.AsyncConnection[Any] = raw.driver_connection  # type: ignore[assignment]
        await driver.execute("DEALLOCATE ALL")
