"""The task table and the request/response schemas, side by side."""

import hashlib
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    ConfigDict,
    StrictBool,
    StrictStr,
    StringConstraints,
    WithJsonSchema,
    field_validator,
)
from sqlalchemy import BigInteger, Column, DateTime, FetchedValue, Identity, Text, func
from sqlmodel import Field, SQLModel

TITLE_MAX = 200
DESCRIPTION_MAX = 1000
USER_ID_MAX = 255


def documented(**keywords: Any) -> dict[str, Any]:
    """`Field(schema_extra=…)` for JSON Schema keywords that only document, such as a format."""
    return {"json_schema_extra": keywords}


def storable_text(value: str) -> str:
    # PostgreSQL text cannot hold NUL, and lone surrogates cannot be encoded as UTF-8.
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return value


Title = Annotated[
    StrictStr,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=TITLE_MAX),
    AfterValidator(storable_text),
]
Description = Annotated[
    StrictStr, StringConstraints(max_length=DESCRIPTION_MAX), AfterValidator(storable_text)
]


class Task(SQLModel, table=True):
    """One row of `task`. The migration owns the DDL; this mirrors it for the ORM."""

    __tablename__ = "task"
    # Fetch server-set columns in the INSERT/UPDATE's RETURNING clause, in the same round trip.
    __mapper_args__ = {"eager_defaults": True}

    id: int | None = Field(
        default=None, sa_column=Column(BigInteger, Identity(always=True), primary_key=True)
    )
    title: str = Field(sa_column=Column(Text, nullable=False))
    description: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    completed: bool = Field(default=False, nullable=False)
    user_id: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime | None = Field(
        default=None,
        sa_column=Column(DateTime(timezone=True), nullable=False, server_default=func.now()),
    )
    updated_at: datetime | None = Field(
        default=None,
        sa_column=Column(
            DateTime(timezone=True),
            nullable=False,
            server_default=func.now(),
            server_onupdate=FetchedValue(),
        ),
    )


class StrictInput(SQLModel):
    # Types are strict ("yes" is not a bool); server-owned fields a client sends are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class TaskCreate(StrictInput):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"title": "Buy milk", "description": "2 litres", "completed": False},
                {"title": "Call the plumber"},
            ]
        }
    )

    title: Title
    description: Description | None = None
    completed: StrictBool = False


class TaskUpdate(StrictInput):
    """PUT: title is required; optional fields that are omitted keep their value."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"title": "Buy oat milk"},
                {"title": "Buy oat milk", "description": None, "completed": True},
            ]
        }
    )

    title: Title
    description: Description | None = None
    # Documented as a plain boolean: omitting it keeps the value, but null is refused.
    completed: Annotated[StrictBool | None, WithJsonSchema({"type": "boolean"})] = None

    @field_validator("completed")
    @classmethod
    def _not_null(cls, value: bool | None) -> bool:
        # Only reached when the client sent the field: null is not a boolean.
        if value is None:
            raise ValueError("must be a boolean")
        return value


class TaskCompletion(StrictInput):
    model_config = ConfigDict(json_schema_extra={"examples": [{"completed": True}]})

    completed: StrictBool = True


TASK_EXAMPLE = {
    "id": 1,
    "title": "Buy milk",
    "description": "2 litres",
    "completed": False,
    "user_id": "alice",
    "created_at": "2026-11-22T00:05:48.922509+00:00",
    "updated_at": "2026-11-22T00:05:48.922509+00:00",
}


class TaskPublic(SQLModel):
    model_config = ConfigDict(json_schema_extra={"examples": [TASK_EXAMPLE]})

    # The lengths hold for every row: the table has the same CHECK constraints.
    id: int = Field(schema_extra=documented(format="int64"))
    title: str = Field(min_length=1, max_length=TITLE_MAX)
    description: str | None = Field(max_length=DESCRIPTION_MAX)
    completed: bool
    user_id: str = Field(min_length=1, max_length=USER_ID_MAX)
    # Rendered by PostgreSQL in UTC (always +00:00): service.queries builds the JSON.
    created_at: datetime = Field(schema_extra=documented(format="date-time"))
    updated_at: datetime = Field(schema_extra=documented(format="date-time"))


def etag_of(body: bytes) -> str:
    """A strong validator: a digest of the task exactly as clients see it."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


# --- error bodies (application/problem+json, RFC 9457), as service.errors sends them --------


class FieldError(SQLModel):
    field: str = Field(description="Where the bad value is: `body.title`, `path.task_id`, …")
    message: str


class Problem(SQLModel):
    """A problem document (RFC 9457)."""

    type: str = Field(
        description="Always `about:blank`.", schema_extra=documented(format="uri-reference")
    )
    title: str = Field(description="The status code's reason phrase.")
    status: int = Field(ge=400, le=599)
    detail: str = Field(description="What went wrong, for a person to read.")


class ValidationProblem(Problem):
    """`errors` names each field that does not fit the schema; it is absent only when the
    database itself refused the values."""

    errors: list[FieldError] = Field(default_factory=list, min_length=1)


class ReadinessProblem(Problem):
    """`problems` lists how the security posture fails; it is absent when the database
    cannot be reached at all."""

    problems: list[str] = Field(default_factory=list, min_length=1)
