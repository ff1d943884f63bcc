"""Operations: one structured log line per request, request ids, Prometheus metrics.

How log lines are written is in service.logs."""

import asyncio
import logging
import random
import re
import time
from collections.abc import Iterator

from fastapi import FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, event
from sqlalchemy.engine import ExceptionContext
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import problem_response

log = logging.getLogger("service")
access_log = logging.getLogger("service.access")

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
HTTP_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


# --- metrics -------------------------------------------------------------------------------


class PoolCollector(Collector):
    """Connections in use and idle, read from the pool at scrape time."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterator[GaugeMetricFamily]:
        transactions = getattr(self.app.state, "transactions", None)
        family = GaugeMetricFamily(
            "todo_db_pool_connections",
            "Pooled database connections that serve task requests, by state.",
            labels=["state"],
        )
        if transactions is not None:
            pool = transactions.engine.pool
            family.add_metric(["in_use"], pool.checkedout())
            family.add_metric(["idle"], pool.checkedin())
        yield family


class Metrics:
    """One registry per app, so several apps (tests, workers) never collide."""

    def __init__(self, app: FastAPI) -> None:
        self.registry = CollectorRegistry()
        labels = ["method", "route", "status"]
        self.requests = Counter(
            "todo_http_requests", "HTTP requests.", labels, registry=self.registry
        )
        self.latency = Histogram(
            "todo_http_request_duration_seconds",
            "HTTP request latency.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.db_errors = Counter(
            "todo_db_errors", "Database errors by kind.", ["kind"], registry=self.registry
        )
        self.registry.register(PoolCollector(app))
        # Each labelled series, once looked up: `labels()` validates and locks on every call.
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def watch(self, engine: Engine) -> None:
        @event.listens_for(engine, "handle_error")
        def count_error(context: ExceptionContext) -> None:
            self.count_db_error(context.original_exception)

    def count_db_error(self, error: BaseException) -> None:
        self.db_errors.labels(kind=type(error).__name__).inc()

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        if method not in HTTP_METHODS:
            method = "OTHER"  # h11 passes any token as a method: no series per made-up one
        series = self._series.get((method, route, status))
        if series is None:
            labels = (method, route, str(status))
            series = (self.requests.labels(*labels), self.latency.labels(*labels))
            self._series[(method, route, status)] = series
        requests, latency = series
        requests.inc()
        latency.observe(seconds)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def metrics_endpoint(request: Request) -> Response:
    """Prometheus text format."""
    metrics: Metrics = request.app.state.metrics
    return metrics.render()


# --- the request middleware ----------------------------------------------------------------


def new_request_id() -> str:
    """128 random bits as 32 hex digits, like a uuid4's hex. Not a secret, only a name for
    one request's log lines: Python's generator (reseeded in every process) is enough, and
    costs no system call as os.urandom does."""
    return f"{random.getrandbits(128):032x}"


class RequestObserver:
    """One structured line and one metric sample per request (never the token), the request id,
    and the last guard against 500s. Plain ASGI: Starlette's BaseHTTPMiddleware would wrap
    every response in a stream and a task group."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if REQUEST_ID.match(given) else new_request_id()
        status = 500
        response_started = False

        async def send_with_request_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_request_id)
        except ClientDisconnect:
            pass  # the client left: nobody to answer
        except asyncio.CancelledError:
            # The server gave up on this request at shutdown (SHUTDOWN_TIMEOUT_SECONDS). Say so,
            # rather than let the server log a stack trace and send a bare 500; the task ends
            # right after, so the cancellation is not lost.
            if not response_started:
                shutting_down = problem_response(
                    503, "The service is shutting down; try again.", headers={"Retry-After": "1"}
                )
                await shutting_down(scope, receive, send_with_request_id)
        except Exception as exc:  # a bug: answer 500 without a stack trace in body or log
            log.error("unhandled %s on %s %s", type(exc).__name__, scope["method"], scope["path"])
            if not response_started:
                response = problem_response(500, "An unexpected error occurred.")
                await response(scope, receive, send_with_request_id)
        self._record(scope, request_id, status, time.perf_counter() - started)

    @staticmethod
    def _record(scope: Scope, request_id: str, status: int, elapsed: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        scope["app"].state.metrics.observe(scope["method"], route, status, elapsed)
        fields = {
            "method": scope["method"],
            "route": route,
            "status": status,
            "duration_ms": round(elapsed * 1000, 2),
            "request_id": request_id,
            "user_id": scope.get("state", {}).get("user_id"),
        }
        access_log.info("request", extra={"fields": fields})
