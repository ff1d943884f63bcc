"""Engine, pool and the per-request session that carries the caller's identity.

This is the security-critical module: every ORM session that touches tasks begins each of its
transactions by switching to the unprivileged application role and setting
`app.current_user_id`, both transaction-local, in one statement with bound values.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, create_engine, event, func, select
from sqlalchemy.engine import URL
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import SessionTransaction, sessionmaker
from sqlmodel import Session

from service.settings import PROJECT_ROOT, Settings

log = logging.getLogger(__name__)

IDENTITY_KEY = "identity"
REPO_ROOT = PROJECT_ROOT


@dataclass(frozen=True)
class Identity:
    role: str
    user_id: str


def make_engine(url: URL, settings: Settings, *, pool_size: int | None = None) -> Engine:
    engine = create_engine(
        url,
        pool_size=pool_size or settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_seconds,
        # A pooled connection may have been cut (database restart, Neon compute suspended).
        pool_pre_ping=True,
        connect_args={
            "connect_timeout": settings.db_connect_timeout_seconds,
            "application_name": "todo-api",
            # A half-open TCP connection (network partition, suspended compute) must not block
            # a pre-ping forever: keepalives and a user timeout bound it (ignored on sockets).
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
            "tcp_user_timeout": 30_000,
            # Behind PgBouncer in transaction mode, server-side prepared statements can land on
            # another server connection; psycopg only prepares when this is not None.
            "prepare_threshold": 5 if settings.db_prepared_statements else None,
        },
    )
    _retry_connects(engine, attempts=settings.db_connect_attempts)
    return engine


def _retry_connects(engine: Engine, *, attempts: int) -> None:
    """A waking Neon compute refuses or drops connects for a moment: back off and retry."""

    @event.listens_for(engine, "do_connect")
    def connect_with_backoff(
        dialect: Any, conn_rec: Any, cargs: tuple[Any, ...], cparams: dict[str, Any]
    ) -> Any:
        for attempt in range(1, attempts + 1):
            try:
                return dialect.loaded_dbapi.connect(*cargs, **cparams)
            except psycopg.OperationalError:
                if attempt == attempts:
                    raise
                delay = min(0.25 * 2 ** (attempt - 1), 2.0)
                log.warning("database connect failed (attempt %d); retrying", attempt)
                time.sleep(delay)
        raise AssertionError("unreachable")


def bind_identity(session: Session, _tx: SessionTransaction, connection: Connection) -> None:
    """Run first in every transaction a task session begins, including after a commit."""
    identity = session.info.get(IDENTITY_KEY)
    if not isinstance(identity, Identity):
        raise RuntimeError("refusing to begin a task transaction without an identity")
    connection.execute(
        select(
            func.set_config("role", identity.role, True),
            func.set_config("app.current_user_id", identity.user_id, True),
        )
    )


class ConnectionSlots:
    """Requests wait here, on the event loop, for a share of the pool before they take a thread.

    Without this, more requests than the thread pool has threads can all block inside the
    pool's checkout, while the requests that hold connections wait for a free thread to finish
    their responses: nothing moves until the pool timeout. The wait is bounded the same way.
    """

    def __init__(self, capacity: int, wait_seconds: float) -> None:
        self._free = asyncio.Semaphore(capacity)
        self._wait_seconds = wait_seconds

    @asynccontextmanager
    async def taken(self) -> AsyncIterator[None]:
        try:
            await asyncio.wait_for(self._free.acquire(), self._wait_seconds)
        except TimeoutError:
            raise PoolTimeoutError("no pooled connection became free in time") from None
        try:
            yield
        finally:
            self._free.release()


class Database:
    def __init__(self, engine: Engine, app_role: str) -> None:
        self.engine = engine
        self.app_role = app_role
        self._sessions = sessionmaker(engine, class_=Session, expire_on_commit=False)
        event.listen(self._sessions, "after_begin", bind_identity)

    @contextmanager
    def session_for(self, user_id: str) -> Iterator[Session]:
        """A session whose every transaction runs as the app role, as `user_id`."""
        with self._sessions(info={IDENTITY_KEY: Identity(self.app_role, user_id)}) as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def run_migrations(url: str, app_role: str) -> None:
    """`alembic upgrade head` as the table owner (the URL's user)."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.attributes["url"] = url
    config.attributes["app_role"] = app_role
    command.upgrade(config, "head")
