"""Every test talks to real PostgreSQL, through the same plugin downstream suites use."""

import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql

if TYPE_CHECKING:  # imported by pytest as a plugin, so that its asserts are rewritten
    from service.testing import TestDatabase

pytest_plugins = ["service.testing"]


@pytest.fixture(scope="session")
def server_url(todo_server_url: str) -> str:
    return todo_server_url


@pytest.fixture(scope="session")
def database(todo_database: "TestDatabase") -> "TestDatabase":
    """One migrated database shared by the suite; tasks are emptied before each test."""
    return todo_database


@pytest.fixture
def fresh_database(todo_fresh_database: "TestDatabase") -> "TestDatabase":
    """A database of its own, for tests that damage the schema or the role."""
    return todo_fresh_database


@pytest.fixture(scope="session")
def client(todo_client: TestClient) -> TestClient:
    return todo_client


@pytest.fixture
def admin(database: "TestDatabase") -> Iterator[psycopg.Connection[Any]]:
    """The owner's connection, for arranging and inspecting rows behind the API's back."""
    with database.connect(autocommit=True) as conn:
        conn.execute("TRUNCATE task RESTART IDENTITY")
        yield conn


@pytest.fixture
def auth(todo_auth: Callable[..., dict[str, str]]) -> Callable[..., dict[str, str]]:
    return todo_auth


@pytest.fixture
def create_task(
    client: TestClient, admin: psycopg.Connection[Any], auth: Callable[..., dict[str, str]]
) -> Callable[..., dict[str, Any]]:
    def create(user_id: str, title: str = "a task", **fields: Any) -> dict[str, Any]:
        response = client.post(
            f"/api/{user_id}/tasks", json={"title": title, **fields}, headers=auth(user_id)
        )
        assert response.status_code == 201, response.text
        return response.json()

    return create


@pytest.fixture
def login_role(database: "TestDatabase") -> Iterator[str]:
    """A login role that can do nothing but switch to the application role (NOINHERIT)."""
    name = f"todo_login_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database.server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOINHERIT").format(sql.Identifier(name)))
        admin.execute(
            sql.SQL("GRANT {} TO {}").format(
                sql.Identifier(database.app_role), sql.Identifier(name)
            )
        )
    try:
        yield name
    finally:
        with psycopg.connect(database.server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
