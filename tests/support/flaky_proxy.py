"""A test-owned TCP proxy on 127.0.0.1 that makes the link to a real server fail, slow down or flap on demand.

The proxy reads each HTTP/1.1 request (keep-alive aware, Content-Length or chunked), counts it, and then acts by
the mode current at that moment:

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

Two properties of the link itself hold under every mode, so a slow link can also lose acknowledgements:

    throttle    `throttle(up_bytes_per_s=…, down_bytes_per_s=…)`, or the constructor fields of the same names:
                bandwidth per direction, "up" client→server and "down" server→client, each one token bucket
                shared by every connection (as one access link is); None leaves a direction unlimited
    flapping    `flap(up_s=…, down_s=…)`: from now on the link is up for `up_s`, down for `down_s`, and again;
                down resets every open connection (RST) and refuses new ones. `stop_flapping()` leaves it up.
                `clock=` injects the time source; `link_events` logs each change as (clock time, "up"|"down")

Bodies up to `WHOLE_BODY_BYTES` are read whole before the mode is chosen (a fault then meets a complete
request); a larger body is relayed piece by piece as it arrives, the proxy holding at most 1 MiB of it, and the
mode is the one current once that first MiB was read. `bytes_up` / `bytes_down` count the bytes relayed.

One thread per connection plus one accept thread (and one for a flapping schedule); every socket has a timeout
and `close()` shuts all of them, so the proxy never outlives its test.
"""

from __future__ import annotations

import collections
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
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
#: Bodies up to this size are read whole before a request meets its mode; larger ones stream through.
WHOLE_BODY_BYTES = 1024 * 1024
#: The most read from a socket at once, and so the largest piece of a streamed body.
_PIECE_BYTES = 64 * 1024


class _Closed(Exception):
    """The peer closed the connection (cleanly, or between requests)."""


class _Stream:
    """Buffered reads from a socket: exact counts, up to a delimiter, some bytes, or to EOF."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(_PIECE_BYTES)
        if not data:
            raise _Closed()
        self.buf += data

    def _take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def until(self, delim: bytes, limit: int = _MAX_HEADER_BYTES) -> bytes:
        while True:
            idx = self.buf.find(delim)
            if idx >= 0:
                return self._take(idx + len(delim))
            if len(self.buf) > limit:
                raise ValueError("header too large")
            self._fill()

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        return self._take(n)

    def some(self, most: int) -> bytes:
        """Between 1 and `most` bytes: what is buffered, else one read."""
        if not self.buf:
            self._fill()
        return self._take(most)

    def to_eof_pieces(self) -> Iterator[bytes]:
        while True:
            try:
                yield self.some(_PIECE_BYTES)
            except _Closed:
                return


def _read_head(stream: _Stream) -> tuple[str, dict[str, str], bytes]:
    head = stream.until(b"\r\n\r\n")
    lines = head[:-4].decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, head


def _body_pieces(stream: _Stream, headers: dict[str, str], *, to_eof: bool) -> Iterator[bytes]:
    """The body's raw bytes (framing kept), in pieces of at most `_PIECE_BYTES`."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = stream.until(b"\r\n")
            yield size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, ended by an empty line
                    line = stream.until(b"\r\n")
                    yield line
                    if line == b"\r\n":
                        return
            left = size + 2
            while left:
                piece = stream.some(min(left, _PIECE_BYTES))
                left -= len(piece)
                yield piece
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left:
            piece = stream.some(min(left, _PIECE_BYTES))
            left -= len(piece)
            yield piece
    elif to_eof:
        yield from stream.to_eof_pieces()


class _Body:
    """One message's body as it is read: the pieces read ahead, then (when not `whole`) the rest as it comes."""

    def __init__(self, stream: _Stream, headers: dict[str, str], *, to_eof: bool, empty: bool = False) -> None:
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self.declared: int | None = None
        if not chunked and "content-length" in headers:
            self.declared = int(headers["content-length"])
        #: The connection ends with this body (a response framed by closing).
        self.ends_connection = not empty and not chunked and self.declared is None and to_eof
        self._rest: Iterator[bytes] = iter(()) if empty else _body_pieces(stream, headers, to_eof=to_eof)
        self.ahead: list[bytes] = []
        self.ahead_bytes = 0
        self.whole = empty

    def read_ahead(self, most: int) -> bool:
        """Read until the body ends (whole, True) or more than `most` bytes are held (False)."""
        while not self.whole and self.ahead_bytes <= most:
            piece = next(self._rest, None)
            if piece is None:
                self.whole = True
            else:
                self.ahead.append(piece)
                self.ahead_bytes += len(piece)
        return self.whole

    def pieces(self) -> Iterator[bytes]:
        """Every piece once: those read ahead, then the rest as it arrives."""
        ahead, self.ahead = self.ahead, []
        yield from ahead
        yield from self._rest

    def drain(self) -> None:
        for _ in self.pieces():
            pass

    def part_limit(self, head: bytes) -> int:
        """How much of head + body is "half the message": half of a known length, else the head and what is held."""
        if self.whole:
            return max(1, (len(head) + self.ahead_bytes) // 2)
        if self.declared is not None:
            return max(1, (len(head) + self.declared) // 2)
        return len(head) + self.ahead_bytes


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


class TokenBucket:
    """`rate` bytes per second with bursts of at most `burst` bytes, kept as the time the bucket runs dry.

    `take(n)` blocks until n bytes may go. Callers reserve in turn under a lock and sleep outside it, so
    connections sharing a bucket share its rate; over any interval t at most `rate * t + burst` bytes pass.
    """

    def __init__(
        self,
        rate: float,
        burst: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"a rate must be > 0 bytes/s, got {rate}")
        self.rate = float(rate)
        # 20 ms of traffic: small enough that a measurement over a second sees the rate, not the burst.
        self.burst = int(burst if burst is not None else min(256 * 1024, max(4096, rate / 50)))
        if self.burst < 1:
            raise ValueError(f"a burst must be >= 1 byte, got {self.burst}")
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._dry_at = clock() - self.burst / self.rate  # starts full

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate:g} B/s, burst={self.burst} B)"

    def take(self, n: int) -> None:
        """Wait until `n` bytes (at most `burst`) may be sent."""
        with self._lock:
            now = self._clock()
            # A bucket never holds more than `burst`: time spent full earns nothing.
            self._dry_at = max(self._dry_at, now - self.burst / self.rate) + n / self.rate
            wait = self._dry_at - now
        if wait > 0:
            self._sleep(wait)


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
    #: Bandwidth client→server and server→client in bytes per second; None: unlimited (see `throttle`).
    up_bytes_per_s: float | None = None
    down_bytes_per_s: float | None = None
    #: Requests seen per mode, and per (mode, "METHOD /path") — the query string is dropped.
    requests: collections.Counter = field(default_factory=collections.Counter)
    lines: collections.Counter = field(default_factory=collections.Counter)
    #: Every request in the order the proxy read it: (mode, "METHOD /path"), the query string dropped.
    history: list = field(default_factory=list)
    #: Bytes relayed client→server (requests) and server→client (responses, and the proxy's own answers).
    bytes_up: int = 0
    bytes_down: int = 0
    #: Each change of a flapping link: (the flap clock's time, "up" | "down").
    link_events: list = field(default_factory=list)

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
        self._buckets: dict[str, TokenBucket | None] = {"up": None, "down": None}
        self._link_down = False
        self._link_state_up = True
        self._link_changed = threading.Condition(self._lock)
        self._flapper: threading.Thread | None = None
        self._flap_stop = threading.Event()
        self.throttle(up_bytes_per_s=self.up_bytes_per_s, down_bytes_per_s=self.down_bytes_per_s)
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

    def throttle(self, *, up_bytes_per_s: float | None = None, down_bytes_per_s: float | None = None) -> None:
        """Limit the link's bandwidth each way (bytes per second, shared by all connections); None: unlimited."""
        buckets = {
            direction: TokenBucket(rate) if rate is not None else None
            for direction, rate in (("up", up_bytes_per_s), ("down", down_bytes_per_s))
        }
        with self._lock:
            self.up_bytes_per_s, self.down_bytes_per_s = up_bytes_per_s, down_bytes_per_s
            self._buckets = buckets

    def flap(
        self,
        up_s: float,
        down_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        poll_s: float = 0.005,
    ) -> None:
        """From now (by `clock`), keep the link up for `up_s` then down for `down_s`, over and over."""
        if up_s <= 0 or down_s <= 0:
            raise ValueError(f"up_s and down_s must be > 0, got {up_s}, {down_s}")
        self.stop_flapping()
        start = clock()
        stop = self._flap_stop = threading.Event()

        def schedule() -> None:
            while not stop.is_set():
                now = clock()
                self._set_link(up=(now - start) % (up_s + down_s) < up_s, at=now)
                stop.wait(poll_s)

        self._set_link(up=True, at=start)
        self._flapper = threading.Thread(target=schedule, name=f"flaky-proxy-{self.port}-flap", daemon=True)
        self._flapper.start()

    def stop_flapping(self) -> None:
        """End a flapping schedule and leave the link up."""
        self._flap_stop.set()
        if self._flapper is not None:
            self._flapper.join(timeout=5)
            self._flapper = None
        self._set_link(up=True, at=None)

    @property
    def link_up(self) -> bool:
        return self._link_state_up

    def wait_link(self, up: bool, timeout: float) -> bool:
        """Wait (at most `timeout` s) until the link is up (or down); whether it got there."""
        with self._link_changed:
            return self._link_changed.wait_for(lambda: self._link_state_up is up, timeout=timeout)

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
            self.bytes_up = self.bytes_down = 0

    def close(self) -> None:
        """Stop listening, cut every connection, and wait (bounded) for the threads to end."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._flap_stop.set()
        if self._flapper is not None:
            self._flapper.join(timeout=5)
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
            if self._listener is not None or self._closed or self._link_down or self.mode == "refuse":
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
            if thread is not None and thread is not threading.current_thread():
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
                # Accepted as the link went down: a refused connection would not have got this far either.
                full = self._link_down or len(self._threads) >= self.max_connections
                if not full:
                    thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
                    self._threads.add(thread)
                    self._sockets.add(client)
            if full:
                _reset(client)
                continue
            thread.start()

    def _drop_connections(self, *, reset: bool = False) -> None:
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                if reset:  # the owning thread's close() then sends an RST, not a FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _set_link(self, *, up: bool, at: float | None) -> None:
        with self._lock:
            if self._link_down is not up or self._closed:
                return  # no change
            self._link_down = not up  # from here the accept loop resets what it still accepts
        if up:
            self._open_listener()
        else:
            self._drop_connections(reset=True)  # first: the cut is what a test measures
            self._close_listener()
        with self._lock:  # published once it holds: a waiter then meets a refused port, or an open one
            self._link_state_up = up
            if at is not None:
                self.link_events.append((at, "up" if up else "down"))
            self._link_changed.notify_all()

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

    def _send(self, sock: socket.socket, data: bytes, direction: str, slow: dict | None = None) -> None:
        """Send `data` one way ("up" to the server, "down" to the client): slowed, throttled, counted."""
        size = int(slow["chunk_size"]) if slow else len(data) or 1
        with self._lock:
            bucket = self._buckets[direction]
        for start in range(0, len(data), size):
            if slow:
                time.sleep(float(slow["delay_s"]))
            part = data[start : start + size]
            step = bucket.burst if bucket is not None else len(part)
            for offset in range(0, len(part), step):
                piece = part[offset : offset + step]
                if bucket is not None:
                    bucket.take(len(piece))
                # Counted before it goes (and taken back if it cannot): a reader that has received the bytes
                # finds them counted (counting after `sendall` raced the receiver on a busy machine).
                self._count(direction, len(piece))
                try:
                    sock.sendall(piece)
                except BaseException:
                    self._count(direction, -len(piece))
                    raise

    def _count(self, direction: str, size: int) -> None:
        with self._lock:
            if direction == "up":
                self.bytes_up += size
            else:
                self.bytes_down += size

    def _relay(self, sock: socket.socket, head: bytes, body: _Body, direction: str, slow: dict | None) -> None:
        """Send a message on: in one go when it was read whole (so `slow` cuts it as before), else as it comes."""
        if body.whole:
            self._send(sock, head + b"".join(body.pieces()), direction, slow)
            return
        self._send(sock, head, direction, slow)
        for piece in body.pieces():
            self._send(sock, piece, direction, slow)

    def _relay_part(self, sock: socket.socket, head: bytes, body: _Body, direction: str) -> None:
        """Send only the first part of a message (see `_Body.part_limit`), then stop."""
        left = body.part_limit(head)
        for piece in (head, *body.ahead):
            if left <= 0:
                return
            self._send(sock, piece[:left], direction)
            left -= len(piece)
        if not body.whole:
            for piece in body.pieces():
                if left <= 0:
                    return
                self._send(sock, piece[:left], direction)
                left -= len(piece)

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
                while True:
                    first_line, headers, head = _read_head(stream)
                    if first_line:  # tolerate stray CRLF between requests
                        break
                body = _Body(stream, headers, to_eof=False)
                body.read_ahead(WHOLE_BODY_BYTES)
                close = headers.get("connection", "").lower() == "close"
                mode, options = self._mode_for(first_line)
                self._record(mode, first_line)
                method = first_line.split(" ", 1)[0]

                if mode == "refuse":  # a request that slipped in as the listener closed
                    reset_client = True
                    return
                if mode == "blackhole":
                    self._swallow(client)
                    return
                if mode == "http_5xx":
                    body.drain()  # the rest of a large body, so the connection stays usable
                    status = int(options["status"])
                    answer = f'{{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "flaky proxy: {status}"}}'.encode()
                    self._send(
                        client,
                        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(answer)}\r\n\r\n".encode()
                        + answer,
                        "down",
                    )
                    if close:
                        return
                    continue

                if upstream is None:
                    try:
                        upstream = self._connect_upstream()
                    except OSError:
                        reset_client = True  # like a gateway whose backend is down
                        return
                    upstream_stream = _Stream(upstream)
                assert upstream_stream is not None

                if mode == "reset" and options["at"] == "request":
                    # Half the request reaches the server, which therefore never applies it.
                    self._relay_part(upstream, head, body, "up")
                    _reset(upstream)
                    self._forget(upstream)
                    upstream = None
                    reset_client = True
                    return

                self._relay(upstream, head, body, "up", options if mode == "slow" else None)
                while True:
                    status_line, response_headers, response_head = _read_head(upstream_stream)
                    status = int(status_line.split(" ", 2)[1])
                    if status != 100:
                        break
                empty = method == "HEAD" or status in (204, 304) or 100 <= status < 200
                response = _Body(upstream_stream, response_headers, to_eof=True, empty=empty)
                response.read_ahead(WHOLE_BODY_BYTES)

                if mode == "lost_ack":
                    response.drain()
                    return  # the server applied it; the client hears a closed connection, nothing else
                if mode == "reset":  # at == "response"
                    self._relay_part(client, response_head, response, "down")
                    reset_client = True
                    return

                slow = options if mode == "slow" and options["response"] else None
                self._relay(client, response_head, response, "down", slow)
                if response.ends_connection or response_headers.get("connection", "").lower() == "close":
                    return
                if close:
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
