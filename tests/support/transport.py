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
"""

from __future__ import annotations

import threading
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


class FaultTransport(Transport):
    """`inner` (default: real HTTP) with faults injected on schedule; records every request."""

    def __init__(self, inner: Transport | None = None) -> None:
        self.inner = inner or RequestsTransport()
        self.requests: list[Recorded] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()

    def fail(
        self, kind: str, *, path: str | None = None, times: int | None = None, status: int = 503, body: bytes = b""
    ) -> None:
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; one of {FAULTS}")
        with self._lock:
            self._faults.append(_Fault(kind, path, times, status, body))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

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
        self.inner.abort()

    def close(self) -> None:
        self.inner.close()
