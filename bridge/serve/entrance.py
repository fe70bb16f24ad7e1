"""The authenticated entrance: a streaming reverse proxy in front of MLflow that the tunnel points at.

Every request must carry the access token, as HTTP Basic (any user name, password = token) or
`Authorization: Bearer <token>`; anything else gets 401 with `WWW-Authenticate` so a browser
prompts. Repeated failures from one client get 429. One path alone is public: the client wheel
(bridge/serve/wheel.py) that a notebook installs before it has any way to send the token, and the
one-line page naming it: GET/HEAD only, a few requests per client, no secret in them.
Forwarded requests look local to MLflow (Host rewritten to MLflow's own address, credentials stripped), so
MLflow's Host-header and cross-origin protection stay on, unchanged, for everything else.

Responses go back compressed when the client accepts it (bridge/serve/compression.py), and every response to a
tunnel client is counted in the month's tunnel usage (bridge/serve/usage.py), which `bridge status` shows.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import errno
import functools
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from bridge import config, secrets
from bridge.errors import ConfigError, ServeError
from bridge.record import LOOPBACK_HOSTS
from bridge.serve import compression, uploads
from bridge.serve.usage import TunnelUsage
from bridge.serve.wheel import PATH_PREFIX as WHEEL_PREFIX
from bridge.serve.wheel import ClientWheel

log = logging.getLogger(__name__)

REALM = "bridge"
#: Failed logins one client may make within the window before it gets 429.
DEFAULT_MAX_FAILURES = 10
DEFAULT_FAILURE_WINDOW_S = 60.0
#: Requests for the public client wheel one client may make per window (every request counts: 200, 304, HEAD).
#: A notebook installs it once per runtime, and pip tries a failed download at most 6 times (`--retries 5`, its
#: default): 10 in 10 minutes lets a person re-run the install cell, while a loop fetching the ~0.3 MB file stops
#: at 1.4 k downloads a day instead of eating the tunnel's monthly budget (ngrok's free plan: 1 GB, 20 k requests).
DEFAULT_WHEEL_DOWNLOADS = 10
DEFAULT_WHEEL_WINDOW_S = 600.0
#: What a client asking for the wheel before it is built is told to wait (a build takes a few seconds).
WHEEL_BUILDING_RETRY_S = 5
#: Bodies up to this size are read whole (fewer round trips); larger ones stream through.
BUFFER_LIMIT_BYTES = 256 * 1024
STREAM_CHUNK_BYTES = 256 * 1024
#: Below uvicorn's 5 s keep-alive, so the proxy never reuses a connection MLflow is closing.
UPSTREAM_KEEPALIVE_S = 3.5
#: Bodies compressed on the fly above this size go to a worker thread, so the event loop keeps serving.
COMPRESS_IN_THREAD_BYTES = 64 * 1024
#: The header in which each tunnel's edge names the client it saw: ngrok appends it to X-Forwarded-For, Cloudflare
#: sets Cf-Connecting-Ip (replacing any a client sent). The entrance throttles failed logins per that address.
CLIENT_HEADERS = {"ngrok": "X-Forwarded-For", "cloudflared": "Cf-Connecting-Ip"}
#: Where MLflow's artifact proxy takes uploads (`mlflow server --serve-artifacts`).
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"

# Hop-by-hop headers (RFC 9110 §7.6.1) are for one connection only; `Expect` is answered here.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
        "Transfer-Encoding", "Upgrade", "Expect",
    )
)  # fmt: skip
# Also never forwarded upstream: the credentials (MLflow needs none), the Host (rewritten), and the
# X-Forwarded-Proto/Host that would make MLflow build URLs for an origin it is not serving.
_NOT_FORWARDED = _HOP_BY_HOP | {"authorization", "host", "x-forwarded-proto", "x-forwarded-host"}
_NOT_RETURNED = _HOP_BY_HOP | {"content-length"}


def _move_into(file: Path, root: Path, path: str) -> None:
    """Place `file` at `root/path` as MLflow's local artifact repository lays files out (the proxy's path under its
    destination folder), appearing whole or not at all: a rename, or on another filesystem a copy beside the
    target renamed over it. A staged file is not read or copied once more, as a PUT to MLflow would."""
    target = root.joinpath(*path.split("/"))
    if root.resolve() not in target.resolve().parents:
        raise uploads.PlaceError(f"artifact path {path!r} leaves MLflow's artifact folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(file, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            partial = target.with_name(f".{target.name}.bridge-upload")
            shutil.copyfile(file, partial)
            os.replace(partial, target)
    except OSError as exc:
        raise uploads.PlaceError(f"could not write {path} into MLflow's artifact folder: {exc}") from None


class TokenSource:
    """The current access token, re-read whenever `bridge token --rotate` touches the revision file."""

    def __init__(self, load: Callable[[], str] | None = None, revision_file: Path | None = None) -> None:
        self._load = load or (lambda: secrets.access_token(create=True))
        self._revision_file = revision_file or config.paths().token_revision_file
        self._reload_lock = threading.Lock()
        self._stamp = self._revision_stamp()
        self._token = self._load().encode()
        self.revision = 0

    def _revision_stamp(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self._revision_file)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def current(self) -> bytes:
        """The token now; one stat() per call, a secret-store read only when the marker changed."""
        stamp = self._revision_stamp()
        if stamp != self._stamp:
            with self._reload_lock:  # the entrance's loop and the supervisor both ask
                if stamp != self._stamp:
                    self._token = self._load().encode()  # if this raises, the next call tries again
                    self._stamp = stamp
                    self.revision += 1
                    log.info("Access token changed; the old token is no longer accepted.")
        return self._token

    def matches(self, presented: bytes | None) -> bool:
        token = self.current()
        # compare_digest even for a missing token, so timing does not say which case it was.
        return hmac.compare_digest(presented if presented is not None else b"", token) and presented is not None


def presented_token(authorization: str | None) -> bytes | None:
    """The token inside an `Authorization` header (Basic password or Bearer), or None."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    try:
        if scheme == "bearer":
            return value.encode("utf-8", "surrogateescape") or None
        if scheme == "basic":
            decoded = base64.b64decode(value.encode("ascii"), validate=True)
            _user, sep, password = decoded.partition(b":")
            return password if sep and password else None
    except (binascii.Error, UnicodeError, ValueError):
        return None
    return None


class AuthThrottle:
    """Count events per client in a sliding window (failed logins; downloads of the public wheel); over the limit
    a client gets 429 until the oldest ages out."""

    def __init__(
        self,
        max_failures: int = DEFAULT_MAX_FAILURES,
        window_s: float = DEFAULT_FAILURE_WINDOW_S,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 1 or window_s <= 0:
            raise ConfigError("auth throttle needs max_failures >= 1 and window_s > 0")
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_clients = max_clients
        self._clock = clock
        self._failures: dict[str, collections.deque[float]] = {}

    def retry_after_s(self, client: str) -> float | None:
        """Seconds until `client` may try again, or None when it is not throttled."""
        times = self._failures.get(client)
        if not times:
            return None
        now = self._clock()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        if len(times) < self.max_failures:
            return None
        return times[0] + self.window_s - now

    def failed(self, client: str) -> None:
        """Count one event (a failed login, a download) for `client`."""
        if client not in self._failures and len(self._failures) >= self.max_clients:
            self._prune()
        self._failures.setdefault(client, collections.deque(maxlen=self.max_failures)).append(self._clock())

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)

    def _prune(self) -> None:
        cutoff = self._clock() - self.window_s
        for client in [c for c, t in self._failures.items() if not t or t[-1] <= cutoff]:
            del self._failures[client]
        while len(self._failures) >= self.max_clients:  # still full: forget the oldest entries
            del self._failures[next(iter(self._failures))]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when installed (in the `serve` extra; less CPU per proxied request), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


@functools.lru_cache(maxsize=4096)  # asked for every request, and peers are few
def _is_loopback(address: str | None) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 from a dual-stack socket
    return (mapped or ip).is_loopback


def _mark_compressed(headers: CIMultiDict[str], coding: str) -> None:
    headers["Content-Encoding"] = coding
    headers["Vary"] = compression.add_vary(headers.get("Vary"))
    headers.popall("Content-Length", None)
    etag = compression.weak_etag(headers.get("ETag"))
    if etag:
        headers["ETag"] = etag


def _bytes_out(response: web.StreamResponse) -> int:
    """Bytes a response put on the wire: its body (compressed, as sent) and, approximately, its head."""
    if isinstance(response, web.Response) and not response.prepared:
        body = response.body
        size = len(body) if isinstance(body, (bytes, bytearray)) else (response.content_length or 0)
    else:
        size = response.body_length
    head = 17 + sum(len(k) + len(v) + 4 for k, v in response.headers.items()) + 2
    return size + head + 64  # + Date, Server and Content-Length, which aiohttp adds while sending


def _is_wheel_path(raw_path: str) -> bool:
    """True for the public prefix itself (the wheel's index page) or a wheel file name under it (query ignored)."""
    path = raw_path.split("?", 1)[0]
    name = path[len(WHEEL_PREFIX) :]
    return path.startswith(WHEEL_PREFIX) and (name == "" or (name.endswith(".whl") and not set(name) & {"/", "%"}))


def _from_this_machine(request: web.BaseRequest) -> bool:
    """True for a peer on this machine: loopback, or the very address the entrance listens on.

    With `--host <LAN address>` the ngrok agent on this machine connects from that address, not loopback;
    treating it as a stranger would put every tunnel client in one throttle bucket.
    """
    peer = request.remote
    if _is_loopback(peer):
        return True
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    return bool(peer and sockname and peer == sockname[0])


class Entrance:
    """The proxy: `start()` binds it in a background thread, `stop()` closes it; `url` is where it listens."""

    def __init__(
        self,
        upstream_port: int,
        *,
        host: str = config.DEFAULT_HOST,
        port: int | None = None,
        tokens: TokenSource | None = None,
        throttle: AuthThrottle | None = None,
        client_header: str = CLIENT_HEADERS["ngrok"],
        usage: TunnelUsage | None = None,
        compress: bool = True,
        staging: Path | None = None,
        max_part_bytes: int = uploads.DEFAULT_MAX_PART_BYTES,
        local_artifacts: Path | None = None,
        client_wheel: ClientWheel | None = None,
        wheel_throttle: AuthThrottle | None = None,
    ) -> None:
        """`staging`: the folder of resumable uploads (bridge/serve/uploads.py); None serves none.
        `local_artifacts`: MLflow's artifact destination when it is a local folder (see `_place`).
        `client_wheel`: the wheel served without the token at its public path; None serves none."""
        self.upstream_port = upstream_port
        self.host = host
        self.port = port if port is not None else upstream_port + 1
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"entrance port {self.port} is not in 0..65535")
        self.tokens = tokens or TokenSource()
        self.throttle = throttle or AuthThrottle()
        self.client_header = client_header
        self._client_header_is_list = client_header.lower() == "x-forwarded-for"
        self.usage = usage if usage is not None else TunnelUsage(None)
        self.compress = compress
        self.static_cache = compression.StaticCache()
        self._upstream = f"http://127.0.0.1:{upstream_port}"
        self._upstream_host = f"127.0.0.1:{upstream_port}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.local_artifacts = local_artifacts
        self.uploads = (
            uploads.Uploads(staging, self._place, max_part_bytes=max_part_bytes) if staging is not None else None
        )
        self.client_wheel = client_wheel
        self.wheel_throttle = wheel_throttle or AuthThrottle(DEFAULT_WHEEL_DOWNLOADS, DEFAULT_WHEEL_WINDOW_S)
        self.requests = 0
        self.rejected = 0
        self.wheel_downloads = 0
        #: Requests from elsewhere (through the tunnel, or another machine) refused for a missing or wrong token (401),
        #: and for too many of those from one client (429). This machine's own probes (`bridge status`) are not counted.
        self.refused_logins = 0
        self.throttled = 0
        self.last_refused_at: float | None = None

    def __repr__(self) -> str:
        return f"Entrance(url={self.url!r}, upstream={self._upstream!r})"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> None:
        """Bind and serve in a daemon thread with its own event loop; raise `ServeError` if binding fails."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._start_async())
            except BaseException as exc:  # reported to the starting thread below
                failure.append(exc)
                loop.run_until_complete(self._stop_async())
                loop.close()
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._stop_async())
                loop.close()

        self._thread = threading.Thread(target=run, name="bridge-entrance", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise ServeError(f"the entrance did not start within {timeout_s:.0f} s")
        if failure:
            exc = failure[0]
            raise ServeError(
                f"the entrance could not listen on {self.host}:{self.port} ({exc}); choose another --entrance-port "
                "or --host"
            ) from None

    def stop(self, timeout_s: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        self._thread = None

    async def _start_async(self) -> None:
        connector = aiohttp.TCPConnector(limit=100, keepalive_timeout=UPSTREAM_KEEPALIVE_S, ttl_dns_cache=None)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bodies pass through byte for byte, Content-Encoding and all
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        app = web.Application(client_max_size=BUFFER_LIMIT_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # No access log: it would cost time per request, and auth failures are logged below anyway.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0:
            server = site._server  # aiohttp exposes the bound port nowhere else
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("Entrance listening on %s, forwarding to %s", self.url, self._upstream)

    async def _stop_async(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # --- requests --------------------------------------------------------------------------------

    def client_of(self, request: web.BaseRequest) -> str | None:
        """Who is knocking, for the throttle; None for a local process talking to the entrance directly.

        The tunnel's agent is a loopback peer and names the real client in its `client_header`: last in
        X-Forwarded-For (the entry ngrok itself appended), or Cf-Connecting-Ip (set by Cloudflare's edge). A
        loopback peer without that header is a process on this machine, which can reach MLflow's own port
        without any login: throttling it would protect nothing and only lock out the workstation's own tools
        after a few typos.
        """
        peer = request.remote or ""
        if _from_this_machine(request):
            forwarded = request.headers.get(self.client_header, "")
            if self._client_header_is_list:
                forwarded = forwarded.rsplit(",", 1)[-1]
            return forwarded.strip() or None
        return peer

    def own_origin(self, request: web.BaseRequest) -> str:
        """The origin a browser using this entrance sends: scheme from the tunnel, host as received."""
        scheme = "http"
        if _from_this_machine(request):
            scheme = request.headers.get("X-Forwarded-Proto", "http").split(",", 1)[0].strip().lower() or "http"
        return f"{scheme}://{request.headers.get('Host', '').lower()}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        client = self.client_of(request)
        response = await self._answer(request, client)
        if client is not None and _from_this_machine(request):  # it came through the tunnel: it costs
            self.usage.add(_bytes_out(response))
        return response

    async def _answer(self, request: web.Request, client: str | None) -> web.StreamResponse:
        if self.client_wheel is not None and _is_wheel_path(request.raw_path):
            return self._serve_wheel(request, client, self.client_wheel)
        retry_after = self.throttle.retry_after_s(client) if client is not None else None
        if retry_after is not None:
            self.rejected += 1
            self.throttled += 1
            return web.Response(
                status=429,
                text="Too many failed logins from this client; try again later.\n",
                headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
            )
        if not self.tokens.matches(presented_token(request.headers.get("Authorization"))):
            self.rejected += 1
            if client is not None:
                self.refused_logins += 1
                self.last_refused_at = time.time()
            if client is not None:
                self.throttle.failed(client)
            log.info(
                "Refused %s %s from %s: missing or wrong access token",
                request.method,
                request.path,
                client or "this machine",
            )
            return web.Response(
                status=401,
                text="This MLflow is behind bridge's entrance: log in with the access token (`bridge token`).\n",
                headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
            )
        if client is not None:
            self.throttle.succeeded(client)
        if not request.raw_path.startswith("/"):  # absolute-form or asterisk targets are not for MLflow
            return web.Response(status=400, text="Request target must be a path.\n")
        if self.uploads is not None and (request.path + "/").startswith(uploads.PREFIX + "/"):
            return await self.uploads.handle(request)
        return await self._forward(request)

    def _serve_wheel(self, request: web.Request, client: str | None, wheel: ClientWheel) -> web.Response:
        """The public client wheel: read-only, throttled per client, revalidated by ETag; no token needed."""
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="The client wheel is read-only.\n", headers={"Allow": "GET, HEAD"})
        if client is not None:
            retry_after = self.wheel_throttle.retry_after_s(client)
            if retry_after is not None:
                return web.Response(
                    status=429,
                    text="Too many downloads of the client wheel from this client; try again later.\n",
                    headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
                )
            self.wheel_throttle.failed(client)  # counts this download
        index = request.path == WHEEL_PREFIX
        if not index and request.path != wheel.public_path:
            # Another version's name (a notebook from before an upgrade): say which one this workstation serves.
            return web.Response(status=404, text=f"This workstation serves {wheel.public_path}\n")
        data, etag = wheel.data, wheel.etag
        if data is None or etag is None:
            if wheel.error is not None:
                return web.Response(status=500, text=f"The client wheel could not be built: {wheel.error}\n")
            return web.Response(
                status=503,
                text="The client wheel is being built; try again in a few seconds.\n",
                headers={"Retry-After": str(WHEEL_BUILDING_RETRY_S)},
            )
        if index:  # a find-links page (PEP 503's form): how a notebook learns the wheel's name from the URL alone
            digest = hashlib.sha256(data).hexdigest()
            page = f'<!DOCTYPE html>\n<a href="{wheel.name}#sha256={digest}">{wheel.name}</a>\n'
            return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-cache"})
        # no-cache: pip's HTTP cache keeps the file and asks again with If-None-Match, answered 304 when unchanged.
        headers = {"ETag": etag, "Cache-Control": "no-cache", "Content-Type": "application/octet-stream"}
        if etag in {tag.strip() for tag in request.headers.get("If-None-Match", "").split(",")}:
            return web.Response(status=304, headers=headers)
        self.wheel_downloads += 1
        return web.Response(body=data, headers=headers)  # aiohttp sends no body to a HEAD, but its length

    async def _place(self, file: Path, path: str) -> None:
        """Put a finished upload into MLflow: moved into MLflow's artifact folder when that is a local folder,
        else through MLflow's own artifact proxy (its artifact repository stores it: S3 for a team). Raises
        PlaceError with why."""
        if self.local_artifacts is not None:
            await asyncio.get_running_loop().run_in_executor(None, _move_into, file, self.local_artifacts, path)
            return
        assert self._session is not None
        url = URL(self._upstream + ARTIFACTS_API + "/" + quote(path), encoded=True)
        headers = {"Host": self._upstream_host, "Content-Type": "application/octet-stream"}
        try:
            with open(file, "rb") as fh:
                async with self._session.put(url, data=fh, headers=headers) as answer:
                    if answer.status != 200:
                        text = (await answer.text())[:300]
                        raise uploads.PlaceError(f"MLflow answered {answer.status}: {text}")
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise uploads.PlaceError(f"MLflow is not reachable ({type(exc).__name__})") from None

    def _upstream_headers(self, request: web.BaseRequest) -> CIMultiDict[str]:
        connection = request.headers.get("Connection")
        skip = _NOT_FORWARDED
        if connection:  # headers the client named as hop-by-hop for this connection go no further
            skip = skip | {token.strip().lower() for token in connection.split(",")}
        headers: CIMultiDict[str] = CIMultiDict([(k, v) for k, v in request.headers.items() if k.lower() not in skip])
        headers["Host"] = self._upstream_host
        origin = request.headers.get("Origin")
        if origin:
            if origin.lower() == self.own_origin(request):
                # The UI served through this entrance is same-origin by definition; tell MLflow so.
                headers["Origin"] = self._upstream
            elif (urlsplit(origin).hostname or "") in LOOPBACK_HOSTS:
                # MLflow trusts every loopback origin; through the entrance another local page is foreign.
                headers["Origin"] = "null"
        return headers

    def _response_headers(self, upstream: aiohttp.ClientResponse, request: web.BaseRequest) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict(
            [(k, v) for k, v in upstream.headers.items() if k.lower() not in _NOT_RETURNED]
        )
        location = headers.get("Location")
        if location and location.startswith(self._upstream):
            headers["Location"] = self.own_origin(request) + location[len(self._upstream) :]
        return headers

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body: bytes | AsyncIterator[bytes] | None = None
        if request.body_exists:
            length = request.content_length
            if length is not None and length <= BUFFER_LIMIT_BYTES:
                body = await request.read()
            else:  # large artifact uploads stream through, never held in memory
                body = request.content.iter_chunked(STREAM_CHUNK_BYTES)
        url = URL(self._upstream + request.raw_path, encoded=True)
        try:
            upstream = await self._session.request(
                request.method, url, headers=self._upstream_headers(request), data=body, allow_redirects=False
            )
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            log.warning("MLflow unreachable for %s %s: %s", request.method, request.path, type(exc).__name__)
            return web.Response(
                status=503,
                text="MLflow is not reachable right now (restarting?); retry shortly.\n",
                headers={"Retry-After": "2"},
            )
        async with upstream:
            headers = self._response_headers(upstream, request)
            length = upstream.content_length
            coding = self._coding_for(request, upstream)
            if coding is not None and request.path.startswith(compression.STATIC_PREFIXES) and upstream.status == 200:
                return await self._static_compressed(request, upstream, headers, coding)
            if request.method != "HEAD" and length is not None and length <= BUFFER_LIMIT_BYTES:
                payload = await upstream.read()
                if coding is not None and len(payload) >= compression.MIN_COMPRESS_BYTES:
                    packed = await self._compress(payload, coding)
                    if len(packed) < len(payload):
                        _mark_compressed(headers, coding)
                        payload = packed
                return web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=payload)
            if coding is not None and request.method != "HEAD":
                return await self._stream_compressed(request, upstream, headers, coding)
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
            if length is not None:
                response.content_length = length
            await response.prepare(request)
            if request.method != "HEAD":
                # A failure from here on can only cut the connection: the status line is already sent.
                async for chunk in upstream.content.iter_chunked(STREAM_CHUNK_BYTES):
                    await response.write(chunk)
            await response.write_eof()
            return response

    # --- compression -----------------------------------------------------------------------------

    def _coding_for(self, request: web.BaseRequest, upstream: aiohttp.ClientResponse) -> str | None:
        """The coding to send this response in, or None to send MLflow's bytes unchanged."""
        if not self.compress or request.method not in ("GET", "POST"):
            return None
        if upstream.status in (204, 206, 304) or upstream.status < 200:
            return None
        headers = upstream.headers
        if "Content-Encoding" in headers or "Content-Range" in headers:
            return None  # MLflow (or an artifact's own type) encoded it already
        if "no-transform" in headers.get("Cache-Control", "").lower():
            return None
        if not compression.is_compressible(headers.get("Content-Type")):
            return None
        if upstream.content_length is not None and upstream.content_length < compression.MIN_COMPRESS_BYTES:
            return None
        return compression.choose_encoding(request.headers.get("Accept-Encoding"))

    async def _compress(self, payload: bytes, coding: str, *, static: bool = False) -> bytes:
        if len(payload) < COMPRESS_IN_THREAD_BYTES and not static:
            return compression.compress(payload, coding)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(compression.compress, payload, coding, static=static))

    async def _static_compressed(
        self, request: web.Request, upstream: aiohttp.ClientResponse, headers: CIMultiDict[str], coding: str
    ) -> web.StreamResponse:
        """A UI file, compressed once at the best level and served from the cache after that."""
        validator = upstream.headers.get("ETag") or upstream.headers.get("Last-Modified") or ""
        key = (request.raw_path, f"{validator}|{upstream.content_length}", coding)
        packed = self.static_cache.get(key) if validator else None
        if packed is None:
            payload = await upstream.read()
            packed = await self._compress(payload, coding, static=True)
            if len(packed) >= len(payload):  # nothing gained: send it as it is
                return web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=payload)
            if validator:
                self.static_cache.put(key, packed)
        # A hit leaves MLflow's bytes unread: the connection is dropped rather than reused, which is cheaper.
        _mark_compressed(headers, coding)
        body = b"" if request.method == "HEAD" else packed
        return web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=body)

    async def _stream_compressed(
        self, request: web.Request, upstream: aiohttp.ClientResponse, headers: CIMultiDict[str], coding: str
    ) -> web.StreamResponse:
        """A large compressible body (a big search result, a text artifact) compressed chunk by chunk."""
        _mark_compressed(headers, coding)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        await response.prepare(request)
        packer = compression.StreamCompressor(coding)
        loop = asyncio.get_running_loop()
        async for chunk in upstream.content.iter_chunked(STREAM_CHUNK_BYTES):
            out = await loop.run_in_executor(None, packer.compress, chunk)  # 256 kB at a time, off the loop
            if out:
                await response.write(out)
        await response.write(packer.finish())
        await response.write_eof()
        return response
