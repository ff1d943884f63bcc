"""SIGTERM: requests in flight finish, the pool closes, the embedded database stops, nothing is
left behind. `todo-api serve` runs as a real process on the embedded PostgreSQL."""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest

from service import embedded
from service.testing import free_port, postgres_processes

CONFIG_VARIABLES = ("DATABASE_URL", "DATABASE_ADMIN_URL", "JWT_SECRET", "BETTER_AUTH_SECRET")
# Every session the service opens logs its end (server-side logging only; libpq passes it on).
LOG_SESSIONS = "-c log_disconnections=on"


def todo_api_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARIABLES}
    return env | values


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under a home directory: the embedded package makes every ancestor traversable.
    parent = Path(tempfile.mkdtemp(prefix="todo-api-shutdown-", dir="/var/tmp"))
    yield parent / "pg"
    for process in postgres_processes(parent):  # only if the test failed
        process.kill()
    shutil.rmtree(parent, ignore_errors=True)


class Service:
    """`python -m service.cli serve` on the embedded database in `data_dir`."""

    def __init__(
        self, data_dir: Path, workers: int = 1, cwd: Path | None = None, **env: str
    ) -> None:
        self.env = todo_api_env(DATA_DIR=str(data_dir), PGOPTIONS=LOG_SESSIONS, **env)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = ["serve", "--port", str(self.port), "--workers", str(workers)]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *command],
            cwd=cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr = ""

    def wait_ready(self, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.communicate()[1]
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("the service never became ready")

    def token(self, user_id: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "service.cli", "token", user_id],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return result.stdout.strip()

    def wait_exit(self, seconds: float) -> int:
        _, self.stderr = self.process.communicate(timeout=seconds)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=30)


class PartialPost:
    """A POST whose headers and half its body are sent; the rest comes when `finish` is called.

    It asks `Expect: 100-continue` (as curl does for large bodies), so `wait_in_flight` can see
    the moment the application starts reading the body: the request is then surely in flight.
    """

    def __init__(self, port: int, user: str, token: str, title: str) -> None:
        body = json.dumps({"title": title}).encode()
        head = (
            f"POST /api/{user}/tasks HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\n"
            "Expect: 100-continue\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.rest = body[len(body) // 2 :]
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock.sendall(head + body[: len(body) // 2])

    def wait_in_flight(self) -> None:
        """Until the server says `100 Continue`: the application is reading the body."""
        received = b""
        while not received.endswith(b"\r\n\r\n"):
            chunk = self.sock.recv(1)
            assert chunk, f"the server closed the connection: {received!r}"
            received += chunk
        assert received == b"HTTP/1.1 100 Continue\r\n\r\n", received

    def finish(self) -> tuple[int, dict[str, str], dict[str, object]]:
        self.sock.sendall(self.rest)
        response = http.client.HTTPResponse(self.sock)
        try:
            response.begin()
            return response.status, dict(response.getheaders()), json.loads(response.read())
        finally:
            response.close()

    def read_to_end(self) -> bytes:
        """Whatever the server sends before it closes the connection."""
        chunks = []
        while chunk := self.sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.sock.close()


def wait_refused(port: int, seconds: float) -> float:
    """Poll until a new connection is refused; return how long that took."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            probe = socket.create_connection(("127.0.0.1", port), timeout=1)
        except ConnectionRefusedError:
            return time.monotonic() - started
        probe.close()
        time.sleep(0.02)
    raise AssertionError("new connections were still accepted after SIGTERM")


def sessions_closed_before_the_database_stopped(log: str) -> None:
    """The service's sessions ended before the database's shutdown began, and none was cut by
    it (a session still open then logs "terminating connection due to administrator command"
    and its disconnection after the shutdown request): the pool was closed first."""
    stop = log.index("received fast shutdown request")
    before, after = log[:stop], log[stop:]
    assert re.search(r"disconnection: .* database=todo", before)
    assert "terminating connection due to administrator command" not in log
    assert "disconnection:" not in after
    assert "database system is shut down" in after


def signals_handled_by(pid: int) -> set[int]:
    """The signals the process has a handler for (`SigCgt` in /proc: a bit per signal)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.MULTILINE)[1], 16)
    return {number for number in range(1, 65) if mask >> (number - 1) & 1}


def server_users(data_dir: Path) -> list[int]:
    """The pids on the embedded server's list of processes using it."""
    return json.loads((data_dir / ".handle_pids.json").read_text() or "[]")


def tasks_in(data_dir: Path) -> list[str]:
    """The titles stored in the embedded database (started for the look, then stopped)."""
    server, url = embedded.start(data_dir)
    try:
        with psycopg.connect(url) as conn:
            return [row[0] for row in conn.execute("SELECT title FROM task ORDER BY id")]
    finally:
        server.cleanup()


def test_sigterm_finishes_the_request_in_flight_then_stops_everything(data_dir):
    service = Service(data_dir)
    in_flight: PartialPost | None = None
    try:
        service.wait_ready()
        token = service.token("alice")
        children = psutil.Process(service.process.pid).children(recursive=True)
        assert postgres_processes(data_dir), "the embedded database should be running"

        in_flight = PartialPost(service.port, "alice", token, "finished after SIGTERM")
        in_flight.wait_in_flight()
        service.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        refused_after = wait_refused(service.port, seconds=5)
        assert service.process.poll() is None, "it must wait for the request in flight"

        status, headers, task = in_flight.finish()
        assert status == 201, task
        assert task["title"] == "finished after SIGTERM"
        assert headers["connection"] == "close"
        returncode = service.wait_exit(seconds=30)
        exited_after = time.monotonic() - signalled
    finally:
        if in_flight is not None:
            in_flight.close()
        service.kill()

    print(
        f"\nnew connections refused {refused_after:.3f} s after SIGTERM; "
        f"exited {exited_after:.3f} s after SIGTERM"
    )
    assert returncode in (0, -signal.SIGTERM), service.stderr
    assert "Traceback" not in service.stderr
    assert exited_after < 15
    assert postgres_processes(data_dir) == []
    assert not [child for child in children if child.is_running()]
    sessions_closed_before_the_database_stopped((data_dir / "log").read_text())
    assert tasks_in(data_dir) == ["finished after SIGTERM"]
    assert postgres_processes(data_dir) == []


def test_a_client_that_never_finishes_cannot_keep_the_process_alive(data_dir):
    service = Service(data_dir, SHUTDOWN_TIMEOUT_SECONDS="2")
    stalled: PartialPost | None = None
    try:
        service.wait_ready()
        stalled = PartialPost(service.port, "alice", service.token("alice"), "never sent")
        stalled.wait_in_flight()
        service.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        returncode = service.wait_exit(seconds=30)
        exited_after = time.monotonic() - signalled
        answer = stalled.read_to_end()  # the server has closed the connection
    finally:
        if stalled is not None:
            stalled.close()
        service.kill()

    print(f"\nexited {exited_after:.3f} s after SIGTERM with a stalled client (timeout 2 s)")
    assert returncode in (0, -signal.SIGTERM), service.stderr
    assert 2 <= exited_after < 2 + 10
    # Never a 201: the request was given up on, and the client is told to try again.
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 503 Service Unavailable", service.stderr
    assert b"application/problem+json" in answer and b"retry-after: 1" in answer.lower()
    assert "timeout graceful shutdown exceeded" in service.stderr
    assert "Traceback" not in service.stderr
    assert postgres_processes(data_dir) == []
    assert tasks_in(data_dir) == []


def test_two_workers_forked_from_the_cli_share_the_database_and_stop_together(data_dir):
    """`serve --workers 2` forks its workers from the CLI process, which imported the app
    first (a spawned worker's command line would be multiprocessing's `spawn_main`); both
    start on the one embedded database, and SIGTERM stops both, then the database."""
    service = Service(data_dir, workers=2)
    try:
        service.wait_ready()
        cli = psutil.Process(service.process.pid)
        workers = cli.children()
        command_lines = [cli.cmdline()] + [worker.cmdline() for worker in workers]
        handled = [signals_handled_by(worker.pid) for worker in workers]
        # Each worker is on the server's list of users, not only the CLI: were the CLI killed,
        # nothing attaching later could stop the server under them.
        users = {cli.pid, *(worker.pid for worker in workers)}
        deadline = time.monotonic() + 30  # the second worker may still be starting
        while set(server_users(data_dir)) != users and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(server_users(data_dir)) == sorted(users)
        token = {"Authorization": f"Bearer {service.token('alice')}"}
        for n in range(10):  # a new connection each: the workers accept from one socket
            created = httpx.post(
                f"{service.base}/api/alice/tasks", json={"title": f"t{n}"}, headers=token
            )
            assert created.status_code == 201, created.text
        service.process.send_signal(signal.SIGTERM)
        returncode = service.wait_exit(seconds=30)
    finally:
        service.kill()

    assert command_lines == [command_lines[0]] * 3, command_lines
    # Not the supervisor's handlers, which would only queue a SIGHUP or SIGQUIT for its loop.
    supervisor_only = {
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGTTIN,
        signal.SIGWINCH,
    }
    assert [(signal.SIGINT in h, signal.SIGTERM in h, h & supervisor_only) for h in handled] == [
        (True, True, set())
    ] * 2
    assert returncode == 0, service.stderr
    assert service.stderr.count("Application startup complete.") == 2, service.stderr
    assert service.stderr.count("Application shutdown complete.") == 2, service.stderr
    assert "Traceback" not in service.stderr
    assert not [worker for worker in workers if worker.is_running()]
    assert postgres_processes(data_dir) == []
    sessions_closed_before_the_database_stopped((data_dir / "log").read_text())
    assert tasks_in(data_dir) == [f"t{n}" for n in range(10)]


def test_sigterm_while_starting_still_stops_the_database(data_dir):
    """`serve` starts the embedded PostgreSQL while it imports the app, before uvicorn handles
    any signal: a SIGTERM then must still end with the database stopped."""
    embedded.start(data_dir)[0].cleanup()  # an existing folder: no initdb, a quick start
    service = Service(data_dir)
    try:
        while not (data_dir / "postmaster.pid").exists():
            assert service.process.poll() is None, service.process.communicate()[1]
            time.sleep(0.002)
        service.process.send_signal(signal.SIGTERM)
        returncode = service.wait_exit(seconds=30)
    finally:
        service.kill()

    assert "todo-api listening" not in service.stderr, "the signal came after start-up"
    assert returncode == 0, service.stderr
    assert postgres_processes(data_dir) == []
    assert server_users(data_dir) == []


def test_workers_brought_up_by_sighup_read_their_settings_afresh(data_dir, tmp_path):
    """SIGHUP makes uvicorn replace the workers one by one. Forked from the CLI, which read the
    settings long before, the new ones still read them as spawned ones would: a changed
    `.env` takes effect (the code they run is the one the CLI imported)."""
    dotenv = tmp_path / ".env"
    dotenv.write_text("MAX_BODY_BYTES=65536\n")
    service = Service(data_dir, workers=2, cwd=tmp_path)
    body = {"title": "t" * 200, "description": "x" * 1000}  # over 1,024 bytes as JSON
    try:
        service.wait_ready()
        token = {"Authorization": f"Bearer {service.token('alice')}"}
        tasks = f"{service.base}/api/alice/tasks"
        assert httpx.post(tasks, json=body, headers=token).status_code == 201
        cli = psutil.Process(service.process.pid)
        before = {worker.pid for worker in cli.children()}
        dotenv.write_text("MAX_BODY_BYTES=1024\n")
        service.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while {worker.pid for worker in cli.children()} & before:
            assert time.monotonic() < deadline, "the workers were not replaced"
            time.sleep(0.1)
        service.wait_ready()
        refused = [httpx.post(tasks, json=body, headers=token).status_code for _ in range(4)]
        service.process.send_signal(signal.SIGTERM)
        returncode = service.wait_exit(seconds=30)
    finally:
        service.kill()

    assert refused == [413] * 4
    assert returncode == 0, service.stderr
    assert postgres_processes(data_dir) == []
