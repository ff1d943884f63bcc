"""When the database cannot be reached or the pool is exhausted: 503, never a hang or a 500."""

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql

from service.testing import TestDatabase, app_client, bearer


@pytest.fixture
def small_app(fresh_database: TestDatabase) -> Iterator[TestClient]:
    settings = fresh_database.settings(
        db_pool_size=1,
        db_max_overflow=0,
        db_pool_timeout_seconds=0.5,
        db_connect_attempts=2,
        retry_after_seconds=7,
    )
    with app_client(settings) as client:
        yield client


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
    assert listed.status_code == 200
    assert [task["title"] for task in listed.json()] == ["t"]
    assert small_app.get("/readyz").status_code == 200


def test_exhausted_pool_is_503_after_the_pool_timeout(small_app):
    engine = small_app.app.state.db.engine
    with engine.connect():  # holds the only pooled connection
        assert_unavailable(small_app.get("/api/alice/tasks", headers=bearer("alice")))
    assert small_app.get("/api/alice/tasks", headers=bearer("alice")).status_code == 200
