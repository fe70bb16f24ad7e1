"""A tiny HTTP/1.1 origin on 127.0.0.1 that counts what reaches it, for tests of the stand-in edges and links.

    POST|PUT /sink       read the body as it streams (Content-Length or chunked), keep only its length; answer
                         {"received": n}
    GET /bytes/<n>       send n bytes
    any /hang            read the body, then answer only once `release` is set (or the origin closes)
    any /sleep/<s>       read the body, answer after s seconds

Bodies are counted in 64 KiB reads and never held, so a 100 MB upload costs no memory. Each request whose head
was read counts in `arrived`; once its body ended — whole or cut — it is logged in `seen` as a `Seen`.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

_PIECE = 64 * 1024
_ZEROS = bytes(_PIECE)


@dataclass(frozen=True)
class Seen:
    """One request as the origin saw it: `complete` is False when the body ended early (a cut connection)."""

    method: str
    path: str
    declared: int | None
    received: int
    complete: bool


@dataclass
class ByteOrigin:
    """The origin's server thread and its log; `close()` releases hanging requests and stops it."""

    io_timeout: float = 30.0
    seen: list[Seen] = field(default_factory=list)
    arrived: int = 0
    release: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._changed = threading.Condition()
        origin = self

        class Handler(_Handler):
            pass

        Handler.origin = origin
        Handler.timeout = self.io_timeout
        self._server = _Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="byte-origin", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_for(self, predicate, timeout: float) -> bool:
        """Wait (at most `timeout` s) until `predicate(origin)` holds; whether it did."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout=timeout)

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _note_arrival(self) -> None:
        with self._changed:
            self.arrived += 1
            self._changed.notify_all()

    def _note(self, seen: Seen) -> None:
        with self._changed:
            self.seen.append(seen)
            self._changed.notify_all()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # A burst of a few hundred connections (the edge's in-flight limit) must not overflow the accept queue.
    request_queue_size = 1024


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    origin: ByteOrigin

    def log_message(self, format, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def _count_body(self) -> tuple[int, bool]:
        """(bytes received, whether the body ended as its framing says) — reading, never keeping."""
        received = 0
        try:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                while True:
                    size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"x", 16)
                    if size == 0:
                        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return received, True
                    left = size
                    while left:
                        data = self.rfile.read(min(left, _PIECE))
                        if not data:
                            return received, False
                        received += len(data)
                        left -= len(data)
                    if self.rfile.read(2) != b"\r\n":
                        return received, False
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                data = self.rfile.read1(min(left, _PIECE))
                if not data:
                    return received, False
                received += len(data)
                left -= len(data)
            return received, True
        except (OSError, ValueError):
            return received, False

    def _handle(self) -> None:
        self.origin._note_arrival()
        declared = self.headers.get("Content-Length")
        received, complete = self._count_body()
        path = self.path.split("?", 1)[0]
        self.origin._note(Seen(self.command, path, int(declared) if declared else None, received, complete))
        if not complete:
            self.close_connection = True
            return
        try:
            if path.startswith("/bytes/"):
                self._send_bytes(int(path.rsplit("/", 1)[1]))
                return
            if path == "/hang":
                self.origin.release.wait(timeout=120)
            elif path.startswith("/sleep/"):
                time.sleep(float(path.rsplit("/", 1)[1]))
            self._answer({"received": received})
        except OSError:
            self.close_connection = True

    def _answer(self, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_bytes(self, n: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        while n:
            piece = _ZEROS[: min(n, _PIECE)]
            self.wfile.write(piece)
            n -= len(piece)


@pytest.fixture
def byte_origin():
    """A counting origin for this test, closed (its hanging requests released) at teardown."""
    origin = ByteOrigin()
    yield origin
    origin.close()
