"""The FastAPI application: start-up (fail closed), health, logging, routes."""

import gc
import json
import logging
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager

from fastapi import FastAPI, Request, Response
from pydantic import SecretStr
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.types import ASGIApp

from service import embedded
from service.auth import TokenVerifier, authorize_request
from service.db import (
    Database,
    IdentityTransactions,
    make_engine,
    run_migrations,
)
from service.errors import (
    READINESS_RESPONSES,
    DatabaseUnavailable,
    TooLargeAsProblem,
    install_error_handlers,
    problem_response,
)
from service.logs import configure_logging
from service.observability import Metrics, RequestObserver, metrics_endpoint
from service.posture import Posture, check_posture
from service.routes import ReadLane, task_router
from service.settings import Settings, get_settings, masked, sqlalchemy_url

log = logging.getLogger("service")


class UnsafePosture(RuntimeError):
    def __init__(self, posture: Posture) -> None:
        super().__init__("refusing to serve: " + "; ".join(posture.problems))


def prepare_embedded(settings: Settings, stack: ExitStack) -> Settings:
    """Start the embedded PostgreSQL, migrate it, and fill in what the settings lack."""
    server, url = embedded.start(settings.data_dir)
    stack.callback(embedded.release, server)
    run_migrations(url, settings.app_db_role)
    update: dict[str, object] = {"database_url": SecretStr(url)}
    if settings.jwt_secret is None and not settings.jwt_jwks_url:
        update["jwt_secret"] = SecretStr(embedded.jwt_secret(settings.data_dir))
    return settings.model_copy(update=update)


def read_posture(db: Database) -> Posture:
    with db.engine.connect() as conn:
        posture = check_posture(conn, db.app_role)
        conn.rollback()
    return posture


def freeze_what_start_up_made() -> None:
    """Move every object alive after start-up (modules, the app, its schemas: most of the
    heap) out of the garbage collector's sight. They live as long as the process, and a full
    collection would otherwise walk all of them again and again, pausing every request in
    flight for tens of milliseconds (bench/RESULTS.md)."""
    gc.collect()
    gc.freeze()


class TodoAPI(FastAPI):
    def build_middleware_stack(self) -> ASGIApp:
        stack = TooLargeAsProblem(super().build_middleware_stack())
        if [middleware.cls for middleware in self.user_middleware] != [RequestObserver]:
            return stack  # the read lane would skip a middleware added since create_app
        return ReadLane(self, stack)


def create_app(settings: Settings | None = None) -> FastAPI:
    base_settings = settings or get_settings()
    configure_logging(base_settings.log_level, base_settings.log_format)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with ExitStack() as stack:
            current = base_settings
            if current.embedded:
                current = prepare_embedded(current, stack)
            current.check_auth_config()
            assert current.database_url is not None
            url = sqlalchemy_url(current.database_url)
            # Posture checks and readiness, off the hot path: two, so probes do not queue.
            db = Database(make_engine(url, current, pool_size=2), current.app_db_role)
            stack.callback(db.dispose)
            app.state.metrics.watch(db.engine)
            posture = read_posture(db)
            if not posture.ok:
                raise UnsafePosture(posture)
            transactions = IdentityTransactions.from_settings(
                url, current, current.app_db_role, on_error=app.state.metrics.count_db_error
            )
            log.info("serving tasks from %s as role %s", masked(url), current.app_db_role)
            app.state.db = db
            app.state.transactions = transactions
            app.state.verifier = TokenVerifier(current)
            freeze_what_start_up_made()
            try:
                yield
            finally:
                await transactions.dispose()

    app = TodoAPI(
        title="todo-api",
        summary="A multi-user task API in which PostgreSQL row-level security keeps users apart.",
        version="1.0.0",
        lifespan=lifespan,
        # Larger bodies get 413 as soon as the count passes the limit, never read whole.
        max_body_size=base_settings.max_body_bytes,
    )
    app.state.retry_after = base_settings.retry_after_seconds
    install_error_handlers(app, base_settings.retry_after_seconds, authorize_request)
    app.state.metrics = Metrics(app)
    app.add_middleware(RequestObserver)
    # Joined to the app's own routes rather than included: FastAPI 0.165 matches an included
    # router's routes twice per request (bench/RESULTS.md), and a 405's Allow header lists the
    # methods of the app's own routes. Nothing is lost: the app adds no prefix, dependencies
    # or responses of its own, and the routes take their dependency overrides from the app.
    app.router.routes.extend(task_router(app).routes)
    app.add_api_route("/healthz", healthz, methods=["GET"], tags=["operations"])
    app.add_api_route(
        "/readyz", readyz, methods=["GET"], tags=["operations"], responses=READINESS_RESPONSES
    )
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    return app


async def healthz() -> dict[str, str]:
    """The process is alive. No database work."""
    return {"status": "ok"}


def readyz(request: Request) -> Response:
    """The database answers and the security posture holds."""
    db: Database = request.app.state.db
    try:
        posture = read_posture(db)
    except (OperationalError, PoolTimeoutError):
        unavailable = DatabaseUnavailable(request.app.state.retry_after)
        return problem_response(503, unavailable.detail, headers=unavailable.headers)
    if not posture.ok:
        return problem_response(
            503, "The security posture does not hold.", problems=posture.problems
        )
    return Response(json.dumps({"status": "ready"}), media_type="application/json")
