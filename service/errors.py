"""Every error is application/problem+json (RFC 9457), with no stack trace, SQL or token."""

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


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


class DatabaseUnavailable(Problem):
    def __init__(self, retry_after: int) -> None:
        super().__init__(
            503,
            "The database cannot be reached; try again shortly.",
            headers={"Retry-After": str(retry_after)},
        )


def problem_response(
    status: int, detail: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **extra,
    }
    return JSONResponse(
        jsonable_encoder(body), status_code=status, headers=headers, media_type=PROBLEM_JSON
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


def install_error_handlers(app: FastAPI, retry_after: int) -> None:
    @app.exception_handler(Problem)
    async def on_problem(_: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.detail, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        if _is_not_json(exc):
            return problem_response(400, "The request body is not valid JSON.")
        return problem_response(
            422, "The request does not fit the schema.", errors=_field_errors(exc)
        )

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeoutError)
    async def on_database_down(_: Request, exc: Exception) -> JSONResponse:
        log.error("database unavailable: %s", type(exc).__name__)
        problem = DatabaseUnavailable(retry_after)
        return problem_response(problem.status, problem.detail, headers=problem.headers)

    @app.exception_handler(IntegrityError)
    @app.exception_handler(DataError)
    async def on_rejected_by_database(_: Request, exc: Exception) -> JSONResponse:
        log.warning("database refused the data: %s", type(exc).__name__)
        return problem_response(422, "The database refused these values.")
