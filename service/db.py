"""Engines, pools and the one transaction every task request runs in.

This is the security-critical module. Every task request runs in one transaction that begins
by switching to the unprivileged application role and setting `app.current_user_id`, both
transaction-local, in one statement with bound values (`IDENTITY`, which also bounds the
transaction's statements with DB_STATEMENT_TIMEOUT_SECONDS). BEGIN, that statement,
the request's own statements and COMMIT travel together in one libpq pipeline
(service.pipeline's `Transaction`): one round trip to the database, and nothing of the request
can run before the identity is in place.

The two reads (`read_as`) run the same identity statement first, in a transaction of their
own, but reads that wait at the same moment share a connection and a round trip
(service.pipeline's `Reads`): each is the implicit transaction that PostgreSQL commits at its
own Sync, so one request's identity ends before the next request's begins.
"""

import asyncio
import itertools
import logging
import math
import select
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import anyio
import psycopg
from psycopg.pq import TransactionStatus
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool, reset_none
from sqlalchemy.util import await_, greenlet_spawn

from service.pipeline import Reads, Row, Statement, Transaction
from service.settings import PROJECT_ROOT, Settings

log = logging.getLogger(__name__)


def connect_args(settings: Settings) -> dict[str, Any]:
    return {
        "connect_timeout": settings.db_connect_timeout_seconds,
        "application_name": "todo-api",
        # A half-open TCP connection (network partition, suspended compute) must not block a
        # request forever: keepalives and a user timeout bound it (ignored on Unix sockets).
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "tcp_user_timeout": 30_000,
        # Behind PgBouncer in transaction mode, server-side prepared statements can land on
        # another server connection; psycopg only prepares when this is not None. (This covers
        # what psycopg itself sends; request transactions prepare through Transaction.)
        "prepare_threshold": 5 if settings.db_prepared_statements else None,
    }


def make_engine(url: URL, settings: Settings, *, pool_size: int | None = None) -> Engine:
    """The blocking engine: posture checks, readiness, the CLI. Never serves task requests."""
    engine = create_engine(
        url,
        pool_size=pool_size or settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_seconds,
        # Off the request path, so a round trip per checkout costs nothing that matters.
        pool_pre_ping=True,
        connect_args=connect_args(settings),
    )
    _retry_connects(engine, attempts=settings.db_connect_attempts, sleep=time.sleep)
    return engine


def make_request_engine(url: URL, settings: Settings) -> AsyncEngine:
    """The pool task requests take their connections from, on the event loop."""
    engine = create_async_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_seconds,
        # BEGIN and COMMIT are sent inside each request's pipeline (service.pipeline):
        # psycopg's own implicit BEGIN would cost a round trip of its own.
        isolation_level="AUTOCOMMIT",
        # IdentityTransactions ends every transaction itself (COMMIT, ROLLBACK, or the
        # connection dropped), so the pool's own rollback on return would only repeat it.
        pool_reset_on_return=None,
        connect_args=connect_args(settings),
    )
    _retry_connects(
        engine.sync_engine,
        attempts=settings.db_connect_attempts,
        sleep=lambda seconds: await_(asyncio.sleep(seconds)),
    )
    event.listen(engine.sync_engine, "checkout", discard_if_closed_by_server)
    return engine


def _retry_connects(engine: Engine, *, attempts: int, sleep: Callable[[float], None]) -> None:
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
                log.warning("database connect failed (attempt %d); retrying", attempt)
                sleep(min(0.25 * 2 ** (attempt - 1), 2.0))
        raise AssertionError("unreachable")


def returns_without_io(engine: AsyncEngine) -> bool:
    """Whether a connection going back to `engine`'s pool is only put into its queue: a
    queue pool that cannot overflow (an overflow connection is closed on return) and does not
    reset on return. SQLAlchemy keeps both settings private; unknown means no."""
    pool = engine.sync_engine.pool
    return (
        isinstance(pool, QueuePool)
        and getattr(pool, "_max_overflow", None) == 0
        and getattr(pool, "_reset_on_return", None) is reset_none
    )


def discard_if_closed_by_server(
    _dbapi_connection: Any, _record: ConnectionPoolEntry, proxy: PoolProxiedConnection
) -> None:
    """A pre-ping without the round trip.

    An idle connection has nothing to read unless the server has ended it: a restart, an idle
    timeout or a suspended Neon compute sends a FATAL error and closes the socket. So a
    readable socket means a dead connection; the pool then replaces it, and every connection
    older than it, before the request uses one.
    """
    connection: psycopg.AsyncConnection[Any] = proxy.driver_connection  # type: ignore[assignment]
    if connection.closed or connection.broken:
        raise InvalidatePoolError("connection closed")
    # poll(), not select(): a process with many files open hands out descriptors >= 1024.
    probe = select.poll()
    probe.register(connection.fileno(), select.POLLIN)
    if probe.poll(0):
        raise InvalidatePoolError("the server closed this pooled connection")


IDENTITY = Statement(
    "SELECT set_config('role', $1, true), set_config('app.current_user_id', $2, true),"
    " set_config('statement_timeout', $3, true)",
    ("role", "user_id", "statement_timeout"),
)
# A read's: the same, and its transaction read-only, so that nothing sent as a read can write.
READ_IDENTITY = Statement(
    IDENTITY.sql + ", set_config('transaction_read_only', 'on', true)", IDENTITY.names
)


# Reads sent in one round trip at most: enough to share the fixed costs of a round trip
# (bench/RESULTS.md), few enough that the last of them does not wait long for the first.
READS_PER_ROUND_TRIP = 8


@dataclass(eq=False)
class _Read:
    """A read waiting for its turn, and where its answer goes."""

    number: int  # in the order the reads were asked for
    asked_at: float  # the event loop's clock
    user_id: str
    statement: Statement
    params: Mapping[str, Any]
    answer: "asyncio.Future[list[Row]]"


class IdentityTransactions:
    """Transactions that run as the application role, on behalf of one user."""

    def __init__(
        self,
        engine: AsyncEngine,
        app_role: str,
        *,
        connections: int,
        wait_seconds: float,
        on_error: Callable[[BaseException], None] | None = None,
        statement_timeout_seconds: float = 0,
        prepare: bool = False,
    ) -> None:
        self.engine = engine
        self.app_role = app_role
        self._on_error = on_error
        # No request waits forever on a row lock (or a slow plan) holding a pooled connection.
        self._statement_timeout = f"{round(statement_timeout_seconds * 1000)}ms"
        self._gate = asyncio.Semaphore(connections)
        self._wait_seconds = wait_seconds
        self._prepare = prepare
        self._return_without_io = returns_without_io(engine)
        self._reads: deque[_Read] = deque()  # first come, first served
        self._numbers = itertools.count()
        self._readers: set[asyncio.Task[None]] = set()  # referenced, so that none is collected
        self._serving = 0  # reader tasks not yet ended: at most one per connection
        self._max_serving = connections

    @classmethod
    def from_settings(
        cls,
        url: URL,
        settings: Settings,
        app_role: str,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> "IdentityTransactions":
        return cls(
            make_request_engine(url, settings),
            app_role,
            connections=settings.db_pool_size + settings.db_max_overflow,
            wait_seconds=settings.db_pool_timeout_seconds,
            on_error=on_error,
            statement_timeout_seconds=settings.db_statement_timeout_seconds,
            prepare=settings.db_prepared_statements,
        )

    @asynccontextmanager
    async def as_user(self, user_id: str) -> AsyncIterator[Transaction]:
        """One transaction, as the app role and `user_id`, in pipeline mode.

        Statements queued in the block go out behind BEGIN and the identity, and with COMMIT
        when the block ends: one round trip. Their rows are read before the connection goes
        back to the pool. An exception inside the block rolls back instead.
        """
        async with self._pooled_connection() as pooled:
            connection: psycopg.AsyncConnection[Any] = pooled.driver_connection  # type: ignore[assignment]
            transaction = Transaction(connection, self._prepared_statements(pooled))
            try:
                transaction.begin(IDENTITY, self._identity(user_id))
                yield transaction
                await transaction.commit()
            except BaseException as exc:
                # Shielded: a cancelled request must still leave its connection clean.
                with anyio.CancelScope(shield=True):
                    await self._recover(pooled, connection, transaction, exc)
                raise

    async def read_as(
        self, user_id: str, statement: Statement, params: Mapping[str, Any]
    ) -> list[Row]:
        """The rows of one read-only statement, run as the app role and `user_id` in a
        transaction of its own that begins with the identity, as in `as_user`.

        Reads waiting at the same moment go to the database together: up to
        READS_PER_ROUND_TRIP of them on one pooled connection, in one round trip, each its own
        implicit transaction (service.pipeline's `Reads`). Reader tasks send them, first come
        first served, one batch per connection taken, until none is left; there are never more
        reader tasks than the pool has connections, and they take their connections through
        the same gate as `as_user`. Each read's transaction is read-only (READ_IDENTITY). An
        error fails the read it belongs to; a connection that fails, or that cannot be had,
        fails the reads it was to carry; a read still waiting for its turn after
        DB_POOL_TIMEOUT_SECONDS gets the pool's timeout, as a request at the gate would.
        """
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[list[Row]] = loop.create_future()
        read = _Read(next(self._numbers), loop.time(), user_id, statement, params, answer)
        self._reads.append(read)
        if self._serving < self._max_serving:
            self._serving += 1
            reader = asyncio.create_task(self._serve_reads())
            self._readers.add(reader)
            reader.add_done_callback(self._readers.discard)
        try:
            return await answer
        except asyncio.CancelledError:
            if answer.done() and not answer.cancelled():
                answer.exception()  # answered just too late: not "never retrieved"
            raise

    async def _serve_reads(self) -> None:
        """A reader task: the waiting reads, batch after batch, until none is left.

        Between its last look at the queue and its count going down there is no await: a read
        queued after that look starts a reader of its own, so none is left waiting."""
        try:
            while self._reads:
                meant_for = self._reads[-1].number  # the reads waiting when it asks
                try:
                    # One batch per checkout: the connection goes back through the gate after
                    # each, so that writes waiting there are not starved by a stream of reads.
                    async with self._pooled_connection() as pooled:
                        await self._send_reads(pooled)
                except Exception as exc:
                    # No connection to be had: the reads it was asked for get the error, as
                    # each would have had it from a request transaction of its own; those
                    # queued since wait for an attempt of their own.
                    self._answer_waiting(exc, up_to=meant_for)
        except BaseException:
            self._answer_waiting(stopped())  # cancelled: the service is stopping
            raise
        finally:
            self._serving -= 1

    async def _send_reads(self, pooled: PoolProxiedConnection) -> None:
        """The next batch of waiting reads, on `pooled`. When the connection fails, it is
        dropped, and its reads get the error."""
        batch: list[_Read] = []
        too_late = asyncio.get_running_loop().time() - self._wait_seconds
        while self._reads and len(batch) < READS_PER_ROUND_TRIP:
            read = self._reads.popleft()
            if read.answer.done():  # its request gave up waiting
                continue
            if read.asked_at < too_late:  # as a request waiting at the gate would have
                _answer(read, self._no_connection_in_time())
                continue
            batch.append(read)
        connection: psycopg.AsyncConnection[Any] = pooled.driver_connection  # type: ignore[assignment]
        try:
            reads = Reads(connection, self._prepared_statements(pooled))
            for read in batch:
                reads.add(READ_IDENTITY, self._identity(read.user_id), read.statement, read.params)
            for read in batch:
                outcome = await reads.outcome()
                self._count_error(outcome)
                _answer(read, outcome)
            if connection.pgconn.transaction_status != TransactionStatus.IDLE:
                # Each Sync must have ended its transaction; a connection that is not idle
                # now (or that the server closed) must not serve another batch.
                raise psycopg.OperationalError("the connection is not idle after its reads")
        except BaseException as exc:
            # Mid-pipeline, the connection's state is unknown: it must not serve anyone again.
            with anyio.CancelScope(shield=True):
                await greenlet_spawn(pooled.invalidate)
            self._count_error(exc)
            for read in batch:
                _answer(read, exc if isinstance(exc, Exception) else stopped())
            if not isinstance(exc, Exception):
                raise

    def _count_error(self, outcome: object) -> None:
        """A database error, for the metrics (`on_error`); anything else is not one."""
        if isinstance(outcome, psycopg.Error) and self._on_error is not None:
            self._on_error(outcome)

    def _no_connection_in_time(self) -> PoolTimeoutError:
        return PoolTimeoutError(f"no database connection was free within {self._wait_seconds:g} s")

    def _answer_waiting(self, failure: Exception, up_to: float = math.inf) -> None:
        while self._reads and self._reads[0].number <= up_to:
            _answer(self._reads.popleft(), failure)

    def _identity(self, user_id: str) -> dict[str, str]:
        return {
            "role": self.app_role,
            "user_id": user_id,
            "statement_timeout": self._statement_timeout,
        }

    def _prepared_statements(self, pooled: PoolProxiedConnection) -> dict[Any, bytes] | None:
        return pooled.info.setdefault("prepared", {}) if self._prepare else None

    @asynccontextmanager
    async def _pooled_connection(self) -> AsyncIterator[PoolProxiedConnection]:
        """A connection from the pool, taken in the order requests asked for one.

        SQLAlchemy's async pool gives a returned connection to whichever request asks next,
        not to the one that has waited longest, so under load some requests starve (p99
        doubled at 64 connections, bench/RESULTS.md). The gate (asyncio's semaphore is
        first come, first served) admits as many requests as the pool has connections: the
        pool itself then never makes anyone wait.
        """
        await self._admit()
        try:
            # The raw DBAPI connection: SQLAlchemy's Connection wrapper would cost CPU on
            # every request for nothing this module uses.
            pooled = await self.engine.raw_connection()
            try:
                yield pooled
            finally:
                await self._return(pooled)
        finally:
            self._gate.release()

    async def _return(self, pooled: PoolProxiedConnection) -> None:
        """Back into the pool. With no overflow (and no reset on return) that is a plain
        put into the pool's queue, done here without a greenlet hand-off (about a tenth of a
        read's CPU, bench/RESULTS.md). An overflow connection is closed instead, which awaits
        the driver: with overflow allowed the return runs in greenlet_spawn, shielded from
        anyio's cancellation so that it is not cut short half-way."""
        if self._return_without_io:
            pooled.close()
            return
        with anyio.CancelScope(shield=True):
            await greenlet_spawn(pooled.close)

    async def _admit(self) -> None:
        if not self._gate.locked():
            await self._gate.acquire()  # returns at once, without a timer
            return
        try:
            async with asyncio.timeout(self._wait_seconds):
                await self._gate.acquire()
        except TimeoutError:
            raise self._no_connection_in_time() from None

    async def _recover(
        self,
        pooled: PoolProxiedConnection,
        connection: psycopg.AsyncConnection[Any],
        transaction: Transaction,
        exc: BaseException,
    ) -> None:
        """Roll back, or drop the connection: nothing of this transaction may reach the next
        request that takes it from the pool."""
        self._count_error(exc)
        idle = False
        try:
            # Cancelled mid-pipeline (a client gone, shutdown), the protocol state is unknown.
            if isinstance(exc, Exception) and not (connection.broken or connection.closed):
                with suppress(psycopg.Error):
                    await transaction.discard()
                    if connection.info.transaction_status != TransactionStatus.IDLE:
                        await connection.execute("ROLLBACK")
                    idle = True
        finally:
            # Also when the ROLLBACK itself is cut short (a plain asyncio cancel, which anyio's
            # shield does not stop): only a connection known to be idle goes back to the pool.
            if not idle:
                await greenlet_spawn(pooled.invalidate)

    async def dispose(self) -> None:
        """Close the pool, once the reader tasks have sent what they had (a connection they
        returned after this would stay open until garbage collection)."""
        if self._readers:
            await asyncio.wait(self._readers, timeout=READERS_STOP_SECONDS)
        if self._readers:  # stuck past the statement timeout: their reads get stopped()
            for reader in self._readers:
                reader.cancel()
            await asyncio.wait(self._readers)
        await self.engine.dispose()


READERS_STOP_SECONDS = 5


def stopped() -> psycopg.OperationalError:
    """What the reads of a reader task cancelled at shutdown get: a 503, as when the database
    is unavailable, rather than a cancellation their own requests never asked for."""
    return psycopg.OperationalError("the service stopped before this read was answered")


def _answer(read: _Read, outcome: list[Row] | Exception) -> None:
    """Hand a read its rows or its error, unless its request has stopped waiting."""
    if read.answer.done():
        return
    if isinstance(outcome, Exception):
        read.answer.set_exception(outcome)
    else:
        read.answer.set_result(outcome)


class Database:
    """The blocking side: posture checks and readiness, as the login role."""

    def __init__(self, engine: Engine, app_role: str) -> None:
        self.engine = engine
        self.app_role = app_role

    def dispose(self) -> None:
        self.engine.dispose()


def run_migrations(url: str, app_role: str) -> None:
    """`alembic upgrade head` as the table owner (the URL's user)."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.attributes["url"] = url
    config.attributes["app_role"] = app_role
    command.upgrade(config, "head")
