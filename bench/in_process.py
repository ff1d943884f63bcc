#!/usr/bin/env python3
"""What a whole request costs the service in CPU, with no server and no socket.

    python3 bench/in_process.py [--rounds 20] [--requests 500] [--variant NAME ...]

One process, uvloop, the ASGI app called directly (middleware, routing, FastAPI, the request
transaction, the access log written to /dev/null), 16 requests in flight, reading one task or
listing one user's 20 tasks by turns. Each variant (bench/variant_app.py) is built as its own
app on the same database; the apps take turns round after round, so that the machine's drift
falls on all of them alike. Prints the median CPU per request of each and its ratio to the
first. CPU here is this process's only: PostgreSQL's is not counted. See bench/RESULTS.md.
"""

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PYTHON = BENCH.parent / ".venv" / "bin" / "python"
if __name__ == "__main__" and Path(sys.prefix).resolve() != PYTHON.parent.parent.resolve():
    os.execv(str(PYTHON), [str(PYTHON), *sys.argv])  # noqa: S606 (as run.py does)

import uvloop  # noqa: E402
from fastapi import FastAPI  # noqa: E402

sys.path.insert(0, str(BENCH))
import variant_app  # noqa: E402

from service.app import create_app  # noqa: E402
from service.logs import JsonFormatter  # noqa: E402
from service.testing import TEST_SECRET, TestDatabase, make_token, migrated_database  # noqa: E402

IN_FLIGHT = 16
USER = "bench-user"
TASKS = 20


def request_scope(path: str, token: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"bench"), (b"authorization", f"Bearer {token}".encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def call(app: FastAPI, scope: dict[str, Any]) -> int:
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    entry = getattr(app.state, "asgi_entry", app)  # a variant's own entry, if it has one
    await entry(dict(scope, state={}), receive, send)
    return status


async def seed(app: FastAPI, token: str) -> list[int]:
    ids = []
    for number in range(TASKS):
        body = f'{{"title": "task {number}"}}'.encode()
        scope = request_scope(f"/api/{USER}/tasks", token)
        scope["method"] = "POST"
        scope["headers"] = [*scope["headers"], (b"content-type", b"application/json")]
        location = b""

        async def receive(body: bytes = body) -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal location
            if message["type"] == "http.response.start":
                location = dict(message["headers"])[b"location"]

        await app(scope, receive, send)
        ids.append(int(location.rsplit(b"/", 1)[1]))
    return ids


async def cpu_ms_per_request(app: FastAPI, scopes: list[dict[str, Any]], requests: int) -> float:
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(scope: dict[str, Any]) -> None:
        async with gate:
            if await call(app, scope) != 200:
                raise SystemExit("a request failed")

    started = time.process_time()
    await asyncio.gather(*(one(scopes[n % len(scopes)]) for n in range(requests)))
    return (time.process_time() - started) * 1000 / requests


async def measure(database: TestDatabase, variants: list[str], rounds: int, requests: int) -> None:
    token = make_token(USER, secret=TEST_SECRET, ttl=3600)
    async with AsyncExitStackOfApps(database) as stack:
        apps = [await stack.start(variant) for variant in variants]
        ids = await seed(apps[0], token)
        # 70% one task, 30% the list, as the read workload.
        paths = [f"/api/{USER}/tasks/{ids[n % TASKS]}" for n in range(7)]
        scopes = [request_scope(path, token) for path in [*paths, *[f"/api/{USER}/tasks"] * 3]]
        figures: list[list[float]] = [[] for _ in variants]
        for _ in range(rounds + 1):  # the first round warms up
            for variant, app, values in zip(variants, apps, figures, strict=True):
                with variant_app.toggled(variant):
                    values.append(await cpu_ms_per_request(app, scopes, requests))
    first = statistics.median(figures[0][1:])
    print(f"CPU ms per read, median of {rounds} rounds x {requests} ({IN_FLIGHT} in flight):")
    for variant, values in zip(variants, figures, strict=True):
        median = statistics.median(values[1:])
        spread = f"{min(values[1:]):.3f}..{max(values[1:]):.3f}"
        print(f"  {variant:<28} {median:.3f}  ({spread})  x{median / first:.3f}")


class AsyncExitStackOfApps:
    """Runs each app's lifespan, as the server would, for as long as the measurement."""

    def __init__(self, database: TestDatabase) -> None:
        self.database = database
        self.lifespans: list[Any] = []

    async def start(self, variant: str) -> FastAPI:
        settings = self.database.settings(db_prepared_statements=True, log_format="json")
        app = variant_app.shape(create_app(settings), {variant} & variant_app.PER_APP)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        self.lifespans.append(lifespan)
        return app

    async def __aenter__(self) -> "AsyncExitStackOfApps":
        return self

    async def __aexit__(self, *exc: object) -> None:
        for lifespan in reversed(self.lifespans):
            await lifespan.__aexit__(None, None, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        choices=["default", *sorted(variant_app.PER_APP | variant_app.TOGGLES.keys())],
        help="repeatable; the same variant twice measures the noise",
    )
    parser.add_argument("--server-url", default=os.environ.get("TEST_DATABASE_URL"))
    args = parser.parse_args()
    server = args.server_url or "postgresql://postgres@127.0.0.1:5432/postgres"
    # The access log as in production (JSON lines), written where it costs no disk.
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
    with migrated_database(server) as database:
        uvloop.run(measure(database, ["default", *args.variant], args.rounds, args.requests))


if __name__ == "__main__":
    main()
