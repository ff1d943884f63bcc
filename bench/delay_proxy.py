"""A small TCP proxy that adds a fixed delay in each direction and counts PostgreSQL
round trips on the wire.

Between the service and PostgreSQL it plays a remote database: with `delay` = 5 ms every byte
reaches the other side 5 ms after it was sent, both ways, so each round trip costs 10 ms more,
the way a Neon database in another data centre behaves. Bandwidth is not limited and order is
kept: each chunk read is written out `delay` seconds after it was read.

It also reads the PostgreSQL protocol going through it (plaintext only: connect with
`sslmode=disable`, or to a server without TLS) and counts, per proxy:

- `ready_for_query`: ReadyForQuery ('Z') messages from the server. A client that does not
  pipeline waits for exactly one of these after each query it sends (a simple Query, or an
  extended-protocol batch ending in Sync), and once per connection start-up
  (`connection_starts` counts those): `ready_for_query - connection_starts` is the number of
  query round trips.
- `turns`: the times the server answered after the client had sent something, counted from
  the raw byte flow without parsing; it agrees with `ready_for_query` for a non-pipelining
  client, and counts a pipelined batch as one.
- `connections`, `client_messages` by type (Q, P, B, E, S, ...), bytes each way.

Standalone: `python bench/delay_proxy.py --target 127.0.0.1:5432 --listen 127.0.0.1:6543
--delay-ms 5` (Ctrl-C prints the counters). From Python: `with DelayProxy(host, port) as proxy:`
runs it in background threads; `proxy.delay` can be changed while it runs and
`proxy.snapshot()` copies the counters.
"""

import argparse
import contextlib
import queue
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
CHUNK = 1 << 16


@dataclass
class Stats:
    connections: int = 0
    ready_for_query: int = 0
    connection_starts: int = 0  # the first ReadyForQuery of each connection
    turns: int = 0
    bytes_to_server: int = 0
    bytes_to_client: int = 0
    unparsed_connections: int = 0  # TLS or GSS encryption: not counted
    client_messages: Counter[str] = field(default_factory=Counter)
    statements: Counter[str] = field(default_factory=Counter)  # round trips by what they ran

    def snapshot(self) -> "Stats":
        copy = Stats(**{k: v for k, v in vars(self).items() if k not in COUNTERS})
        for name in COUNTERS:
            setattr(copy, name, Counter(getattr(self, name)))
        return copy

    def __sub__(self, other: "Stats") -> "Stats":
        diff = Stats(
            **{k: getattr(self, k) - getattr(other, k) for k in vars(self) if k not in COUNTERS}
        )
        for name in COUNTERS:
            setattr(diff, name, getattr(self, name) - getattr(other, name))
        return diff


COUNTERS = ("client_messages", "statements")


ON_TASK = re.compile(r"\b(INSERT INTO|UPDATE|DELETE FROM|FROM) task\b", re.IGNORECASE)


def label(query: bytes) -> str:
    """A short name for a statement: BEGIN, COMMIT, the pre-ping, or its first words."""
    text = " ".join(query.decode("utf-8", "replace").split())
    upper = text.upper()
    if upper.startswith("SELECT SET_CONFIG("):
        return "set_config(role), set_config(user)"
    if upper in ("SELECT 1", ";", ""):
        return f"{text or '(empty)'} (pool pre-ping)"
    # The table's own verb, wherever it stands: the statements render JSON around it.
    if found := ON_TASK.search(text):
        verb = found.group(1).upper()
        what = "SELECT … FROM task" if verb == "FROM" else f"{verb} task"
        order = " ORDER BY" if " ORDER BY " in upper else ""
        lock = " FOR UPDATE" if " FOR UPDATE" in upper else ""
        return what + order + lock
    return text[:40]


class WireCounter:
    """Frames one connection's PostgreSQL messages, both directions."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.client_buf = b""
        self.server_buf = b""
        self.client_startup = True  # untyped packets until the StartupMessage
        self.server_single_bytes = 0  # answers to SSLRequest/GSSENCRequest are one byte
        self.encrypted = False
        self.client_spoke = False
        self.prepared: dict[bytes, bytes] = {}  # statement name (b"" = unnamed) -> text
        self.batch: list[str] = []  # what the extended-protocol batch being built runs
        self.ready_seen = False

    def from_client(self, data: bytes) -> None:
        self.client_spoke = True
        if self.encrypted:
            return
        self.client_buf += data
        while True:
            if self.client_startup:
                if len(self.client_buf) < 8:
                    return
                length, code = struct.unpack("!ii", self.client_buf[:8])
                if len(self.client_buf) < length:
                    return
                self.client_buf = self.client_buf[length:]
                if code in (SSL_REQUEST, GSSENC_REQUEST):
                    self.server_single_bytes += 1
                else:  # StartupMessage or CancelRequest
                    self.client_startup = False
                    self.stats.client_messages[
                        "startup" if code != CANCEL_REQUEST else "cancel"
                    ] += 1
                continue
            if len(self.client_buf) < 5:
                return
            kind = chr(self.client_buf[0])
            (length,) = struct.unpack("!i", self.client_buf[1:5])
            if len(self.client_buf) < 1 + length:
                return
            body = self.client_buf[5 : 1 + length]
            self.client_buf = self.client_buf[1 + length :]
            self.stats.client_messages[kind] += 1
            self._classify(kind, body)

    def _classify(self, kind: str, body: bytes) -> None:
        """Name what each round trip carried: a simple Query's text, or for an extended-protocol
        batch (Parse/Bind/.../Sync) the text of the statement bound last."""
        if kind == "Q":
            self.stats.statements[label(body.split(b"\0", 1)[0])] += 1
        elif kind == "P":
            name, query = body.split(b"\0", 2)[:2]
            self.prepared[name] = query
        elif kind == "B":
            statement = body.split(b"\0", 2)[1]
            self.batch.append(label(self.prepared.get(statement, b"?")))
        elif kind == "S":
            # A pipelined batch (several statements, one Sync) is one round trip.
            self.stats.statements[" + ".join(self.batch) or "(sync)"] += 1
            self.batch = []

    def from_server(self, data: bytes) -> None:
        if self.client_spoke:
            self.stats.turns += 1
            self.client_spoke = False
        if self.encrypted:
            return
        self.server_buf += data
        while self.server_buf:
            if self.server_single_bytes:
                answer = self.server_buf[:1]
                self.server_buf = self.server_buf[1:]
                self.server_single_bytes -= 1
                if answer in (b"S", b"G"):
                    self.encrypted = True
                    self.stats.unparsed_connections += 1
                    return
                continue
            if len(self.server_buf) < 5:
                return
            kind = self.server_buf[0:1]
            (length,) = struct.unpack("!i", self.server_buf[1:5])
            if len(self.server_buf) < 1 + length:
                return
            self.server_buf = self.server_buf[1 + length :]
            if kind == b"Z":
                self.stats.ready_for_query += 1
                if not self.ready_seen:
                    self.ready_seen = True
                    self.stats.connection_starts += 1


class DelayProxy:
    """Threads, not asyncio: a sleeping writer thread per direction keeps the delay exact to
    about 0.1 ms, where event-loop timers (millisecond granularity) add up to 1 ms per hop."""

    def __init__(self, target_host: str, target_port: int, delay: float = 0.0) -> None:
        self.target = (target_host, target_port)
        self.delay = delay  # seconds, each direction; may be changed while running
        self.stats = Stats()
        self.lock = threading.Lock()
        self.port = 0
        self._listener: socket.socket | None = None
        self._closing = threading.Event()
        self._sockets: set[socket.socket] = set()

    def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        listener = socket.create_server((host, port), backlog=256)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()
        return self.port

    def snapshot(self) -> Stats:
        with self.lock:
            return self.stats.snapshot()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.stats.connections += 1
                self._sockets |= {client, upstream}
            wire = WireCounter(self.stats)
            self._pump(client, upstream, wire.from_client, "bytes_to_server")
            self._pump(upstream, client, wire.from_server, "bytes_to_client")

    def _pump(
        self, source: socket.socket, sink: socket.socket, seen: Callable[[bytes], None], tally: str
    ) -> None:
        chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

        def read() -> None:
            while True:
                try:
                    data = source.recv(CHUNK)
                except OSError:
                    data = b""
                if data:
                    with self.lock:
                        setattr(self.stats, tally, getattr(self.stats, tally) + len(data))
                        seen(data)
                chunks.put((time.monotonic() + self.delay, data))
                if not data:
                    return

        def write() -> None:
            while True:
                due, data = chunks.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    if not data:
                        sink.shutdown(socket.SHUT_WR)
                        return
                    sink.sendall(data)
                except OSError:
                    self._forget(source, sink)
                    return

        threading.Thread(target=read, daemon=True, name="proxy-read").start()
        threading.Thread(target=write, daemon=True, name="proxy-write").start()

    def _forget(self, *sockets: socket.socket) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
            with self.lock:
                self._sockets.discard(sock)

    def close(self) -> None:
        self._closing.set()
        if self._listener is not None:
            self._listener.close()
        with self.lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> "DelayProxy":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or "127.0.0.1", int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:5432", help="host:port of PostgreSQL")
    parser.add_argument("--listen", default="127.0.0.1:6543", help="host:port to listen on")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="added delay each way")
    args = parser.parse_args()
    proxy = DelayProxy(*_host_port(args.target), delay=args.delay_ms / 1000)
    port = proxy.start(*_host_port(args.listen))
    print(f"proxy on port {port} -> {args.target}, +{args.delay_ms} ms each way", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.close()
        print(proxy.snapshot(), flush=True)


if __name__ == "__main__":
    main()
