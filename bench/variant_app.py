"""Service changes tried out without editing service/: `run.py --variant NAME` starts uvicorn on
`variant_app:create_app`, which patches the service before building the real app.

BENCH_VARIANTS (comma-separated) picks them:

- `implicit-transaction`: no BEGIN and no COMMIT in the pipeline. The identity and the
  statement still run in one transaction, the implicit one that PostgreSQL opens for the
  messages before a Sync and commits at the Sync: two statements fewer per request.
- `unbatched-reads`: the two reads as before `IdentityTransactions.read_as`: each its own
  request transaction (BEGIN, identity, statement, COMMIT) on a pooled connection of its own,
  instead of sharing a connection and a round trip with the reads waiting at the same moment.
- `coalesced-writes`: uvicorn's httptools protocol sends a response's head together with its
  body, in one write instead of two (a scratch patch of uvicorn's internals, for measuring
  only: it would hold back the head of a streaming response).
- `baseline`: no change, but started the way every variant is (uvicorn on this module), so
  that a pair of variants differs in nothing else.
- `no-request-middleware`: the request-log/metrics middleware (`RequestObserver`) removed. Not
  shippable (it is the access log, the metrics and the last guard against 500s): an upper bound
  for what it costs.

- `gc-off`: the cyclic garbage collector disabled in each worker (an upper bound for what its
  pauses cost; not shippable: cycles would never be freed).

- `gc-threshold`: the collector's first threshold raised from 700 to 20,000 allocations, so
  that young-generation collections run about 30 times less often.

- `raw-read-routes`: the two read routes (get one, list) served by plain Starlette routes placed
  before FastAPI's, doing the same work (token, path check, TaskStore, the same JSON and ETag)
  without FastAPI's dependency injection and parameter validation: an upper bound for what
  those cost. Not shippable: no OpenAPI, no problem documents for bad input.

- `asgi-read-lane`: the two reads answered before any layer of the app (token, path check,
  TaskStore, the same JSON, ETag, request id, access log line and metrics), anything else or
  any failure handed to the app: an upper bound for what the layers between the server and a
  route cost a read. Not shippable: a bad request would be checked twice, and nothing renders
  errors. `inner-read-lane`: the same just inside `RequestObserver`. `no-read-lane`: every
  request down the full stack (the service before `service.routes.ReadLane`).

Process-wide switches, for `bench/in_process.py` only (it turns them on for that variant's
rounds and off again): `lean-log-records` (logging's documented switches: no thread, process or
caller in the records), `access-log-off`, `metrics-off`.

Settings need no variant: `--env JWT_CACHE_SECONDS=0`, `--env DB_PREPARED_STATEMENTS=false`,
`--env DB_MAX_OVERFLOW=5` and so on. This is measurement scaffolding, not a patch to merge as
is: see bench/RESULTS.md.
"""

import gc
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.datastructures import Headers
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.app import create_app as real_create_app
from service.errors import Problem
from service.observability import Metrics, RequestObserver, new_request_id
from service.pipeline import Statement, Transaction, _Awaited
from service.queries import TaskStore
from service.routes import task_response

PER_APP = {
    "no-request-middleware",
    "raw-read-routes",
    "asgi-read-lane",
    "inner-read-lane",
    "no-read-lane",
}
KNOWN = {
    "implicit-transaction",
    "gc-off",
    "gc-threshold",
    "unbatched-reads",
    "coalesced-writes",
    "baseline",
    *PER_APP,
}


@contextmanager
def toggled(variant: str) -> Iterator[None]:
    """A process-wide variant switched on for the block (bench/in_process.py), else nothing."""
    switch = TOGGLES.get(variant)
    if switch is not None:
        switch(True)
    try:
        yield
    finally:
        if switch is not None:
            switch(False)


def _lean_log_records(on: bool) -> None:
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = not on
    logging._srcfile = None if on else SRCFILE  # type: ignore[attr-defined]


def _access_log_off(on: bool) -> None:
    logging.getLogger("service.access").disabled = on


def _metrics_off(on: bool) -> None:
    Metrics.observe = _no_observation if on else OBSERVE  # type: ignore[method-assign]


def _no_observation(self: Metrics, method: str, route: str, status: int, seconds: float) -> None:
    pass


SRCFILE = logging._srcfile  # type: ignore[attr-defined]
OBSERVE = Metrics.observe
TOGGLES: dict[str, Callable[[bool], None]] = {
    "lean-log-records": _lean_log_records,
    "access-log-off": _access_log_off,
    "metrics-off": _metrics_off,
}


def _variants() -> set[str]:
    return {v.strip() for v in os.environ.get("BENCH_VARIANTS", "").split(",") if v.strip()}


def _begin_implicitly(self: Transaction, first: Statement, params: Mapping[str, Any]) -> None:
    self._pgconn.enter_pipeline_mode()
    self._send(first, params, _Awaited.CHECKED)


async def _commit_implicitly(self: Transaction) -> None:
    await self._end_pipeline()
    if self._error is not None:
        raise self._error


async def _raw_store(request: Request) -> TaskStore | Response:
    token = request.headers.get("authorization", "").removeprefix("Bearer ")
    try:
        user = await request.app.state.verifier.verify(token)
    except Problem as problem:
        return Response(status_code=problem.status)
    if user != request.path_params["user_id"]:
        return Response(status_code=403)
    return TaskStore(request.app.state.transactions, user)


async def _raw_read(request: Request) -> Response:
    store = await _raw_store(request)
    if isinstance(store, Response):
        return store
    row = await store.get(request.path_params["task_id"])
    return Response(status_code=404) if row is None else task_response(row)


async def _raw_list(request: Request) -> Response:
    store = await _raw_store(request)
    if isinstance(store, Response):
        return store
    return Response(await store.list(), media_type="application/json")


def create_app() -> ASGIApp:
    variants = _variants()
    unknown = variants - KNOWN
    if unknown:
        raise ValueError(f"unknown BENCH_VARIANTS: {sorted(unknown)}")
    if "implicit-transaction" in variants:
        Transaction.begin = _begin_implicitly  # type: ignore[method-assign]
        Transaction.commit = _commit_implicitly  # type: ignore[method-assign]
    if "unbatched-reads" in variants:
        _unbatch_reads()
    if "coalesced-writes" in variants:
        _coalesce_response_writes()
    if "gc-off" in variants:
        gc.disable()
    if "gc-threshold" in variants:
        gc.set_threshold(20_000, *gc.get_threshold()[1:])
    app = shape(real_create_app(), variants)
    return getattr(app.state, "asgi_entry", app)  # type: ignore[no-any-return]


def _unbatch_reads() -> None:
    """The two reads as they were before IdentityTransactions.read_as: each its own request
    transaction (BEGIN, identity, statement, COMMIT) on a connection of its own."""
    from service.queries import GET, LIST, first

    async def list_(self: TaskStore) -> str:
        async with self._transactions.as_user(self.owner) as tx:
            listed = tx.queue(LIST, {"p_owner": self.owner})
        return "[" + ",".join(row["json"] for row in listed.rows) + "]"

    async def get(self: TaskStore, task_id: int) -> Any:
        async with self._transactions.as_user(self.owner) as tx:
            got = tx.queue(GET, self._the_task(task_id))
        return first(got.rows)

    TaskStore.list = list_  # type: ignore[method-assign]
    TaskStore.get = get  # type: ignore[method-assign]


class _HeldTransport:
    """Holds what is written (the status line and headers) instead of sending it."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.held = b""

    def write(self, data: bytes) -> None:
        self.held += data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def _coalesce_response_writes() -> None:
    """uvicorn's httptools protocol writes a response's head and its body in two writes:
    send them in one."""
    from uvicorn.protocols.http import httptools_impl

    base = httptools_impl.RequestResponseCycle

    class Cycle(base):  # type: ignore[misc,valid-type]
        async def send(self, message: Any) -> None:
            if message["type"] == "http.response.start" and not self.response_started:
                real, self.transport = self.transport, _HeldTransport(self.transport)
                try:
                    await super().send(message)
                finally:
                    self._held, self.transport = self.transport.held, real
                return
            held = getattr(self, "_held", b"")
            if held and message["type"] == "http.response.body":
                self._held = b""
                real = self.transport
                holder = _HeldTransport(real)
                holder.held = held
                self.transport = holder
                try:
                    await super().send(message)
                finally:
                    self.transport = real
                real.write(holder.held)
                return
            await super().send(message)

    httptools_impl.RequestResponseCycle = Cycle


READ_PATH = re.compile(r"^/api/([^/]+)/tasks(?:/([1-9][0-9]{0,17}))?$")


async def _lane_answer(state: Any, scope: Scope) -> tuple[Response, str] | None:
    """A plain read's response and user, as the service would answer it; None when the
    request is not one, or anything but a 200 would come of it (the app answers those)."""
    matched = scope["type"] == "http" and scope["method"] == "GET"
    matched = matched and READ_PATH.match(scope["path"])
    if not matched:
        return None
    token = Headers(scope=scope).get("authorization", "").removeprefix("Bearer ")
    try:
        user = await state.verifier.verify(token)
    except Problem:
        return None
    if user != matched.group(1):
        return None
    store = TaskStore(state.transactions, user)
    if matched.group(2) is None:
        return Response(await store.list(), media_type="application/json"), user
    row = await store.get(int(matched.group(2)))
    return None if row is None else (task_response(row), user)


def _read_lane(app: FastAPI) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """Reads served before any middleware, with the same token check, transaction, response,
    request id, access log and metrics; the rest (and every failure) to the app. An upper
    bound for what the middleware, routing and FastAPI layers cost a read."""

    async def lane(scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        answer = await _lane_answer(app.state, scope)
        if answer is None:
            return await app(scope, receive, send)
        response, user = answer
        request_id = new_request_id()
        response.headers["X-Request-ID"] = request_id
        scope["app"] = app
        scope.setdefault("state", {})["user_id"] = user
        await response(scope, receive, send)
        RequestObserver._record(
            scope, request_id, response.status_code, time.perf_counter() - started
        )

    return lane


class InnerReadLane:
    """Reads served just inside RequestObserver (so behind the body limits, the 500 guard, the
    access log and the metrics), skipping the exception middleware, routing and FastAPI."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = await _lane_answer(scope["app"].state, scope)
        if answer is None:
            return await self.app(scope, receive, send)
        response, user = answer
        scope.setdefault("state", {})["user_id"] = user
        await response(scope, receive, send)


def shape(app: FastAPI, variants: set[str]) -> FastAPI:
    """The variants that change one app only (bench/in_process.py builds several)."""
    if "no-read-lane" in variants:
        app.middleware_stack = app.build_middleware_stack().app  # what ReadLane hands on to
    if "inner-read-lane" in variants:
        app.add_middleware(InnerReadLane)  # outermost of the app's own: moved inward below
        app.user_middleware.append(app.user_middleware.pop(0))
    if "asgi-read-lane" in variants:
        app.state.asgi_entry = _read_lane(app)
    if "raw-read-routes" in variants:
        app.router.routes[:0] = [
            Route("/api/{user_id}/tasks/{task_id:int}", _raw_read, methods=["GET"]),
            Route("/api/{user_id}/tasks", _raw_list, methods=["GET"]),
        ]
    if "no-request-middleware" in variants:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not RequestObserver]
    return app
