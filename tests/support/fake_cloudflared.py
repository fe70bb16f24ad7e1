#!/usr/bin/env python3
"""A stand-in `cloudflared` for tests: the process bridge runs for `--tunnel cloudflared`.

It speaks what bridge uses of the real binary:
  * `cloudflared --version` → `cloudflared version 2025.11.1 (built 2025-11-12-1200 UTC)`;
  * `cloudflared tunnel [--no-autoupdate] [--metrics HOST:PORT] --url http://127.0.0.1:PORT`, a quick tunnel: it
    logs to stderr in cloudflared's format (`2026-11-28T21:00:00Z INF …`), prints the account-less notice,
    `Requesting new quick Tunnel on trycloudflare.com...`, the box

        INF +--------------------------------------------------------------------------------------------+
        INF |  Your quick Tunnel has been created! Visit it at (it may take some time to be reachable):  |
        INF |  https://<four>-<random>-<words>-<here>.trycloudflare.com                                 |
        INF +--------------------------------------------------------------------------------------------+

    then `Registered tunnel connection connIndex=0 …`; the metrics server answers `GET /ready` (200 once a
    connection is registered, with `readyConnections`) and `GET /quicktunnel` (`{"hostname": …}`), as cloudflared's
    does. SIGTERM/SIGINT end it (`Initiating graceful shutdown`), exit 0.
  * SIGUSR1 drops the tunnel's one edge connection for `FAKE_CLOUDFLARED_DROP_S` seconds (default 8, the drop seen in
    issue 19), as a network blip does to the real agent: `/ready` answers 503 with `readyConnections: 0`, the edge
    answers 530 (Cloudflare's error 1033, no connector), the log says `Connection terminated` and `Retrying
    connection in up to 2s`; then the connection registers again under the same hostname. The real agent does the
    same: a quick tunnel has one connection (`RunQuickTunnel` sets `ha-connections` to 1), `/ready` is 200 only while
    a connection is registered (metrics/readiness.go), and a dropped connection is retried in place with backoff
    (supervisor/tunnel.go, supervisor/supervisor.go in github.com/cloudflare/cloudflared). SIGUSR2 drops it for good:
    the agent lives on, redialling, never ready again.
The edge is a real HTTP forwarder on 127.0.0.1 inside this process (killing the process kills it). Its public URL
cannot resolve here, so the forwarder's real address is published in the JSON map `{public_url: local_url}` in the
file named by `FAKE_CLOUDFLARED_STATE` (the same side channel as the stand-in ngrok's).

The forwarder behaves like Cloudflare's edge: `Host` is the public host; `Cf-Connecting-Ip` is the address the edge
saw (a client-sent one is replaced), `X-Forwarded-For` gains that address, `X-Forwarded-Proto: https`, `Cf-Ray`,
`Cf-Visitor`; bodies stream both ways. Tests name the address "the edge saw" with `X-Stand-In-Peer` (removed
before forwarding), since every test client connects from 127.0.0.1.

The edge also enforces Cloudflare's limits (the constants below say where each number comes from):
  * a request body over `MAX_BODY_BYTES` (100 MB) → 413, by its Content-Length before anything is forwarded, or, for
    a chunked body, as soon as the bytes counted while it streams pass the limit: the origin then sees the request
    cut short, never complete. The edge reads and drops the rest of the body (for at most `DRAIN_S`) so the client
    hears the 413 instead of a broken pipe;
  * no response head from the origin `ORIGIN_TIMEOUT_S` (100 s) after the request was sent → 524;
  * more than `MAX_IN_FLIGHT` (200) requests in flight through the tunnel → 429 for each one beyond.

Test switches (environment, read when the tunnel starts):
  FAKE_CLOUDFLARED_STATE              file that receives the public→local URL map
  FAKE_CLOUDFLARED_OFFLINE            "1": the quick-tunnel request fails (`failed to request quick Tunnel`), exit 1
  FAKE_CLOUDFLARED_HANG               "1": never get a URL; keep logging retries until killed (for start-up deadlines)
  FAKE_CLOUDFLARED_RATE_LIMITED       a file path: while that file exists, the quick-tunnel request is refused with
                                      Cloudflare's rate limit (429, "error code: 1015") and the agent exits 1, as the
                                      real one does (cmd/cloudflared/tunnel/quick_tunnel.go: the body is not JSON, so
                                      it logs `Error unmarshaling QuickTunnel response: error code: 1015 …
                                      status_code="429 Too Many Requests"` and returns `failed to unmarshal quick
                                      Tunnel`). Deleting the file lifts the limit, as time does for the real one.
  FAKE_CLOUDFLARED_DROP_S             seconds an edge drop (SIGUSR1) lasts; default 8
  FAKE_CLOUDFLARED_MAX_BODY           bytes; default MAX_BODY_BYTES
  FAKE_CLOUDFLARED_ORIGIN_TIMEOUT_S   seconds; default ORIGIN_TIMEOUT_S
  FAKE_CLOUDFLARED_MAX_IN_FLIGHT      requests; default MAX_IN_FLIGHT
"""

from __future__ import annotations

import asyncio
import datetime
import fcntl
import json
import os
import random
import secrets
import signal
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

VERSION = "2025.11.1"
SMALL_BODY = 256 * 1024

# Cloudflare's limits on a quick tunnel. The defaults are the real values; tests shrink them through the
# environment (`EdgeLimits.from_environment`).
#: Largest request body the edge passes on; over it, 413. Cloudflare's Free and Pro plans: "Max upload size 100 MB"
#: (developers.cloudflare.com/support/troubleshooting/http-status-codes/4xx-client-error/error-413/, and
#: /cache/concepts/default-cache-behavior/ "Upload limits"; Business 200 MB, Enterprise 500 MB). The docs write MB
#: without saying which. Read as 10**6 bytes, the stricter reading (a client under it is under 100 MiB too), and the
#: one Cloudflare's own client took: wrangler met 413s on batches it had kept under 100 MiB and switched to
#: counting the 100 MB in 10**6 (github.com/cloudflare/workers-sdk/pull/1392, for Cloudflare's API).
MAX_BODY_BYTES = 100 * 10**6
#: Proxy Read Timeout: seconds the edge waits, once the request is sent, for the origin's response; then 524
#: "A timeout occurred" (developers.cloudflare.com/fundamentals/reference/connection-limits/: Proxy Read Timeout
#: 100 s → 524; /support/troubleshooting/http-status-codes/cloudflare-5xx-errors/error-524/). Configurable on
#: Enterprise plans only, so 100 s is the value a quick tunnel meets.
ORIGIN_TIMEOUT_S = 100.0
#: Requests in flight through one quick tunnel; one more gets 429. "Quick Tunnels are subject to a hard limit on the
#: number of concurrent requests that can be proxied at any point in time. Currently, this limit is 200 in-flight
#: requests. If a Quick Tunnel hits this limit, the HTTP response will return a 429 status code."
#: (developers.cloudflare.com/cloudflare-one/networks/connectors/cloudflare-tunnel/do-more-with-tunnels/trycloudflare/)
MAX_IN_FLIGHT = 200
#: How long the edge keeps reading (and dropping) an oversize body after its 413, so that a client that sends the
#: whole body before reading (requests, urllib3) hears the 413 rather than a reset. Not documented by Cloudflare:
#: this stand-in's choice, nginx's `lingering_time` default (Cloudflare's 413 page is nginx's).
DRAIN_S = 30.0

PAGE_413 = (
    "<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n"
    "<center><h1>413 Request Entity Too Large</h1></center>\r\n"
    "<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n"
)
PAGE_524 = (
    "<!DOCTYPE html>\n<html><head><title>{host} | 524: A timeout occurred</title></head><body>"
    "<h1>Error 524</h1><p>A timeout occurred</p><p>The origin web server timed out responding to this request.</p>"
    "</body></html>\n"
)
NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
# Headers the edge sets itself: a client's own copies never reach the origin.
EDGE_HEADERS = {"cf-connecting-ip", "cf-ray", "cf-visitor", "cf-ipcountry", "x-forwarded-proto", "x-stand-in-peer"}
WORDS = (
    "alpha", "bridge", "carol", "delta", "ember", "forest", "granite", "harbor", "island", "jacket", "kernel",
    "lantern", "meadow", "nickel", "orbit", "pepper", "quartz", "river", "saddle", "timber", "umbrella", "velvet",
    "willow", "yellow", "zenith", "shows", "bahamas", "victorian", "colleges", "mesh", "stages", "gentle",
)  # fmt: skip
NOTICE = (
    "Thank you for trying Cloudflare Tunnel. Doing so, without a Cloudflare account, is a quick way to experiment "
    "and try it out. However, be aware that these account-less Tunnels have no uptime guarantee, are subject to "
    "the Cloudflare Online Services Terms of Use (https://www.cloudflare.com/website-terms/), and Cloudflare "
    "reserves the right to investigate your use of Tunnels for violations of such terms. If you intend to use "
    "Tunnels in production you should use a pre-created named tunnel by following: "
    "https://developers.cloudflare.com/cloudflare-one/connections/connect-apps"
)


def log(level: str, message: str) -> None:
    """One line of cloudflared's console log (to stderr, as the real binary writes it)."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    sys.stderr.write(f"{now} {level} {message}\n")
    sys.stderr.flush()


def box(url: str) -> None:
    """The quick-tunnel box, each line its own log entry, padded like cloudflared's."""
    lines = ["Your quick Tunnel has been created! Visit it at (it may take some time to be reachable):", url]
    width = max(len(line) for line in lines) + 4
    log("INF", "+" + "-" * width + "+")
    for line in lines:
        log("INF", "|  " + line.ljust(width - 2) + "|")
    log("INF", "+" + "-" * width + "+")


def parse_args(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    words: list[str] = []
    flags: dict[str, str] = {}
    valueless = {"--no-autoupdate", "--version", "-v"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            if "=" in arg:
                key, value = arg.split("=", 1)
                flags[key] = value
            elif arg in valueless or i + 1 >= len(argv):
                flags[arg] = ""
            else:
                flags[arg] = argv[i + 1]
                i += 1
        else:
            words.append(arg)
        i += 1
    return words, flags


def update_state(path: str | None, add: dict[str, str] | None = None, remove: list[str] | None = None) -> None:
    """Read-modify-write the shared public→local map under an flock (several agents may share it)."""
    if not path:
        return
    state = Path(path)
    state.parent.mkdir(parents=True, exist_ok=True)
    with open(str(state) + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(state.read_text() or "{}")
        except (FileNotFoundError, ValueError):
            data = {}
        data.update(add or {})
        for key in remove or []:
            data.pop(key, None)
        tmp = state.with_name(state.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, state)


@dataclass(frozen=True)
class EdgeLimits:
    """The limits the edge enforces: Cloudflare's by default, smaller ones for tests."""

    max_body_bytes: int = MAX_BODY_BYTES
    origin_timeout_s: float = ORIGIN_TIMEOUT_S
    max_in_flight: int = MAX_IN_FLIGHT

    def __post_init__(self) -> None:
        if self.max_body_bytes < 0 or self.origin_timeout_s <= 0 or self.max_in_flight < 1:
            raise ValueError(f"edge limits out of range: {self}")

    @classmethod
    def from_environment(cls) -> EdgeLimits:
        """The defaults, each overridden by its FAKE_CLOUDFLARED_* variable when set; a bad value raises."""
        env = os.environ
        try:
            return cls(
                max_body_bytes=int(env.get("FAKE_CLOUDFLARED_MAX_BODY", MAX_BODY_BYTES)),
                origin_timeout_s=float(env.get("FAKE_CLOUDFLARED_ORIGIN_TIMEOUT_S", ORIGIN_TIMEOUT_S)),
                max_in_flight=int(env.get("FAKE_CLOUDFLARED_MAX_IN_FLIGHT", MAX_IN_FLIGHT)),
            )
        except ValueError as exc:
            raise ValueError(f"bad FAKE_CLOUDFLARED_* limit: {exc}") from None


class _BodyTooLarge(Exception):
    """A streamed request body passed the edge's limit: forwarding stops, the origin sees it cut."""


class Edge:
    """Cloudflare's edge for one quick tunnel: an HTTP server on 127.0.0.1 forwarding to the origin URL."""

    def __init__(self, public_url: str, origin: str, limits: EdgeLimits | None = None) -> None:
        self.public_url = public_url
        self.public_host = urlsplit(public_url).netloc
        self.origin = origin.rstrip("/")
        self.limits = limits or EdgeLimits()
        self.local_url = ""
        self.in_flight = 0
        self._runner = None
        self._session = None
        self.holder: dict = {}

    async def start(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

        self._session = ClientSession(
            connector=TCPConnector(limit=0), timeout=ClientTimeout(total=None, sock_connect=5), auto_decompress=False
        )
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        # The default backlog (128) would drop SYNs from a burst of MAX_IN_FLIGHT clients; the kernel caps it anyway.
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        self.local_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def handle(self, request):
        from aiohttp import web

        if not self.holder.get("connected", True):
            # No connector holds the hostname: Cloudflare's error 1033, served with status 530.
            return web.Response(status=530, text="error code: 1033", headers={"Server": "cloudflare"})
        if self.in_flight >= self.limits.max_in_flight:
            # No body from Cloudflare's docs for this one: only the status is promised.
            return web.Response(status=429, text="429 Too Many Requests\n", headers={"Server": "cloudflare"})
        self.in_flight += 1
        try:
            return await self.forward(request)
        finally:
            self.in_flight -= 1

    async def forward(self, request):
        from aiohttp import ClientError, web
        from multidict import CIMultiDict
        from yarl import URL

        limit = self.limits.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return await self.refuse_too_large(request)

        seen = request.headers.get("X-Stand-In-Peer") or request.remote or "127.0.0.1"
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | EDGE_HEADERS)
        prior = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {seen}" if prior else seen
        headers["Cf-Connecting-Ip"] = seen
        headers["X-Forwarded-Proto"] = "https"
        headers["Cf-Visitor"] = '{"scheme":"https"}'
        headers["Cf-Ray"] = f"{secrets.token_hex(8)}-AMS"
        headers["Host"] = self.public_host
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        # Set once the whole request is on its way to the origin: the Proxy Read Timeout counts from there.
        sent = asyncio.Event()
        too_large = False
        if not request.body_exists:
            body = None
            sent.set()
        elif request.content_length is not None and request.content_length <= SMALL_BODY:
            body = await request.read()
            sent.set()
        else:

            async def stream():
                nonlocal too_large
                counted = 0
                async for chunk in request.content.iter_chunked(64 * 1024):
                    counted += len(chunk)
                    if counted > limit:  # only a chunked body gets here: a declared length was checked above
                        too_large = True
                        raise _BodyTooLarge()
                    yield chunk
                sent.set()

            body = stream()

        async def send():
            target = URL(self.origin + request.raw_path, encoded=True)
            return await self._session.request(
                request.method,
                target,
                headers=headers,
                data=body,
                allow_redirects=False,
                skip_auto_headers=NO_AUTO_HEADERS,
            )

        async def read_timeout():
            await sent.wait()
            await asyncio.sleep(self.limits.origin_timeout_s)

        pending = asyncio.ensure_future(send())
        timer = asyncio.ensure_future(read_timeout())
        try:
            await asyncio.wait({pending, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not pending.done():
                pending.cancel()  # the 524 below, or the client went away: drop the origin connection
                await asyncio.gather(pending, return_exceptions=True)
        if pending.cancelled():
            return web.Response(
                status=524,
                reason="A timeout occurred",
                text=PAGE_524.format(host=self.public_host),
                content_type="text/html",
                headers={"Server": "cloudflare"},
            )
        try:
            upstream = pending.result()
        except (ClientError, OSError) as exc:
            if too_large:
                return await self.refuse_too_large(request)
            log("ERR", f'Request failed error="{exc}" connIndex=0 dest={self.public_url}{request.path} type=http')
            # What Cloudflare answers when the tunnel's origin refuses: error 502 (Bad Gateway).
            return web.Response(status=502, text="Bad gateway: the origin could not be reached (cloudflared)\n")
        try:
            async with upstream:
                if (
                    upstream.content_length is not None
                    and upstream.content_length <= SMALL_BODY
                    and request.method != "HEAD"
                ):
                    small = web.Response(status=upstream.status, reason=upstream.reason, body=await upstream.read())
                    for key, value in upstream.headers.items():
                        if key.lower() not in HOP_BY_HOP:
                            small.headers.add(key, value)
                    return small
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for key, value in upstream.headers.items():
                    if key.lower() not in HOP_BY_HOP or key.lower() == "content-length":
                        response.headers.add(key, value)
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(64 * 1024):
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (ClientError, OSError) as exc:
            log("ERR", f'Request failed error="{exc}" connIndex=0 dest={self.public_url}{request.path} type=http')
            return web.Response(status=502, text="Bad gateway: the origin could not be reached (cloudflared)\n")

    async def refuse_too_large(self, request):
        """413 in Cloudflare's words, then read and drop what is left of the body (bounded) and close."""
        from aiohttp import web

        response = web.Response(
            status=413,
            reason="Request Entity Too Large",
            text=PAGE_413,
            content_type="text/html",
            headers={"Server": "cloudflare"},
        )
        response.force_close()
        await response.prepare(request)
        await response.write_eof()

        async def drop_rest() -> None:
            while await request.content.readany():
                pass

        try:
            await asyncio.wait_for(drop_rest(), DRAIN_S)
        except Exception:  # the drain timed out, or the client gave up mid-body: the connection closes either way
            pass
        return response


async def metrics_server(address: str, edge_holder: dict):
    """cloudflared's metrics listener: /ready and /quicktunnel, the endpoints bridge reads."""
    from aiohttp import web

    async def ready(_request):
        connections = 1 if edge_holder.get("edge") and edge_holder.get("connected") else 0
        return web.json_response(
            {"status": 200 if connections else 503, "readyConnections": connections, "connectorId": edge_holder["id"]},
            status=200 if connections else 503,
        )

    async def quicktunnel(_request):
        edge = edge_holder.get("edge")
        return web.json_response({"hostname": edge.public_host if edge else ""})

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_get("/quicktunnel", quicktunnel)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = address.rpartition(":")
    site = web.TCPSite(runner, host or "127.0.0.1", int(port or 0))
    await site.start()
    bound = site._server.sockets[0].getsockname()
    log("INF", f"Starting metrics server on {bound[0]}:{bound[1]}/metrics")
    return runner


def register(holder: dict) -> None:
    """The edge connection is up: `/ready` says 200 and the edge forwards."""
    holder["connected"] = True
    log(
        "INF",
        f"Registered tunnel connection connIndex=0 connection={uuid.uuid4()} event=0 ip=198.41.200.13 "
        "location=ams01 protocol=quic",
    )


async def drop(holder: dict, seconds: float) -> None:
    """The one edge connection is lost for `seconds`, then registered again; the hostname stays."""
    if not holder.get("connected"):
        return
    holder["connected"] = False
    log("ERR", 'Connection terminated error="timeout: no recent network activity" connIndex=0')
    log("INF", "Retrying connection in up to 2s connIndex=0 event=0 ip=198.41.200.13")
    await asyncio.sleep(seconds)
    register(holder)


async def run_quick_tunnel(flags: dict[str, str]) -> int:
    origin = flags.get("--url", "")
    if not origin:
        log("ERR", "a quick tunnel needs --url (the stand-in supports only quick tunnels)")
        return 1
    if "://" not in origin:
        origin = "http://" + origin
    log("INF", NOTICE)
    log("INF", "Requesting new quick Tunnel on trycloudflare.com...")
    if os.environ.get("FAKE_CLOUDFLARED_OFFLINE") == "1":
        log(
            "ERR",
            'failed to request quick Tunnel: Post "https://api.trycloudflare.com/tunnel": dial tcp: lookup '
            "api.trycloudflare.com on 127.0.0.53:53: no such host",
        )
        return 1
    limited = os.environ.get("FAKE_CLOUDFLARED_RATE_LIMITED")
    if limited and os.path.exists(limited):
        log(
            "ERR",
            "Error unmarshaling QuickTunnel response: error code: 1015 "
            'error="invalid character \'e\' looking for beginning of value" status_code="429 Too Many Requests"',
        )
        # urfave/cli prints the command's returned error bare, after the log.
        sys.stderr.write("failed to unmarshal quick Tunnel: invalid character 'e' looking for beginning of value\n")
        return 1
    if os.environ.get("FAKE_CLOUDFLARED_HANG") == "1":
        while True:  # the line first: a start deadline that ends early still has the reason to report
            log("INF", "Retrying quick Tunnel request in 1s")
            await asyncio.sleep(0.5)

    try:
        limits = EdgeLimits.from_environment()
    except ValueError as exc:
        log("ERR", str(exc))
        return 1
    holder: dict = {"id": str(uuid.uuid4())}
    runner = await metrics_server(flags.get("--metrics", "127.0.0.1:0"), holder)
    words = "-".join(random.choice(WORDS) for _ in range(4))
    edge = Edge(f"https://{words}.trycloudflare.com", origin, limits)
    await edge.start()
    state = os.environ.get("FAKE_CLOUDFLARED_STATE")
    update_state(state, add={edge.public_url: edge.local_url})
    box(edge.public_url)
    log(
        "INF",
        "Cannot determine default configuration path. No file [config.yml config.yaml] in "
        "[~/.cloudflared ~/.cloudflare-warp ~/cloudflare-warp /etc/cloudflared /usr/local/etc/cloudflared]",
    )
    log("INF", f"Version {VERSION} (Checksum 0000000000000000000000000000000000000000000000000000000000000000)")
    log("INF", f"Generated Connector ID: {holder['id']}")
    holder["edge"] = edge
    edge.holder = holder
    register(holder)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    drop_s = float(os.environ.get("FAKE_CLOUDFLARED_DROP_S", "8"))
    drops: list[asyncio.Task] = []
    loop.add_signal_handler(signal.SIGUSR1, lambda: drops.append(asyncio.ensure_future(drop(holder, drop_s))))
    # SIGUSR2: a drop that never ends (the edge refuses every redial), so the agent lives but is never ready again.
    loop.add_signal_handler(signal.SIGUSR2, lambda: drops.append(asyncio.ensure_future(drop(holder, 10**9))))
    await stop.wait()
    for task in drops:
        task.cancel()
    log("INF", "Initiating graceful shutdown due to signal terminated ...")
    update_state(state, remove=[edge.public_url])
    await edge.stop()
    await runner.cleanup()
    return 0


def main(argv: list[str]) -> int:
    words, flags = parse_args(argv)
    if "--version" in flags or "-v" in flags or words[:1] == ["version"]:
        print(f"cloudflared version {VERSION} (built 2025-11-12-1200 UTC)")
        return 0
    if words[:1] == ["tunnel"] and len(words) == 1:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(run_quick_tunnel(flags))
        return uvloop.run(run_quick_tunnel(flags))
    log("ERR", f"unknown command {' '.join(words)!r} (stand-in cloudflared: quick tunnels only)")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
