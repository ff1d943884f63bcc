"""The task statements and the store that runs them.

Each statement is a SQLModel query that filters by the owner, as the row-level security policy
also does underneath. They are compiled once, at import, with numbered parameters: a request
only binds values. `TaskStore` runs them as the caller (service.db.IdentityTransactions): one
round trip per request (the reads share theirs with other reads waiting at the same moment),
two when an If-Match header must be checked against the locked row.

PostgreSQL renders each task as the JSON clients get (`row_to_json` over exactly TaskPublic's
fields, timestamps as RFC 3339 text in UTC), as PostgREST does: the service passes the text
through instead of building rows, validating and serializing them again in Python.
"""

from functools import cache
from typing import Any, NamedTuple

from sqlalchemy import (
    ColumnElement,
    Executable,
    FromClause,
    Select,
    Text,
    bindparam,
    cast,
    func,
    insert,
    literal_column,
    true,
)
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlmodel import delete, select, update

from service.db import IdentityTransactions
from service.errors import Problem
from service.models import Task, TaskPublic, etag_of
from service.pipeline import Row, Statement, Transaction

# Numbered parameters, as libpq takes them (service.pipeline.Transaction sends them).
DIALECT = PGDialect_psycopg(paramstyle="numeric_dollar")
TASK = Task.__table__  # type: ignore[attr-defined]
EDITABLE = ("title", "description", "completed")
TIMESTAMPS = ("created_at", "updated_at")
RFC3339_UTC = literal_column("""'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'""")

# Bound parameters are prefixed: a bindparam may not share its name with a column it sets.
OWNER = bindparam("p_owner", type_=TASK.c.user_id.type)
TASK_ID = bindparam("p_task_id", type_=TASK.c.id.type)
IS_OWNERS = Task.user_id == OWNER
IS_THE_TASK = (Task.id == TASK_ID, IS_OWNERS)


def compiled(statement: Executable) -> Statement:
    sql = statement.compile(dialect=DIALECT)
    return Statement(str(sql), tuple(sql.positiontup or ()))


def utc_text(timestamp: ColumnElement[Any]) -> ColumnElement[str]:
    """RFC 3339 in UTC with all six digits of microseconds, whatever the session's TimeZone."""
    return func.to_char(func.timezone(literal_column("'UTC'"), timestamp), RFC3339_UTC)


def with_json(rows: FromClause) -> Select[Any]:
    """Each row's id and its JSON as clients see it: TaskPublic's fields, made by a LATERAL
    projection of the row, so that WHERE and ORDER BY still work on the table's columns."""
    fields = [
        utc_text(rows.c[name]).label(name) if name in TIMESTAMPS else rows.c[name]
        for name in TaskPublic.model_fields
    ]
    public = select(*fields).correlate(rows).lateral("task_public")
    as_text = cast(func.row_to_json(public.table_valued()), Text)  # psycopg would parse json
    return select(rows.c.id, as_text.label("json")).select_from(rows.join(public, true()))


def written(statement: Any) -> Select[Any]:
    """An INSERT or UPDATE … RETURNING, with the JSON of the rows it wrote."""
    return with_json(statement.returning(*TASK.c).cte("written"))


LIST = compiled(
    with_json(TASK).where(IS_OWNERS).order_by(TASK.c.created_at.desc(), TASK.c.id.desc())
)
GET = compiled(with_json(TASK).where(*IS_THE_TASK))
LOCK = compiled(with_json(TASK).where(*IS_THE_TASK).with_for_update(of=TASK))
CREATE = compiled(
    written(
        insert(Task).values(
            {name: bindparam(f"p_{name}") for name in EDITABLE} | {"user_id": OWNER}
        )
    )
)
DELETE = compiled(delete(Task).where(*IS_THE_TASK).returning(Task.id))


@cache
def update_sql(columns: tuple[str, ...]) -> Statement:
    """UPDATE of exactly these columns (PUT keeps omitted fields), compiled once per set."""
    unknown = set(columns) - set(EDITABLE)
    if unknown:
        raise ValueError(f"not editable: {sorted(unknown)}")
    return compiled(
        written(
            update(Task)
            .where(*IS_THE_TASK)
            .values({name: bindparam(f"p_{name}") for name in columns})
        )
    )


class PublicTask(NamedTuple):
    """A task as clients see it: its id, and its JSON exactly as sent (the response body)."""

    id: int
    body: bytes

    @property
    def etag(self) -> str:
        return etag_of(self.body)


class TaskStore:
    """The caller's tasks. Every method is one transaction as the caller."""

    def __init__(self, transactions: IdentityTransactions, owner: str) -> None:
        self._transactions = transactions
        self.owner = owner

    async def list(self) -> str:
        """The caller's tasks as a JSON array, newest first."""
        listed = await self._transactions.read_as(self.owner, LIST, {"p_owner": self.owner})
        return "[" + ",".join(row["json"] for row in listed) + "]"

    async def get(self, task_id: int) -> PublicTask | None:
        return first(await self._transactions.read_as(self.owner, GET, self._the_task(task_id)))

    async def create(self, fields: dict[str, Any]) -> PublicTask:
        values = {f"p_{name}": fields[name] for name in EDITABLE}
        async with self._transactions.as_user(self.owner) as tx:
            created = tx.queue(CREATE, {"p_owner": self.owner, **values})
        (row,) = created.rows  # INSERT … RETURNING returns the row it wrote
        return public_task(row)

    async def update(
        self, task_id: int, changes: dict[str, Any], if_match: str | None
    ) -> PublicTask | None:
        """The updated task, or None when the caller has no such task."""
        sql = update_sql(tuple(sorted(changes)))
        values = {f"p_{name}": value for name, value in changes.items()}
        async with self._transactions.as_user(self.owner) as tx:
            await self._check_if_match(tx, task_id, if_match)
            updated = tx.queue(sql, self._the_task(task_id) | values)
        return first(updated.rows)

    async def delete(self, task_id: int, if_match: str | None) -> bool:
        """Whether the caller had such a task (and now has not)."""
        async with self._transactions.as_user(self.owner) as tx:
            await self._check_if_match(tx, task_id, if_match)
            deleted = tx.queue(DELETE, self._the_task(task_id))
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
        if "*" not in accepted and current.etag not in accepted:
            raise Problem(412, "The task has changed since it was read; read it again.")


def public_task(row: Row) -> PublicTask:
    return PublicTask(row["id"], row["json"].encode())


def first(rows: list[Row]) -> PublicTask | None:
    return public_task(rows[0]) if rows else None


def not_found() -> Problem:
    return Problem(404, "No such task.")
