"""Helpers for integration suites: a migrated PostgreSQL, a running app, tokens for any user.

The database comes from TEST_DATABASE_URL when set (a server whose user may create databases
and roles), else from testcontainers when a Docker engine answers, else from the embedded
PostgreSQL. Each `migrated_database()` is a fresh database with its own application role,
dropped afterwards, so suites can run side by side on one server.

`pgbouncer(server_url)` starts a real PgBouncer in transaction mode in front of a server (the
pooler Neon puts behind its `-pooler` host). With TEST_POOLER_URL set to a PgBouncer's URL, or to
`auto` (the session starts one), `TestDatabase.settings()` connects the service through it, while
migrations and the owner's `connect()` stay direct.

As a pytest plugin (`pytest_plugins = ["service.testing"]`) it provides the fixtures
todo_server_url, todo_pooler_url, todo_database, todo_fresh_database, todo_client, todo_token
and todo_auth.
"""

import http.client
import os
import pwd
import shutil
import signal
import socket
import subprocess
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
import psutil
import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql
from pydantic import SecretStr
from sqlalchemy.engine import URL

from service.app import create_app
from service.db import run_migrations
from service.settings import Settings, sqlalchemy_url

TEST_SECRET = "test-secret-that-is-at-least-32-bytes-long"  # noqa: S105 (tests only)
POSTGRES_IMAGE = "postgres:17-alpine"
POOLER_ENV = "TEST_POOLER_URL"


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


def make_url_for(url: str) -> URL:
    """A libpq URL (postgresql://) as a SQLAlchemy URL object."""
    return sqlalchemy_url(url).set(drivername="postgresql")


def as_role(url: str, role: str) -> str:
    """The same server and database, logged in as `role` (no password: trust in the tests)."""
    return make_url_for(url).set(username=role, password=None).render_as_string(False)


def libpq_url(url: str, database: str | None = None) -> str:
    parsed = make_url_for(url)
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


def _url_host_port(url: URL) -> tuple[str, int]:
    """Where a URL points: its host (a Unix-socket folder in `?host=` counts) and port."""
    host, port = url.query.get("host", url.host), url.query.get("port", url.port)
    if isinstance(host, tuple):
        host = host[0]
    if isinstance(port, tuple):
        port = port[0]
    return host or "127.0.0.1", int(port or 5432)


def pgbouncer_binary() -> str | None:
    """The pgbouncer executable, or None when it is not installed (Debian puts it in sbin)."""
    candidates = (shutil.which("pgbouncer"), "/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")
    return next((path for path in candidates if path and Path(path).is_file()), None)


def _pgbouncer_account(server_host: str) -> pwd.struct_passwd | None:
    """PgBouncer refuses to run as root: run it as `postgres` (or as the owner of the server's
    Unix-socket folder, which only that user may enter). None: run it as ourselves."""
    if os.geteuid() != 0:
        return None
    if server_host.startswith("/"):
        owner = Path(server_host).stat().st_uid
        if owner != 0:
            return pwd.getpwuid(owner)
    return pwd.getpwnam("postgres")


def _ini_quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


@contextmanager
def pgbouncer(
    server_url: str, *, pool_size: int = 5, query_wait_timeout: int = 10, timeout: float = 15
) -> Iterator[str]:
    """A real PgBouncer (`pool_mode = transaction`) in front of `server_url`; yields its URL.

    It listens on a free 127.0.0.1 port and forwards every database name to the same database on
    the server. The server URL's user gets in (auth_type trust; PgBouncer logs in to the server
    with that user's password, if the URL has one), and so does any other role that user can
    look up on the server (auth_user). `pool_size` is PgBouncer's default_pool_size: server
    connections per database and user; a query that waits longer than `query_wait_timeout`
    seconds for one fails (08P01). Config, log and pid file live in a temporary folder, removed
    after a safe shutdown (SIGINT) that leaves no process behind. Needs the `pgbouncer` binary
    (Debian: `apt-get install --no-install-recommends pgbouncer`).
    """
    binary = pgbouncer_binary()
    if binary is None:
        raise FileNotFoundError(
            "pgbouncer is not installed (apt-get install --no-install-recommends pgbouncer)"
        )
    server = make_url_for(server_url)
    server_host, server_port = _url_host_port(server)
    user, password = server.username or "postgres", server.password or ""
    account = _pgbouncer_account(server_host)
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="todo-api-pgbouncer-"))
    ini = folder / "pgbouncer.ini"
    log = folder / "pgbouncer.log"
    try:
        (folder / "users.txt").write_text(f"{_ini_quote(user)} {_ini_quote(password)}\n")
        ini.write_text(
            "[databases]\n"
            f"* = host={server_host} port={server_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {folder / 'users.txt'}\n"
            # Other roles (a least-privilege login) are looked up on the server as this user.
            f"auth_user = {user}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 1000\n"
            # Sent by some drivers (JDBC, asyncpg); PgBouncer refuses unknown startup parameters.
            "ignore_startup_parameters = extra_float_digits\n"
            # Retry a refused server login soon (the default waits 15 s), and fail a query that
            # waits too long for a server connection (the default waits 120 s).
            "server_login_retry = 1\n"
            f"query_wait_timeout = {query_wait_timeout}\n"
            f"logfile = {log}\n"
            f"pidfile = {folder / 'pgbouncer.pid'}\n"
        )
        if account is not None:
            os.chmod(folder, 0o700)
            for path in (folder, *folder.iterdir()):
                os.chown(path, account.pw_uid, account.pw_gid)
        with (folder / "stderr.log").open("wb") as stderr:
            process = subprocess.Popen(  # noqa: S603 (a fixed binary and our own config)
                [binary, "-q", str(ini)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                user=account.pw_uid if account else None,
                group=account.pw_gid if account else None,
                extra_groups=[] if account else None,
            )
        try:
            url = server.set(host="127.0.0.1", port=port).difference_update_query(["host", "port"])
            _wait_for_pgbouncer(process, url.render_as_string(hide_password=False), timeout, folder)
            yield url.render_as_string(hide_password=False)
        finally:
            _stop(process)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_pgbouncer(
    process: subprocess.Popen[bytes], url: str, timeout: float, folder: Path
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited ({process.returncode}): {_tail(folder)}")
        try:
            with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError as error:
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not answer: {error}; {_tail(folder)}") from None
            time.sleep(0.05)


def _tail(folder: Path) -> str:
    text = ""
    for name in ("stderr.log", "pgbouncer.log"):
        path = folder / name
        if path.exists():
            text += path.read_text(errors="replace")
    return text[-2000:]


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGINT is PgBouncer's safe shutdown; then SIGTERM (immediate), then SIGKILL."""
    for sig, wait in ((signal.SIGINT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        if process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
    process.wait()


def env_pooler_url() -> str | None:
    """The PgBouncer services connect through in tests (TEST_POOLER_URL), None for direct."""
    value = os.environ.get(POOLER_ENV, "").strip()
    if value == "auto":
        raise RuntimeError(
            "TEST_POOLER_URL=auto is resolved by the todo_pooler_url fixture when the session "
            "starts; outside pytest, set it to a PgBouncer's URL"
        )
    return value or None


def through_pooler(url: str, pooler: str) -> str:
    """`url` (the same user, password and database) pointed at the pooler's host and port."""
    host, port = _url_host_port(make_url_for(pooler))
    target = make_url_for(url).difference_update_query(["host", "port"])
    if host.startswith("/"):
        target = target.set(host=None, port=None).update_query_dict(
            {"host": host, "port": str(port)}
        )
    else:
        target = target.set(host=host, port=port)
    return target.render_as_string(hide_password=False)


@dataclass(frozen=True)
class TestDatabase:
    __test__ = False  # not a pytest test class

    server_url: str
    url: str
    name: str
    app_role: str

    pooler_url: str | None = None  # a PgBouncer in front of server_url, for the service

    @property
    def service_url(self) -> str:
        """The URL the service connects with: through `pooler_url` when set, else direct."""
        return through_pooler(self.url, self.pooler_url) if self.pooler_url else self.url

    @property
    def pooled(self) -> bool:
        """True when the service connects through a transaction pooler."""
        return self.pooler_url is not None

    def settings(self, **overrides: Any) -> Settings:
        """The service's settings: `service_url`, a test secret, this database's app role."""
        values: dict[str, Any] = {
            "database_url": SecretStr(self.service_url),
            "jwt_secret": SecretStr(TEST_SECRET),
            "app_db_role": self.app_role,
        }
        return Settings(**(values | overrides))

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """A direct connection as the database's owner (a superuser in the usual test setups)."""
        return psycopg.connect(self.url, **kwargs)


@contextmanager
def migrated_database(
    server_url: str, *, migrate: bool = True, pooler_url: str | None = None
) -> Iterator[TestDatabase]:
    """A fresh database (migrated as its owner unless `migrate=False`) with its own app role,
    dropped afterwards. `pooler_url`: a PgBouncer in front of `server_url` that the service
    connects through (default: TEST_POOLER_URL; unset, the service connects directly)."""
    suffix = uuid.uuid4().hex[:10]
    name, role = f"todo_test_{suffix}", f"todo_app_{suffix}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    pooler = pooler_url or env_pooler_url()
    database = TestDatabase(server_url, libpq_url(server_url, name), name, role, pooler)
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


def postgres_processes(data_dir: Path) -> list[psutil.Process]:
    """PostgreSQL processes serving `data_dir`: none may be left after a clean stop."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "postgres" in (process.info["name"] or "") and str(data_dir) in cmdline:
            found.append(process)
    return found


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


@pytest.fixture(scope="session", autouse=True)
def todo_pooler_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The PgBouncer the service connects through: TEST_POOLER_URL, or with TEST_POOLER_URL=auto
    one started in front of todo_server_url for the session (the variable then holds its URL
    until the session ends). None when unset: the service connects directly."""
    if os.environ.get(POOLER_ENV, "").strip() != "auto":
        yield env_pooler_url()
        return
    with (
        pgbouncer(request.getfixturevalue("todo_server_url")) as url,
        pytest.MonkeyPatch.context() as env,
    ):
        env.setenv(POOLER_ENV, url)
        yield url


@pytest.fixture(scope="session")
def todo_database(todo_server_url: str, todo_pooler_url: str | None) -> Iterator[TestDatabase]:
    """A migrated database of the session's own, with its own application role."""
    with migrated_database(todo_server_url, pooler_url=todo_pooler_url) as database:
        yield database


@pytest.fixture
def todo_fresh_database(
    todo_server_url: str, todo_pooler_url: str | None
) -> Iterator[TestDatabase]:
    """A migrated database for one test, e.g. one that damages the schema or the role."""
    with migrated_database(todo_server_url, pooler_url=todo_pooler_url) as database:
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
