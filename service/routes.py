"""The six task routes. Each query filters by the owner too; RLS enforces it underneath."""

import hashlib
from collections.abc import AsyncIterator, Iterator
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Header, Path, Request, Response, status
from sqlmodel import Session, delete, select, update

from service.auth import OwnerId
from service.db import ConnectionSlots
from service.errors import (
    BODY_PROBLEMS,
    NO_SUCH_TASK,
    PRECONDITION_FAILED,
    TASK_PROBLEMS,
    Problem,
)
from service.models import (
    TASK_EXAMPLE,
    USER_ID_MAX,
    Task,
    TaskCompletion,
    TaskCreate,
    TaskPublic,
    TaskUpdate,
)

MAX_BIGINT = 2**63 - 1

UserId = Annotated[
    str,
    Path(
        min_length=1,
        max_length=USER_ID_MAX,
        description="The caller's user id, exactly as in the token's user claim.",
        examples=["alice"],
    ),
]
TaskId = Annotated[
    int,
    Path(
        ge=1,
        le=MAX_BIGINT,
        description="The task's id.",
        examples=[1],
        json_schema_extra={"format": "int64"},
    ),
]


async def connection_slot(request: Request, owner: OwnerId) -> AsyncIterator[None]:
    """A share of the pool, awaited without a thread (503 after DB_POOL_TIMEOUT_SECONDS)."""
    slots: ConnectionSlots = request.app.state.connection_slots
    async with slots.taken():
        yield


def task_session(
    request: Request,
    owner: OwnerId,
    user_id: UserId,
    _slot: Annotated[None, Depends(connection_slot)],
) -> Iterator[Session]:
    # user_id equals owner here (path_owner made sure, with 401 and 403 first). Declaring it
    # after OwnerId is what puts its limits in the OpenAPI document, which keeps the last
    # declaration of a parameter; a path longer than 255 can never get past the 403.
    with request.app.state.db.session_for(owner) as session:
        yield session


SessionDep = Annotated[Session, Depends(task_session)]
IfMatch = Annotated[
    str | None,
    Header(
        description="Optimistic concurrency: the ETag of the task as last read. If the task has"
        " changed since, the request fails with 412 and changes nothing.",
        examples=['"3f1c0de5a9b24c7e8d6f0a1b2c3d4e5f"'],
    ),
]

ETAG_HEADER = {
    "ETag": {
        "description": "A strong validator of this task, for If-Match.",
        "required": True,
        "schema": {"type": "string"},
        "example": '"3f1c0de5a9b24c7e8d6f0a1b2c3d4e5f"',
    }
}
# What the document says beyond the signatures; the problems are in service.errors.
LISTED = {200: {"content": {"application/json": {"example": [TASK_EXAMPLE]}}}}
CREATED = {
    201: {
        "description": "The created task.",
        "headers": ETAG_HEADER
        | {
            "Location": {
                "description": "The task's URL.",
                "required": True,
                "schema": {"type": "string", "format": "uri-reference"},
                "example": "/api/alice/tasks/1",
            }
        },
    }
}

TAGGED = {200: {"headers": ETAG_HEADER}}
WRITE_PROBLEMS = BODY_PROBLEMS | NO_SUCH_TASK | PRECONDITION_FAILED

router = APIRouter(prefix="/api/{user_id}/tasks", tags=["tasks"], responses=TASK_PROBLEMS)


def not_found() -> Problem:
    return Problem(404, "No such task.")


@router.get("", response_model=list[TaskPublic], responses=LISTED)
def list_tasks(owner: OwnerId, session: SessionDep) -> list[Task]:
    """The caller's tasks, newest first."""
    query = (
        select(Task).where(Task.user_id == owner).order_by(Task.created_at.desc(), Task.id.desc())  # type: ignore[union-attr]
    )
    return list(session.exec(query).all())


@router.post(
    "",
    response_model=TaskPublic,
    status_code=status.HTTP_201_CREATED,
    responses=BODY_PROBLEMS | CREATED,
)
def create_task(
    owner: OwnerId, body: TaskCreate, session: SessionDep, request: Request, response: Response
) -> Task:
    task = Task(**body.model_dump(), user_id=owner)
    session.add(task)
    session.commit()
    tagged(response, task)
    # url_path_for does not escape: an opaque user id may hold spaces, '?' or non-ASCII.
    response.headers["Location"] = request.app.url_path_for(
        "read_task", user_id=quote(owner, safe=""), task_id=str(task.id)
    )
    return task


@router.get("/{task_id}", response_model=TaskPublic, responses=NO_SUCH_TASK | TAGGED)
def read_task(owner: OwnerId, task_id: TaskId, session: SessionDep, response: Response) -> Task:
    task = session.exec(select(Task).where(Task.id == task_id, Task.user_id == owner)).first()
    if task is None:
        raise not_found()
    return tagged(response, task)


@router.put("/{task_id}", response_model=TaskPublic, responses=WRITE_PROBLEMS | TAGGED)
def replace_task(
    owner: OwnerId,
    task_id: TaskId,
    body: TaskUpdate,
    session: SessionDep,
    response: Response,
    if_match: IfMatch = None,
) -> Task:
    """Title is required; description and completed keep their value when omitted."""
    check_if_match(session, owner, task_id, if_match)
    task = _update(session, owner, task_id, body.model_dump(exclude_unset=True))
    return tagged(response, task)


@router.patch("/{task_id}/complete", response_model=TaskPublic, responses=WRITE_PROBLEMS | TAGGED)
def complete_task(
    owner: OwnerId,
    task_id: TaskId,
    session: SessionDep,
    response: Response,
    body: TaskCompletion | None = None,
    if_match: IfMatch = None,
) -> Task:
    """Sets `completed` (true when there is no body); idempotent, never a toggle."""
    completed = body.completed if body is not None else True
    check_if_match(session, owner, task_id, if_match)
    return tagged(response, _update(session, owner, task_id, {"completed": completed}))


@router.delete(
    "/{task_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=NO_SUCH_TASK | PRECONDITION_FAILED,
)
def delete_task(
    owner: OwnerId, task_id: TaskId, session: SessionDep, if_match: IfMatch = None
) -> Response:
    check_if_match(session, owner, task_id, if_match)
    result = session.exec(delete(Task).where(Task.id == task_id, Task.user_id == owner))
    if result.rowcount == 0:
        raise not_found()
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def tagged(response: Response, task: Task) -> Task:
    response.headers["ETag"] = etag(task)
    return task


def etag(task: Task) -> str:
    """A strong validator: a digest of the task exactly as clients see it."""
    public = TaskPublic.model_validate(task).model_dump_json()
    return '"' + hashlib.sha256(public.encode()).hexdigest()[:32] + '"'


def check_if_match(session: Session, owner: str, task_id: int, if_match: str | None) -> None:
    """With If-Match, lock the row and compare in this transaction, so that the check and the
    write that follows are atomic; without it, nothing changes (one statement, no lock)."""
    if if_match is None:
        return
    current = session.exec(
        select(Task).where(Task.id == task_id, Task.user_id == owner).with_for_update()
    ).first()
    if current is None:
        raise not_found()
    accepted = {candidate.strip() for candidate in if_match.split(",")}
    if "*" not in accepted and etag(current) not in accepted:
        raise Problem(412, "The task has changed since it was read; read it again.")


def _update(session: Session, owner: str, task_id: int, changes: dict[str, object]) -> Task:
    statement = (
        update(Task)
        .where(Task.id == task_id, Task.user_id == owner)
        .values(**changes)
        .returning(Task)
    )
    task = session.exec(statement).scalar_one_or_none()
    if task is None:
        raise not_found()
    session.commit()
    return task
