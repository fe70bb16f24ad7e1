"""In-memory transports for the client's `Link`: exact, reproducible faults without a proxy process.

    HandlerTransport(handler)        every request answered by `handler(request) -> Response` (httpx's MockTransport)
    FaultTransport(inner)            passes requests to `inner` (a real server, or a handler) unless a fault
                                     is scheduled for them:

        refuse        no connection: the server never sees the request
        timeout       the request times out before the server sees it
        lost_answer   the server applies the request, then the answer is lost (the client sees a TransportError)
        status        the transport answers `status` itself (the server never sees the request)

Faults are scheduled with `fail(kind, path=…, times=…, status=…)`: `path` is a substring of the request
path (None: every request), `times` how many matching requests to affect (None: until `clear()`). Every
request is recorded in order in `requests`, with the fault applied to it (or None).

`hold(paths, methods=…)` keeps matching requests in the transport, unsent, until `release()` (a link too slow for
them): a request held past its read timeout fails as a timeout and is never sent; one held when `abort()` is
called fails at once. `held` lists every request that waited, with the sha256 of a file it carried.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bridge.client.link import Request, RequestsTransport, Response, Transport
from bridge.errors import TransportError

FAULTS = ("refuse", "timeout", "lost_answer", "status")


class HandlerTransport(Transport):
    """Answers every request with `handler(request)`."""

    def __init__(self, handler: Callable[[Request], Response]) -> None:
        self.handler = handler

    def send(self, request: Request) -> Response:
        return self.handler(request)


@dataclass
class _Fault:
    kind: str
    path: str | None
    times: int | None
    status: int
    body: bytes


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    json: dict | None
    fault: str | None
    headers: dict = field(default_factory=dict, compare=False)
    #: What a held request carried: the sha256 of its file body, or of the file a tus creation announces.
    sha256: str | None = field(default=None, compare=False)


def carried_sha256(request: Request) -> str | None:
    """The sha256 of the file `request` sends (a PUT of an open file) or announces (a tus creation's metadata)."""
    name = getattr(request.data, "name", None)
    if isinstance(name, str):
        digest = hashlib.sha256()
        with open(name, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()
    meta = next((v for k, v in request.headers.items() if k.lower() == "upload-metadata"), None)
    for pair in (meta or "").split(","):
        key, _, value = pair.strip().partition(" ")
        if key == "sha256":
            return base64.b64decode(value).decode()
    return None


class FaultTransport(Transport):
    """`inner` (default: real HTTP) with faults injected on schedule; records every request."""

    def __init__(self, inner: Transport | None = None) -> None:
        self.inner = inner or RequestsTransport()
        self.requests: list[Recorded] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self.held: list[Recorded] = []
        self._holding: tuple[tuple[str, ...], frozenset[str] | None] | None = None
        self._aborts = 0
        self._hold_changed = threading.Condition(self._lock)

    def fail(
        self, kind: str, *, path: str | None = None, times: int | None = None, status: int = 503, body: bytes = b""
    ) -> None:
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; one of {FAULTS}")
        with self._lock:
            self._faults.append(_Fault(kind, path, times, status, body))

    def clear(self) -> None:
        """No more faults (a hold stays until `release`)."""
        with self._lock:
            self._faults.clear()

    def hold(self, paths: tuple[str, ...], *, methods: tuple[str, ...] | None = None) -> None:
        """Keep requests whose path contains one of `paths` (and of `methods`) unsent until `release()`."""
        with self._lock:
            self._holding = (tuple(paths), frozenset(methods) if methods is not None else None)

    def release(self) -> None:
        """Send what is held, and hold nothing more."""
        with self._hold_changed:
            self._holding = None
            self._hold_changed.notify_all()

    def _holds(self, request: Request) -> bool:
        holding = self._holding
        if holding is None:
            return False
        paths, methods = holding
        return (methods is None or request.method in methods) and any(p in request.path for p in paths)

    def _wait_while_held(self, request: Request) -> None:
        with self._lock:
            if not self._holds(request):
                return
        self.held.append(Recorded(request.method, request.path, request.json, "held", sha256=carried_sha256(request)))
        deadline = time.monotonic() + request.timeout[1]
        with self._hold_changed:
            aborts = self._aborts
            while self._holds(request):
                left = deadline - time.monotonic()
                if self._aborts != aborts:
                    raise TransportError(f"ConnectionError talking to {request.url} (cut while held by the transport)")
                if left <= 0:
                    raise TransportError(f"ReadTimeout talking to {request.url} (held by the test transport)")
                self._hold_changed.wait(left)

    def _take(self, request: Request) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.path is None or fault.path in request.path:
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            self._faults.remove(fault)
                    return fault
        return None

    def count(self, path: str, *, method: str | None = None) -> int:
        """Requests recorded whose path contains `path` (and of `method`, when given)."""
        return sum(1 for r in self.requests if path in r.path and (method is None or r.method == method))

    def send(self, request: Request) -> Response:
        self._wait_while_held(request)
        fault = self._take(request)
        self.requests.append(
            Recorded(request.method, request.path, request.json, fault.kind if fault else None, dict(request.headers))
        )
        if fault is None:
            return self.inner.send(request)
        if fault.kind == "refuse":
            raise TransportError(f"ConnectionError talking to {request.url} (refused by the test transport)")
        if fault.kind == "timeout":
            raise TransportError(f"ReadTimeout talking to {request.url} (the test transport)")
        if fault.kind == "status":
            return Response(fault.status, fault.body)
        self.inner.send(request)  # lost_answer: the server applied it; the client never hears back
        raise TransportError(f"ConnectionError talking to {request.url} (answer lost by the test transport)")

    def abort(self) -> None:
        with self._hold_changed:
            self._aborts += 1
            self._hold_changed.notify_all()
        self.inner.abort()

    def close(self) -> None:
        self.inner.close()
