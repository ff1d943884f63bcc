"""The task table and the request/response schemas, side by side."""

from datetime import UTC, datetime
from typing import Annotated

from pydantic import (
    AfterValidator,
    ConfigDict,
    StrictBool,
    StrictStr,
    StringConstraints,
    field_serializer,
    field_validator,
)
from sqlalchemy import BigInteger, Column, DateTime, FetchedValue, Identity, Text, func
from sqlmodel import Field, SQLModel

TITLE_MAX = 200
DESCRIPTION_MAX = 1000
USER_ID_MAX = 255


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
    title: Title
    description: Description | None = None
    completed: StrictBool = False


class TaskUpdate(StrictInput):
    """PUT: title is required; optional fields that are omitted keep their value."""

    title: Title
    description: Description | None = None
    completed: StrictBool | None = None

    @field_validator("completed")
    @classmethod
    def _not_null(cls, value: bool | None) -> bool:
        # Only reached when the client sent the field: null is not a boolean.
        if value is None:
            raise ValueError("must be a boolean")
        return value


class TaskCompletion(StrictInput):
    completed: StrictBool = True


class TaskPublic(SQLModel):
    id: int
    title: str
    description: str | None
    completed: bool
    user_id: str
    created_at: datetime
    updated_at: datetime

    @field_serializer("created_at", "updated_at")
    def _as_utc(self, value: datetime) -> str:
        return value.astimezone(UTC).isoformat()
