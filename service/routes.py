"""The six task routes. Each query filters by the owner too; RLS enforces it underneath."""

import inspect
from collections.abc import Callable, Coroutine
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Request, Response, status
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError

from service.auth import BearerToken, UserId, bearer_scheme, path_owner
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

# What a task route's path holds, checked with the very declarations FastAPI checks with.
PATH_TYPES: dict[str, Any] = {"user_id": UserId, "task_id": TaskId}
PATH_CHECKS = {name: TypeAdapter(declared) for name, declared in PATH_TYPES.items()}
Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class TaskRoute(APIRoute):
    """Serves a read without FastAPI's per-request dependency solving, a quarter of a read's
    CPU (bench/RESULTS.md); everything else gets FastAPI's own handler.

    A route qualifies when it is a plain async read: its endpoint takes `tasks: Tasks` and
    otherwise only values of its path declared as in PATH_TYPES, returns a Response, and the
    route adds no dependencies of its own (the two reads). When every path value is valid and
    no dependency is overridden, its handler calls `task_store` and the endpoint with what
    FastAPI would pass them: the token and path checks run exactly as in FastAPI's handler.
    Anything else goes to FastAPI's handler, so its errors, like the OpenAPI document, are
    FastAPI's. (FastAPI's own telemetry hooks, which the service does not configure, see no
    dependency or endpoint spans for such a read.)"""

    def get_route_handler(self) -> Handler:
        standard = super().get_route_handler()
        if not self._is_plain_read():
            return standard
        endpoint, overrides = self.endpoint, self.dependency_overrides_provider
        path_arguments = set(inspect.signature(endpoint).parameters) - {"tasks"}

        async def read(request: Request) -> Response:
            if getattr(overrides, "dependency_overrides", None):
                return await standard(request)
            try:
                path = {
                    name: PATH_CHECKS[name].validate_python(value)
                    for name, value in request.path_params.items()
                }
            except ValidationError:
                return await standard(request)
            tasks = await task_store(request, path["user_id"], await bearer_scheme(request))
            return await endpoint(tasks=tasks, **{name: path[name] for name in path_arguments})

        return read

    def _is_plain_read(self) -> bool:
        signature = inspect.signature(self.endpoint)
        declared = {name: parameter.annotation for name, parameter in signature.parameters.items()}
        takes_tasks = declared.pop("tasks", None) == Tasks
        in_path = set(self.param_convertors)
        return (
            inspect.iscoroutinefunction(self.endpoint)
            and signature.return_annotation is Response
            and not self.dependencies
            and takes_tasks
            and in_path <= PATH_TYPES.keys()
            and all(name in in_path and PATH_TYPES[name] == kind for name, kind in declared.items())
        )


def task_response(task: PublicTask, status_code: int = 200, **headers: str) -> Response:
    headers["ETag"] = task.etag
    return Response(task.body, status_code, headers, media_type="application/json")


async def list_tasks(tasks: Tasks) -> Response:
    """The caller's tasks, newest first."""
    return Response(await tasks.list(), media_type="application/json")


async def create_task(body: TaskCreate, tasks: Tasks, request: Request) -> Response:
    task = await tasks.create(body.model_dump())
    # url_path_for does not escape: an opaque user id may hold spaces, '?' or non-ASCII.
    location = request.app.url_path_for(
        "read_task", user_id=quote(tasks.owner, safe=""), task_id=str(task.id)
    )
    return task_response(task, status.HTTP_201_CREATED, Location=location)


async def read_task(task_id: TaskId, tasks: Tasks) -> Response:
    return task_response(found(await tasks.get(task_id)))


async def replace_task(
    task_id: TaskId, body: TaskUpdate, tasks: Tasks, if_match: IfMatch = None
) -> Response:
    """Title is required; description and completed keep their value when omitted."""
    changes = body.model_dump(exclude_unset=True)
    return task_response(found(await tasks.update(task_id, changes, if_match)))


async def complete_task(
    task_id: TaskId,
    tasks: Tasks,
    body: TaskCompletion | None = None,
    if_match: IfMatch = None,
) -> Response:
    """Sets `completed` (true when there is no body); idempotent, never a toggle."""
    completed = body.completed if body is not None else True
    return task_response(found(await tasks.update(task_id, {"completed": completed}, if_match)))


async def delete_task(task_id: TaskId, tasks: Tasks, if_match: IfMatch = None) -> Response:
    if not await tasks.delete(task_id, if_match):
        raise not_found()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def found(task: PublicTask | None) -> PublicTask:
    if task is None:
        raise not_found()
    return task


def task_router(app: FastAPI) -> APIRouter:
    """The six routes, built for one app: FastAPI binds a route to the app whose
    `dependency_overrides` it honours when the route is made."""
    router = APIRouter(
        prefix="/api/{user_id}/tasks",
        tags=["tasks"],
        responses=TASK_PROBLEMS,
        route_class=TaskRoute,
        dependency_overrides_provider=app,
    )
    one = "/{task_id}"
    add = router.add_api_route
    add("", list_tasks, methods=["GET"], response_model=list[TaskPublic], responses=LISTED)
    add(
        "",
        create_task,
        methods=["POST"],
        response_model=TaskPublic,
        status_code=status.HTTP_201_CREATED,
        responses=BODY_PROBLEMS | CREATED,
    )
    add(one, read_task, methods=["GET"], response_model=TaskPublic, responses=NO_SUCH_TASK | TAGGED)
    add(
        one,
        replace_task,
        methods=["PUT"],
        response_model=TaskPublic,
        responses=WRITE_PROBLEMS | TAGGED,
    )
    add(
        f"{one}/complete",
        complete_task,
        methods=["PATCH"],
        response_model=TaskPublic,
        responses=WRITE_PROBLEMS | TAGGED,
    )
    add(
        one,
        delete_task,
        methods=["DELETE"],
        status_code=status.HTTP_204_NO_CONTENT,
        responses=NO_SUCH_TASK | PRECONDITION_FAILED,
    )
    return router
