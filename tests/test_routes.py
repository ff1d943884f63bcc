"""Every route's success path, every status code it can return, and cross-user access."""

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import fastapi.routing
import pytest
from fastapi import Depends, FastAPI, Request, Response
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN_CONTEXT, NonRecordingSpan
from psycopg import sql
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Mount, Route

from service.app import create_app
from service.errors import Problem
from service.models import TaskPublic
from service.queries import TaskStore
from service.routes import TaskId, TaskRoute, Tasks, list_tasks, read_task, task_store
from service.testing import app_client

ALICE, BOB = "alice", "bob"
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00")
MISSING_ID = 9_000_000_000


def row(admin: Any, task_id: int) -> tuple[Any, ...] | None:
    return admin.execute(
        "SELECT title, description, completed, user_id, created_at, updated_at"
        " FROM task WHERE id = %s",
        (task_id,),
    ).fetchone()


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()
    return body


# --- success paths ---------------------------------------------------------------------


def test_create_returns_201_location_and_the_task(client, admin, auth):
    response = client.post(
        "/api/alice/tasks",
        json={"title": "  Buy milk  ", "description": "2 litres", "completed": False},
        headers=auth(ALICE),
    )
    assert response.status_code == 201
    task = response.json()
    assert response.headers["location"] == f"/api/alice/tasks/{task['id']}"
    assert task["title"] == "Buy milk"
    assert task["description"] == "2 litres"
    assert task["completed"] is False
    assert task["user_id"] == ALICE
    assert isinstance(task["id"], int)
    for stamp in ("created_at", "updated_at"):
        assert datetime.fromisoformat(task[stamp]).utcoffset().total_seconds() == 0
    assert row(admin, task["id"])[:4] == ("Buy milk", "2 litres", False, ALICE)


def test_a_task_is_sent_as_exactly_its_public_fields_in_utc_whatever_the_time_zone(
    fresh_database, auth
):
    """PostgreSQL renders the JSON: timestamps in UTC with all six digits of microseconds even
    where the database's default time zone is not UTC, and no column beyond TaskPublic's."""
    with fresh_database.connect(autocommit=True) as owner:
        owner.execute(
            sql.SQL("ALTER DATABASE {} SET TimeZone = 'Asia/Kolkata'").format(
                sql.Identifier(fresh_database.name)
            )
        )
        whole = owner.execute(
            "INSERT INTO task (title, user_id, created_at, updated_at) VALUES"
            " ('whole', 'alice', '2026-01-01 05:30:00+05:30', '2026-01-01 00:00:00.5+00')"
            " RETURNING id"
        ).fetchone()
    assert whole is not None
    with app_client(fresh_database.settings()) as client:
        created = client.post("/api/alice/tasks", json={"title": "t"}, headers=auth(ALICE))
        path = f"/api/alice/tasks/{created.json()['id']}"
        bodies = [
            created.text,
            client.get(path, headers=auth(ALICE)).text,
            client.patch(path + "/complete", headers=auth(ALICE)).text,
        ]
        bodies += [
            json.dumps(task) for task in client.get("/api/alice/tasks", headers=auth(ALICE)).json()
        ]
        old = client.get(f"/api/alice/tasks/{whole[0]}", headers=auth(ALICE)).json()
    for body in bodies:
        task = json.loads(body)
        assert list(task) == list(TaskPublic.model_fields)
        TaskPublic.model_validate_json(body)
        for stamp in ("created_at", "updated_at"):
            assert RFC3339_UTC.fullmatch(task[stamp]), task[stamp]
            assert datetime.fromisoformat(task[stamp]) <= datetime.now(UTC)
    assert old["created_at"] == "2026-01-01T00:00:00.000000+00:00"
    assert old["updated_at"] == "2026-01-01T00:00:00.500000+00:00"


def test_create_with_title_only_defaults_the_rest(client, auth):
    task = client.post("/api/alice/tasks", json={"title": "x"}, headers=auth(ALICE)).json()
    assert task["description"] is None
    assert task["completed"] is False


def test_server_owned_fields_sent_by_the_client_are_ignored(client, auth):
    sent = {
        "title": "t",
        "id": 424242,
        "user_id": BOB,
        "created_at": "2000-01-01T00:00:00Z",
        "updated_at": "2000-01-01T00:00:00Z",
    }
    task = client.post("/api/alice/tasks", json=sent, headers=auth(ALICE)).json()
    assert task["id"] != 424242
    assert task["user_id"] == ALICE
    assert not task["created_at"].startswith("2000")


def test_list_returns_only_own_tasks_newest_first(client, create_task, auth):
    first = create_task(ALICE, "first")
    second = create_task(ALICE, "second")
    create_task(BOB, "bob's")
    response = client.get("/api/alice/tasks", headers=auth(ALICE))
    assert response.status_code == 200
    assert [t["id"] for t in response.json()] == [second["id"], first["id"]]


def test_list_orders_by_created_at_then_id(client, create_task, admin, auth):
    older, tie_low, tie_high = (create_task(ALICE, name) for name in ("older", "t1", "t2"))
    admin.execute("UPDATE task SET created_at = '2020-01-01' WHERE id = %s", (older["id"],))
    admin.execute(
        "UPDATE task SET created_at = '2021-01-01' WHERE id = ANY(%s)",
        ([tie_low["id"], tie_high["id"]],),
    )
    ids = [t["id"] for t in client.get("/api/alice/tasks", headers=auth(ALICE)).json()]
    assert ids == [tie_high["id"], tie_low["id"], older["id"]]


def test_list_is_empty_for_a_new_user(client, auth):
    response = client.get("/api/nobody/tasks", headers=auth("nobody"))
    assert response.status_code == 200
    assert response.json() == []


def test_get_one(client, create_task, auth):
    task = create_task(ALICE, "read me")
    response = client.get(f"/api/alice/tasks/{task['id']}", headers=auth(ALICE))
    assert response.status_code == 200
    assert response.json() == task


def test_put_replaces_title_and_keeps_omitted_fields(client, create_task, auth):
    task = create_task(ALICE, "old", description="keep me", completed=True)
    response = client.put(
        f"/api/alice/tasks/{task['id']}", json={"title": " new "}, headers=auth(ALICE)
    )
    assert response.status_code == 200
    updated = response.json()
    assert updated["title"] == "new"
    assert updated["description"] == "keep me"
    assert updated["completed"] is True


def test_put_sets_every_given_field_including_a_null_description(client, create_task, auth):
    task = create_task(ALICE, "old", description="drop me")
    updated = client.put(
        f"/api/alice/tasks/{task['id']}",
        json={"title": "new", "description": None, "completed": True},
        headers=auth(ALICE),
    ).json()
    assert (updated["description"], updated["completed"]) == (None, True)


def test_put_back_a_task_just_read_is_accepted(client, create_task, auth):
    task = create_task(ALICE, "round trip")
    response = client.put(f"/api/alice/tasks/{task['id']}", json=task, headers=auth(ALICE))
    assert response.status_code == 200
    assert response.json()["id"] == task["id"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [(None, True), ({}, True), ({"completed": True}, True), ({"completed": False}, False)],
)
def test_patch_complete_sets_rather_than_toggles(client, create_task, auth, body, expected):
    task = create_task(ALICE, "t", completed=not expected)
    url = f"/api/alice/tasks/{task['id']}/complete"
    for _ in range(2):  # idempotent: the second call gives the same state
        response = client.patch(url, json=body, headers=auth(ALICE))
        assert response.status_code == 200
        assert response.json()["completed"] is expected


def test_delete_returns_204_and_removes_the_row(client, create_task, admin, auth):
    task = create_task(ALICE, "bye")
    response = client.delete(f"/api/alice/tasks/{task['id']}", headers=auth(ALICE))
    assert response.status_code == 204
    assert response.content == b""
    assert row(admin, task["id"]) is None
    again = client.delete(f"/api/alice/tasks/{task['id']}", headers=auth(ALICE))
    assert_problem(again, 404)


# --- timestamps ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["put", "patch"])
def test_created_at_is_stable_and_updated_at_advances(client, create_task, auth, method):
    task = create_task(ALICE, "t")
    url = f"/api/alice/tasks/{task['id']}"
    if method == "put":
        changed = client.put(url, json={"title": "t2"}, headers=auth(ALICE)).json()
    else:
        changed = client.patch(url + "/complete", headers=auth(ALICE)).json()
    assert changed["created_at"] == task["created_at"]
    assert datetime.fromisoformat(changed["updated_at"]) > datetime.fromisoformat(
        task["updated_at"]
    )


# --- 404 and cross-user access ----------------------------------------------------------

ROUTES_ON_ONE_TASK = [
    ("get", "", None),
    ("put", "", {"title": "stolen"}),
    ("patch", "/complete", None),
    ("delete", "", None),
]


@pytest.mark.parametrize(("method", "suffix", "body"), ROUTES_ON_ONE_TASK)
def test_unknown_task_is_404(client, auth, method, suffix, body):
    response = client.request(
        method, f"/api/alice/tasks/{MISSING_ID}{suffix}", json=body, headers=auth(ALICE)
    )
    assert_problem(response, 404)


@pytest.mark.parametrize(("owner", "intruder"), [(ALICE, BOB), (BOB, ALICE)])
@pytest.mark.parametrize(("method", "suffix", "body"), ROUTES_ON_ONE_TASK)
def test_cross_user_access_is_refused_and_changes_nothing(
    client, create_task, admin, auth, owner, intruder, method, suffix, body
):
    task = create_task(owner, "private", description="secret")
    before = row(admin, task["id"])

    via_owner_path = client.request(
        method, f"/api/{owner}/tasks/{task['id']}{suffix}", json=body, headers=auth(intruder)
    )
    assert_problem(via_owner_path, 403)
    via_own_path = client.request(
        method, f"/api/{intruder}/tasks/{task['id']}{suffix}", json=body, headers=auth(intruder)
    )
    assert_problem(via_own_path, 404)
    assert "secret" not in via_own_path.text

    assert row(admin, task["id"]) == before


@pytest.mark.parametrize(("owner", "intruder"), [(ALICE, BOB), (BOB, ALICE)])
def test_cross_user_list_and_create_are_refused(client, create_task, admin, auth, owner, intruder):
    create_task(owner, "private")
    listed = client.get(f"/api/{owner}/tasks", headers=auth(intruder))
    assert_problem(listed, 403)
    created = client.post(f"/api/{owner}/tasks", json={"title": "planted"}, headers=auth(intruder))
    assert_problem(created, 403)
    own_list = client.get(f"/api/{intruder}/tasks", headers=auth(intruder)).json()
    assert own_list == []
    assert admin.execute("SELECT count(*) FROM task").fetchone()[0] == 1


def test_403_reveals_nothing_about_which_ids_exist(client, create_task, auth):
    task = create_task(ALICE, "t")
    existing = client.get(f"/api/alice/tasks/{task['id']}", headers=auth(BOB))
    missing = client.get(f"/api/alice/tasks/{MISSING_ID}", headers=auth(BOB))
    assert existing.status_code == missing.status_code == 403
    assert existing.json() == missing.json()


def test_opaque_user_ids_are_text_not_numbers(client, auth):
    for user in ("007", "7", "4f3c2a1e-8d2b-4c1a-9e6f-0a1b2c3d4e5f", "a" * 255):
        response = client.post(f"/api/{user}/tasks", json={"title": "t"}, headers=auth(user))
        assert response.status_code == 201
        assert response.json()["user_id"] == user
    assert client.get("/api/007/tasks", headers=auth("007")).json()[0]["user_id"] == "007"
    assert len(client.get("/api/7/tasks", headers=auth("7")).json()) == 1


@pytest.mark.parametrize("user", ["a b?c#d", "üser", "line\u2028sep", "50%"])
def test_location_of_any_opaque_user_id_is_escaped_and_followable(client, auth, user):
    path = f"/api/{quote(user, safe='')}/tasks"
    created = client.post(path, json={"title": "t"}, headers=auth(user))
    assert created.status_code == 201
    assert created.headers["location"] == f"{path}/{created.json()['id']}"
    followed = client.get(created.headers["location"], headers=auth(user))
    assert followed.status_code == 200
    assert followed.json()["user_id"] == user


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "title"),
        ({"title": ""}, "title"),
        ({"title": "   "}, "title"),
        ({"title": None}, "title"),
        ({"title": 123}, "title"),
        ({"title": "x" * 201}, "title"),
        ({"title": "nul\u0000byte"}, "title"),
        ({"title": "t", "description": "d" * 1001}, "description"),
        ({"title": "t", "description": 123}, "description"),
        ({"title": "t", "description": "nul\u0000"}, "description"),
        ({"title": "t", "completed": "yes"}, "completed"),
        ({"title": "t", "completed": 1}, "completed"),
        ({"title": "t", "completed": None}, "completed"),
        ([], "body"),
        ("a string", "body"),
    ],
)
@pytest.mark.parametrize("method", ["post", "put"])
def test_invalid_bodies_are_422_naming_the_field_and_change_nothing(
    client, create_task, admin, auth, body, field, method
):
    task = create_task(ALICE, "original")
    url = "/api/alice/tasks" if method == "post" else f"/api/alice/tasks/{task['id']}"
    response = client.request(method, url, json=body, headers=auth(ALICE))
    problem = assert_problem(response, 422)
    assert any(error["field"].endswith(field) for error in problem["errors"]), problem
    assert admin.execute("SELECT count(*) FROM task").fetchone()[0] == 1
    assert row(admin, task["id"])[0] == "original"


def test_a_lone_surrogate_escape_is_422_not_500(client, auth):
    headers = {**auth(ALICE), "content-type": "application/json"}
    response = client.post("/api/alice/tasks", content=b'{"title": "\\ud800"}', headers=headers)
    assert_problem(response, 422)


def test_limits_are_inclusive(client, auth):
    body = {"title": "x" * 200, "description": "d" * 1000}
    response = client.post("/api/alice/tasks", json=body, headers=auth(ALICE))
    assert response.status_code == 201
    assert len(response.json()["title"]) == 200


def test_title_length_counts_characters_not_bytes(client, auth):
    response = client.post("/api/alice/tasks", json={"title": "é" * 200}, headers=auth(ALICE))
    assert response.status_code == 201


@pytest.mark.parametrize("body", [{"completed": "true"}, {"completed": 0}, {"completed": None}])
def test_patch_complete_rejects_non_booleans(client, create_task, auth, body):
    task = create_task(ALICE, "t")
    response = client.patch(
        f"/api/alice/tasks/{task['id']}/complete", json=body, headers=auth(ALICE)
    )
    assert_problem(response, 422)


@pytest.mark.parametrize(
    ("content", "content_type"),
    [(b"{not json", "application/json"), (b"title=x", "text/plain"), (b"\xff\xfe", None)],
)
def test_a_body_that_is_not_json_is_400(client, auth, content, content_type):
    headers = auth(ALICE)
    if content_type:
        headers["content-type"] = content_type
    response = client.post("/api/alice/tasks", content=content, headers=headers)
    assert_problem(response, 400)


@pytest.mark.parametrize("task_id", ["abc", "0", "-1", "1.5", str(2**63), "99999999999999999999"])
def test_task_ids_that_are_not_positive_bigints_are_422(client, auth, task_id):
    response = client.get(f"/api/alice/tasks/{task_id}", headers=auth(ALICE))
    problem = assert_problem(response, 422)
    assert problem["errors"][0]["field"] == "path.task_id"


def test_largest_bigint_id_is_a_clean_404(client, auth):
    response = client.get(f"/api/alice/tasks/{2**63 - 1}", headers=auth(ALICE))
    assert_problem(response, 404)


def test_status_order_401_before_403_before_422(client, auth):
    assert client.get("/api/alice/tasks/abc").status_code == 401
    assert client.get("/api/alice/tasks/abc", headers=auth(BOB)).status_code == 403
    assert client.post("/api/alice/tasks", json={}, headers=auth(BOB)).status_code == 403


def test_error_bodies_carry_no_sql_or_trace(client, auth):
    response = client.post("/api/alice/tasks", json={"title": 5}, headers=auth(ALICE))
    for leak in ("Traceback", "SELECT", "INSERT", "psycopg", "sqlalchemy", "Bearer"):
        assert leak not in response.text


# --- operations --------------------------------------------------------------------------------


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


def test_request_id_is_echoed_or_made(client):
    assert (
        client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"]
        == "abc-123"
    )
    made = client.get("/healthz", headers={"X-Request-ID": "bad id\n"}).headers["x-request-id"]
    again = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch("[0-9a-f]{32}", made) and re.fullmatch("[0-9a-f]{32}", again)
    assert made != again


def test_openapi_declares_the_bearer_scheme_and_the_six_routes(client):
    spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert any(s["type"] == "http" and s["scheme"] == "bearer" for s in schemes.values())
    operations = {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if path.startswith("/api/")
    }
    assert operations == {
        ("GET", "/api/{user_id}/tasks"),
        ("POST", "/api/{user_id}/tasks"),
        ("GET", "/api/{user_id}/tasks/{task_id}"),
        ("PUT", "/api/{user_id}/tasks/{task_id}"),
        ("DELETE", "/api/{user_id}/tasks/{task_id}"),
        ("PATCH", "/api/{user_id}/tasks/{task_id}/complete"),
    }
    assert client.get("/docs").status_code == 200


# --- order of decisions, and oversized bodies ------------------------------------------------


@pytest.mark.parametrize(
    ("content", "headers_for", "expected"),
    [
        (b"{not json", None, 401),
        (b"{not json", BOB, 403),
        (b'{"title": 5}', None, 401),
        (b'{"title": 5}', BOB, 403),
        (b"{not json", ALICE, 400),
    ],
)
@pytest.mark.parametrize("method", ["post", "put"])
def test_auth_is_decided_before_the_body(client, auth, content, headers_for, expected, method):
    headers = {"content-type": "application/json"}
    if headers_for:
        headers |= auth(headers_for)
    url = "/api/alice/tasks" if method == "post" else "/api/alice/tasks/1"
    response = client.request(method, url, content=content, headers=headers)
    assert_problem(response, expected)
    if expected == 401:
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_64_kib_is_413_problem_and_changes_nothing(client, admin, auth, chunked):
    body = b'{"title": "' + b"x" * (64 * 1024) + b'"}'
    content = iter([body[:1000], body[1000:]]) if chunked else body
    headers = {**auth(ALICE), "content-type": "application/json"}
    response = client.post("/api/alice/tasks", content=content, headers=headers)
    assert_problem(response, 413)
    assert admin.execute("SELECT count(*) FROM task").fetchone()[0] == 0


@pytest.mark.parametrize(
    "content",
    [b'{"title": "\xff\xfe"}', b'{"title": "ok"}\x00', b'\x00{"title": "x"}', b"\xc3\x28"],
)
def test_invalid_utf8_and_raw_nul_bodies_are_400(client, admin, auth, content):
    headers = {**auth(ALICE), "content-type": "application/json"}
    response = client.post("/api/alice/tasks", content=content, headers=headers)
    assert_problem(response, 400)
    assert admin.execute("SELECT count(*) FROM task").fetchone()[0] == 0


@pytest.mark.parametrize("path", ["/api/%00/tasks", "/api/%FF/tasks", "/api/alice/tasks/%00"])
def test_hostile_paths_are_4xx(client, auth, path):
    response = client.get(path, headers=auth(ALICE))
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"] == "application/problem+json"


# --- reads without FastAPI's dependency solving (service.routes.TaskRoute) ------------------


@pytest.fixture
def solved(monkeypatch) -> list[str]:
    """The paths for which FastAPI solved dependencies, while the fixture lasts."""
    paths: list[str] = []
    solve = fastapi.routing.solve_dependencies

    async def counted(*, request: Any, **kwargs: Any) -> Any:
        paths.append(request.url.path)
        return await solve(request=request, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counted)
    return paths


@pytest.fixture
def routed(monkeypatch) -> list[str]:
    """The paths that went down the app's full stack to a task route, while the fixture lasts
    (the read lane, service.routes.ReadLane, serves its reads without the router)."""
    paths: list[str] = []
    handle = TaskRoute.handle

    async def counted(self: TaskRoute, scope: Any, receive: Any, send: Any) -> None:
        paths.append(scope["path"])
        await handle(self, scope, receive, send)

    monkeypatch.setattr(TaskRoute, "handle", counted)
    return paths


def test_valid_reads_skip_fastapis_dependency_solving_and_the_rest_do_not(
    client, create_task, auth, solved
):
    task = create_task(ALICE, "mine")
    solved.clear()  # the create's
    one = client.get(f"/api/alice/tasks/{task['id']}", headers=auth(ALICE))
    listed = client.get("/api/alice/tasks", headers=auth(ALICE))
    assert (one.status_code, one.json()) == (200, task)
    assert (listed.status_code, listed.json()) == (200, [task])
    assert solved == []

    assert client.get("/api/alice/tasks/0", headers=auth(ALICE)).status_code == 422
    assert client.delete(f"/api/alice/tasks/{task['id']}", headers=auth(ALICE)).status_code == 204
    assert solved == ["/api/alice/tasks/0", f"/api/alice/tasks/{task['id']}"]


def test_plain_reads_take_the_lane_and_every_other_request_the_full_stack(
    client, create_task, auth, routed
):
    task = create_task(ALICE, "mine")
    one, listed = f"/api/alice/tasks/{task['id']}", "/api/alice/tasks"
    routed.clear()  # the create's
    assert client.get(one, headers=auth(ALICE)).json() == task
    assert client.get(listed, headers=auth(ALICE)).json() == [task]
    assert client.get(one, headers=auth(BOB)).status_code == 403  # refused in the lane
    assert client.get(one, headers={"Authorization": "Bearer x"}).status_code == 401
    assert client.get("/api/alice/tasks/999999", headers=auth(ALICE)).status_code == 404
    assert routed == []

    assert client.head(one, headers=auth(ALICE)).status_code == 405  # as FastAPI answers it
    assert client.request("GET", one, headers=auth(ALICE), content=b"{}").status_code == 200
    assert client.get("/api/alice/tasks/0", headers=auth(ALICE)).status_code == 422
    assert client.put(one, headers=auth(ALICE), json={"title": "x"}).status_code == 200
    assert routed == [one, one, "/api/alice/tasks/0", one]


def test_a_middleware_added_to_the_app_sees_every_read(database, create_task, auth, routed):
    """The read lane skips the app's middleware stack, so an app given a middleware of its own
    (a downstream project's, say) serves its reads down the full stack, through it."""
    task = create_task(ALICE)
    app = create_app(database.settings())

    async def stamp(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers["X-Stamped"] = "yes"
        return response

    app.middleware("http")(stamp)
    routed.clear()
    with app_client(database.settings()) as plain, TestClient(app) as stamped:
        assert plain.get("/api/alice/tasks", headers=auth(ALICE)).json() == [task]
        assert routed == []
        response = stamped.get("/api/alice/tasks", headers=auth(ALICE))
    assert response.json() == [task] and response.headers["x-stamped"] == "yes"
    assert routed == ["/api/alice/tasks"]


class RecordedSpan(NonRecordingSpan):
    """What FastAPI's telemetry makes of a request: the span's name and route."""

    def __init__(self, name: str, attributes: Any, ended: list[tuple[str, Any]]) -> None:
        super().__init__(INVALID_SPAN_CONTEXT)
        self.name, self.attributes, self.ended = name, dict(attributes or {}), ended

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def set_attributes(self, attributes: Any) -> None:
        self.attributes.update(attributes)

    def update_name(self, name: str) -> None:
        self.name = name

    def end(self, end_time: Any = None) -> None:
        self.ended.append((self.name, self.attributes.get("http.route")))


class RecordingTracer(trace.Tracer):
    def __init__(self, ended: list[tuple[str, Any]]) -> None:
        self.ended = ended

    def start_span(self, name: str, *args: Any, attributes: Any = None, **kwargs: Any) -> Any:
        return RecordedSpan(name, attributes, self.ended)

    @contextmanager
    def start_as_current_span(self, name: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
        yield RecordedSpan(name, kwargs.get("attributes"), self.ended)


class RecordingProvider(trace.TracerProvider):
    def __init__(self) -> None:
        self.ended: list[tuple[str, Any]] = []

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return RecordingTracer(self.ended)


def test_reads_traced_by_fastapis_telemetry_carry_their_route(
    database, create_task, auth, monkeypatch, routed
):
    """With an OpenTelemetry provider in the process (`opentelemetry-instrument` sets one up),
    FastAPI traces every request and its router names the span's route: such reads take the
    full stack."""
    task = create_task(ALICE)
    provider = RecordingProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    routed.clear()
    with app_client(database.settings()) as traced:
        assert traced.get(f"/api/alice/tasks/{task['id']}", headers=auth(ALICE)).json() == task
        assert traced.get("/api/alice/tasks", headers=auth(BOB)).status_code == 403
    assert provider.ended == [
        ("GET /api/{user_id}/tasks/{task_id}", "/api/{user_id}/tasks/{task_id}"),
        ("GET /api/{user_id}/tasks", "/api/{user_id}/tasks"),
    ]
    assert routed == [f"/api/alice/tasks/{task['id']}", "/api/alice/tasks"]


def test_mounted_under_a_path_of_its_own_the_app_still_serves_reads(database, create_task, auth):
    """A mounting app's own path values reach the task routes' path parameters too."""
    task = create_task(ALICE)
    todo = create_app(database.settings())
    outer = FastAPI(routes=[Mount("/tenants/{tenant}", app=todo)])
    with TestClient(todo), TestClient(outer) as mounted:  # the first runs todo's start-up
        response = mounted.get(f"/tenants/t1/api/alice/tasks/{task['id']}", headers=auth(ALICE))
        assert (response.status_code, response.json()) == (200, task)
        assert mounted.get("/tenants/t1/api/alice/tasks", headers=auth(ALICE)).json() == [task]


def test_an_exception_handler_that_raises_is_handled_as_in_the_full_stack(
    database, auth, monkeypatch
):
    """A handler's own exception meets the app's exception middleware, as it does after a
    route's: here a 403 problem becomes an HTTPException, rendered as a 403 problem."""
    app = create_app(database.settings())

    @app.exception_handler(Problem)
    async def as_http_exception(request: Request, exc: Problem) -> Response:
        raise StarletteHTTPException(exc.status, exc.detail)

    with TestClient(app) as client:
        lane = client.get("/api/alice/tasks", headers=auth(BOB))
        use_fastapis_own_handlers(client, monkeypatch)
        full = client.get("/api/alice/tasks", headers=auth(BOB))
    assert (lane.status_code, lane.json()) == (full.status_code, full.json())
    assert lane.status_code == 403


class BrokenRoute(Route):
    def matches(self, scope: Any) -> Any:
        raise RuntimeError("a route that cannot match")


def test_a_route_that_fails_to_match_gets_the_full_stacks_500(database, auth):
    """Whatever goes wrong while the lane looks for the route is answered by the full stack,
    which meets the same failure inside the request middleware: a 500 problem, logged."""
    app = create_app(database.settings())
    app.router.routes.insert(0, BrokenRoute("/broken", lambda request: None))
    with TestClient(app) as client:
        response = client.get("/api/alice/tasks", headers=auth(ALICE))
    assert_problem(response, 500)


def use_fastapis_own_handlers(client, monkeypatch) -> None:
    """Every task route served by FastAPI's own handler down the full stack, as if TaskRoute
    were a plain APIRoute (the read lane then takes nothing)."""
    swapped = 0
    for route in client.app.routes:
        if isinstance(route, TaskRoute):
            standard = fastapi.routing.request_response(APIRoute.get_route_handler(route))
            monkeypatch.setattr(route, "app", standard)
            monkeypatch.setattr(route, "plain_read", False)
            swapped += 1
    assert swapped == 6


ODD_TASK_IDS = ["0", "-1", "01", "+1", " 1", "1 ", "1_0", "\u0661", "1.0", "1e3", "0x10", "abc"]
ODD_TASK_IDS += [str(2**63 - 1), str(2**63), "99999999999999999999"]
ODD_USERS = ["a" * 255, "a" * 256, "%00", "%C3%BC", "a%20b", "%FF"]


def read_answers(client, auth, task_id: int, caplog) -> list[tuple[Any, ...]]:
    """What every odd read returns (status, headers, body) and the user its access log line
    names, by path and token."""
    alice_token = auth(ALICE)["Authorization"].removeprefix("Bearer ")
    tokens = {
        "alice": auth(ALICE),
        "bob": auth(BOB),
        "none": {},
        "basic": {"Authorization": "Basic YWxpY2U6eA=="},
        "empty bearer": {"Authorization": "Bearer "},
        "garbage": {"Authorization": "Bearer not.a.token"},
        "lower-case scheme": {"Authorization": f"bearer {alice_token}"},
    }
    paths = [f"/api/alice/tasks/{quote(odd)}" for odd in ODD_TASK_IDS]
    paths += [f"/api/alice/tasks/{task_id}", "/api/alice/tasks"]
    paths += [f"/api/{user}/tasks" for user in ODD_USERS]
    paths += [f"/api/{user}/tasks/{task_id}" for user in ODD_USERS]
    answers = []
    for path in paths:
        for name, headers in tokens.items():
            answers.append((path, name, *answer(client, caplog, "GET", path, headers)))
    # What the lane must leave to the full stack, or answer as it would.
    one, listed = f"/api/alice/tasks/{task_id}", "/api/alice/tasks"
    too_large = b"x" * (64 * 1024 + 1)
    shapes: dict[str, tuple[str, str, dict[str, str], bytes | None]] = {
        "head": ("HEAD", one, auth(ALICE), None),
        "a body": ("GET", one, auth(ALICE), b"{}"),
        "a body too large": ("GET", listed, auth(ALICE), too_large),
        "a request id": ("GET", one, {**auth(ALICE), "X-Request-ID": "req-1"}, None),
        "a query": ("GET", f"{listed}?limit=1", auth(ALICE), None),
        "a trailing slash": ("GET", f"{listed}/", auth(ALICE), None),
        "a double slash": ("GET", f"/api/alice//tasks/{task_id}", auth(ALICE), None),
    }
    for name, (method, path, headers, content) in shapes.items():
        answers.append((path, name, *answer(client, caplog, method, path, headers, content)))
    return answers


def answer(
    client, caplog, method: str, path: str, headers: dict[str, str], content: bytes | None = None
) -> tuple[Any, ...]:
    """Status, headers (but a made-up request id and the date), body, and what the access
    log says of one request (user, route, status)."""
    caplog.clear()
    response = client.request(
        method, path, headers=headers, content=content, follow_redirects=False
    )
    access = [r.fields for r in caplog.records if r.name == "service.access"]
    logged = [(line["user_id"], line["route"], line["status"]) for line in access]
    made_up = {"date"} | ({"x-request-id"} if "X-Request-ID" not in headers else set())
    sent = {k: v for k, v in response.headers.items() if k not in made_up}
    return response.status_code, sent, response.content, logged


def test_odd_reads_get_exactly_what_fastapis_own_handler_answers(
    client, create_task, auth, monkeypatch, caplog, routed
):
    caplog.set_level(logging.INFO, logger="service.access")
    task_id = create_task(ALICE)["id"]
    routed.clear()
    fast = read_answers(client, auth, task_id, caplog)
    # The lane answered the valid reads with every kind of token, with a query and with a
    # request id; only HEAD and the two bodies took the router to them.
    assert routed.count(f"/api/alice/tasks/{task_id}") == 2
    assert routed.count("/api/alice/tasks") == 1
    use_fastapis_own_handlers(client, monkeypatch)
    assert read_answers(client, auth, task_id, caplog) == fast
    assert {answer[2] for answer in fast} >= {200, 307, 401, 403, 404, 413, 422}
    assert {user for *_, logged in fast for user, _, _ in logged} >= {ALICE, None}


def test_dependency_overrides_reach_every_task_route(client, create_task, monkeypatch):
    """FastAPI's testing hook: here every request acts as alice, whatever its token."""
    task = create_task(ALICE)

    async def as_alice(request: Request) -> TaskStore:
        return TaskStore(request.app.state.transactions, ALICE)

    monkeypatch.setitem(client.app.dependency_overrides, task_store, as_alice)
    assert client.get(f"/api/alice/tasks/{task['id']}").json() == task
    assert client.get("/api/alice/tasks").json() == [task]
    assert client.delete(f"/api/alice/tasks/{task['id']}").status_code == 204


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("put", "/api/alice/tasks", "GET, POST"),
        ("post", "/api/alice/tasks/1", "DELETE, GET, PUT"),
        ("get", "/api/alice/tasks/1/complete", "PATCH"),
    ],
)
def test_a_method_the_path_lacks_is_405_naming_the_ones_it_has(client, auth, method, path, allowed):
    response = client.request(method, path, headers=auth(ALICE))
    assert_problem(response, 405)
    assert response.headers["allow"] == allowed


async def read_with_a_query(task_id: TaskId, tasks: Tasks, verbose: bool = False) -> Response:
    return Response()


def read_synchronously(task_id: TaskId, tasks: Tasks) -> Response:
    return Response()


async def read_a_model(task_id: TaskId, tasks: Tasks) -> dict[str, str]:
    return {}


async def read_an_unchecked_id(task_id: int, tasks: Tasks) -> Response:
    return Response()


async def no_check() -> None:
    return None


@pytest.mark.parametrize(
    ("path", "endpoint", "extra", "plain"),
    [
        ("/api/{user_id}/tasks/{task_id}", read_task, {}, True),
        ("/api/{user_id}/tasks", list_tasks, {}, True),
        ("/api/{user_id}/tasks/{task_id}", read_task, {"dependencies": [Depends(no_check)]}, False),
        ("/api/{user_id}/tasks/{task_id}", read_with_a_query, {}, False),
        ("/api/{user_id}/tasks/{task_id}", read_synchronously, {}, False),
        ("/api/{user_id}/tasks/{task_id}", read_a_model, {}, False),
        ("/api/{user_id}/tasks/{task_id}", read_an_unchecked_id, {}, False),
        ("/api/{user_id}/tasks", read_task, {}, False),  # task_id not in the path
        ("/api/{user_id}/tasks/{task_id}/{other}", read_task, {}, False),
    ],
)
def test_only_plain_async_reads_of_the_path_skip_fastapis_handler(path, endpoint, extra, plain):
    route = TaskRoute(path, endpoint, methods=["GET"], response_model=None, **extra)
    assert route._is_plain_read() is plain
