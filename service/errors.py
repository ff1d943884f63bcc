"""Every error is application/problem+json (RFC 9457), with no stack trace, SQL or token."""

import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic.json_schema import models_json_schema
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlmodel import SQLModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import models

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TOO_LARGE_DETAIL = "The request body is too large."


class Problem(Exception):
    """An error the client should see, as a problem document."""

    def __init__(self, status: int, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


class Unauthorized(Problem):
    def __init__(self, detail: str, *, token_sent: bool) -> None:
        challenge = 'Bearer error="invalid_token"' if token_sent else "Bearer"
        super().__init__(401, detail, headers={"WWW-Authenticate": challenge})


# Errors from a database that answered: a timeout, a lock that could not be taken, a
# serialization failure or deadlock, a prepared statement that vanished from the connection (a
# pooler's DISCARD ALL; the next request prepares it afresh). Still 503 with Retry-After, but
# not "cannot be reached".
DATABASE_BUSY = (
    psycopg.errors.QueryCanceled,
    psycopg.errors.LockNotAvailable,
    psycopg.errors.TransactionRollback,
    psycopg.errors.InvalidSqlStatementName,
)


class DatabaseUnavailable(Problem):
    def __init__(self, retry_after: int) -> None:
        super().__init__(
            503,
            "The database cannot be reached; try again shortly.",
            headers={"Retry-After": str(retry_after)},
        )


def problem_body(status: int, detail: str, **extra: Any) -> dict[str, Any]:
    """The document: service.models.Problem, plus `errors` (422) or `problems` (/readyz)."""
    return {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **extra,
    }


def problem_response(
    status: int, detail: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(
        jsonable_encoder(problem_body(status, detail, **extra)),
        status_code=status,
        headers=headers,
        media_type=PROBLEM_JSON,
    )


def _field_errors(exc: RequestValidationError) -> list[dict[str, str]]:
    return [
        {"field": ".".join(str(part) for part in error["loc"]), "message": error["msg"]}
        for error in exc.errors()
    ]


def _is_not_json(exc: RequestValidationError) -> bool:
    # json_invalid: malformed JSON; a bytes input at ("body",): a body that was not JSON at all.
    return any(
        error["type"] == "json_invalid"
        or (tuple(error["loc"]) == ("body",) and isinstance(error.get("input"), bytes))
        for error in exc.errors()
    )


def allowed_methods(request: Request) -> str:
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods or set()
    return ", ".join(sorted(methods))


def install_error_handlers(
    app: FastAPI, retry_after: int, authorize: Callable[[Request], Awaitable[None]]
) -> None:
    """Answer every error with a problem document, and publish their schemas in /openapi.json.

    `authorize` runs the route's token and path checks: FastAPI parses a body before it runs
    dependencies, and a client must still learn 401/403 before 400/422.
    """
    _publish_problem_schemas(app)

    @app.exception_handler(Problem)
    async def on_problem(_: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.detail, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route that matched the path; RFC 9110 wants all.
            headers["Allow"] = allowed_methods(request)
        return problem_response(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        try:
            await authorize(request)
        except Problem as problem:
            return problem_response(problem.status, problem.detail, headers=problem.headers)
        if _is_not_json(exc):
            return problem_response(400, "The request body is not valid JSON.")
        return problem_response(
            422, "The request does not fit the schema.", errors=_field_errors(exc)
        )

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeoutError)
    @app.exception_handler(psycopg.OperationalError)
    @app.exception_handler(psycopg.errors.InvalidSqlStatementName)
    async def on_database_down(_: Request, exc: Exception) -> JSONResponse:
        problem = DatabaseUnavailable(retry_after)
        if isinstance(exc, DATABASE_BUSY):
            log.warning("database busy: %s", type(exc).__name__)
            detail = "The database could not finish this request in time; try again shortly."
            return problem_response(503, detail, headers=problem.headers)
        log.error("database unavailable: %s", type(exc).__name__)
        return problem_response(problem.status, problem.detail, headers=problem.headers)

    @app.exception_handler(IntegrityError)
    @app.exception_handler(DataError)
    @app.exception_handler(psycopg.IntegrityError)
    @app.exception_handler(psycopg.DataError)
    async def on_rejected_by_database(_: Request, exc: Exception) -> JSONResponse:
        log.warning("database refused the data: %s", type(exc).__name__)
        return problem_response(422, "The database refused these values.")


class TooLargeAsProblem:
    """Starlette's body limiter answers 413 in plain text, outside every handler and middleware
    FastAPI lets us add; rewrite that one response so that clients get one error format."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = False

        async def send_as_problem(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # the plain-text body of the replaced response
            if message["type"] == "http.response.start" and message["status"] == 413:
                headers = dict(message.get("headers", []))
                if not headers.get(b"content-type", b"").startswith(PROBLEM_JSON.encode()):
                    replaced = True
                    await problem_response(413, TOO_LARGE_DETAIL)(scope, receive, send)
                    return
            await send(message)

        await self.app(scope, receive, send_as_problem)


# --- the OpenAPI document: which problems each route can answer -------------------------------
# The routes' `responses=` are made of these. FastAPI documents a response `model` as
# application/json, so a problem's content refers to its schema by name instead, and
# install_error_handlers adds those schemas (service.models) to the document's components.

_REF = "#/components/schemas/{}"


def _publish_problem_schemas(app: FastAPI) -> None:
    generate = app.openapi
    problem_models = (models.Problem, models.ValidationProblem, models.ReadinessProblem)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            _, problems = models_json_schema(
                [(model, "serialization") for model in problem_models],
                ref_template=_REF.format("{model}"),
            )
            components = document.setdefault("components", {})
            schemas = components.get("schemas", {}) | problems["$defs"]
            components["schemas"] = dict(sorted(schemas.items()))
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _problem(
    description: str,
    examples: dict[str, dict[str, Any]],
    *,
    model: type[SQLModel] = models.Problem,
    headers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    content = {
        PROBLEM_JSON: {"schema": {"$ref": _REF.format(model.__name__)}, "examples": examples}
    }
    response: dict[str, Any] = {"description": description, "content": content}
    if headers:
        response["headers"] = headers
    return response


def _example(summary: str, status: int, detail: str, **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "value": problem_body(status, detail, **extra)}


def _retry_after(*, always: bool) -> dict[str, Any]:
    return {
        "Retry-After": {
            "description": "Seconds to wait before trying again.",
            "required": always,
            "schema": {"type": "integer", "minimum": 1},
            "example": 5,
        }
    }


_DATABASE_DOWN = _example("The database cannot be reached", 503, DatabaseUnavailable(5).detail)
_INVALID = "The request does not fit the schema."

BODY_PROBLEMS = {
    400: _problem(
        "The body is not JSON at all.",
        {"malformed": _example("Malformed JSON", 400, "The request body is not valid JSON.")},
    ),
    413: _problem(
        "The body is larger than MAX_BODY_BYTES (64 KiB by default); it is not read whole.",
        {"too_large": _example("A body over the limit", 413, TOO_LARGE_DETAIL)},
    ),
}
UNAUTHORIZED = {
    401: _problem(
        "No bearer token, or one that is not valid: bad signature, unknown key, algorithm not"
        " accepted, expired or not yet valid, wrong issuer or audience, no user claim.",
        {
            "missing": _example("No token", 401, "A bearer token is required."),
            "expired": _example("An expired token", 401, "The token has expired."),
        },
        headers={
            "WWW-Authenticate": {
                "description": '`Bearer`, plus `error="invalid_token"` when a token was sent'
                " (RFC 6750).",
                "required": True,
                "schema": {"type": "string"},
                "example": 'Bearer error="invalid_token"',
            }
        },
    )
}
FORBIDDEN = {
    403: _problem(
        "The token is valid but its user is not `{user_id}`. Decided before any database work.",
        {
            "other_user": _example(
                "Another user's path", 403, "This token does not belong to that user."
            )
        },
    )
}
NO_SUCH_TASK = {
    404: _problem(
        "No such task for this user; another user's task is a 404 too.",
        {"missing": _example("No such task", 404, "No such task.")},
    )
}
PRECONDITION_FAILED = {
    412: _problem(
        "`If-Match` was sent and the task has changed since: nothing was changed.",
        {
            "stale": _example(
                "A stale ETag", 412, "The task has changed since it was read; read it again."
            )
        },
    )
}
INVALID = {
    422: _problem(
        "JSON that does not fit the schema, or a task id that is not a positive 64-bit integer."
        " `errors` names each field.",
        {
            "body": _example(
                "A title that is too long",
                422,
                _INVALID,
                errors=[
                    {"field": "body.title", "message": "String should have at most 200 characters"}
                ],
            ),
            "task_id": _example(
                "A task id that is not positive",
                422,
                _INVALID,
                errors=[
                    {
                        "field": "path.task_id",
                        "message": "Input should be greater than or equal to 1",
                    }
                ],
            ),
        },
        model=models.ValidationProblem,
    )
}
UNAVAILABLE = {
    503: _problem(
        "The database, or the identity provider's keys, cannot be reached right now.",
        {
            "database": _DATABASE_DOWN,
            "keys": _example(
                "The token keys (JWKS) cannot be fetched",
                503,
                "Token keys cannot be fetched right now.",
            ),
        },
        headers=_retry_after(always=True),
    )
}

TASK_PROBLEMS = UNAUTHORIZED | FORBIDDEN | INVALID | UNAVAILABLE
"""What every task route can answer, whatever its body: token, path, database."""

READINESS_RESPONSES = {
    200: {
        "description": "The database answers and the security posture holds.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"status": {"const": "ready"}},
                    "required": ["status"],
                },
                "example": {"status": "ready"},
            }
        },
    },
    503: _problem(
        "The database cannot be reached (with `Retry-After`), or the security posture does not"
        " hold (with `problems`).",
        {
            "database": _DATABASE_DOWN,
            "posture": _example(
                "The security posture does not hold",
                503,
                "The security posture does not hold.",
                problems=["row-level security is not forced on task"],
            ),
        },
        model=models.ReadinessProblem,
        headers=_retry_after(always=False),
    ),
}
