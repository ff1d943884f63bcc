"""Helpers for integration suites: a migrated PostgreSQL, a running app, tokens for any user.

The database comes from TEST_DATABASE_URL when set (a server whose user may create databases
and roles), else from testcontainers when a Docker engine answers, else from the embedded
PostgreSQL. Each `migrated_database()` is a fresh database with its own application role,
dropped afterwards, so suites can run side by side on one server.

As a pytest plugin (`pytest_plugins = ["service.testing"]`) it provides the fixtures
todo_server_url, todo_database, todo_fresh_database, todo_client, todo_token and
todo_auth.
"""

import http.client
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jwt
import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql
from pydantic import SecretStr

from service.app import create_app
from service.db import run_migrations
from service.settings import Settings, sqlalchemy_url

TEST_SECRET = "test-secret-that-is-at-least-32-bytes-long"  # noqa: S105 (tests only)
POSTGRES_IMAGE = "postgres:17-alpine"


def docker_available(timeout: float = 2.0) -> bool:
    """True only if a Docker engine answers /_ping; never hangs."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    parsed = urlparse(host)
    try:
        if parsed.scheme == "unix":
            if not Path(parsed.path).exists():
                return False
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(parsed.path)
            conn = http.client.HTTPConnection("localhost", timeout=timeout)
            conn.sock = sock
        elif parsed.scheme in ("tcp", "http"):
            conn = http.client.HTTPConnection(parsed.hostname or "", parsed.port, timeout=timeout)
        else:
            return False
        try:
            conn.request("GET", "/_ping")
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except OSError:
        return False


def libpq_url(url: str, database: str | None = None) -> str:
    parsed = sqlalchemy_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


@contextmanager
def postgres_server_url() -> Iterator[str]:
    """A URL to a PostgreSQL server on which databases and roles may be created."""
    given = os.environ.get("TEST_DATABASE_URL")
    if given:
        yield libpq_url(given)
    elif docker_available():
        from testcontainers.community.postgres import PostgresContainer

        with PostgresContainer(POSTGRES_IMAGE, driver=None) as container:
            yield libpq_url(container.get_connection_url())
    else:
        from service.embedded import get_server

        # Not under a home directory: as root the package makes every ancestor traversable.
        parent = Path(tempfile.mkdtemp(prefix="todo-api-test-", dir="/var/tmp"))
        server = get_server(parent / "pg", cleanup_mode="delete")
        try:
            yield server.get_uri("postgres")
        finally:
            server.cleanup()
            shutil.rmtree(parent, ignore_errors=True)


@dataclass(frozen=True)
class TestDatabase:
    __test__ = False  # not a pytest test class

    server_url: str
    url: str
    name: str
    app_role: str

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": SecretStr(self.url),
            "jwt_secret": SecretStr(TEST_SECRET),
            "app_db_role": self.app_role,
        }
        return Settings(**(values | overrides))

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """A connection as the database's owner (a superuser in the usual test setups)."""
        return psycopg.connect(self.url, **kwargs)


@contextmanager
def migrated_database(server_url: str, *, migrate: bool = True) -> Iterator[TestDatabase]:
    suffix = uuid.uuid4().hex[:10]
    name, role = f"todo_test_{suffix}", f"todo_app_{suffix}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    database = TestDatabase(server_url, libpq_url(server_url, name), name, role)
    try:
        if migrate:
            run_migrations(database.url, role)
        yield database
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def make_token(
    user_id: str | None,
    *,
    secret: str = TEST_SECRET,
    ttl: int = 300,
    algorithm: str = "HS256",
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A signed token; pass a private key and algorithm for the asymmetric ones."""
    now = int(time.time())
    payload: dict[str, Any] = {"iat": now, "exp": now + ttl, **claims}
    if user_id is not None:
        payload.setdefault("sub", user_id)
    return jwt.encode(payload, secret, algorithm=algorithm, headers=headers)


def bearer(user_id: str, **kwargs: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(user_id, **kwargs)}"}


@contextmanager
def live_server(settings: Settings, *, port: int = 0) -> Iterator[str]:
    """The real app under uvicorn on 127.0.0.1, in a thread; yields its base URL."""
    import uvicorn

    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port or free_port(),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="todo-api-live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the live server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def app_client(settings: Settings) -> Iterator[TestClient]:
    """The real app, started (posture checked) and stopped around the block."""
    with TestClient(create_app(settings)) as client:
        yield client


# --- pytest fixtures: `pytest_plugins = ["service.testing"]` in a conftest.py -----------------


@pytest.fixture(scope="session")
def todo_server_url() -> Iterator[str]:
    """A PostgreSQL server: TEST_DATABASE_URL, else testcontainers, else embedded."""
    with postgres_server_url() as url:
        yield url


@pytest.fixture(scope="session")
def todo_database(todo_server_url: str) -> Iterator[TestDatabase]:
    """A migrated database of the session's own, with its own application role."""
    with migrated_database(todo_server_url) as database:
        yield database


@pytest.fixture
def todo_fresh_database(todo_server_url: str) -> Iterator[TestDatabase]:
    """A migrated database for one test, e.g. one that damages the schema or the role."""
    with migrated_database(todo_server_url) as database:
        yield database


@pytest.fixture(scope="session")
def todo_client(todo_database: TestDatabase) -> Iterator[TestClient]:
    """The real app on that database, started (posture checked) once per session."""
    with app_client(todo_database.settings()) as client:
        yield client


@pytest.fixture
def todo_token() -> Callable[..., str]:
    """`todo_token("alice")`: a valid token for any user (claims may be overridden)."""
    return make_token


@pytest.fixture
def todo_auth() -> Callable[..., dict[str, str]]:
    """`todo_auth("alice")`: the Authorization header for any user."""
    return bearer
