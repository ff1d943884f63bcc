"""The README's example for downstream suites, run as written (it uses only the plugin)."""


def test_alice_cannot_see_bobs_tasks(todo_client, todo_auth):
    created = todo_client.post("/api/bob/tasks", json={"title": "bob's"}, headers=todo_auth("bob"))
    assert created.status_code == 201
    task_id = created.json()["id"]

    assert (
        todo_client.get(f"/api/alice/tasks/{task_id}", headers=todo_auth("alice")).status_code
        == 404
    )
    assert (
        todo_client.get(f"/api/bob/tasks/{task_id}", headers=todo_auth("alice")).status_code == 403
    )
    own = todo_client.get("/api/alice/tasks", headers=todo_auth("alice")).json()
    assert all(task["user_id"] == "alice" for task in own)
