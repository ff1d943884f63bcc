"""How a request's statements travel: one transaction in one libpq pipeline, one write.

`Transaction` drives the connection's libpq pipeline (`psycopg.pq`) itself: statements go into
libpq's output buffer as they are queued and leave together with the Sync, which is one round
trip and one wake-up of the server. psycopg's own pipeline mode writes and polls after every
`execute()`, one write per statement; sending them in one write gave a median +33% reads
(bench/RESULTS.md). psycopg still does the rest: it binds the values (`Transformer`), loads the
rows and raises its own error classes.

`Reads` sends the read-only transactions of several requests on one connection in one go:
each is the transaction PostgreSQL opens by itself for the messages before a Sync (no BEGIN,
no COMMIT), committed at its own Sync, or rolled back there after an error, which the
transactions behind it never see.

What runs inside the transactions, and as whom, is service.db's business.
"""

import asyncio
import enum
import itertools
import os
import secrets
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.adapt import PyFormat, Transformer
from psycopg.pq import ExecStatus, PipelineStatus
from psycopg.pq.abc import PGresult

Row = dict[str, Any]
PreparedKey = tuple[bytes, tuple[int, ...]]  # the SQL and its parameters' types
Prepared = dict[PreparedKey, bytes]  # a connection's prepared statements, by key: their names


@dataclass(frozen=True)
class Statement:
    """SQL with numbered parameters ($1, $2, …) and the names of the values they take."""

    sql: str
    names: tuple[str, ...] = ()


BEGIN = Statement("BEGIN")
COMMIT = Statement("COMMIT")


@dataclass(eq=False)
class Queued:
    """A statement sent in a request transaction; `rows` is filled in once its result is in."""

    rows: list[Row] = field(default_factory=list)


@dataclass(frozen=True)
class _Parse:
    """A statement being prepared on this connection; recorded once the server accepts it."""

    key: PreparedKey
    name: bytes


class _Awaited(enum.Enum):
    CHECKED = "a statement whose result is checked, not kept"
    SYNC = "the end of the pipeline"


Expected = Queued | _Parse | _Awaited


class StatementNames:
    """Names for prepared statements: unique per process and unpredictable across processes.
    Should prepared statements be enabled behind a pooler that cannot keep them apart, a name
    from another worker is an error, never another worker's statement."""

    def __init__(self) -> None:
        self.start_afresh()

    def start_afresh(self) -> None:
        self._prefix = f"todo_api_{secrets.token_hex(4)}_"
        self._numbers = itertools.count(1)

    def next(self) -> bytes:
        return f"{self._prefix}{next(self._numbers)}".encode()


statement_names = StatementNames()
# `todo-api serve --workers N` forks its workers from a process that imported this module:
# each must draw its own names, not continue its parent's.
os.register_at_fork(after_in_child=statement_names.start_afresh)


class Transaction:
    """One transaction on one connection, in libpq's pipeline mode until it ends.

    `begin()` opens it, `queue()` and `read()` send statements, `commit()` ends it; after an
    error, `discard()` ends the pipeline and the caller rolls back what is left.
    """

    def __init__(
        self,
        connection: psycopg.AsyncConnection[Any],
        prepared: Prepared | None,
        parsing: Prepared | None = None,
    ) -> None:
        self._pgconn = connection.pgconn
        self._encoding = connection.info.encoding
        self._adapt = Transformer(connection)
        self._prepared = prepared  # None: never prepare (a transaction pooler may be in between)
        # Prepared in this pipeline, not yet accepted (shared by the transactions of a `Reads`).
        self._parsing: Prepared = {} if parsing is None else parsing
        self._expected: deque[Expected] = deque()
        self._error: psycopg.Error | None = None

    def begin(self, first: Statement, params: Mapping[str, Any]) -> None:
        """BEGIN and `first`: nothing queued later can run unless both succeed."""
        self._pgconn.enter_pipeline_mode()
        self._send(BEGIN, None, _Awaited.CHECKED)
        self._send(first, params, _Awaited.CHECKED)

    def queue(self, statement: Statement | str, params: Mapping[str, Any] | None = None) -> Queued:
        """Send behind what is already queued, without waiting for the answer."""
        queued = Queued()
        self._send(
            Statement(statement) if isinstance(statement, str) else statement, params, queued
        )
        return queued

    async def read(
        self, statement: Statement | str, params: Mapping[str, Any] | None = None
    ) -> list[Row]:
        """Send and wait for the rows now (one more round trip; the transaction stays open)."""
        queued = self.queue(statement, params)
        self._pgconn.send_flush_request()
        await self._receive(until=queued)
        return queued.rows

    async def commit(self) -> None:
        self._send(COMMIT, None, _Awaited.CHECKED)
        await self._end_pipeline()
        if self._error is not None:
            raise self._error

    async def discard(self) -> None:
        """End the pipeline, whatever is still in it, and drop its results."""
        if self._pgconn.pipeline_status != PipelineStatus.OFF:
            await self._end_pipeline()

    async def _end_pipeline(self) -> None:
        if _Awaited.SYNC not in self._expected:
            self._sync()
        await self._settle_to_sync()
        self._pgconn.exit_pipeline_mode()

    def _sync(self) -> None:
        """The Sync that ends what was sent: the transaction, if it is an implicit one."""
        self._pgconn.pipeline_sync()
        self._expected.append(_Awaited.SYNC)

    async def _settle_to_sync(self) -> psycopg.Error | None:
        """Read the results up to the Sync; the first error among them, if any."""
        await self._receive(until=_Awaited.SYNC)
        return self._error

    def _send(
        self, statement: Statement, params: Mapping[str, Any] | None, expected: Expected
    ) -> None:
        """Into libpq's output buffer, binding exactly the values the statement names.

        Mistakes are refused here, before anything of them is sent: once COMMIT has gone out
        behind a statement, a mistake the server does not treat as an error (an empty
        statement answers EMPTY_QUERY) could no longer stop the transaction committing."""
        if not statement.sql.strip():
            raise ValueError("an empty statement")
        if params and not statement.names:
            raise TypeError("values given for a statement without parameters")
        values = [(params or {})[name] for name in statement.names]
        dumped = self._adapt.dump_sequence(values, [PyFormat.AUTO] * len(values))
        types, formats = self._adapt.types, self._adapt.formats
        sql = statement.sql.encode(self._encoding)
        name = self._prepared_name(sql, types)
        if name is None:
            self._pgconn.send_query_params(sql, dumped, types, formats)
        else:
            self._pgconn.send_query_prepared(name, dumped, formats)
        self._expected.append(expected)

    def _prepared_name(self, sql: bytes, types: Sequence[int]) -> bytes | None:
        """The server-side statement to run, prepared in this pipeline if it was not yet.
        Values of other types (psycopg picks int2, int4 or int8 by value) get a statement of
        their own, as in psycopg's own prepared statements."""
        if self._prepared is None:
            return None
        key = (sql, tuple(types))
        name = self._prepared.get(key) or self._parsing.get(key)
        if name is None:
            name = self._parsing[key] = statement_names.next()
            self._pgconn.send_prepare(name, sql, types)
            self._expected.append(_Parse(key, name))
        return name

    async def _receive(self, *, until: Expected) -> None:
        """Read results up to `until`'s; raise the first error once it is reached (for the Sync,
        the caller raises it after leaving pipeline mode)."""
        await self._flush()
        while True:
            self._pgconn.consume_input()
            ended = False  # the last get_result() ended a statement's results
            while self._expected and not self._pgconn.is_busy():
                result = self._pgconn.get_result()
                if result is None:
                    if ended:  # libpq has nothing more for us, yet results are owed
                        raise self._out_of_step()
                    ended = True
                    continue
                ended = False
                expected = self._expected.popleft()
                self._settle(expected, result)
                if expected is until:
                    if self._error is not None and until is not _Awaited.SYNC:
                        raise self._error
                    return
            await self._wait(reader=True)

    def _settle(self, expected: Expected, result: PGresult) -> None:
        """What a result means for the statement it answers."""
        status = ExecStatus(result.status)
        if status == ExecStatus.FATAL_ERROR:
            self._fail(psycopg.errors.error_from_result(result, self._encoding))
        elif status == ExecStatus.PIPELINE_ABORTED:
            return  # skipped after an earlier error, which is the one raised
        elif not _answers(expected, status):
            self._fail(psycopg.InterfaceError(f"unexpected {status.name} result from the server"))
        elif isinstance(expected, Queued) and status == ExecStatus.TUPLES_OK:
            names = [result.fname(i).decode(self._encoding) for i in range(result.nfields)]
            self._adapt.set_pgresult(result)
            expected.rows = self._adapt.load_rows(
                0, result.ntuples, lambda values: dict(zip(names, values, strict=True))
            )
        elif isinstance(expected, _Parse) and self._prepared is not None:
            self._prepared[expected.key] = expected.name

    def _fail(self, error: psycopg.Error) -> None:
        if isinstance(error, psycopg.errors.InvalidSqlStatementName) and self._prepared:
            # A prepared statement vanished (a pooler's DISCARD ALL, a DBA's DEALLOCATE):
            # this request fails, the connection's next ones prepare afresh.
            self._prepared.clear()
        self._error = self._error or error

    def _out_of_step(self) -> psycopg.Error:
        """The connection was lost or its stream corrupted: libpq then stops being busy for
        good, and waiting for the results still owed would spin forever."""
        reason = self._pgconn.error_message.decode(self._encoding, "replace").strip()
        return psycopg.OperationalError(f"the database connection broke: {reason or 'no reason'}")

    async def _flush(self) -> None:
        """libpq's rule when the socket takes only part: wait until it can be read or written,
        and read what the server sent meanwhile. Otherwise a server blocked sending a large
        result and this side blocked sending a large statement would wait for each other."""
        while self._pgconn.flush():
            await self._wait(reader=True, writer=True)
            self._pgconn.consume_input()

    async def _wait(self, *, reader: bool = False, writer: bool = False) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():  # the loop may call again before this task runs
                ready.set_result(None)

        socket = self._pgconn.socket
        if reader:
            loop.add_reader(socket, wake)
        if writer:
            loop.add_writer(socket, wake)
        try:
            await ready
        finally:
            if reader:
                loop.remove_reader(socket)
            if writer:
                loop.remove_writer(socket)


class Reads:
    """Read-only transactions of several requests, one after another on one connection, sent
    together in one pipeline: one write and one wake-up of the server for all of them.

    Each is an implicit transaction: its statements run in the transaction PostgreSQL opens
    for the messages before a Sync and commits at that Sync. Its first statement is the
    identity (`add`), so nothing of it runs before the identity is in place, and what the
    identity set with `set_config(..., true)` ends at its Sync, before the next one begins.
    An error rolls back that transaction alone: the server skips only the rest of it, up to
    its Sync. `outcome()` reads the transactions' results in the order they were added.
    """

    def __init__(self, connection: psycopg.AsyncConnection[Any], prepared: Prepared | None) -> None:
        self._connection = connection
        self._prepared = prepared
        # A statement new to the connection is parsed once for the batch: only the identity,
        # which fails alike for every transaction, can come before its Parse and make the
        # server skip it.
        self._parsing: Prepared = {}
        self._sent: deque[tuple[Transaction, Queued, Exception | None]] = deque()

    def add(
        self,
        first: Statement,
        first_params: Mapping[str, Any],
        statement: Statement,
        params: Mapping[str, Any],
    ) -> None:
        """Queue `first` and `statement` as one transaction, ended by its own Sync."""
        pgconn = self._connection.pgconn
        if pgconn.pipeline_status == PipelineStatus.OFF:
            pgconn.enter_pipeline_mode()
        transaction = Transaction(self._connection, self._prepared, self._parsing)
        queued, mistake = Queued(), None
        try:
            transaction._send(first, first_params, _Awaited.CHECKED)
            queued = transaction.queue(statement, params)
        except Exception as refused:  # refused before any of it was sent (Transaction._send)
            mistake = refused
        # Also after a mistake: the Sync ends what was sent, so the next transaction starts
        # on its own, and this one has nothing but (at most) its identity to commit.
        transaction._sync()
        self._sent.append((transaction, queued, mistake))

    async def outcome(self) -> list[Row] | Exception:
        """The next transaction's rows, or what failed it: the error that rolled it back, or
        the mistake that kept its statement from being sent. Raises when the connection itself
        fails: the transactions still owed are then lost with it."""
        transaction, queued, mistake = self._sent.popleft()
        error = await transaction._settle_to_sync()
        if not self._sent:
            self._connection.pgconn.exit_pipeline_mode()
        return mistake or error or queued.rows


def _answers(expected: Expected, status: ExecStatus) -> bool:
    """Whether a result of this status is one that `expected` waits for."""
    if expected is _Awaited.SYNC:
        return status == ExecStatus.PIPELINE_SYNC
    return status in (ExecStatus.COMMAND_OK, ExecStatus.TUPLES_OK)
