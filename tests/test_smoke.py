def test_create_and_read(client, create_task, auth):
    task = create_task("alice", "first")
    response = client.get(f"/api/alice/tasks/{task['id']}", headers=auth("alice"))
    assert response.status_code == 200
    assert response.json() == task
