"""Real concurrent HTTP clients against a running server (uvicorn), and optimistic concurrency."""

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from service.testing import TestDatabase, bearer, live_server

PARALLEL = 50


@pytest.fixture(scope="module")
def base_url(database: TestDatabase) -> Iterator[str]:
    with live_server(database.settings(db_pool_size=8, db_max_overflow=4)) as url:
        yield url


@pytest.fixture
def user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


def in_parallel(calls: list[Callable[[httpx.Client], httpx.Response]]) -> list[httpx.Response]:
    """Every call at once, each on its own connection."""

    def run(call: Callable[[httpx.Client], httpx.Response]) -> httpx.Response:
        with httpx.Client(timeout=30) as client:
            return call(client)

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(run, calls))


def create(base_url: str, user: str, title: str = "t") -> dict[str, Any]:
    response = httpx.post(
        f"{base_url}/api/{user}/tasks", json={"title": title}, headers=bearer(user)
    )
    assert response.status_code == 201, response.text
    return response.json()


def test_parallel_creates_by_one_user_all_land(base_url, user):
    titles = [f"task {n}" for n in range(PARALLEL)]
    responses = in_parallel(
        [
            lambda c, title=title: c.post(
                f"{base_url}/api/{user}/tasks", json={"title": title}, headers=bearer(user)
            )
            for title in titles
        ]
    )
    assert [r.status_code for r in responses] == [201] * PARALLEL
    listed = httpx.get(f"{base_url}/api/{user}/tasks", headers=bearer(user)).json()
    assert sorted(task["title"] for task in listed) == sorted(titles)
    assert len({task["id"] for task in listed}) == PARALLEL


def test_racing_puts_leave_the_task_equal_to_one_of_them(base_url, user):
    task = create(base_url, user)
    url = f"{base_url}/api/{user}/tasks/{task['id']}"
    bodies = [
        {"title": f"version {n}", "description": f"d{n}", "completed": n % 2 == 0}
        for n in range(20)
    ]
    responses = in_parallel(
        [lambda c, body=body: c.put(url, json=body, headers=bearer(user)) for body in bodies]
    )
    assert {r.status_code for r in responses} == {200}
    final = httpx.get(url, headers=bearer(user)).json()
    written = {key: final[key] for key in ("title", "description", "completed")}
    assert written in bodies


def test_racing_deletes_yield_exactly_one_204(base_url, user):
    task = create(base_url, user)
    url = f"{base_url}/api/{user}/tasks/{task['id']}"
    responses = in_parallel([lambda c: c.delete(url, headers=bearer(user))] * 20)
    assert Counter(r.status_code for r in responses) == {204: 1, 404: 19}


def test_delete_racing_gets_never_yields_5xx(base_url, user):
    task = create(base_url, user)
    url = f"{base_url}/api/{user}/tasks/{task['id']}"
    calls = [lambda c: c.get(url, headers=bearer(user))] * 30
    calls.insert(10, lambda c: c.delete(url, headers=bearer(user)))
    statuses = Counter(r.status_code for r in in_parallel(calls))
    assert set(statuses) <= {200, 204, 404}
    assert statuses[204] == 1


# --- ETag and If-Match -------------------------------------------------------------------------


def test_every_task_response_carries_an_etag_that_changes_with_the_task(base_url, user):
    created = httpx.post(f"{base_url}/api/{user}/tasks", json={"title": "t"}, headers=bearer(user))
    url = f"{base_url}{created.headers['location']}"
    read = httpx.get(url, headers=bearer(user))
    assert created.headers["etag"] == read.headers["etag"]
    assert read.headers["etag"].startswith('"')
    put = httpx.put(url, json={"title": "t2"}, headers=bearer(user))
    patched = httpx.patch(f"{url}/complete", headers=bearer(user))
    tags = [created.headers["etag"], put.headers["etag"], patched.headers["etag"]]
    assert len(set(tags)) == 3


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [("put", "", {"title": "mine"}), ("patch", "/complete", None), ("delete", "", None)],
)
def test_a_stale_if_match_is_412_and_changes_nothing(base_url, user, method, suffix, body):
    task = create(base_url, user)
    url = f"{base_url}/api/{user}/tasks/{task['id']}"
    stale = httpx.get(url, headers=bearer(user)).headers["etag"]
    fresh = httpx.put(url, json={"title": "changed elsewhere"}, headers=bearer(user))
    headers = {**bearer(user), "If-Match": stale}
    response = httpx.request(method, url + suffix, json=body, headers=headers)
    assert response.status_code == 412
    assert response.headers["content-type"] == "application/problem+json"
    after = httpx.get(url, headers=bearer(user))
    assert after.json() == fresh.json()
    assert after.headers["etag"] == fresh.headers["etag"]


@pytest.mark.parametrize(
    ("method", "suffix", "body", "status"),
    [
        ("put", "", {"title": "mine"}, 200),
        ("patch", "/complete", None, 200),
        ("delete", "", None, 204),
    ],
)
def test_a_matching_if_match_goes_through(base_url, user, method, suffix, body, status):
    task = create(base_url, user)
    url = f"{base_url}/api/{user}/tasks/{task['id']}"
    current = httpx.get(url, headers=bearer(user)).headers["etag"]
    headers = {**bearer(user), "If-Match": f'"other", {current}'}
    assert httpx.request(method, url + suffix, json=body, headers=headers).status_code == status
    star = {**bearer(user), "If-Match": "*"}
    if method != "delete":
        assert httpx.request(method, url + suffix, json=body, headers=star).status_code == 200


def test_if_match_on_a_missing_or_foreign_task_is_404(base_url, user):
    task = create(base_url, "someone-else")
    headers = {**bearer(user), "If-Match": "*"}
    url = f"{base_url}/api/{user}/tasks/{task['id']}"
    assert httpx.put(url, json={"title": "x"}, headers=headers).status_code == 404
    assert httpx.delete(url, headers=headers).status_code == 404


def test_racing_conditional_puts_let_exactly_one_win(base_url, user):
    task = create(base_url, user)
    url = f"{base_url}/api/{user}/tasks/{task['id']}"
    tag = httpx.get(url, headers=bearer(user)).headers["etag"]
    headers = {**bearer(user), "If-Match": tag}
    responses = in_parallel(
        [
            lambda c, n=n: c.put(url, json={"title": f"writer {n}"}, headers=headers)
            for n in range(10)
        ]
    )
    assert Counter(r.status_code for r in responses) == {200: 1, 412: 9}
    (winner,) = [r for r in responses if r.status_code == 200]
    assert httpx.get(url, headers=bearer(user)).json()["title"] == winner.json()["title"]


def test_more_clients_than_threads_and_connections_do_not_stall(database, user):
    """100 clients, 40 worker threads, 2 connections: requests queue without holding threads."""
    pool_timeout = 60
    settings = database.settings(
        db_pool_size=2, db_max_overflow=0, db_pool_timeout_seconds=pool_timeout
    )
    with live_server(settings) as url:
        create(url, user)
        started = time.monotonic()
        responses = in_parallel(
            [lambda c: c.get(f"{url}/api/{user}/tasks", headers=bearer(user))] * 100
        )
        elapsed = time.monotonic() - started
    assert Counter(r.status_code for r in responses) == {200: 100}
    # Stalled requests would only move again when the pool timeout ends them.
    assert elapsed < pool_timeout / 2, f"took {elapsed:.1f} s: requests waited for each other"
