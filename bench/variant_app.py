"""Service changes tried out without editing service/: `run.py --variant NAME` starts uvicorn on
`variant_app:create_app`, which patches service.db before building the real app.

BENCH_VARIANTS (comma-separated) picks them:

- `no-pre-ping`: `pool_pre_ping=False`. Saves the `SELECT 1` sent on every pool checkout; a
  connection cut while idle then fails one request instead of being replaced silently.
- `pipeline`: BEGIN, the identity `set_config`s and the transaction's first statement travel
  in one psycopg pipeline, so they cost one round trip instead of three. psycopg syncs after
  its own implicit BEGIN even in pipeline mode, so the connection is switched to autocommit for
  the task session and BEGIN is sent explicitly as the pipeline's first command; the identity
  is still one statement with bound values, and it still runs before anything else in the
  transaction (a failing set_config aborts the pipeline: the statement after it never runs).
  COMMIT / ROLLBACK stay one round trip each. Only task sessions are affected: autocommit is
  switched back off when the connection returns to the pool.
- `driver-sql-identity`: the identity statement sent with `exec_driver_sql` (a fixed SQL
  string, bound values) instead of building `select(func.set_config(...))` anew on every
  transaction, which SQLAlchemy must construct and look up in its compiled cache each time.
- `no-request-middleware`: the request-log/metrics middleware (`RequestObserver`) removed. Not
  shippable (it is the access log, the metrics and the last guard against 500s): an upper bound
  for what it costs. (It was measured when it was still a BaseHTTPMiddleware; it has since been
  rewritten as plain ASGI.)

This is measurement scaffolding, not a patch to merge as is: see bench/RESULTS.md.
"""

import os
from contextlib import AbstractContextManager
from typing import Any

from fastapi import FastAPI
from sqlalchemy import Connection, Engine, event
from sqlalchemy.orm import SessionTransaction
from sqlmodel import Session

import service.db
from service.app import create_app as real_create_app
from service.db import IDENTITY_KEY, Identity
from service.observability import RequestObserver

PIPELINE_KEY = "bench_pipeline"
IDENTITY_SQL = "SELECT set_config('role', %s, true), set_config('app.current_user_id', %s, true)"


def _variants() -> set[str]:
    return {v.strip() for v in os.environ.get("BENCH_VARIANTS", "").split(",") if v.strip()}


def _bind_identity_pipelined(
    session: Session, _tx: SessionTransaction, connection: Connection
) -> None:
    identity = session.info.get(IDENTITY_KEY)
    if not isinstance(identity, Identity):
        raise RuntimeError("refusing to begin a task transaction without an identity")
    raw: Any = connection.connection.dbapi_connection
    raw.autocommit = True  # psycopg must not send (and sync) its own BEGIN
    pipeline = raw.pipeline()
    pipeline.__enter__()
    connection.info[PIPELINE_KEY] = pipeline
    raw.execute("BEGIN")
    raw.execute(IDENTITY_SQL, (identity.role, identity.user_id))


def _bind_identity_driver_sql(
    session: Session, _tx: SessionTransaction, connection: Connection
) -> None:
    identity = session.info.get(IDENTITY_KEY)
    if not isinstance(identity, Identity):
        raise RuntimeError("refusing to begin a task transaction without an identity")
    connection.exec_driver_sql(IDENTITY_SQL, (identity.role, identity.user_id))


def _flush_pipeline(conn: Connection, *_: Any) -> None:
    pipeline: AbstractContextManager[Any] | None = conn.info.pop(PIPELINE_KEY, None)
    if pipeline is not None:
        pipeline.__exit__(None, None, None)  # sync: one round trip, raises what failed


def _watch_engine(engine: Engine) -> None:
    # After the first statement is queued, sync before SQLAlchemy reads its description.
    event.listen(engine, "after_cursor_execute", _flush_pipeline)
    event.listen(engine, "commit", _flush_pipeline)
    event.listen(engine, "rollback", _flush_pipeline)

    @event.listens_for(engine, "checkin")
    def _autocommit_off(dbapi_connection: Any, _record: Any) -> None:
        if dbapi_connection is not None and not dbapi_connection.closed:
            dbapi_connection.autocommit = False


def _patch(variants: set[str]) -> None:
    known = {"no-pre-ping", "pipeline", "driver-sql-identity", "no-request-middleware"}
    unknown = variants - known
    if unknown:
        raise ValueError(f"unknown BENCH_VARIANTS: {sorted(unknown)}")
    original = service.db.create_engine

    def create_engine(*args: Any, **kwargs: Any) -> Engine:
        if "no-pre-ping" in variants:
            kwargs["pool_pre_ping"] = False
        engine = original(*args, **kwargs)
        if "pipeline" in variants:
            _watch_engine(engine)
        return engine

    service.db.create_engine = create_engine
    if "pipeline" in variants:
        service.db.bind_identity = _bind_identity_pipelined
    elif "driver-sql-identity" in variants:
        service.db.bind_identity = _bind_identity_driver_sql


def create_app() -> FastAPI:
    variants = _variants()
    _patch(variants)
    app = real_create_app()
    if "no-request-middleware" in variants:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not RequestObserver]
    return app
