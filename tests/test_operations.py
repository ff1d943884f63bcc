"""What operators see: request logs, request ids, metrics."""

import json
import logging

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import DataError

from service.app import create_app
from service.logs import JsonFormatter, TextFormatter

ACCESS_LOGGER = "service.access"


def access_records(caplog) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == ACCESS_LOGGER]


def test_one_access_line_per_request_with_route_template_and_user(client, auth, caplog):
    headers = {**auth("alice"), "X-Request-ID": "req-42"}
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        response = client.get("/api/alice/tasks", headers=headers)
    assert response.headers["x-request-id"] == "req-42"
    (record,) = access_records(caplog)
    assert record.fields == {
        "method": "GET",
        "route": "/api/{user_id}/tasks",
        "status": 200,
        "duration_ms": record.fields["duration_ms"],
        "request_id": "req-42",
        "user_id": "alice",
    }
    line = json.loads(JsonFormatter().format(record))
    assert line["route"] == "/api/{user_id}/tasks" and line["level"] == "INFO"
    text = TextFormatter().format(record)
    assert "route=/api/{user_id}/tasks" in text and "status=200" in text


def test_no_log_line_contains_the_token(client, auth, caplog):
    headers = auth("alice")
    token = headers["Authorization"].removeprefix("Bearer ")
    with caplog.at_level(logging.DEBUG):
        client.get("/api/alice/tasks", headers=headers)
        client.get("/api/bob/tasks", headers=headers)
        client.get("/api/alice/tasks", headers={"Authorization": f"Bearer {token}x"})
    everything = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    assert token not in everything
    assert token[-20:] not in everything


def test_unmatched_paths_do_not_grow_the_route_label(client, caplog):
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        client.get("/no/such/path/12345")
    (record,) = access_records(caplog)
    assert record.fields["route"] == "unmatched"


def sample(body: str, series: str) -> float:
    """The value of one series in the Prometheus text format (0 when absent)."""
    for line in body.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_metrics_count_requests_and_latency_per_route_and_status(client, auth):
    ok = 'method="GET",route="/api/{user_id}/tasks",status="200"'
    forbidden = 'method="GET",route="/api/{user_id}/tasks",status="403"'
    first = client.get("/metrics").text
    before = sample(first, f"todo_http_requests_total{{{ok}}}")
    timed = sample(first, f"todo_http_request_duration_seconds_count{{{ok}}}")
    for _ in range(3):
        client.get("/api/alice/tasks", headers=auth("alice"))
    client.get("/api/alice/tasks", headers=auth("bob"))
    body = client.get("/metrics").text
    assert sample(body, f"todo_http_requests_total{{{ok}}}") == before + 3
    assert sample(body, f"todo_http_request_duration_seconds_count{{{ok}}}") == timed + 3
    assert f"todo_http_requests_total{{{forbidden}}}" in body
    assert f'todo_http_request_duration_seconds_bucket{{le="0.1",{ok}}}' in body
    assert 'todo_db_pool_connections{state="in_use"}' in body
    assert 'todo_db_pool_connections{state="idle"}' in body


def test_made_up_methods_share_one_metrics_series(client, auth):
    for method in ("BREW", "WHEN"):
        client.request(method, "/api/alice/tasks", headers=auth("alice"))
    body = client.get("/metrics").text
    assert 'method="OTHER",route="/api/{user_id}/tasks"' in body
    assert "BREW" not in body and "WHEN" not in body


def test_metrics_count_database_errors_by_kind(client):
    engine = client.app.state.db.engine
    with engine.connect() as conn, pytest.raises(DataError):
        conn.exec_driver_sql("SELECT 1/0")
    body = client.get("/metrics").text
    assert 'todo_db_errors_total{kind="DivisionByZero"} 1.0' in body


def test_a_bug_is_a_500_problem_with_no_trace_and_is_logged(database, caplog):
    app = create_app(database.settings())

    def broken() -> None:
        raise RuntimeError("internal detail that must not leak")

    app.add_api_route("/broken", broken)
    with TestClient(app) as client, caplog.at_level(logging.INFO):
        response = client.get("/broken", headers={"X-Request-ID": "bug-1"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["x-request-id"] == "bug-1"
    assert "internal detail" not in response.text and "Traceback" not in response.text
    logged = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    assert "internal detail" not in logged and "Traceback" not in logged
    (access,) = access_records(caplog)
    assert access.fields["status"] == 500 and access.fields["request_id"] == "bug-1"
