"""Least privilege end to end: the API logs in as a role that can do nothing by itself."""

import psycopg
import pytest

from service.testing import app_client, as_role, bearer, make_url_for


def test_the_login_role_alone_cannot_read_tasks(database, login_role, admin):
    admin.execute("INSERT INTO task (title, user_id) VALUES ('t', 'alice')")
    url = as_role(database.url, login_role)
    with psycopg.connect(url) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT * FROM task")


def test_the_service_works_through_a_least_privilege_login(database, login_role, admin):
    # Through the pooler too, when the suite runs behind one: it lets in any role of the server.
    url = as_role(database.service_url, login_role)
    assert make_url_for(url).username == login_role
    with app_client(database.settings(database_url=url)) as client:
        assert client.get("/readyz").status_code == 200
        created = client.post("/api/alice/tasks", json={"title": "t"}, headers=bearer("alice"))
        assert created.status_code == 201
        listed = client.get("/api/alice/tasks", headers=bearer("alice")).json()
        assert [task["title"] for task in listed] == ["t"]
        with client.app.state.db.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT current_user").scalar() == login_role
