#!/usr/bin/env python3
"""A stand-in ngrok agent for tests: the process pyngrok launches at `ngrok_path`.

It speaks what pyngrok uses of the real agent:
  * `ngrok start --none --log stdout [--config PATH]… [--authtoken T] [--region R]`, logging ngrok's logfmt lines
    (`starting web service … addr=127.0.0.1:4040`, `client session established`, `tunnel session started`, and
    `lvl=eror … err="…ERR_NGROK_4018…"` / `ERR_NGROK_108` on failure, then exit 1);
  * `ngrok --version`, `ngrok version`, `ngrok config add-authtoken T`, `ngrok config check|upgrade`, `ngrok update`;
  * the agent's local API: `GET/POST /api/tunnels`, `GET/DELETE /api/tunnels/<name>` (v2 shapes) and the same under
    `/api/endpoints` (v3 shapes).
Each http tunnel is a real HTTP forwarder on 127.0.0.1 inside this process (so killing the agent kills it). Its
public URL is `https://<random>.ngrok-free.app` (or `https://<domain>`), which cannot resolve here, so the forwarder's
real address is published through a side channel: the JSON map `{public_url: "http://127.0.0.1:<port>"}` in the file
named by `FAKE_NGROK_STATE`, and the `fake_forward_url` field of each tunnel in the local API.

The forwarder behaves like ngrok's edge: Host is the public host, `X-Forwarded-For` gains the client address,
`X-Forwarded-Proto: https`, `X-Forwarded-Host`; bodies stream both ways; tunnels created with basic auth (v2
`basic_auth: ["user:pass"]` or a v3 `traffic_policy` `basic-auth` action) answer 401 without those credentials.

Test switches (environment):
  FAKE_NGROK_STATE         file that receives the public→local URL map
  FAKE_NGROK_AUTHTOKEN     if set, the only authtoken accepted (others: ERR_NGROK_105)
  FAKE_NGROK_SESSION_LOCK  a file one agent at a time holds (flock), like ngrok's one-session-per-account limit;
                           a second agent fails with ERR_NGROK_108
  FAKE_NGROK_OFFLINE       "1": never reach "the ngrok service"; log dial errors forever, like an offline agent
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import fcntl
import hmac
import json
import os
import secrets
import signal
import sys
import uuid
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

VERSION = "3.19.1"
DEFAULT_WEB_PORT = 4040
SMALL_BODY = 256 * 1024
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

ERR_4018 = (
    "authentication failed: Usage of ngrok requires a verified account and authtoken.\\n\\n"
    "Sign up for an account: https://dashboard.ngrok.com/signup\\n"
    "Install your authtoken: https://dashboard.ngrok.com/get-started/your-authtoken\\r\\n\\r\\nERR_NGROK_4018\\r\\n"
)
ERR_105 = (
    "authentication failed: The authtoken you specified does not look like a proper ngrok tunnel authtoken.\\n"
    "Your authtoken: {token}\\nInstructions to install your authtoken are on your ngrok dashboard:\\n"
    "https://dashboard.ngrok.com/get-started/your-authtoken\\r\\n\\r\\nERR_NGROK_105\\r\\n"
)
ERR_108 = (
    "authentication failed: Your account is limited to 1 simultaneous ngrok agent sessions.\\n"
    "You can run multiple simultaneous tunnels from a single agent session by defining the tunnels in your "
    "agent configuration file and starting them with the command `ngrok start --all`.\\n"
    "You can view your current agent sessions in the dashboard:\\nhttps://dashboard.ngrok.com/agents\\r\\n\\r\\n"
    "ERR_NGROK_108\\r\\n"
)


def log(lvl: str, msg: str, **fields: str) -> None:
    """One line of ngrok's logfmt, as `--log stdout --log-format term` prints it."""
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%dT%H:%M:%S%z")
    parts = [f"t={now}", f"lvl={lvl}", f'msg="{msg}"']  # msg is always quoted, as ngrok does
    for key, value in fields.items():
        if value and not any(c in value for c in ' "='):
            parts.append(f"{key}={value}")
        else:
            parts.append(f'{key}="{value.replace(chr(34), chr(92) + chr(34))}"')
    sys.stdout.write(" ".join(parts) + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Positional words and `--flag value` options (repeatable)."""
    words: list[str] = []
    flags: dict[str, list[str]] = {}
    valueless = {"--none", "--all"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            if "=" in arg:
                key, value = arg.split("=", 1)
                flags.setdefault(key, []).append(value)
            elif arg in valueless or i + 1 >= len(argv):
                flags.setdefault(arg, []).append("")
            else:
                flags.setdefault(arg, []).append(argv[i + 1])
                i += 1
        else:
            words.append(arg)
        i += 1
    return words, flags


def load_config(paths: list[str]) -> dict:
    """Merge the config files in order; v3 `agent:` keys are lifted to the top level like v2's."""
    import yaml

    merged: dict = {}
    for path in paths:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
        if str(data.get("version")) == "3":
            data = {**data, **(data.get("agent") or {})}
        merged.update(data)
    return merged


# --------------------------------------------------------------------------------------------- forwarder


class Forwarder:
    """One tunnel: an HTTP server on 127.0.0.1 acting as ngrok's edge for `public_url`, forwarding to `upstream`."""

    def __init__(
        self, name: str, public_url: str, upstream: str, credentials: list[str], api_shape: str, inspect: bool
    ):
        self.name = name
        self.id = uuid.uuid4().hex
        self.public_url = public_url
        self.public_host = urlsplit(public_url).netloc
        self.upstream = upstream.rstrip("/")
        self.credentials = credentials
        self.api_shape = api_shape
        self.inspect = inspect
        self.local_url = ""
        self._runner = None
        self._session = None

    async def start(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

        # auto_decompress off: bytes pass through untouched, so Content-Length stays true.
        self._session = ClientSession(
            connector=TCPConnector(limit=0),
            timeout=ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,
        )
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.local_url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _authorized(self, header: str | None) -> bool:
        if not self.credentials:
            return True
        if not header or not header.lower().startswith("basic "):
            return False
        try:
            given = base64.b64decode(header[6:].strip(), validate=True).decode()
        except ValueError:
            return False
        ok = False
        for cred in self.credentials:  # compare against all, constant time each
            ok |= hmac.compare_digest(given.encode(), cred.encode())
        return ok

    async def handle(self, request):
        from aiohttp import ClientError, web
        from multidict import CIMultiDict
        from yarl import URL

        client = request.remote or "127.0.0.1"
        if not self._authorized(request.headers.get("Authorization")):
            return web.Response(
                status=401,
                text="Unauthorized\n",
                headers={"WWW-Authenticate": 'Basic realm="ngrok"'},
            )
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
        prior = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {client}" if prior else client
        headers["X-Forwarded-Proto"] = "https"
        headers["X-Forwarded-Host"] = self.public_host
        headers["Host"] = self.public_host
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        # Small bodies in one piece (fast path for API calls); large ones streamed, as the real edge does.
        if not request.body_exists:
            body = None
        elif request.content_length is not None and request.content_length <= SMALL_BODY:
            body = await request.read()
        else:
            body = request.content.iter_chunked(64 * 1024)
        try:
            # The raw path as received, not re-quoted: ngrok passes the request line through unchanged.
            target = URL(self.upstream + request.raw_path, encoded=True)
            async with self._session.request(
                request.method,
                target,
                headers=headers,
                data=body,
                allow_redirects=False,
                skip_auto_headers=NO_AUTO_HEADERS,  # the upstream sees the client's headers, not aiohttp's
            ) as upstream:
                small_body = upstream.content_length is not None and upstream.content_length <= SMALL_BODY
                if small_body and request.method != "HEAD":
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
            log("warn", "failed to dial upstream", obj="tunnels", err=str(exc).replace('"', "'"))
            return web.Response(
                status=502,
                text=f"Traffic was successfully tunneled to the ngrok agent, but the agent failed to establish "
                f"a connection to the upstream web service at {self.upstream}.\n\nERR_NGROK_8012\n",
            )

    def as_json(self) -> dict:
        common = {
            "name": self.name,
            "ID": self.id,
            "public_url": self.public_url,
            "fake_forward_url": self.local_url,
            "metrics": {"conns": {"count": 0}, "http": {"count": 0}},
        }
        if self.api_shape == "endpoints":
            return {
                **common,
                "id": self.id,
                "url": self.public_url,
                "uri": f"/api/endpoints/{quote(self.name, safe='')}",
                "upstream": {"url": self.upstream, "protocol": "http1"},
            }
        return {
            **common,
            "uri": f"/api/tunnels/{self.name}",
            "proto": "https",
            "config": {"addr": self.upstream, "inspect": self.inspect},
        }


# --------------------------------------------------------------------------------------------- agent


class Agent:
    def __init__(self, config: dict):
        self.config = config
        self.tunnels: dict[str, Forwarder] = {}
        self.state_path = os.environ.get("FAKE_NGROK_STATE") or None

    # The state file may be shared by several agents: read-modify-write under an flock.
    def _update_state(self, add: dict[str, str] | None = None, remove: list[str] | None = None) -> None:
        if not self.state_path:
            return
        path = Path(self.state_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(str(path) + ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = json.loads(path.read_text() or "{}")
            except (FileNotFoundError, ValueError):
                data = {}
            data.update(add or {})
            for key in remove or []:
                data.pop(key, None)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=2))
            os.replace(tmp, path)

    @staticmethod
    def _error(status: int, code: int, msg: str, err: str = ""):
        from aiohttp import web

        body = {"error_code": code, "status_code": status, "msg": msg, "details": {"err": err} if err else {}}
        return web.json_response(body, status=status)

    async def create(self, request, shape: str):
        try:
            opts = await request.json()
        except ValueError:
            return self._error(400, 100, "invalid tunnel configuration", "request body is not JSON")
        name = opts.get("name") or f"tunnel-{uuid.uuid4().hex[:8]}"
        if name in self.tunnels:
            return self._error(400, 102, "invalid tunnel configuration", f"tunnel '{name}' already exists")
        if shape == "endpoints":
            upstream = (opts.get("upstream") or {}).get("url", "")
            url = opts.get("url") or ""
            domain = urlsplit(url).hostname if url else None
            credentials = _policy_credentials(opts.get("traffic_policy"))
        else:
            proto = opts.get("proto", "http")
            if proto != "http":
                return self._error(400, 102, "invalid tunnel configuration", f"the fake agent has no {proto!r}")
            upstream = str(opts.get("addr", "80"))
            domain = opts.get("domain") or opts.get("hostname")
            credentials = list(opts.get("basic_auth") or [])
        if "://" not in upstream:
            upstream = f"http://localhost:{upstream}" if upstream.isdigit() else f"http://{upstream}"
        for cred in credentials:
            user, _, password = cred.partition(":")
            if not user or not (8 <= len(password) <= 128):
                return self._error(
                    400,
                    102,
                    "invalid tunnel configuration",
                    "basic auth: password must be 8 to 128 characters. ERR_NGROK_2001",
                )
        if domain:
            if any(t.public_host == domain for t in self.tunnels.values()):
                return self._error(
                    502,
                    103,
                    "failed to start tunnel",
                    f"The endpoint 'https://{domain}' is already online. ERR_NGROK_334",
                )
            public_url = f"https://{domain}"
        else:
            public_url = f"https://{secrets.token_hex(6)}.ngrok-free.app"
        inspect = str(opts.get("inspect", True)).lower() not in ("false", "0")
        tunnel = Forwarder(name, public_url, upstream, credentials, shape, inspect)
        await tunnel.start()
        self.tunnels[name] = tunnel
        self._update_state(add={public_url: tunnel.local_url})
        log("info", "started tunnel", obj="tunnels", name=name, addr=upstream, url=public_url)
        return _json(tunnel.as_json(), status=201)

    async def list(self, request, shape: str):
        items = [t.as_json() for t in self.tunnels.values() if t.api_shape == shape or shape == "tunnels"]
        return _json({shape: items, "uri": f"/api/{shape}"})

    async def get(self, request, shape: str):
        tunnel = self.tunnels.get(unquote(request.match_info["name"]))
        if tunnel is None:
            return self._error(404, 100, "tunnel not found")
        return _json(tunnel.as_json())

    async def delete(self, request, shape: str):
        from aiohttp import web

        tunnel = self.tunnels.pop(unquote(request.match_info["name"]), None)
        if tunnel is None:
            return self._error(404, 100, "tunnel not found")
        self._update_state(remove=[tunnel.public_url])
        await tunnel.stop()
        log("info", "stopped tunnel", obj="tunnels", name=tunnel.name, url=tunnel.public_url)
        return web.Response(status=204)

    async def serve_api(self) -> str:
        from aiohttp import web

        app = web.Application()
        for shape in ("tunnels", "endpoints"):
            app.router.add_get(f"/api/{shape}", lambda r, s=shape: self.list(r, s))
            app.router.add_post(f"/api/{shape}", lambda r, s=shape: self.create(r, s))
            # Names may hold "/" or ":" (pyngrok's default names embed the address); uris carry them escaped.
            app.router.add_get(f"/api/{shape}/{{name:.+}}", lambda r, s=shape: self.get(r, s))
            app.router.add_delete(f"/api/{shape}/{{name:.+}}", lambda r, s=shape: self.delete(r, s))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        web_addr = str(self.config.get("web_addr") or "")
        if web_addr:
            host, _, port = web_addr.rpartition(":")
            candidates = [(host or "127.0.0.1", int(port))]
        else:
            # Like the real agent: 4040, or the next free port when another agent holds it.
            candidates = [("127.0.0.1", p) for p in range(DEFAULT_WEB_PORT, DEFAULT_WEB_PORT + 60)]
        for host, port in candidates:
            site = web.TCPSite(runner, host, port)
            try:
                await site.start()
            except OSError:
                continue
            bound = site._server.sockets[0].getsockname()
            return f"{bound[0]}:{bound[1]}"
        raise OSError(f"web service could not bind {web_addr or '127.0.0.1:4040-4099'}")

    async def shutdown(self) -> None:
        self._update_state(remove=[t.public_url for t in self.tunnels.values()])
        for tunnel in list(self.tunnels.values()):
            await tunnel.stop()


def _json(data: dict, status: int = 200):
    from aiohttp import web

    return web.json_response(data, status=status)


def _policy_credentials(policy) -> list[str]:
    """Credentials of a v3 traffic policy's `basic-auth` actions (policy as a dict or JSON text)."""
    if isinstance(policy, str):
        try:
            policy = json.loads(policy)
        except ValueError:
            return []
    creds: list[str] = []
    for rule in (policy or {}).get("on_http_request", []) or []:
        for action in rule.get("actions", []) or []:
            if action.get("type") == "basic-auth":
                creds.extend((action.get("config") or {}).get("credentials", []))
    return creds


def fail(err: str, msg: str = "session closing") -> int:
    log("eror", msg, obj="tunnels.session", err=err)
    return 1


async def run_agent(flags: dict[str, list[str]]) -> int:
    config_paths = [p for p in flags.get("--config", []) if p]
    for path in config_paths:
        log("info", "open config file", path=path, err="nil")
    try:
        config = load_config(config_paths)
    except (OSError, ValueError) as exc:
        print(f"ERROR:  Failed to load configuration file: {exc}", flush=True)
        return 1
    authtoken = (
        (flags.get("--authtoken") or [""])[-1] or config.get("authtoken") or os.environ.get("NGROK_AUTHTOKEN", "")
    )

    agent = Agent(config)
    try:
        addr = await agent.serve_api()
    except OSError as exc:
        return fail(str(exc), "failed to start web service")
    log("info", "starting web service", obj="web", addr=addr, allow_hosts="[]")

    if os.environ.get("FAKE_NGROK_OFFLINE") == "1":
        while True:  # the real agent retries forever with backoff; pyngrok gives up at its startup timeout
            log(
                "eror",
                "failed to reconnect session",
                obj="tunnels.session",
                err='failed to dial ngrok server with address "connect.ngrok-agent.com:443": '
                "dial tcp: lookup connect.ngrok-agent.com: no such host",
            )
            await asyncio.sleep(0.3)
    if not authtoken:
        return fail(ERR_4018)
    expected = os.environ.get("FAKE_NGROK_AUTHTOKEN")
    if expected and not hmac.compare_digest(expected.encode(), authtoken.encode()):
        return fail(ERR_105.format(token=authtoken))  # the real agent echoes the token it was given
    lock_path = os.environ.get("FAKE_NGROK_SESSION_LOCK")
    if lock_path:
        lock = open(lock_path, "a+")  # noqa: SIM115 - held for the life of the process; freed on any exit
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return fail(ERR_108)

    log("info", "client session established", obj="tunnels.session")
    log("info", "tunnel session started", obj="tunnels.session")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await agent.shutdown()
    return 0


def add_authtoken(token: str, flags: dict[str, list[str]]) -> int:
    import yaml

    path = Path((flags.get("--config") or [""])[-1] or Path.home() / ".config" / "ngrok" / "ngrok.yml")
    data = {}
    if path.exists():
        data = yaml.safe_load(path.read_text()) or {}
    if str(data.get("version")) == "3":
        data.setdefault("agent", {})["authtoken"] = token
    else:
        data.setdefault("version", "2")
        data["authtoken"] = token
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    os.chmod(path, 0o600)
    print(f"Authtoken saved to configuration file: {path}")
    return 0


def main(argv: list[str]) -> int:
    words, flags = parse_args(argv)
    if "--version" in flags or words[:1] == ["version"]:
        print(f"ngrok version {VERSION}")
        return 0
    if words[:1] == ["start"]:
        # The real agent is Go; uvloop keeps this stand-in's own overhead from dominating proxy benchmarks.
        try:
            import uvloop
        except ImportError:
            return asyncio.run(run_agent(flags))
        return uvloop.run(run_agent(flags))
    if words[:2] == ["config", "add-authtoken"] and len(words) == 3:
        return add_authtoken(words[2], flags)
    if words[:2] in (["config", "check"], ["config", "upgrade"]):
        print("Valid configuration file at " + ", ".join(flags.get("--config", ["(default)"])))
        return 0
    if words[:1] == ["update"]:
        print("No update available, this is the latest version.")
        return 0
    print(f"ERROR:  unknown command {' '.join(words)!r} (fake ngrok agent)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
