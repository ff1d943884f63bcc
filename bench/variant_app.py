"""Service changes tried out without editing service/: `run.py --variant NAME` starts uvicorn on
`variant_app:create_app`, which patches the service before building the real app.

BENCH_VARIANTS (comma-separated) picks them:

- `implicit-transaction`: no BEGIN and no COMMIT in the pipeline. The identity and the
  statement still run in one transaction, the implicit one that PostgreSQL opens for the
  messages before a Sync and commits at the Sync: two statements fewer per request.
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

Settings need no variant: `--env JWT_CACHE_SECONDS=0`, `--env DB_PREPARED_STATEMENTS=false`,
`--env DB_MAX_OVERFLOW=5` and so on. This is measurement scaffolding, not a patch to merge as
is: see bench/RESULTS.md.
"""

import gc
import os
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.routing import Route

from service.app import create_app as real_create_app
from service.errors import Problem
from service.observability import RequestObserver
from service.pipeline import Statement, Transaction, _Awaited
from service.queries import TaskStore
from service.routes import task_response

KNOWN = {
    "implicit-transaction",
    "no-request-middleware",
    "gc-off",
    "gc-threshold",
    "raw-read-routes",
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


def create_app() -> FastAPI:
    variants = _variants()
    unknown = variants - KNOWN
    if unknown:
        raise ValueError(f"unknown BENCH_VARIANTS: {sorted(unknown)}")
    if "implicit-transaction" in variants:
        Transaction.begin = _begin_implicitly  # type: ignore[method-assign]
        Transaction.commit = _commit_implicitly  # type: ignore[method-assign]
    if "gc-off" in variants:
        gc.disable()
    if "gc-threshold" in variants:
        gc.set_threshold(20_000, *gc.get_threshold()[1:])
    app = real_create_app()
    if "raw-read-routes" in variants:
        app.router.routes[:0] = [
            Route("/api/{user_id}/tasks/{task_id:int}", _raw_read, methods=["GET"]),
            Route("/api/{user_id}/tasks", _raw_list, methods=["GET"]),
        ]
    if "no-request-middleware" in variants:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not RequestObserver]
    return app
