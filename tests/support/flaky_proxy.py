"""A test-owned TCP proxy on 127.0.0.1 that makes the link to a real MLflow server fail on demand.

The proxy reads each HTTP/1.1 request whole (keep-alive aware, Content-Length or chunked), counts it, and
then acts by the mode current at that moment:

    pass        forward, relay the response
    refuse      stop listening (connection refused); any other mode listens again on the same port
    blackhole   accept and read, never answer
    reset       RST the client: at="request" after forwarding half the request (server never applies it),
                at="response" after relaying half of the server's response (server applied it)
    http_5xx    answer `status` (503) itself, forward nothing
    slow        forward and relay in `chunk_size` pieces, `delay_s` before each piece (response=False: only
                the request is slowed, the answer relayed at once)
    lost_ack    forward the request, read the server's whole response, close the client without sending it

Every mode but `refuse` also takes `path` (only requests whose path contains it are affected; others pass)
and `times` (affect that many requests, then switch back to `pass` by itself) — e.g. lose exactly the
acknowledgement of the first `runs/create`.

One thread per connection plus one accept thread; every socket has a timeout and `close()` shuts all of
them, so the proxy never outlives its test.
"""

from __future__ import annotations

import collections
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import pytest

from tests.support.mlflow_server import free_port

MODES = ("pass", "refuse", "blackhole", "reset", "http_5xx", "slow", "lost_ack")
_MODE_OPTIONS = {
    "pass": {},
    "refuse": {},
    "blackhole": {},
    "reset": {"at": "request"},
    "http_5xx": {"status": 503},
    "slow": {"delay_s": 0.05, "chunk_size": 4096, "response": True},
    "lost_ack": {},
}
_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
_MAX_HEADER_BYTES = 256 * 1024


class _Closed(Exception):
    """The peer closed the connection (cleanly, or between requests)."""


class _Stream:
    """Buffered reads from a socket: exact counts, up to a delimiter, or to EOF."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise _Closed()
        self.buf += data

    def until(self, delim: bytes, limit: int = _MAX_HEADER_BYTES) -> bytes:
        while True:
            idx = self.buf.find(delim)
            if idx >= 0:
                out, self.buf = self.buf[: idx + len(delim)], self.buf[idx + len(delim) :]
                return out
            if len(self.buf) > limit:
                raise ValueError("header too large")
            self._fill()

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def to_eof(self) -> bytes:
        try:
            while True:
                self._fill()
        except _Closed:
            pass
        out, self.buf = self.buf, b""
        return out


@dataclass
class _Message:
    first_line: str
    headers: dict[str, str]
    raw: bytes
    close: bool = False


def _read_head(stream: _Stream) -> tuple[str, dict[str, str], bytes]:
    head = stream.until(b"\r\n\r\n")
    lines = head[:-4].decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, head


def _read_body(stream: _Stream, headers: dict[str, str], *, to_eof: bool) -> tuple[bytes, bool]:
    """The body's raw bytes (framing kept) and whether the connection ends after it."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = b""
        while True:
            size_line = stream.until(b"\r\n")
            out += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, ended by an empty line
                    line = stream.until(b"\r\n")
                    out += line
                    if line == b"\r\n":
                        return out, False
            out += stream.exact(size + 2)
    if "content-length" in headers:
        return stream.exact(int(headers["content-length"])), False
    if to_eof:
        return stream.to_eof(), True
    return b"", False


def _read_request(stream: _Stream) -> _Message:
    while True:
        line, headers, head = _read_head(stream)
        if line:  # tolerate stray CRLF between requests
            break
    body, _ = _read_body(stream, headers, to_eof=False)
    close = headers.get("connection", "").lower() == "close"
    return _Message(line, headers, head + body, close)


def _read_response(stream: _Stream, method: str) -> _Message:
    while True:
        line, headers, head = _read_head(stream)
        status = int(line.split(" ", 2)[1])
        if status != 100:
            break
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        body, eof = b"", False
    else:
        body, eof = _read_body(stream, headers, to_eof=True)
    close = eof or headers.get("connection", "").lower() == "close"
    return _Message(line, headers, head + body, close)


def _target(first_line: str) -> tuple[str, str]:
    """(method, path without query) of a request line."""
    method, _, rest = first_line.partition(" ")
    return method, rest.rsplit(" ", 1)[0].split("?", 1)[0]


def _reset(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN (SO_LINGER with a zero timeout)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


@dataclass
class FlakyProxy:
    """A proxy from `url` to `upstream_host:upstream_port` whose failure mode can change at any time."""

    upstream_host: str
    upstream_port: int
    port: int = 0
    io_timeout: float = 30.0
    max_connections: int = 64
    mode: str = "pass"
    options: dict = field(default_factory=dict)
    #: Requests seen per mode, and per (mode, "METHOD /path") — the query string is dropped.
    requests: collections.Counter = field(default_factory=collections.Counter)
    lines: collections.Counter = field(default_factory=collections.Counter)
    #: Every request in the order the proxy read it: (mode, "METHOD /path"), the query string dropped.
    history: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._path: str | None = None
        self._times: int | None = None
        self._open_listener()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ----------------------------------------------------------------------------------- control

    def set_mode(self, name: str, *, path: str | None = None, times: int | None = None, **options) -> None:
        """Switch to mode `name` (for requests matching `path`, for `times` requests); bad input raises at once."""
        if name not in MODES:
            raise ValueError(f"unknown proxy mode {name!r}; modes: {', '.join(MODES)}")
        unknown = set(options) - set(_MODE_OPTIONS[name])
        if unknown:
            raise TypeError(
                f"mode {name!r} takes no option(s) {sorted(unknown)}; it takes {sorted(_MODE_OPTIONS[name])}"
            )
        if name == "refuse" and (path is not None or times is not None):
            raise TypeError("mode 'refuse' closes the port for everyone; it takes no path or times")
        if times is not None and times < 1:
            raise ValueError(f"times must be >= 1, got {times}")
        with self._lock:
            self.mode, self.options = name, {**_MODE_OPTIONS[name], **options}
            self._path, self._times = path, times
        if name == "refuse":
            self._close_listener()
            self._drop_connections()
        else:
            self._open_listener()

    def count(self, path: str | None = None, *, method: str | None = None, mode: str | None = None) -> int:
        """Requests seen whose path contains `path` (and match `method`, `mode` when given)."""
        with self._lock:
            total = 0
            for (seen_mode, line), n in self.lines.items():
                seen_method, _, seen_path = line.partition(" ")
                if mode is not None and seen_mode != mode:
                    continue
                if method is not None and seen_method != method:
                    continue
                if path is not None and path not in seen_path:
                    continue
                total += n
            return total

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.lines.clear()
            self.history.clear()

    def close(self) -> None:
        """Stop listening, cut every connection, and wait (bounded) for the threads to end."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._close_listener()
        self._drop_connections()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> FlakyProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- listener

    def _open_listener(self) -> None:
        with self._lock:
            if self._listener is not None or self._closed:
                return
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(64)
            sock.settimeout(0.1)
            self._listener = sock
            thread = threading.Thread(
                target=self._accept_loop, args=(sock,), name=f"flaky-proxy-{self.port}", daemon=True
            )
            self._accept_thread = thread
        thread.start()

    def _close_listener(self) -> None:
        with self._lock:
            sock, thread = self._listener, self._accept_thread
            self._listener = self._accept_thread = None
        if sock is not None:
            # The accept loop polls every 0.1 s; wait for it so the port is really closed on return.
            if thread is not None:
                thread.join(timeout=5)
            sock.close()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            with self._lock:
                if self._listener is not listener:
                    return
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                full = len(self._threads) >= self.max_connections
                if not full:
                    thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
                    self._threads.add(thread)
                    self._sockets.add(client)
            if full:
                _reset(client)
                continue
            thread.start()

    def _drop_connections(self) -> None:
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -------------------------------------------------------------------------------- connection

    def _track(self, sock: socket.socket) -> socket.socket:
        sock.settimeout(self.io_timeout)
        with self._lock:
            self._sockets.add(sock)
        return sock

    def _forget(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets.discard(sock)
        try:
            sock.close()
        except OSError:
            pass

    def _connect_upstream(self) -> socket.socket:
        sock = socket.create_connection((self.upstream_host, self.upstream_port), timeout=self.io_timeout)
        return self._track(sock)

    def _send(self, sock: socket.socket, data: bytes, options: dict | None = None) -> None:
        if not options:
            sock.sendall(data)
            return
        size = int(options["chunk_size"])
        for start in range(0, len(data), size):
            time.sleep(float(options["delay_s"]))
            sock.sendall(data[start : start + size])

    def _swallow(self, client: socket.socket) -> None:
        """Read and drop everything until the client gives up or the proxy closes; never answer."""
        while True:
            with self._lock:
                if self._closed:
                    return
            try:
                if not client.recv(65536):
                    return
            except TimeoutError:
                continue

    def _mode_for(self, first_line: str) -> tuple[str, dict]:
        """The mode this request meets, spending one of `times` when it is affected."""
        with self._lock:
            mode, options = self.mode, dict(self.options)
            if mode == "pass" or mode == "refuse":
                return mode, options
            if self._path is not None and self._path not in _target(first_line)[1]:
                return "pass", {}
            if self._times is not None:
                self._times -= 1
                if self._times == 0:
                    self.mode, self.options, self._path, self._times = "pass", {}, None, None
            return mode, options

    def _record(self, mode: str, first_line: str) -> None:
        method, path = _target(first_line)
        with self._lock:
            self.requests[mode] += 1
            self.lines[(mode, f"{method} {path}")] += 1
            self.history.append((mode, f"{method} {path}"))

    def _serve(self, client: socket.socket) -> None:
        self._track(client)
        stream = _Stream(client)
        upstream: socket.socket | None = None
        upstream_stream: _Stream | None = None
        reset_client = False
        try:
            while True:
                request = _read_request(stream)
                mode, options = self._mode_for(request.first_line)
                self._record(mode, request.first_line)
                method = request.first_line.split(" ", 1)[0]

                if mode == "refuse":  # a request that slipped in as the listener closed
                    reset_client = True
                    return
                if mode == "blackhole":
                    self._swallow(client)
                    return
                if mode == "http_5xx":
                    status = int(options["status"])
                    body = f'{{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "flaky proxy: {status}"}}'.encode()
                    client.sendall(
                        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n".encode()
                        + body
                    )
                    if request.close:
                        return
                    continue

                if upstream is None:
                    try:
                        upstream = self._connect_upstream()
                    except OSError:
                        reset_client = True  # like a gateway whose backend is down
                        return
                    upstream_stream = _Stream(upstream)

                if mode == "reset" and options["at"] == "request":
                    # Half the request reaches the server, which therefore never applies it.
                    upstream.sendall(request.raw[: max(1, len(request.raw) // 2)])
                    _reset(upstream)
                    self._forget(upstream)
                    upstream = None
                    reset_client = True
                    return

                self._send(upstream, request.raw, options if mode == "slow" else None)
                response = _read_response(upstream_stream, method)

                if mode == "lost_ack":
                    return  # the server applied it; the client hears a closed connection, nothing else
                if mode == "reset":  # at == "response"
                    client.sendall(response.raw[: max(1, len(response.raw) // 2)])
                    reset_client = True
                    return

                self._send(client, response.raw, options if mode == "slow" and options["response"] else None)
                if response.close:
                    return
                if request.close:
                    return
        except (_Closed, OSError, ValueError):
            return
        finally:
            self._forget(upstream)
            with self._lock:
                self._sockets.discard(client)
                self._threads.discard(threading.current_thread())
            if reset_client:
                _reset(client)
            else:
                try:
                    client.close()
                except OSError:
                    pass


@pytest.fixture
def make_flaky_proxy():
    """A factory for proxies to any (host, port); every proxy it made is closed after the test."""
    made: list[FlakyProxy] = []

    def make(upstream_host: str, upstream_port: int, **kw) -> FlakyProxy:
        proxy = FlakyProxy(upstream_host, upstream_port, **kw)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


@pytest.fixture
def flaky_proxy(mlflow_server, make_flaky_proxy) -> FlakyProxy:
    """A flaky link to the session's MLflow server, starting in `pass` mode."""
    return make_flaky_proxy("127.0.0.1", mlflow_server.port)
