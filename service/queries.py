"""The task statements and the store that runs them.

Each statement is a SQLModel query that filters by the owner, as the row-level security policy
also does underneath. They are compiled to psycopg's SQL once, at import: a request only binds
values. `TaskStore` runs them as the caller (service.db.IdentityTransactions): one round trip
per request, two when an If-Match header must be checked against the locked row.
"""

from functools import cache
from typing import Any

from psycopg.rows import DictRow
from sqlalchemy import Executable, bindparam, insert
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlmodel import delete, select, update

from service.db import IdentityTransactions, Transaction
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
        async with self._transactions.as_user(self.owner) as tx:
            listed = await tx.queue(LIST, {"p_owner": self.owner})
        return listed.rows

    async def get(self, task_id: int) -> DictRow | None:
        async with self._transactions.as_user(self.owner) as tx:
            got = await tx.queue(GET, self._the_task(task_id))
        return first(got.rows)

    async def create(self, fields: dict[str, Any]) -> DictRow:
        values = {f"p_{name}": fields[name] for name in EDITABLE}
        async with self._transactions.as_user(self.owner) as tx:
            created = await tx.queue(CREATE, {"p_owner": self.owner, **values})
        (row,) = created.rows  # INSERT … RETURNING returns the row it wrote
        return row

    async def update(
        self, task_id: int, changes: dict[str, Any], if_match: str | None
    ) -> DictRow | None:
        """The updated task, or None when the caller has no such task."""
        sql = update_sql(tuple(sorted(changes)))
        values = {f"p_{name}": value for name, value in changes.items()}
        async with self._transactions.as_user(self.owner) as tx:
            await self._check_if_match(tx, task_id, if_match)
            updated = await tx.queue(sql, self._the_task(task_id) | values)
        return first(updated.rows)

    async def delete(self, task_id: int, if_match: str | None) -> bool:
        """Whether the caller had such a task (and now has not)."""
        async with self._transactions.as_user(self.owner) as tx:
            await self._check_if_match(tx, task_id, if_match)
            deleted = await tx.queue(DELETE, self._the_task(task_id))
        return bool(deleted.rows)

    def _the_task(self, task_id: int) -> dict[str, Any]:
        return {"p_owner": self.owner, "p_task_id": task_id}

    async def _check_if_match(self, tx: Transaction, task_id: int, if_match: str | None) -> None:
        """With If-Match, lock the row and compare in this transaction, so that the check and
        the write that follows are atomic; without it, nothing is sent (no lock, no wait)."""
        if if_match is None:
            return
        current = first(await tx.read(LOCK, self._the_task(task_id)))  # locked from here on
        if current is None:
            raise not_found()
        accepted = {candidate.strip() for candidate in if_match.split(",")}
        if "*" not in accepted and etag(current) not in accepted:
            raise Problem(412, "The task has changed since it was read; read it again.")


def first(rows: list[DictRow]) -> DictRow | None:
    return rows[0] if rows else None


def not_found() -> Problem:
    return Problem(404, "No such task.")
