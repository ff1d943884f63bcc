"""Behind a transaction pooler: many users, one small pool, and nobody ever sees anyone else.

The real app runs under uvicorn and connects through a real PgBouncer in `pool_mode =
transaction`, with fewer service connections than concurrent clients and fewer PgBouncer server
connections than service connections, so every server connection carries transactions of many
users one after the other. Clients interleave creates, lists, gets, puts, patches, deletes and
attempts on other users' task ids; every task in every response must be the requester's.

Underneath, a row trigger (added by the owner for this test only) logs, for every row the app
writes, the transaction's `app.current_user_id`, its effective role, its transaction id and the
server process: each must match the row's owner and the app role. The figures go to
.data/reliability/pooler.json.
"""

import asyncio
import dataclasses
import json
import random
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from service.db import make_engine
from service.settings import PROJECT_ROOT, sqlalchemy_url
from service.testing import (
    TestDatabase,
    bearer,
    live_server,
    migrated_database,
    pgbouncer,
    pgbouncer_binary,
)

FIGURES_FILE = PROJECT_ROOT / ".data" / "reliability" / "pooler.json"
REQUESTS = 10_000
# Concurrent clients, each with one keep-alive connection and one request in flight. Not more
# than the 40 tokens of the app's threadpool: a request releases its pooled connection in a
# threadpool call after its response is sent, so with more requests than tokens, all tokens can
# be held by requests waiting for a connection and the holders wait for the pool timeout (503).
CLIENTS = 40
USERS = 24
SERVICE_POOL = 4  # service connections to PgBouncer, fewer than the clients
PGBOUNCER_POOL = 2  # PgBouncer's server connections, fewer than the service's
TIME_LIMIT = 180  # seconds; the run stops issuing requests then (and the test fails)
USERS_PER_CLIENT_STEP = 4  # client n speaks for users n % 4, n % 4 + 4, ...
LIVE_TASKS = 2  # per client and user: beyond this a client deletes rather than creates

# The trigger function runs as the invoker, so `current_user` is the role the transaction
# really runs as; it hands the row to a SECURITY DEFINER function owned by the owner, so the
# app role needs no privilege on the log (functions are executable by PUBLIC by default).
LOG_DDL = """
CREATE TABLE pooler_log (
    id bigserial PRIMARY KEY,
    op text NOT NULL,
    identity text,
    actor name NOT NULL,
    tx bigint NOT NULL,
    backend integer NOT NULL,
    row_user text NOT NULL,
    title text NOT NULL
);
CREATE FUNCTION pooler_log_write(op text, actor name, row_user text, title text)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO public.pooler_log (op, identity, actor, tx, backend, row_user, title)
    VALUES (op, current_setting('app.current_user_id', true), actor, txid_current(),
            pg_backend_pid(), row_user, title)
$$;
CREATE FUNCTION pooler_log_row() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM public.pooler_log_write(TG_OP, current_user, OLD.user_id, OLD.title);
    ELSE
        PERFORM public.pooler_log_write(TG_OP, current_user, NEW.user_id, NEW.title);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER pooler_log AFTER INSERT OR UPDATE OR DELETE ON task
    FOR EACH ROW EXECUTE FUNCTION pooler_log_row();
"""

pytestmark = pytest.mark.skipif(
    pgbouncer_binary() is None,
    reason="pgbouncer is not installed (apt-get install --no-install-recommends pgbouncer)",
)


@pytest.fixture
def logged_database(server_url: str) -> Iterator[TestDatabase]:
    """A migrated database of its own whose task writes are logged by the owner's trigger."""
    with migrated_database(server_url) as database:
        with database.connect() as owner:
            owner.execute(LOG_DDL)
        yield database


class Connection:
    """One keep-alive HTTP/1.1 connection: a client that waits for each answer before it asks
    again. Far lighter than a general client, which matters with the app in the same process
    on two cores; the app sends a Content-Length with every body."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(
        self, method: str, path: str, auth: str, body: Any = None
    ) -> tuple[int, bytes]:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: {auth}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        async with asyncio.timeout(60):
            status_line = await reader.readuntil(b"\r\n")
            length, close = 0, False
            while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                elif name.lower() == "connection" and "close" in value.lower():
                    close = True
            content = await reader.readexactly(length)
        if close:
            await self.close()
        return int(status_line.split()[1]), content

    async def close(self) -> None:
        if self.streams is not None:
            writer = self.streams[1]
            self.streams = None
            writer.close()
            await writer.wait_closed()


@dataclass
class Tally:
    """What the clients did and saw; asyncio runs them on one thread, so no locks."""

    issued: int = 0
    leaks: int = 0  # a task of another user in a response
    unexpected: int = 0  # any other surprise: a status, an id, a title, a lost task
    statuses: Counter[str] = field(default_factory=Counter)  # "op status", e.g. "put 200"
    problems: list[str] = field(default_factory=list)
    tasks_seen: int = 0
    all_ids: dict[str, list[int]] = field(default_factory=dict)  # user -> ids ever created

    def expect(self, ok: bool, message: str) -> None:
        if not ok:
            if message.startswith("LEAK"):
                self.leaks += 1
            else:
                self.unexpected += 1
            if len(self.problems) < 50:
                self.problems.append(message)


def check_task(tally: Tally, user: str, task: Any, context: str) -> None:
    """A task in a response must be the requester's: user_id and the title that encodes it."""
    tally.tasks_seen += 1
    owner = task.get("user_id") if isinstance(task, dict) else None
    title = task.get("title", "") if isinstance(task, dict) else ""
    tally.expect(
        owner == user and title.startswith(f"{user}|"),
        f"LEAK: {context} as {user} returned {task!r}",
    )


async def client_loop(
    number: int,
    http: Connection,
    users: list[str],
    headers: dict[str, str],
    tally: Tally,
    deadline: float,
) -> None:
    rng = random.Random(number)
    # Each client speaks for a quarter of the users, each user through ten clients: lists stay
    # short while every user's requests still come over many connections at once.
    mine_users = users[number % USERS_PER_CLIENT_STEP :: USERS_PER_CLIENT_STEP]
    own: dict[str, list[int]] = {user: [] for user in mine_users}  # this client's live tasks
    deleted: list[tuple[str, int]] = []
    serial = 0
    while tally.issued < REQUESTS and time.monotonic() < deadline:
        tally.issued += 1
        user = rng.choice(mine_users)
        base, auth = f"/api/{user}/tasks", headers[user]
        mine = own[user]
        roll = rng.random()
        if not mine or (roll < 0.30 and len(mine) < LIVE_TASKS):
            op = "create"
        elif roll < 0.45:
            op = "list"
        elif roll < 0.60:
            op = "get"
        elif roll < 0.72:
            op = "put"
        elif roll < 0.84:
            op = "patch"
        elif roll < 0.94 or len(mine) >= LIVE_TASKS:
            op = "delete"
        elif roll < 0.97 and deleted:
            op = "get-deleted"
        elif others := [name for name in users if name != user and tally.all_ids.get(name)]:
            op = "probe"
        else:
            op = "list"

        body: Any = None
        if op == "create":
            serial += 1
            title = f"{user}|c{number}|{serial}"
            status, content = await http.request("POST", base, auth, {"title": title})
            if status == 201:
                body = json.loads(content)
                tally.expect(body.get("title") == title, f"create returned {body!r}")
                mine.append(body["id"])
                tally.all_ids.setdefault(user, []).append(body["id"])
        elif op == "list":
            status, content = await http.request("GET", base, auth)
            if status == 200:
                body = json.loads(content)
                listed = {task.get("id") for task in body}
                tally.expect(set(mine) <= listed, f"list as {user} lost {set(mine) - listed}")
        elif op in ("get", "put", "patch", "delete"):
            task_id = rng.choice(mine)
            url = f"{base}/{task_id}"
            if op == "get":
                status, content = await http.request("GET", url, auth)
            elif op == "put":
                change = {"title": f"{user}|c{number}|{task_id}|put", "description": user}
                status, content = await http.request("PUT", url, auth, change)
            elif op == "patch":
                change = {"completed": rng.random() < 0.5}
                status, content = await http.request("PATCH", f"{url}/complete", auth, change)
            else:
                status, content = await http.request("DELETE", url, auth)
                if status == 204:
                    mine.remove(task_id)
                    deleted.append((user, task_id))
            if status == 200:
                body = json.loads(content)
                tally.expect(body.get("id") == task_id, f"{op} {task_id} returned {body!r}")
        elif op == "get-deleted":  # deleted on purpose: must be a 404
            user, task_id = rng.choice(deleted)
            auth = headers[user]
            status, content = await http.request("GET", f"/api/{user}/tasks/{task_id}", auth)
        else:  # another user's task id under my own path: invisible, a 404 for every verb
            url = f"{base}/{rng.choice(tally.all_ids[rng.choice(others)])}"
            verb = rng.choice(("GET", "PUT", "DELETE", "PATCH"))
            if verb == "PUT":
                status, content = await http.request(verb, url, auth, {"title": f"{user}|x"})
            elif verb == "PATCH":
                status, content = await http.request(verb, f"{url}/complete", auth)
            else:
                status, content = await http.request(verb, url, auth)
        if status < 300 and content:
            body = body if body is not None else json.loads(content)
            for task in body if isinstance(body, list) else [body]:
                check_task(tally, user, task, op)
        elif status >= 300:
            # A problem body never carries a task; it must not name another user's data either.
            tally.expect(b'"user_id"' not in content, f"LEAK: {op} as {user}: {content[:200]!r}")
        tally.statuses[f"{op} {status}"] += 1
        expected = {"create": 201, "delete": 204, "get-deleted": 404, "probe": 404}.get(op, 200)
        tally.expect(status == expected, f"{op} as {user}: {status} {content[:200]!r}")


def pgbouncer_version() -> str:
    binary = pgbouncer_binary()
    assert binary is not None
    answer = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    return answer.stdout.splitlines()[0]


async def drive(base_url: str, users: list[str]) -> tuple[Tally, float]:
    headers = {user: bearer(user, ttl=600)["Authorization"] for user in users}
    host, port = base_url.removeprefix("http://").split(":")
    connections = [Connection(host, int(port)) for _ in range(CLIENTS)]
    tally = Tally()
    started = time.monotonic()
    try:
        await asyncio.gather(
            *(
                client_loop(n, http, users, headers, tally, started + TIME_LIMIT)
                for n, http in enumerate(connections)
            )
        )
    finally:
        for http in connections:
            await http.close()
    return tally, time.monotonic() - started


def test_interleaved_users_behind_pgbouncer_never_see_each_other(
    logged_database: TestDatabase, server_url: str
):
    users = [f"user-{n:02d}-{'x' * (n % 3)}" for n in range(USERS)]
    with pgbouncer(server_url, pool_size=PGBOUNCER_POOL) as pooler_url:
        settings = dataclasses.replace(logged_database, pooler_url=pooler_url).settings(
            db_pool_size=SERVICE_POOL,
            db_max_overflow=0,
            db_pool_timeout_seconds=60,
            log_level="WARNING",
        )
        # The default, which PgBouncer 1.18 needs: it has no prepared-statement support.
        assert settings.db_prepared_statements is False
        with live_server(settings) as base_url:
            tally, duration = asyncio.run(drive(base_url, users))

    with logged_database.connect() as owner:
        log = owner.execute(
            "SELECT op, identity, actor, tx, backend, row_user, title FROM pooler_log"
        ).fetchall()
        mixed_transactions = owner.execute(
            "SELECT tx FROM pooler_log GROUP BY tx HAVING count(DISTINCT identity) > 1"
        ).fetchall()
    wrong_identity = [
        row
        for row in log
        if row[1] != row[5] or not row[6].startswith(f"{row[5]}|") or row[2] != settings.app_db_role
    ]
    ops = Counter(row[0] for row in log)
    statuses = tally.statuses
    server_errors = sum(n for key, n in statuses.items() if key.split()[1].startswith("5"))
    completed = sum(statuses.values())
    leaks = tally.leaks
    users_by_process: dict[int, set[str]] = {}
    for row in log:
        users_by_process.setdefault(row[4], set()).add(row[5])
    figures = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "pooler": f"PgBouncer (pool_mode = transaction, default_pool_size = {PGBOUNCER_POOL})",
        "requests": completed,
        "concurrent_clients": CLIENTS,
        "users": USERS,
        "service_pool_size": SERVICE_POOL,
        "service_max_overflow": 0,
        "pgbouncer_default_pool_size": PGBOUNCER_POOL,
        "prepared_statements": settings.db_prepared_statements,
        "duration_seconds": round(duration, 2),
        "requests_per_second": round(completed / duration, 1),
        "tasks_checked_in_responses": tally.tasks_seen,
        "statuses": dict(sorted(statuses.items())),
        "server_errors": server_errors,
        "unexpected_responses": tally.unexpected,
        "logged_row_writes": len(log),
        "logged_transactions": len({row[3] for row in log}),
        "server_processes_seen": len(users_by_process),
        "users_written_per_server_process": sorted(map(len, users_by_process.values())),
        "response_leaks_found": leaks,
        "identity_mismatches_found": len(wrong_identity) + len(mixed_transactions),
        "pgbouncer": pgbouncer_version(),
    }
    FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
    FIGURES_FILE.write_text(json.dumps(figures, indent=2) + "\n")
    print(
        f"\nbehind PgBouncer (transaction mode): {completed} requests from {CLIENTS} clients "
        f"as {USERS} users in {duration:.1f} s ({completed / duration:.0f}/s); service pool "
        f"{SERVICE_POOL}+0, PgBouncer pool {PGBOUNCER_POOL}, "
        f"{figures['server_processes_seen']} server processes; "
        f"{tally.tasks_seen} tasks in responses checked, {len(log)} row writes in "
        f"{figures['logged_transactions']} transactions checked; leaks found: "
        f"{leaks + len(wrong_identity) + len(mixed_transactions)}; 5xx: {server_errors}"
    )
    print(f"statuses: {dict(sorted(statuses.items()))}")

    assert tally.problems == []
    assert wrong_identity == []
    assert mixed_transactions == []
    assert server_errors == 0
    assert completed >= REQUESTS, f"only {completed} requests in {TIME_LIMIT} s"
    # The log saw every write the API reported, and nothing else.
    updates = statuses["put 200"] + statuses["patch 200"]
    assert ops == Counter(
        {"INSERT": statuses["create 201"], "UPDATE": updates, "DELETE": statuses["delete 204"]}
    )
    # Fewer server processes than service connections: they were shared between users.
    assert figures["server_processes_seen"] <= PGBOUNCER_POOL


@pytest.mark.parametrize("prepared", [False, True], ids=["default-off", "on"])
def test_prepared_statements_setting_behind_pgbouncer(database: TestDatabase, prepared: bool):
    """Off (the default), nothing is prepared and any PgBouncer works. On, PgBouncer before 1.21
    hands a connection's next transaction to a server connection where psycopg's statement was
    prepared by another client: `prepared statement "_pg3_0" already exists`."""
    version = pgbouncer_version()
    supports_prepared = tuple(int(part) for part in version.split()[-1].split(".")[:2]) >= (1, 21)
    if prepared and supports_prepared:
        pytest.skip(f"{version} may support prepared statements (max_prepared_statements)")
    with pgbouncer(database.server_url, pool_size=2) as pooler_url:
        settings = dataclasses.replace(database, pooler_url=pooler_url).settings(
            db_prepared_statements=prepared, db_pool_size=6, db_max_overflow=0
        )
        engine = make_engine(sqlalchemy_url(settings.database_url), settings)
        errors: Counter[str] = Counter()
        try:
            connections = [engine.connect() for _ in range(6)]  # six clients, two servers
            for n in range(120):
                connection = connections[n % len(connections)]
                try:
                    assert connection.execute(text("SELECT :n + 1"), {"n": n}).scalar() == n + 1
                    connection.commit()
                except DBAPIError as error:
                    errors[type(error.orig).__name__] += 1
                    connection.rollback()
            for connection in connections:
                connection.close()
        finally:
            engine.dispose()
    if prepared:
        assert errors and set(errors) <= {"DuplicatePreparedStatement", "InvalidSqlStatementName"}
    else:
        assert errors == Counter()
