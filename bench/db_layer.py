#!/usr/bin/env python3
"""What the request transaction costs the service in CPU, layer by layer, with no HTTP.

    python3 bench/db_layer.py

One process, uvloop, 16 transactions in flight on 8 connections, reading one task as one user.
Prints the service's CPU per transaction (the best of three runs of 4,000) for:

- `TaskStore.get`: what a GET runs, as the service runs it (the gate, SQLAlchemy's pool,
  BEGIN + identity + statement + COMMIT in one libpq pipeline driven by
  service.pipeline's `Transaction`, the JSON from PostgreSQL);
- the same `Transaction` on connections held by the benchmark (no pool, no gate);
- psycopg's own pipeline mode on held connections: one `execute()` per statement, each sent
  and polled on its own (what the service did before `Transaction`);
- the same four statements through libpq with nothing around them (`psycopg.pq`, values
  already bytes, rows not loaded): a lower bound for any driver;
- the bare statement, no transaction and no identity (not something the service may do).

CPU here is this process's only: PostgreSQL's is not counted. See bench/RESULTS.md.
"""

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PYTHON = BENCH.parent / ".venv" / "bin" / "python"
if __name__ == "__main__" and Path(sys.prefix).resolve() != PYTHON.parent.parent.resolve():
    os.execv(str(PYTHON), [str(PYTHON), *sys.argv])  # noqa: S606 (as run.py does)

import psycopg  # noqa: E402
import uvloop  # noqa: E402
from psycopg import pq  # noqa: E402

from service.db import IDENTITY, IdentityTransactions  # noqa: E402
from service.pipeline import Statement, Transaction  # noqa: E402
from service.queries import GET, TaskStore  # noqa: E402
from service.settings import Settings, sqlalchemy_url  # noqa: E402
from service.testing import migrated_database  # noqa: E402

TRANSACTIONS = 4000
IN_FLIGHT = 16
CONNECTIONS = 8
USER = "bench-user"

Connection = psycopg.AsyncConnection[Any]


async def cpu_ms_per_call(call: Callable[[], Awaitable[object]]) -> float:
    """The best of three runs: CPU ms of this process per call, IN_FLIGHT calls at a time."""
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one() -> None:
        async with gate:
            await call()

    await asyncio.gather(*(one() for _ in range(200)))  # warm: prepared statements, caches
    runs = []
    for _ in range(3):
        started = time.process_time()
        await asyncio.gather(*(one() for _ in range(TRANSACTIONS)))
        runs.append(1000 * (time.process_time() - started) / TRANSACTIONS)
    return min(runs)


def held(connections: list[Connection], use: Callable[[Connection], Awaitable[object]]) -> Any:
    idle: asyncio.LifoQueue[Connection] = asyncio.LifoQueue()
    for connection in connections:
        idle.put_nowait(connection)

    async def call() -> None:
        connection = await idle.get()
        try:
            await use(connection)
        finally:
            idle.put_nowait(connection)

    return call


def pyformat(statement: Statement) -> str:
    """The statement as psycopg's execute() takes it: %(name)s for $n."""
    sql = statement.sql
    for n, name in reversed(list(enumerate(statement.names, 1))):  # $12 before $1
        sql = sql.replace(f"${n}", f"%({name})s")
    return sql


async def measure(url: str, app_role: str) -> list[tuple[str, float]]:
    settings = Settings(
        database_url=url, jwt_secret="x" * 48, db_prepared_statements=True, db_pool_size=8
    )
    transactions = IdentityTransactions.from_settings(sqlalchemy_url(url), settings, app_role)
    store = TaskStore(transactions, USER)
    task_id = (await store.create({"title": "t", "description": None, "completed": False})).id
    identity = (app_role, USER, "10s")
    the_task = {"p_owner": USER, "p_task_id": task_id}
    connections = [
        await psycopg.AsyncConnection.connect(url, autocommit=True, prepare_threshold=5)
        for _ in range(CONNECTIONS)
    ]

    identity_values = dict(zip(IDENTITY.names, identity, strict=True))

    async def transaction(connection: Connection) -> object:
        tx = Transaction(connection, prepared.setdefault(connection, {}))
        try:
            tx.begin(IDENTITY, identity_values)
            got = tx.queue(GET, the_task)
            await tx.commit()
        except BaseException:
            await tx.discard()
            raise
        return got.rows

    prepared: dict[Connection, dict[Any, bytes]] = {}
    identity_psycopg, get_psycopg = pyformat(IDENTITY), pyformat(GET)

    async def psycopg_pipeline(connection: Connection) -> object:
        async with connection.pipeline():
            await connection.execute("BEGIN")
            await connection.execute(identity_psycopg, identity_values)
            cursor = await connection.execute(get_psycopg, the_task)
            await connection.execute("COMMIT")
        return await cursor.fetchall()

    get_params = [str(the_task[name]).encode() for name in GET.names]
    identity_params = [value.encode() for value in identity]
    loop = asyncio.get_running_loop()

    async def libpq(connection: Connection) -> object:
        pgconn = connection.pgconn
        pgconn.enter_pipeline_mode()
        for sql, params in (
            (b"BEGIN", None),
            (IDENTITY.sql.encode(), identity_params),
            (GET.sql.encode(), get_params),
            (b"COMMIT", None),
        ):
            pgconn.send_query_params(sql, params)
        pgconn.pipeline_sync()
        while pgconn.flush():
            await asyncio.sleep(0)
        results: list[pq.abc.PGresult] = []
        while True:
            pgconn.consume_input()
            while not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    continue
                if result.status == pq.ExecStatus.PIPELINE_SYNC:
                    pgconn.exit_pipeline_mode()
                    return results[2].get_value(0, 1)
                if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
                    raise RuntimeError(f"libpq path: {result.error_message.decode()}")  # not timed
                results.append(result)
            readable = loop.create_future()
            loop.add_reader(pgconn.socket, readable.set_result, None)
            try:
                await readable
            finally:
                loop.remove_reader(pgconn.socket)

    async def bare(connection: Connection) -> object:
        cursor = await connection.execute(get_psycopg, the_task)
        return await cursor.fetchall()

    try:
        return [
            (
                "TaskStore.get (the service's request transaction)",
                await cpu_ms_per_call(lambda: store.get(task_id)),
            ),
            (
                "service.pipeline.Transaction, held connections",
                await cpu_ms_per_call(held(connections, transaction)),
            ),
            (
                "psycopg's pipeline mode, held connections",
                await cpu_ms_per_call(held(connections, psycopg_pipeline)),
            ),
            (
                "libpq alone via psycopg.pq (lower bound)",
                await cpu_ms_per_call(held(connections, libpq)),
            ),
            ("bare statement, no transaction", await cpu_ms_per_call(held(connections, bare))),
        ]
    finally:
        for connection in connections:
            await connection.close()
        await transactions.dispose()


def main() -> int:
    server = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    with migrated_database(server.replace("postgresql+psycopg://", "postgresql://")) as database:
        figures = uvloop.run(measure(database.url, database.app_role))
    print(
        f"CPU of this process per transaction ({IN_FLIGHT} in flight, best of 3 x {TRANSACTIONS})"
    )
    for name, ms in figures:
        print(f"  {name:52s} {ms:6.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
