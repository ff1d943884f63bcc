"""Every test talks to real PostgreSQL; see service/testing.py for where it comes from."""

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from service.testing import (
    TestDatabase,
    app_client,
    bearer,
    migrated_database,
    postgres_server_url,
)


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    with postgres_server_url() as url:
        yield url


@pytest.fixture(scope="session")
def database(server_url: str) -> Iterator[TestDatabase]:
    """One migrated database shared by the suite; tasks are emptied before each test."""
    with migrated_database(server_url) as db:
        yield db


@pytest.fixture
def fresh_database(server_url: str) -> Iterator[TestDatabase]:
    """A database of its own, for tests that damage the schema or the role."""
    with migrated_database(server_url) as db:
        yield db


@pytest.fixture(scope="session")
def client(database: TestDatabase) -> Iterator[TestClient]:
    with app_client(database.settings()) as test_client:
        yield test_client


@pytest.fixture
def admin(database: TestDatabase) -> Iterator[psycopg.Connection[Any]]:
    """The owner's connection, for arranging and inspecting rows behind the API's back."""
    with database.connect(autocommit=True) as conn:
        conn.execute("TRUNCATE task RESTART IDENTITY")
        yield conn


@pytest.fixture
def auth() -> Callable[..., dict[str, str]]:
    return bearer


@pytest.fixture
def create_task(
    client: TestClient, admin: psycopg.Connection[Any]
) -> Callable[..., dict[str, Any]]:
    def create(user_id: str, title: str = "a task", **fields: Any) -> dict[str, Any]:
        response = client.post(
            f"/api/{user_id}/tasks", json={"title": title, **fields}, headers=bearer(user_id)
        )
        assert response.status_code == 201, response.text
        return response.json()

    return create
