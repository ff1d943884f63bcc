"""The task statements and the store that runs them.

Each statement is a SQLModel query that filters by the owner, as the row-level security policy
also does underneath. They are compiled to psycopg's SQL once, at import: a request only binds
values. `TaskStore` runs them as the caller (service.db.IdentityTransactions): one round trip
per request, two when an If-Match header must be checked against the locked row.
"""

from functools import cache
from typing import Any

from psycopg import AsyncConnection, AsyncCursor
from psycopg.rows import DictRow, dict_row
from sqlalchemy import Executable, bindparam, insert
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlmodel import delete, select, update

from service.db import IdentityTransactions
from service.errors import Problem
from service.models import Task, etag

DIALECT = PGDialect_psycopg()
COLUMNS = tuple(Task.__table__.columns)  # type: ignore[attr-defined]
EDITABLE = ("title", "description", "completed")

# Bound parameters are prefixed: a bindparam may not share its name with a column it sets.
OWNER = bindparam("p_owner", type_=Task.__table__.c.user_id.type)  # type: ignore[attr-defined]
TASK_ID = bindparam("p_task_id", type_=Task.__table__.c.id.type)  # type: ignore[attr-defined]
IS_OWNERS = Task.user_id == OWNER
IS_THE_TASK = (Task.id == TASK_ID, IS_OWNERS)


def compiled(statement: Executable) -> str:
    return str(statement.compile(dialect=DIALECT))


LIST = compiled(
    select(Task).where(IS_OWNERS).order_by(Task.created_at.desc(), Task.id.desc())  # type: ignore[union-attr]
)
GET = compiled(select(Task).where(*IS_THE_TASK))
LOCK = compiled(select(Task).where(*IS_THE_TASK).with_for_update())
CREATE = compiled(
    insert(Task)
    .values({name: bindparam(f"p_{name}") for name in EDITABLE} | {"user_id": OWNER})
    .returning(*COLUMNS)
)
DELETE = compiled(delete(Task).where(*IS_THE_TASK).returning(Task.id))


@cache
def update_sql(columns: tuple[str, ...]) -> str:
    """UPDATE of exactly these columns (PUT keeps omitted fields), compiled once per set."""
    unknown = set(columns) - set(EDITABLE)
    if unknown:
        raise ValueError(f"not editable: {sorted(unknown)}")
    return compiled(
        update(Task)
        .where(*IS_THE_TASK)
        .values({name: bindparam(f"p_{name}") for name in columns})
        .returning(*COLUMNS)
    )


class TaskStore:
    """The caller's tasks. Every method is one transaction as the caller."""

    def __init__(self, transactions: IdentityTransactions, owner: str) -> None:
        self._transactions = transactions
        self.owner = owner

    async def list(self) -> list[DictRow]:
        async with self._transactions.as_user(self.owner) as conn:
            cursor = await _queue(conn, LIST, p_owner=self.owner)
        return await cursor.fetchall()

    async def get(self, task_id: int) -> DictRow | None:
        async with self._transactions.as_user(self.owner) as conn:
            cursor = await _queue(conn, GET, p_owner=self.owner, p_task_id=task_id)
        return await cursor.fetchone()

    async def create(self, fields: dict[str, Any]) -> DictRow:
        values = {f"p_{name}": fields[name] for name in EDITABLE}
        async with self._transactions.as_user(self.owner) as conn:
            cursor = await _queue(conn, CREATE, p_owner=self.owner, **values)
        created = await cursor.fetchone()
        assert created is not None  # INSERT … RETURNING returns the row it wrote
        return created

    async def update(
        self, task_id: int, changes: dict[str, Any], if_match: str | None
    ) -> DictRow | None:
        """The updated task, or None when the caller has no such task."""
        sql = update_sql(tuple(sorted(changes)))
        values = {f"p_{name}": value for name, value in changes.items()}
        async with self._transactions.as_user(self.owner) as conn:
            await self._check_if_match(conn, task_id, if_match)
            cursor = await _queue(conn, sql, p_owner=self.owner, p_task_id=task_id, **values)
        return await cursor.fetchone()

    async def delete(self, task_id: int, if_match: str | None) -> bool:
        """Whether the caller had such a task (and now has not)."""
        async with self._transactions.as_user(self.owner) as conn:
            await self._check_if_match(conn, task_id, if_match)
            cursor = await _queue(conn, DELETE, p_owner=self.owner, p_task_id=task_id)
        return await cursor.fetchone() is not None

    async def _check_if_match(
        self, conn: AsyncConnection[Any], task_id: int, if_match: str | None
    ) -> None:
        """With If-Match, lock the row and compare in this transaction, so that the check and
        the write that follows are atomic; without it, nothing is sent (no lock, no wait)."""
        if if_match is None:
            return
        locked = await _queue(conn, LOCK, p_owner=self.owner, p_task_id=task_id)
        current = await locked.fetchone()  # the round trip: the row is locked from here on
        if current is None:
            raise not_found()
        accepted = {candidate.strip() for candidate in if_match.split(",")}
        if "*" not in accepted and etag(current) not in accepted:
            raise Problem(412, "The task has changed since it was read; read it again.")


def not_found() -> Problem:
    return Problem(404, "No such task.")


async def _queue(conn: AsyncConnection[Any], sql: str, **params: Any) -> AsyncCursor[DictRow]:
    cursor = conn.cursor(row_factory=dict_row)
    await cursor.execute(sql, params)  # type: ignore[arg-type]  # compiled once, from SQLModel
    return cursor
