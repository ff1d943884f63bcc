"""The six task routes. Each query filters by the owner too; RLS enforces it underneath."""

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Header, Path, Request, Response, status

from service.auth import BearerToken, UserId, path_owner
from service.errors import BODY_PROBLEMS, NO_SUCH_TASK, PRECONDITION_FAILED, TASK_PROBLEMS
from service.models import (
    TASK_EXAMPLE,
    TaskCompletion,
    TaskCreate,
    TaskPublic,
    TaskUpdate,
)
from service.queries import PublicTask, TaskStore, not_found

MAX_BIGINT = 2**63 - 1

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


async def task_store(request: Request, user_id: UserId, token: BearerToken) -> TaskStore:
    """The caller's tasks, once the token is valid (401) and names the path's user (403).
    One dependency rather than a chain of them: each level costs every request."""
    owner = await path_owner(request, user_id, token)
    return TaskStore(request.app.state.transactions, owner)


Tasks = Annotated[TaskStore, Depends(task_store)]
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


def task_response(task: PublicTask, status_code: int = 200, **headers: str) -> Response:
    headers["ETag"] = task.etag
    return Response(task.body, status_code, headers, media_type="application/json")


@router.get("", response_model=list[TaskPublic], responses=LISTED)
async def list_tasks(tasks: Tasks) -> Response:
    """The caller's tasks, newest first."""
    return Response(await tasks.list(), media_type="application/json")


@router.post(
    "",
    response_model=TaskPublic,
    status_code=status.HTTP_201_CREATED,
    responses=BODY_PROBLEMS | CREATED,
)
async def create_task(body: TaskCreate, tasks: Tasks, request: Request) -> Response:
    task = await tasks.create(body.model_dump())
    # url_path_for does not escape: an opaque user id may hold spaces, '?' or non-ASCII.
    location = request.app.url_path_for(
        "read_task", user_id=quote(tasks.owner, safe=""), task_id=str(task.id)
    )
    return task_response(task, status.HTTP_201_CREATED, Location=location)


@router.get("/{task_id}", response_model=TaskPublic, responses=NO_SUCH_TASK | TAGGED)
async def read_task(task_id: TaskId, tasks: Tasks) -> Response:
    return task_response(found(await tasks.get(task_id)))


@router.put("/{task_id}", response_model=TaskPublic, responses=WRITE_PROBLEMS | TAGGED)
async def replace_task(
    task_id: TaskId, body: TaskUpdate, tasks: Tasks, if_match: IfMatch = None
) -> Response:
    """Title is required; description and completed keep their value when omitted."""
    changes = body.model_dump(exclude_unset=True)
    return task_response(found(await tasks.update(task_id, changes, if_match)))


@router.patch("/{task_id}/complete", response_model=TaskPublic, responses=WRITE_PROBLEMS | TAGGED)
async def complete_task(
    task_id: TaskId,
    tasks: Tasks,
    body: TaskCompletion | None = None,
    if_match: IfMatch = None,
) -> Response:
    """Sets `completed` (true when there is no body); idempotent, never a toggle."""
    completed = body.completed if body is not None else True
    return task_response(found(await tasks.update(task_id, {"completed": completed}, if_match)))


@router.delete(
    "/{task_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=NO_SUCH_TASK | PRECONDITION_FAILED,
)
async def delete_task(task_id: TaskId, tasks: Tasks, if_match: IfMatch = None) -> Response:
    if not await tasks.delete(task_id, if_match):
        raise not_found()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def found(task: PublicTask | None) -> PublicTask:
    if task is None:
        raise not_found()
    return task
