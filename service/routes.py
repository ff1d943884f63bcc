"""The six task routes. Each query filters by the owner too; RLS enforces it underneath."""

import inspect
from collections.abc import Callable, Coroutine
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Request, Response, status
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.routing import Match, request_response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.auth import BearerToken, UserId, bearer_scheme, path_owner
from service.errors import BODY_PROBLEMS, NO_SUCH_TASK, PRECONDITION_FAILED, TASK_PROBLEMS
from service.models import (
    TASK_EXAMPLE,
    TaskCompletion,
    TaskCreate,
    TaskPublic,
    TaskUpdate,
)
from service.observability import RequestObserver
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
BODY_HEADERS = (b"content-length", b"transfer-encoding")
READ_PATH = "todo_api.read_path"  # the scope key under which ReadLane hands on a read's path


class TaskRoute(APIRoute):
    """Serves a read without FastAPI's per-request dependency solving, a quarter of a read's
    CPU (bench/RESULTS.md); everything else gets FastAPI's own handler.

    A route qualifies when it is a plain async read: its endpoint takes `tasks: Tasks` and
    otherwise only values of its path declared as in PATH_TYPES, returns a Response, and the
    route adds no dependencies of its own (the two reads). When every path value is valid and
    no dependency is overridden, its handler calls `task_store` and the endpoint with what
    FastAPI would pass them: the token and path checks run exactly as in FastAPI's handler.
    Anything else goes to FastAPI's handler, so its errors, like the OpenAPI document, are
    FastAPI's. (FastAPI's own telemetry, when an OpenTelemetry provider is set up, sees no
    dependency or endpoint spans for such a read.)"""

    # Both set by get_route_handler, which FastAPI calls as it builds the route.
    plain_read: bool = False
    _in_path: frozenset[str] = frozenset()  # the path values that the endpoint takes

    def get_route_handler(self) -> Handler:
        standard = super().get_route_handler()
        self.plain_read = self._is_plain_read()
        if not self.plain_read:
            return standard
        self._in_path = frozenset(inspect.signature(self.endpoint).parameters) - {"tasks"}

        async def read(request: Request) -> Response:
            path = self.plain_read_arguments(request.path_params)
            if path is None:
                return await standard(request)
            return await self.serve_plain_read(request, path)

        return read

    def plain_read_arguments(self, path_params: dict[str, Any]) -> dict[str, Any] | None:
        """The path's values as FastAPI would pass them, or None when FastAPI's own handler
        must answer: a value it would refuse, or a dependency override (its testing hook)."""
        if not self.plain_read:
            return None
        if getattr(self.dependency_overrides_provider, "dependency_overrides", None):
            return None
        try:
            return {
                name: PATH_CHECKS[name].validate_python(path_params[name])
                for name in self.param_convertors  # not a mounting app's own path values
            }
        except ValidationError:
            return None

    async def serve_plain_read(self, request: Request, path: dict[str, Any]) -> Response:
        """`task_store` (token, then path) and the endpoint, as FastAPI would call them."""
        tasks = await task_store(request, path["user_id"], await bearer_scheme(request))
        return await self.endpoint(tasks=tasks, **{name: path[name] for name in self._in_path})

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


class ReadLane:
    """The plain reads, served from the top of the app instead of the bottom of its stack.

    On its way to a route a request passes FastAPI's and Starlette's layers: the last-resort
    500 page, the exception telemetry hook, three body-limit layers, the exception middleware,
    the router, and FastAPI's request wrapper with its two exit stacks. For a GET without a
    body that a plain read (TaskRoute) serves, none of them acts, yet together they cost a
    tenth of its CPU (bench/RESULTS.md). Such a request is answered here by the same route
    code, inside the same RequestObserver (request id, access log, metrics, the guard against
    500s) and the same two layers of exception handling as a route's (Starlette's
    `request_response` and its ExceptionMiddleware, with the app's own handlers), so its 401,
    403, 404 and 503 are the ones the full stack renders.

    Every other request goes down the full stack: any other method or route, a request that
    declares a body (the body limits would act on it), a path value FastAPI would refuse, any
    request while a dependency is overridden, and every request FastAPI's OpenTelemetry traces
    (its router names the span's route). An app given a middleware of its own gets no lane at
    all (service.app.TodoAPI), since the lane would skip it."""

    def __init__(self, api: FastAPI, app: ASGIApp) -> None:
        self.api = api
        self.app = app  # the full stack; `app` as in every ASGI middleware
        # Split as Starlette's build_middleware_stack splits them: 500 and Exception go to its
        # last-resort page, which RequestObserver's own guard stands in for here.
        handlers = {
            key: handler
            for key, handler in api.exception_handlers.items()
            if key not in (500, Exception)
        }
        routed = request_response(self._read)
        self.observed = RequestObserver(ExceptionMiddleware(routed, handlers=handlers))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            path = self._plain_read_path(scope)
        except Exception:  # an oddity in matching is the full stack's to answer
            path = None
        if path is None:
            await self.app(scope, receive, send)
            return
        scope[READ_PATH] = path
        await self.observed(scope, receive, send)

    def _plain_read_path(self, scope: Scope) -> dict[str, Any] | None:
        """The path's checked values if the request is a plain read, and then `scope` gets
        what the router adds; else None."""
        if scope["type"] != "http" or scope["method"] != "GET":
            return None
        if "fastapi.telemetry" in scope:  # FastAPI is tracing it (pinned by a test)
            return None
        if any(name in BODY_HEADERS for name, _ in scope["headers"]):
            return None
        for route in self.api.router.routes:  # the router's own rule: the first full match
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                break
        else:
            return None
        if not isinstance(route, TaskRoute):
            return None
        path = route.plain_read_arguments(child_scope["path_params"])
        if path is not None:
            scope.setdefault("router", self.api.router)
            scope.update(child_scope)
        return path

    @staticmethod
    async def _read(request: Request) -> Response:
        route: TaskRoute = request.scope["route"]
        return await route.serve_plain_read(request, request.scope[READ_PATH])


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
