"""The six task routes. Each query filters by the owner too; RLS enforces it underneath."""

from collections.abc import Iterator
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Path, Request, Response, status
from sqlmodel import Session, delete, select, update

from service.auth import OwnerId
from service.errors import Problem
from service.models import Task, TaskCompletion, TaskCreate, TaskPublic, TaskUpdate

MAX_BIGINT = 2**63 - 1


def task_session(request: Request, owner: OwnerId) -> Iterator[Session]:
    with request.app.state.db.session_for(owner) as session:
        yield session


SessionDep = Annotated[Session, Depends(task_session)]
TaskId = Annotated[int, Path(gt=0, le=MAX_BIGINT, description="The task's id.")]

router = APIRouter(prefix="/api/{user_id}/tasks", tags=["tasks"])


def not_found() -> Problem:
    return Problem(404, "No such task.")


@router.get("", response_model=list[TaskPublic])
def list_tasks(owner: OwnerId, session: SessionDep) -> list[Task]:
    """The caller's tasks, newest first."""
    query = (
        select(Task).where(Task.user_id == owner).order_by(Task.created_at.desc(), Task.id.desc())  # type: ignore[union-attr]
    )
    return list(session.exec(query).all())


@router.post("", response_model=TaskPublic, status_code=status.HTTP_201_CREATED)
def create_task(
    owner: OwnerId, body: TaskCreate, session: SessionDep, request: Request, response: Response
) -> Task:
    task = Task(**body.model_dump(), user_id=owner)
    session.add(task)
    session.commit()
    # url_path_for does not escape: an opaque user id may hold spaces, '?' or non-ASCII.
    response.headers["Location"] = request.app.url_path_for(
        "read_task", user_id=quote(owner, safe=""), task_id=str(task.id)
    )
    return task


@router.get("/{task_id}", response_model=TaskPublic)
def read_task(owner: OwnerId, task_id: TaskId, session: SessionDep) -> Task:
    task = session.exec(select(Task).where(Task.id == task_id, Task.user_id == owner)).first()
    if task is None:
        raise not_found()
    return task


@router.put("/{task_id}", response_model=TaskPublic)
def replace_task(owner: OwnerId, task_id: TaskId, body: TaskUpdate, session: SessionDep) -> Task:
    """Title is required; description and completed keep their value when omitted."""
    return _update(session, owner, task_id, body.model_dump(exclude_unset=True))


@router.patch("/{task_id}/complete", response_model=TaskPublic)
def complete_task(
    owner: OwnerId, task_id: TaskId, session: SessionDep, body: TaskCompletion | None = None
) -> Task:
    """Sets `completed` (true when there is no body); idempotent, never a toggle."""
    completed = body.completed if body is not None else True
    return _update(session, owner, task_id, {"completed": completed})


@router.delete("/{task_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_task(owner: OwnerId, task_id: TaskId, session: SessionDep) -> Response:
    result = session.exec(delete(Task).where(Task.id == task_id, Task.user_id == owner))
    if result.rowcount == 0:
        raise not_found()
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


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
