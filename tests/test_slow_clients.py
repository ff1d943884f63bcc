"""One slow client never blocks the others, even when the pool holds a single connection.

A request is read whole before any database work starts, so a client that stalls half-way
through its headers or its body holds no pooled connection.
"""

import http.client
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from urllib.parse import urlparse

import httpx

from service.testing import TestDatabase, bearer, live_server, make_token

PROMPT = 2.0  # seconds: what "promptly" means for the other clients


class SlowPost:
    """A POST sent over a raw socket in two parts, with the client stalling in between."""

    def __init__(self, port: int, user: str, title: str, *, stall_in: str) -> None:
        body = json.dumps({"title": title}).encode()
        head = (
            f"POST /api/{user}/tasks HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {make_token(user)}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        request = head + body
        # Stall in the body: all headers and half the body (Content-Length promises more).
        # Stall in the headers: only the request line and part of the headers.
        cut = len(head) + len(body) // 2 if stall_in == "body" else len(head) // 2
        self.first, self.rest = request[:cut], request[cut:]
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def start(self) -> None:
        self.sock.sendall(self.first)

    def finish(self) -> tuple[int, dict[str, object]]:
        self.sock.sendall(self.rest)
        response = http.client.HTTPResponse(self.sock)
        try:
            response.begin()
            return response.status, json.loads(response.read())
        finally:
            response.close()

    def close(self) -> None:
        self.sock.close()


@contextmanager
def slow_posts(port: int, *specs: tuple[str, str, str]) -> Iterator[list[SlowPost]]:
    posts: list[SlowPost] = []
    try:
        for user, title, stall_in in specs:
            posts.append(SlowPost(port, user, title, stall_in=stall_in))
        yield posts
    finally:
        for post in posts:
            post.close()


def test_stalled_clients_do_not_block_others_with_a_pool_of_one(fresh_database: TestDatabase):
    settings = fresh_database.settings(db_pool_size=1, db_max_overflow=0, db_pool_timeout_seconds=1)
    with live_server(settings) as base:
        port = urlparse(base).port
        assert port is not None
        with httpx.Client(base_url=base, timeout=10) as client:
            seeded = client.post("/api/bob/tasks", json={"title": "bob's"}, headers=bearer("bob"))
            assert seeded.status_code == 201
            bob_task = seeded.json()["id"]

            specs = [
                ("slow", "stalled in the body", "body"),
                ("slow", "stalled in the body too", "body"),
                ("slowpoke", "stalled in the headers", "headers"),
            ]
            with slow_posts(port, *specs) as posts:
                for post in posts:
                    post.start()
                time.sleep(0.3)  # the server has read what was sent and waits for the rest

                calls = [
                    lambda: client.get("/api/alice/tasks", headers=bearer("alice")),
                    lambda: client.post(
                        "/api/alice/tasks", json={"title": "prompt"}, headers=bearer("alice")
                    ),
                    lambda: client.get(f"/api/bob/tasks/{bob_task}", headers=bearer("bob")),
                    lambda: client.post(
                        "/api/carol/tasks", json={"title": "prompt"}, headers=bearer("carol")
                    ),
                ]
                durations = []
                # Longer than the pool timeout (1 s): a stalled client holding the only
                # connection would turn these into 503s.
                stalled_since = time.monotonic()
                while time.monotonic() - stalled_since < 1.5:
                    for call in calls:
                        started = time.monotonic()
                        response = call()
                        durations.append(time.monotonic() - started)
                        assert response.status_code in (200, 201), response.text
                # And several at once, each still needing the single pooled connection.
                with ThreadPoolExecutor(max_workers=len(calls)) as pool:
                    timed = pool.map(
                        lambda call: (time.monotonic(), call(), time.monotonic()), calls
                    )
                    for started, response, finished in timed:
                        durations.append(finished - started)
                        assert response.status_code in (200, 201), response.text
                print(
                    f"\n{len(durations)} requests while 3 clients stalled: "
                    f"slowest {max(durations):.3f} s"
                )
                assert max(durations) < PROMPT

                results = [post.finish() for post in posts]

            assert [status for status, _ in results] == [201, 201, 201]
            assert [body["title"] for _, body in results] == [title for _, title, _ in specs]
            listed = client.get("/api/slow/tasks", headers=bearer("slow")).json()
            assert sorted(task["title"] for task in listed) == [
                "stalled in the body",
                "stalled in the body too",
            ]
