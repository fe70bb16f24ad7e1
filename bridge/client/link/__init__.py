"""The client's one way to talk to its server: URL, token, HTTP, failure classification, online state, probe.

    store reads · artifacts · auth · connect() · sender · heartbeats ──▶ Link ──▶ Transport ──▶ server

Everything that talks to the bridge server goes through a `Link`: it adds the token (only ever to its own
server), translates every failure into `TransportError` / `HttpError` (bridge.errors), keeps `online` and
`last_error`, re-reads the token when it is refused, and follows the published record when the server moves.

`Transport` is the seam underneath: one required method, `send()`, plus `abort()` and `close()`.
`RequestsTransport` is the real one; tests pass one that refuses, times out, loses the answer after the
server applied the request, or answers any status (tests/support/transport.py).
"""

from __future__ import annotations

import abc
import contextlib
import enum
import json
import logging
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import quote

import requests
import urllib3

from bridge.client import forksafe
from bridge.client.link import discovery
from bridge.errors import HttpError, LinkError, TokenRejectedError, TransportError
from bridge.record import describe_url

log = logging.getLogger(__name__)

API = "/api/2.0/mlflow"
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
#: The cheapest authenticated request: is the server there, and does it take our token?
PROBE_ENDPOINT = "/experiments/search"
#: ngrok's free domains answer browser-like clients with an interstitial page unless this header is sent.
NGROK_SKIP_WARNING = {"ngrok-skip-browser-warning": "1"}
#: Consecutive network failures, and seconds of them, before the published record is re-read.
REDISCOVER_AFTER_FAILURES = 3
REDISCOVER_AFTER_S = 5.0
#: Reads from the training thread must not hang it: a short connect and a bounded read.
READ_TIMEOUT = (3.0, 30.0)
#: An upload's socket timeout (each send, and the wait for the answer once the body is sent): the server answers
#: after storing the file, so a base plus the file's size at a modest storing rate, at most the cap. A stalled
#: connection then holds delivery for about that long, not for the cap (harness: a black-holed console.log upload
#: held every other entry for 300 s).
UPLOAD_ANSWER_BASE_S = 30.0
UPLOAD_STORE_BYTES_PER_S = 1_000_000
UPLOAD_READ_TIMEOUT_S = 300.0


def upload_read_timeout(size_bytes: int, read_timeout_s: float) -> float:
    """How long an upload of `size_bytes` may wait on its socket (see UPLOAD_ANSWER_BASE_S)."""
    return max(read_timeout_s, min(UPLOAD_READ_TIMEOUT_S, UPLOAD_ANSWER_BASE_S + size_bytes / UPLOAD_STORE_BYTES_PER_S))


class Verdict(enum.Enum):
    RETRY = "retry"  # try the same request again later
    TOKEN = "token"  # the token was refused: pause, re-read it, retry slowly
    REJECT = "reject"  # the server refuses this content: isolate the entry, dead-letter it


def classify_failure(exc: BaseException) -> Verdict:
    """What to do after `exc`: a pure function of the failure, never of how often it happened."""
    if isinstance(exc, HttpError):
        if exc.status in (401, 403):
            return Verdict.TOKEN
        if exc.status in (408, 425, 429) or exc.status >= 500:
            return Verdict.RETRY
        if exc.error_code is None:
            # Not MLflow speaking (a tunnel's "endpoint offline" 404, a proxy page): the link is wrong, not the data.
            return Verdict.RETRY
        return Verdict.REJECT
    return Verdict.RETRY


# ------------------------------------------------------------------------------------------ transport


@dataclass(frozen=True)
class Request:
    """One HTTP request as the transport sees it; `data` is bytes or an open file (uploads)."""

    method: str
    url: str
    headers: dict = field(default_factory=dict)
    params: dict | None = None
    json: dict | None = None
    data: bytes | str | BinaryIO | None = None
    timeout: tuple[float, float] = (5.0, 20.0)

    @property
    def path(self) -> str:
        """The URL's path (and query, if any), e.g. /api/2.0/mlflow/runs/log-batch."""
        return "/" + self.url.split("://", 1)[-1].partition("/")[2]


@dataclass
class Response:
    status: int
    content: bytes = b""
    headers: dict = field(default_factory=dict)

    def json(self):
        return json.loads(self.content) if self.content else {}

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class Transport(abc.ABC):
    """Sends one request and returns the answer; raises `TransportError` when there is no usable answer."""

    @abc.abstractmethod
    def send(self, request: Request) -> Response: ...

    # Optional: a transport with no requests to cut, or nothing to release, keeps these as they are.
    def abort(self) -> None:  # noqa: B027
        """Cut requests in flight from another thread (they fail with TransportError)."""

    def close(self) -> None:  # noqa: B027
        """Release connections."""


class _AbortableAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter, plus `abort()`: cut its open connections from another thread.

    `Session.close()` only drops idle pooled connections; a request in flight would run to its timeout
    (20 s, 300 s for uploads) while `stop()` waits for it.
    """

    def __init__(self) -> None:
        self._open: weakref.WeakSet = weakref.WeakSet()
        self._open_lock = threading.Lock()
        super().__init__()

    def _track(self, conn) -> None:
        with self._open_lock:
            self._open.add(conn)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        track = self._track

        class HTTPPool(urllib3.HTTPConnectionPool):
            def _new_conn(self):
                conn = super()._new_conn()
                track(conn)
                return conn

        class HTTPSPool(urllib3.HTTPSConnectionPool):
            def _new_conn(self):
                conn = super()._new_conn()
                track(conn)
                return conn

        self.poolmanager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}

    def abort(self) -> None:
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            sock = getattr(conn, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    # socket.socket's own shutdown, not SSLSocket's (which drops its TLS state under the reader).
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)


#: Methods a request may be sent again for at once when its pooled connection turns out dead (HTTP's idempotent
#: methods: reads mostly; never a POST, whose retry is the journal's business, nor a body streamed from a file).
_SENT_AGAIN_ON_A_DEAD_CONNECTION = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


def _failure(request: Request, exc: Exception) -> TransportError:
    return TransportError(f"{type(exc).__name__} talking to {describe_url(request.url)}")


class RequestsTransport(Transport):
    """The real transport: one requests session per thread (sessions are not shared safely), all abortable."""

    def __init__(self) -> None:
        self._aborts = 0  # how many times `abort` cut requests: a request cut so is not sent again
        self._local = threading.local()
        self._adapters: weakref.WeakSet = weakref.WeakSet()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        forksafe.renew_after_fork(self)

    def _after_fork_in_child(self) -> None:
        # Pooled connections are the parent's sockets: the child opens its own.
        self._local = threading.local()
        self._adapters = weakref.WeakSet()
        self._sessions = []
        self._lock = threading.Lock()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            adapter = _AbortableAdapter()
            session = requests.Session()
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            with self._lock:
                self._adapters.add(adapter)
                self._sessions.append(session)
            self._local.session = session
        return session

    def send(self, request: Request) -> Response:
        aborts = self._aborts
        try:
            return self._send(request)
        except requests.RequestException as exc:
            # A keep-alive connection the server closed while it sat idle in the pool (uvicorn closes after 5 s)
            # fails the next request sent on it: an idempotent one goes once more, on a new connection. Seen as
            # reads failing with no fault at all (harness: `log_table` raising after a slow `log_model`).
            if (
                not isinstance(exc, requests.ConnectionError)
                or isinstance(exc, requests.Timeout)
                or request.method not in _SENT_AGAIN_ON_A_DEAD_CONNECTION
                or not isinstance(request.data, (bytes, str, type(None)))  # a file read once: not again
                or aborts != self._aborts
            ):
                raise _failure(request, exc) from None
        try:
            return self._send(request)
        except requests.RequestException as exc:
            raise _failure(request, exc) from None

    def _send(self, request: Request) -> Response:
        resp = self._session().request(
            request.method,
            request.url,
            params=request.params,
            json=request.json,
            data=request.data,
            headers=request.headers,
            timeout=request.timeout,
        )
        return Response(resp.status_code, resp.content, dict(resp.headers))

    def abort(self) -> None:
        self._aborts += 1
        with self._lock:
            adapters = list(self._adapters)
        for adapter in adapters:
            adapter.abort()

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            with contextlib.suppress(Exception):
                session.close()
        self._local = threading.local()


# ----------------------------------------------------------------------------------------------- link


class Link:
    """The client's connection to one bridge server (which may move: see `maybe_rediscover`)."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        transport: Transport | None = None,
        token_source: Callable[[], str | None] | None = None,
        http_timeout_s: float = 20.0,
        rediscover: bool = True,
    ) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._token_source = token_source
        self.transport = transport or RequestsTransport()
        self.timeout = (min(5.0, http_timeout_s), http_timeout_s)
        self.rediscover_enabled = rediscover
        self.online: bool | None = None
        self.last_error: str | None = None
        self.token_rejected = False
        self.requests = 0
        #: {server URL: the largest upload part it takes, or None: no resumable uploads} (link/uploads.py), and
        #: until when a "None" holds before the server is asked again (it may have been a tunnel's own 404).
        self.upload_parts: dict[str, int | None] = {}
        self.upload_parts_until: dict[str, float] = {}
        #: {server URL: whether its uploads take the file's sha256 on a later part} (a head start: link/uploads.py)
        self.upload_sha256_later: dict[str, bool] = {}
        #: Bytes of files sent (every try counted, so a benchmark can compare them with what arrived).
        self.upload_bytes_sent = 0
        self.url_listeners: list[Callable[[str], None]] = []
        self._failures = 0
        self._failing_since: float | None = None
        self._last_failure_answered = False

    @property
    def token(self) -> str | None:
        return self._token

    def __repr__(self) -> str:
        return f"Link(url={describe_url(self.url)!r}, token={'…' if self._token else None})"

    # ------------------------------------------------------------------------------------ http

    def _headers(self) -> dict[str, str]:
        headers = dict(NGROK_SKIP_WARNING)
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: dict | None = None,
        params: dict | None = None,
        data: bytes | str | BinaryIO | None = None,
        timeout: tuple[float, float] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """One HTTP request to the server; errors as TransportError / HttpError, never with the token."""
        self.requests += 1
        sent = self._headers() | (headers or {})
        request = Request(method, self.url + path, sent, params, json_body, data, timeout or self.timeout)
        try:
            resp = self.transport.send(request)
        except TransportError as exc:
            self._note_failure(str(exc))
            raise
        if resp.status >= 400:
            error_code, message = None, resp.text[:500]
            with contextlib.suppress(ValueError, AttributeError):
                body = resp.json()
                error_code, message = body.get("error_code"), body.get("message", message)
            cls = TokenRejectedError if resp.status in (401, 403) else HttpError
            failure = cls(resp.status, error_code, message, resp.headers)
            if classify_failure(failure) is not Verdict.REJECT:
                self._note_failure(str(failure), answered=failure.error_code is not None)
            if isinstance(failure, TokenRejectedError):
                self._note_token_rejected(resp.status)
            raise failure
        self._note_success()
        return resp

    def call(
        self, endpoint: str, body: dict, *, method: str = "POST", timeout: tuple[float, float] | None = None
    ) -> dict:
        """An MLflow REST call (`endpoint` under /api/2.0/mlflow); the answer's JSON."""
        if method == "GET":
            resp = self.request("GET", API + endpoint, params=body, timeout=timeout)
        else:
            resp = self.request(method, API + endpoint, json_body=body, timeout=timeout)
        try:
            return resp.json()
        except ValueError:
            raise TransportError(
                f"{describe_url(self.url)}{API}{endpoint} answered with something that is not JSON"
            ) from None

    def check(self, timeout: float | None = None) -> None:
        """One cheap authenticated request; raises LinkError when the server is not usable."""
        self.call(
            PROBE_ENDPOINT, {"max_results": 1}, method="GET", timeout=None if timeout is None else (timeout, timeout)
        )

    def probe(self, timeout: float | None = None) -> bool:
        """True when the server answers and takes the token (`check` without the error)."""
        try:
            self.check(timeout)
            return True
        except LinkError:
            return False

    def abort(self) -> None:
        self.transport.abort()

    def close(self) -> None:
        self.transport.close()

    # ---------------------------------------------------------------------------------- state

    @property
    def answers(self) -> bool:
        """Whether a read on the training thread should ask the server: it is not known down, or its last
        failure was an answer (a 5xx, a 429: busy, not gone — a read costs one round trip and may well succeed).
        Known unreachable, a read would only wait out a timeout; the sender notices recovery."""
        return self.online is not False or self._last_failure_answered

    def _note_failure(self, message: str, *, answered: bool = False) -> None:
        self.online = False
        self._last_failure_answered = answered
        self.last_error = message
        self._failures += 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()

    def _note_token_rejected(self, status: int) -> None:
        if not self.token_rejected:
            log.warning(
                "bridge: the server rejected the access token (HTTP %d) — delivery paused; the journal "
                "keeps everything",
                status,
            )
        self.token_rejected = True
        self.last_error = f"token rejected (HTTP {status}); delivery paused, retrying slowly"

    def _note_success(self) -> None:
        self.online = True
        self._failures = 0
        self._failing_since = None
        if self.token_rejected:
            log.info("bridge: the server accepts the token again; delivery resumed")
        self.token_rejected = False

    @property
    def failures(self) -> int:
        """Consecutive failed requests since the last success."""
        return self._failures

    def refresh_token(self) -> None:
        """Re-read the token from where it came from (a rotated token, a Colab secret set meanwhile)."""
        if self._token_source is None:
            return
        with contextlib.suppress(Exception):
            token = self._token_source()
            if token:
                self._token = token

    def maybe_rediscover(self, *, interval_s: float | None = None) -> bool:
        """After a run of network failures, re-read the published record; True when the URL changed."""
        if not self.rediscover_enabled or self._failures < REDISCOVER_AFTER_FAILURES:
            return False
        if self._failing_since is None or time.monotonic() - self._failing_since < REDISCOVER_AFTER_S:
            return False
        try:
            endpoint = discovery.rediscover(self._token, self.url, interval_s=interval_s)
        except Exception as exc:  # re-discovery is best effort; delivery keeps retrying the old URL
            log.debug("bridge: re-discovery failed: %s", exc)
            return False
        if endpoint is None or endpoint.url.rstrip("/") == self.url:
            return False
        log.warning(
            "bridge: the server moved to %s (%s); delivering there", describe_url(endpoint.url), endpoint.source
        )
        self.url = endpoint.url.rstrip("/")
        self._failures = 0
        self._failing_since = None
        for listener in self.url_listeners:
            with contextlib.suppress(Exception):
                listener(self.url)
        return True

    # ------------------------------------------------------------------------------ artifacts

    @staticmethod
    def artifact_path(artifact_root: str, path: str = "") -> str:
        """`path` under a run's server artifact root, as the mlflow-artifacts proxy names it (no leading /)."""
        if not artifact_root or not artifact_root.startswith("mlflow-artifacts:"):
            raise ValueError(
                f"the server's artifact root for this run is {artifact_root!r}; bridge uploads only "
                "through the server's artifact proxy (mlflow server --serve-artifacts)"
            )
        rest = artifact_root[len("mlflow-artifacts:") :]
        if rest.startswith("//"):
            rest = rest[2:].split("/", 1)[1] if "/" in rest[2:] else ""
        return f"{rest.strip('/')}/{path}".strip("/")

    def artifact_url(self, artifact_root: str, path: str) -> str:
        """The mlflow-artifacts proxy path (under this server) of `path` under a run's artifact root."""
        return ARTIFACTS_API + "/" + quote(self.artifact_path(artifact_root, path))

    def list_artifacts(self, folder: str) -> list[dict]:
        """The proxy's listing of `folder` (a path as `artifact_path` gives it)."""
        return self.request("GET", ARTIFACTS_API, params={"path": folder}).json().get("files") or []
