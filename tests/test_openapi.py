"""The OpenAPI document: every status each route can answer, as problem+json with our schemas,
examples for every body, limits that match the database, the bearer scheme, and a valid 3.1
document."""

import json
import re
from http import HTTPStatus
from typing import Any

import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator

from service import models

TASKS = "/api/{user_id}/tasks"
ONE_TASK = "/api/{user_id}/tasks/{task_id}"
PROBLEM_JSON = "application/problem+json"
REF = "#/components/schemas/"

EVERY_TASK_ROUTE = {"401", "403", "422", "503"}
TASK_ROUTES = {
    ("get", TASKS): {"200"},
    ("post", TASKS): {"201", "400", "413"},
    ("get", ONE_TASK): {"200", "404"},
    ("put", ONE_TASK): {"200", "400", "404", "412", "413"},
    ("delete", ONE_TASK): {"204", "404", "412"},
    ("patch", ONE_TASK + "/complete"): {"200", "400", "404", "412", "413"},
}
OPERATIONS = {("get", "/healthz"): {"200"}, ("get", "/readyz"): {"200", "503"}}
EXPECTED = {route: EVERY_TASK_ROUTE | own for route, own in TASK_ROUTES.items()} | OPERATIONS

PROBLEM_MODELS = {
    "Problem": models.Problem,
    "ValidationProblem": models.ValidationProblem,
    "ReadinessProblem": models.ReadinessProblem,
}


@pytest.fixture(scope="module")
def spec(client) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def responses(spec: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    return spec["paths"][path][method]["responses"]


def schema(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return spec["components"]["schemas"][name]


def problem_responses(spec: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    return [
        (method, path, status, response)
        for method, path in EXPECTED
        for status, response in responses(spec, method, path).items()
        if int(status) >= 400
    ]


def string_branch(prop: dict[str, Any]) -> dict[str, Any]:
    """The string schema of a property that may also be null."""
    return next(branch for branch in prop.get("anyOf", [prop]) if branch["type"] == "string")


# --- the document as a whole ------------------------------------------------------------------


def test_is_a_valid_openapi_3_1_document(spec):
    assert spec["openapi"].startswith("3.1.")
    OpenAPIV31SpecValidator(spec).validate()


def test_every_reference_resolves(spec):
    names = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(spec)))
    assert names <= spec["components"]["schemas"].keys()


# --- statuses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), EXPECTED)
def test_each_route_documents_exactly_the_statuses_it_can_answer(spec, method, path):
    assert set(responses(spec, method, path)) == EXPECTED[(method, path)]


def test_fastapis_default_validation_error_is_not_documented(spec):
    text = json.dumps(spec)
    assert "HTTPValidationError" not in text
    assert "ValidationError" not in spec["components"]["schemas"]


@pytest.mark.parametrize(("method", "path"), TASK_ROUTES)
def test_successes_are_json_bodies_except_delete(spec, method, path):
    documented = responses(spec, method, path)
    if method == "delete":
        assert "content" not in documented["204"]
        return
    success = "201" if method == "post" else "200"
    content = documented[success]["content"]
    assert set(content) == {"application/json"}
    expected = {"$ref": REF + "TaskPublic"}
    if method == "get" and path == TASKS:
        expected = {"type": "array", "items": expected}
    assert expected.items() <= content["application/json"]["schema"].items()


def test_created_documents_location(spec):
    location = responses(spec, "post", TASKS)["201"]["headers"]["Location"]
    assert location["required"] is True
    assert location["schema"] == {"type": "string", "format": "uri-reference"}


# --- problems -----------------------------------------------------------------------------------


def test_every_error_is_problem_json_with_our_schema_and_examples(spec):
    for method, path, status, response in problem_responses(spec):
        where = f"{method} {path} {status}"
        assert set(response["content"]) == {PROBLEM_JSON}, where
        media = response["content"][PROBLEM_JSON]
        expected = "Problem"
        if status == "422":
            expected = "ValidationProblem"
        elif path == "/readyz":
            expected = "ReadinessProblem"
        assert media["schema"] == {"$ref": REF + expected}, where
        assert media["examples"], where
        for example in media["examples"].values():
            body = example["value"]
            PROBLEM_MODELS[expected].model_validate(body, strict=True)
            assert body["status"] == int(status), where
            assert body["title"] == HTTPStatus(int(status)).phrase, where
            assert body["type"] == "about:blank", where


def test_401_documents_www_authenticate_and_503_retry_after(spec):
    for method, path, status, response in problem_responses(spec):
        headers = response.get("headers", {})
        if status == "401":
            assert headers["WWW-Authenticate"]["required"] is True
        if status == "503":
            retry_after = headers["Retry-After"]
            assert retry_after["schema"]["type"] == "integer"
            # /readyz sends it when the database is down, not when the posture fails.
            assert retry_after["required"] is (path != "/readyz"), (method, path)


def test_problem_schemas_are_what_errors_py_sends(spec):
    problem = schema(spec, "Problem")
    assert set(problem["properties"]) == {"type", "title", "status", "detail"}
    assert set(problem["required"]) == {"type", "title", "status", "detail"}
    assert problem["properties"]["status"]["type"] == "integer"

    invalid = schema(spec, "ValidationProblem")
    assert set(invalid["properties"]) == {"type", "title", "status", "detail", "errors"}
    assert "errors" not in invalid["required"]  # the database's own refusal has no list
    assert invalid["properties"]["errors"]["items"] == {"$ref": REF + "FieldError"}
    field_error = schema(spec, "FieldError")
    assert set(field_error["properties"]) == set(field_error["required"]) == {"field", "message"}

    readiness = schema(spec, "ReadinessProblem")
    assert readiness["properties"]["problems"]["items"] == {"type": "string"}
    assert "problems" not in readiness["required"]


def example_value(spec: dict[str, Any], status: str, name: str, path: str = ONE_TASK) -> Any:
    method = "put" if status in {"400", "404"} else "get"
    media = responses(spec, method, path)[status]["content"][PROBLEM_JSON]
    return media["examples"][name]["value"]


def test_the_problem_examples_are_what_the_api_sends(spec, client, auth):
    url = "/api/alice/tasks/9000000000"
    sent = {
        ("401", "missing"): client.get(url),
        ("401", "expired"): client.get(url, headers=auth("alice", ttl=-3600)),
        ("403", "other_user"): client.get(url, headers=auth("bob")),
        ("404", "missing"): client.put(url, json={"title": "t"}, headers=auth("alice")),
        ("400", "malformed"): client.put(
            url,
            content=b"{not json",
            headers={**auth("alice"), "content-type": "application/json"},
        ),
        ("422", "body"): client.put(url, json={"title": "x" * 201}, headers=auth("alice")),
        ("422", "task_id"): client.get("/api/alice/tasks/0", headers=auth("alice")),
    }
    for (status, name), response in sent.items():
        assert response.status_code == int(status), response.text
        assert response.headers["content-type"] == PROBLEM_JSON
        assert response.json() == example_value(spec, status, name), (status, name)


# --- limits and formats -------------------------------------------------------------------------


@pytest.fixture
def database_limits(admin) -> dict[str, tuple[int, int]]:
    """(min, max) character counts from the task table's CHECK constraints."""
    limits = {}
    for (definition,) in admin.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = 'task'::regclass AND contype = 'c'"
    ):
        column = re.search(r"char_length\((\w+)\)", definition)
        if column:
            low = re.search(r">= (\d+)", definition)
            high = re.search(r"<= (\d+)", definition)
            assert high, definition
            limits[column[1]] = (int(low[1]) if low else 0, int(high[1]))
    return limits


def test_the_database_limits_are_the_documented_ones(database_limits):
    assert database_limits == {"title": (1, 200), "description": (0, 1000), "user_id": (1, 255)}


@pytest.mark.parametrize("model", ["TaskCreate", "TaskUpdate", "TaskPublic"])
def test_title_and_description_lengths(spec, database_limits, model):
    properties = schema(spec, model)["properties"]
    title = properties["title"]
    assert (title["type"], title["minLength"], title["maxLength"]) == (
        "string",
        *database_limits["title"],
    )
    description = properties["description"]
    assert {"type": "null"} in description["anyOf"]
    assert string_branch(description)["maxLength"] == database_limits["description"][1]
    assert "minLength" not in string_branch(description)


def test_task_public_formats(spec, database_limits):
    task = schema(spec, "TaskPublic")
    properties = task["properties"]
    assert (properties["id"]["type"], properties["id"]["format"]) == ("integer", "int64")
    assert properties["completed"]["type"] == "boolean"
    user_id = properties["user_id"]
    assert (user_id["minLength"], user_id["maxLength"]) == database_limits["user_id"]
    for stamp in ("created_at", "updated_at"):
        assert (properties[stamp]["type"], properties[stamp]["format"]) == ("string", "date-time")
    assert set(task["required"]) == set(properties)


def test_completed_is_a_boolean_in_every_request(spec):
    for model in ("TaskCreate", "TaskUpdate", "TaskCompletion"):
        assert schema(spec, model)["properties"]["completed"]["type"] == "boolean"


@pytest.mark.parametrize(("method", "path"), TASK_ROUTES)
def test_path_parameters(spec, database_limits, method, path):
    everything = spec["paths"][path][method]["parameters"]
    parameters = {p["name"]: p for p in everything if p["in"] == "path"}
    assert set(parameters) == ({"user_id", "task_id"} if "{task_id}" in path else {"user_id"})
    assert all(p["required"] for p in parameters.values())
    headers = {p["name"] for p in everything if p["in"] == "header"}
    assert headers == ({"if-match"} if method in ("put", "patch", "delete") else set())
    user_id = parameters["user_id"]["schema"]
    assert (user_id["type"], user_id["minLength"], user_id["maxLength"]) == (
        "string",
        *database_limits["user_id"],
    )
    if "task_id" in parameters:
        task_id = parameters["task_id"]["schema"]
        assert task_id["type"] == "integer"
        assert (task_id["minimum"], task_id["maximum"]) == (1, 2**63 - 1)
        assert task_id["format"] == "int64"


def test_user_id_limits_do_not_change_the_order_of_statuses(client, auth):
    too_long = "a" * 256
    assert client.get(f"/api/{too_long}/tasks").status_code == 401
    assert client.get(f"/api/{too_long}/tasks", headers=auth("alice")).status_code == 403
    assert client.get(f"/api/{too_long}/tasks", headers=auth(too_long)).status_code == 401


# --- examples -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("TaskCreate", models.TaskCreate),
        ("TaskUpdate", models.TaskUpdate),
        ("TaskCompletion", models.TaskCompletion),
        ("TaskPublic", models.TaskPublic),
    ],
)
def test_every_task_schema_has_examples_that_fit_it(spec, name, model):
    examples = schema(spec, name)["examples"]
    assert examples
    for example in examples:
        model.model_validate_json(json.dumps(example))


def test_the_list_has_an_example(spec):
    media = responses(spec, "get", TASKS)["200"]["content"]["application/json"]
    assert media["example"]
    for task in media["example"]:
        models.TaskPublic.model_validate(task)


def test_request_bodies(spec):
    for method, path, model, required in [
        ("post", TASKS, "TaskCreate", True),
        ("put", ONE_TASK, "TaskUpdate", True),
        ("patch", ONE_TASK + "/complete", "TaskCompletion", False),
    ]:
        body = spec["paths"][path][method]["requestBody"]
        assert body.get("required", False) is required
        media = body["content"]["application/json"]["schema"]
        assert {"$ref": REF + model} in media.get("anyOf", [media])


# --- security -----------------------------------------------------------------------------------


def test_the_bearer_scheme_is_declared_and_guards_every_task_route(spec):
    schemes = spec["components"]["securitySchemes"]
    bearer = [name for name, s in schemes.items() if (s["type"], s["scheme"]) == ("http", "bearer")]
    assert len(bearer) == 1
    for method, path in TASK_ROUTES:
        assert spec["paths"][path][method]["security"] == [{bearer[0]: []}]
    for method, path in OPERATIONS:
        assert "security" not in spec["paths"][path][method]
