"""`bridge serve`: wire MLflow, the entrance, the tunnel and the publisher together, and keep them up.

    access token ──▶ MlflowProcess.start() ──▶ Entrance ──▶ Tunnel (optional) ──▶ Publisher (signed record)

The tunnel is ngrok's (bridge/serve/tunnel.py) or a Cloudflare quick tunnel (bridge/serve/tunnel_cloudflared.py);
`--tunnel auto` picks ngrok when an authtoken is configured, else cloudflared when its binary is there, else none.

While it runs, the supervisor restarts MLflow when it dies (without touching the entrance or the
tunnel), reopens the tunnel and republishes its new URL when the agent dies, republishes before the
record expires and after the token rotates, reaps runs whose client stopped sending heartbeats, and
writes what it sees to the state file that `bridge status` reads. No secret goes into that file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from bridge import config, secrets
from bridge.errors import BridgeError, ConfigError, PublishError, ServeError, TunnelError
from bridge.record import make_record
from bridge.retry import compute_backoff_ms
from bridge.serve.entrance import CLIENT_HEADERS, Entrance
from bridge.serve.mlflow_process import MlflowOptions, MlflowProcess, redact_uri
from bridge.serve.publisher import FilePublisher, Publisher, publisher_for
from bridge.serve.usage import TunnelUsage, budget_warning
from bridge.serve.wheel import ClientWheel

if TYPE_CHECKING:
    from collections.abc import Callable

    from bridge.serve.public_tunnel import PublicTunnel
    from bridge.serve.tunnel import TunnelConfig

log = logging.getLogger(__name__)

TUNNEL_MODES = ("auto", "ngrok", "cloudflared", "none")
#: `bridge serve`'s default: ngrok with an authtoken, else a Cloudflare quick tunnel, else the entrance alone.
DEFAULT_TUNNEL = "auto"
#: `--host` values that bind every address: never a URL anyone can use.
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
#: Signals that stop `bridge serve` cleanly. SIGHUP (the terminal closed) and SIGQUIT (Ctrl-\) matter as much as
#: SIGINT/SIGTERM: MLflow runs in its own session, so a signal that kills only this process orphans it on the port.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
#: How often the tunnel's health is checked, in seconds.
TUNNEL_CHECK_INTERVAL_S = 5.0
#: How often the month's tunnel usage is saved, in seconds.
USAGE_SAVE_INTERVAL_S = 5.0
#: The main loop's tick.
TICK_S = 0.5
#: The user name ngrok's edge basic auth (--edge-auth) expects; the password is the access token.
EDGE_AUTH_USER = "bridge"


@dataclass(frozen=True)
class ServeOptions:
    """Everything `bridge serve` accepts; validated here so bad input fails before anything starts."""

    port: int = config.DEFAULT_MLFLOW_PORT
    entrance_port: int | None = None
    host: str = config.DEFAULT_HOST
    tunnel: str = DEFAULT_TUNNEL
    domain: str | None = None
    edge_auth: bool = False
    publish: str | None = None
    backend_store_uri: str | None = None
    artifacts_destination: str | None = None
    workers: int = config.DEFAULT_WORKERS
    heartbeat_timeout_s: float = config.DEFAULT_HEARTBEAT_TIMEOUT_S
    record_ttl_s: float = config.DEFAULT_RECORD_TTL_S
    mlflow_start_timeout_s: float = 90.0
    bytes_budget: float = config.DEFAULT_TUNNEL_BYTES_BUDGET
    requests_budget: int = config.DEFAULT_TUNNEL_REQUESTS_BUDGET

    def __post_init__(self) -> None:
        if self.tunnel not in TUNNEL_MODES:
            raise ConfigError(f"--tunnel {self.tunnel!r} is not one of {', '.join(TUNNEL_MODES)}")
        if self.entrance_port is not None and self.entrance_port == self.port:
            raise ConfigError(f"--entrance-port {self.entrance_port} is the MLflow port; choose another")
        if self.heartbeat_timeout_s <= 0:
            raise ConfigError(f"--heartbeat-timeout must be positive, got {self.heartbeat_timeout_s}")
        if self.bytes_budget < 0 or self.requests_budget < 0:
            raise ConfigError("--tunnel-budget-gb and --tunnel-budget-requests must be 0 (no budget) or positive")
        if self.record_ttl_s < 60:
            raise ConfigError(f"record TTL must be at least 60 s, got {self.record_ttl_s}")
        if (self.domain or self.edge_auth) and self.tunnel in ("none", "cloudflared"):
            raise ConfigError("--domain and --edge-auth need the ngrok tunnel; drop them or use --tunnel ngrok")

    @property
    def resolved_entrance_port(self) -> int:
        return self.entrance_port if self.entrance_port is not None else self.port + 1

    @property
    def reap_interval_s(self) -> float:
        return min(self.heartbeat_timeout_s / 4, 30.0)


@dataclass
class ServeInfo:
    """What a started `bridge serve` offers, for the CLI to print; no secret in it."""

    mlflow_url: str
    entrance_url: str
    public_url: str | None
    record_url: str
    published_to: str
    publish_error: str | None
    notes: list[str] = field(default_factory=list)
    #: The entrance path of the client wheel notebooks install (public: no token needed).
    wheel_path: str | None = None


class _Interrupted(Exception):
    """A stop was requested while starting."""


class Supervisor:
    """Starts the parts in order, watches them, and stops them all; `start()`, then `wait()`, then `stop()`."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.instance = uuid.uuid4().hex
        self.started_at = time.time()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.notes: list[str] = []
        self.mlflow = MlflowProcess(
            MlflowOptions(
                port=options.port,
                backend_store_uri=options.backend_store_uri,
                artifacts_destination=options.artifacts_destination,
                workers=options.workers,
                start_timeout_s=options.mlflow_start_timeout_s,
            )
        )
        self.publisher: Publisher = publisher_for(options.publish)
        # `bridge url` reads the local record, so it is written even when the record goes elsewhere too.
        self._local_publisher = FilePublisher(config.paths().record_file) if options.publish else None
        self.client_wheel = ClientWheel(config.paths().client_wheel_dir)
        self.entrance: Entrance | None = None
        self.tunnel: PublicTunnel | None = None  # ngrok's or cloudflared's, imported only when used
        self.tunnel_mode = "none"  # what --tunnel resolved to: ngrok, cloudflared or none
        self.tunnel_status = "disabled"
        self.tunnel_error: str | None = None
        self.public_url: str | None = None
        self.record_url: str | None = None
        self.last_publish: dict[str, Any] | None = None
        self.last_reap: dict[str, Any] | None = None
        self.ready_at: float | None = None
        self.events: list[dict[str, Any]] = []
        self._published_revision = -1
        self._next_publish_at = 0.0
        self._publish_failures = 0
        self._tunnel_failures = 0
        self._next_tunnel_check = 0.0
        self._state_lock = threading.Lock()
        self._next_usage_save = 0.0
        self.secrets_store = secrets.describe_store()
        self._budget_warned_month: str | None = None
        self._stopped = False
        self.stop_requested = False

    # --- start and stop ---------------------------------------------------------------------------

    def start(self) -> ServeInfo:
        """Bring everything up in order; on any failure stop what started and re-raise."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> ServeInfo:
        opts = self.options
        config.paths().ensure()
        secrets.access_token(create=True)  # generated on first use, before anything can ask for it
        make_tunnel = self._choose_tunnel()
        _check_bindable(opts.host, opts.resolved_entrance_port)  # say so now, not after MLflow's start-up
        self._check_interrupt()
        self.client_wheel.start()  # built (or found in the cache) while MLflow starts; 503 until then
        self.mlflow.start()
        self._check_interrupt()
        self.entrance = Entrance(
            opts.port, host=opts.host, port=opts.resolved_entrance_port,
            client_header=CLIENT_HEADERS.get(self.tunnel_mode, CLIENT_HEADERS["ngrok"]),
            usage=TunnelUsage.load(config.paths().tunnel_usage_file),
            staging=config.paths().uploads_dir,
            local_artifacts=_local_folder(self.mlflow.options.resolved_artifacts_destination()),
            client_wheel=self.client_wheel,
        )  # fmt: skip
        self.entrance.start()
        self._check_interrupt()
        if make_tunnel is not None:
            self.tunnel = tunnel = make_tunnel()
            self.tunnel_status = "opening"
            self.public_url = tunnel.open()
            self.tunnel_status = "open"
        self.record_url = self.public_url or self._advertised_entrance_url()
        self._publish()
        self._spawn(self._watch_mlflow, "bridge-mlflow-watch")
        self._spawn(self._reap_loop, "bridge-reaper")
        self._write_state()
        return ServeInfo(
            mlflow_url=self.mlflow.url,
            entrance_url=self.entrance.url,
            public_url=self.public_url,
            record_url=self.record_url,
            published_to=self.publisher.describe(),
            publish_error=None if self.last_publish and self.last_publish["ok"] else self._last_publish_error(),
            notes=list(self.notes),
            wheel_path=self.client_wheel.public_path,
        )

    def _choose_tunnel(self) -> Callable[[], PublicTunnel] | None:
        """Resolve `--tunnel` now: a factory for the tunnel, or None (with a note saying why) for the entrance alone."""
        mode = self.options.tunnel
        if mode == "none":
            return None
        if mode == "cloudflared" or (
            mode == "auto" and not self.options.domain and not self.options.edge_auth and not secrets.ngrok_authtoken()
        ):
            from bridge.serve.tunnel_cloudflared import CloudflaredConfig, CloudflaredTunnel, install_help

            cf_config = CloudflaredConfig.from_environment()
            if cf_config.binary is None and mode == "auto":
                self.notes.append(
                    "No ngrok authtoken is configured and no cloudflared is installed, so there is no public tunnel: "
                    "serving the entrance alone. For a public URL without an account, " + install_help() + "; or run "
                    "`bridge login` (or set NGROK_AUTHTOKEN) for ngrok. Then restart."
                )
                return None
            if mode == "auto":
                self.notes.append(
                    "No ngrok authtoken is configured: opening a Cloudflare quick tunnel (no account needed; a new URL "
                    "at every start, which the signed record follows). `bridge login` makes ngrok the tunnel instead."
                )
            self.tunnel_mode = "cloudflared"
            return lambda: CloudflaredTunnel(self._tunnel_target(), cf_config)
        tunnel_config = self._tunnel_config()
        if tunnel_config is None:
            return None
        from bridge.serve.tunnel import Tunnel

        self.tunnel_mode = "ngrok"
        return lambda: Tunnel(self._tunnel_target(), tunnel_config)

    def _tunnel_config(self) -> TunnelConfig | None:
        """The ngrok tunnel's config, or None (with a note saying why) when there is no authtoken."""
        from bridge.serve.tunnel import TunnelConfig

        edge = (EDGE_AUTH_USER, secrets.access_token(create=True)) if self.options.edge_auth else None
        tunnel_config = TunnelConfig.from_environment(domain=self.options.domain, edge_auth=edge)
        if tunnel_config.authtoken is None:
            self.notes.append(
                "No ngrok authtoken is configured, so there is no public tunnel: serving the entrance alone. "
                "Run `bridge login` (or set NGROK_AUTHTOKEN) and restart to get a public URL."
            )
            return None
        return tunnel_config

    def _tunnel_target(self) -> str:
        assert self.entrance is not None
        # The agent runs here: a wildcard bind is reached through loopback.
        if self.options.host in WILDCARD_HOSTS:
            return f"http://127.0.0.1:{self.entrance.port}"
        return self.entrance.url

    def _advertised_entrance_url(self) -> str:
        """The entrance's URL for others: a wildcard bind is named by this machine's address, not 0.0.0.0."""
        assert self.entrance is not None
        if self.options.host not in WILDCARD_HOSTS:
            return self.entrance.url
        address = primary_address()
        if address is None:
            self.notes.append(
                "--host binds every address, but this machine has no network route: "
                "publishing the loopback URL; name the address to publish with --host."
            )
            return f"http://127.0.0.1:{self.entrance.port}"
        self.notes.append(
            f"--host {self.options.host} binds every address; publishing {address}, this "
            "machine's address on its default route (name another with --host)."
        )
        return f"http://{address}:{self.entrance.port}"

    def _check_interrupt(self) -> None:
        if self.stop_requested:
            raise _Interrupted()

    def request_stop(self) -> None:
        """Ask everything to stop; safe from a signal handler."""
        self.stop_requested = True
        self._stop.set()
        self.mlflow.interrupt()

    def mark_ready(self) -> None:
        """Record in the state file that start-up is over (everything up, the start-up output printed)."""
        self.ready_at = time.time()
        self._write_state()

    def wait(self) -> None:
        """Run the watch loop until `request_stop()`."""
        while not self._stop.wait(TICK_S):
            try:
                self._tick()
            except Exception:  # a bug in one tick must not take the workstation's MLflow down
                log.exception("Supervisor tick failed")

    def stop(self) -> None:
        """Stop the tunnel, the entrance and MLflow (whole process group); leaves no child behind."""
        self._stop.set()
        if self._stopped:
            return
        self._stopped = True
        if self.tunnel is not None:
            try:
                self.tunnel.close()
            except Exception as exc:  # keep stopping the rest
                log.warning("Closing the tunnel failed: %s", type(exc).__name__)
            self.tunnel_status = "closed"
        if self.entrance is not None:
            self.entrance.stop()
            self.entrance.usage.save()
        self.client_wheel.stop()  # a build still running
        self.mlflow.stop()
        for thread in self._threads:
            thread.join(timeout=15)
        try:
            self.publisher.close()
        except Exception:  # closing a session cannot matter now
            pass
        self._write_state(stopped=True)

    # --- the watch loop ---------------------------------------------------------------------------

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _watch_mlflow(self) -> None:
        self.mlflow.watch(self._stop, on_event=self._event)

    def _event(self, message: str) -> None:
        with self._state_lock:
            self.events = [*self.events, {"at": time.time(), "event": message}][-20:]
        self._write_state()

    def _tick(self) -> None:
        now = time.time()
        if self.tunnel is not None and now >= self._next_tunnel_check:
            self._check_tunnel(self.tunnel, now)
        assert self.entrance is not None
        self.entrance.tokens.current()  # notices a rotation even when no request has come in since
        revision = self.entrance.tokens.revision
        if revision != self._published_revision:
            self._event("access token changed; republishing the record under the new key")
            if self.tunnel is not None and self.options.edge_auth and self.tunnel_mode == "ngrok":
                self._reopen_tunnel("the edge password follows the access token")
            self._publish()
        elif now >= self._next_publish_at:
            self._publish()
        if now >= self._next_usage_save:
            self._save_usage()
            self._next_usage_save = now + USAGE_SAVE_INTERVAL_S
        self._write_state()

    def _save_usage(self) -> None:
        """Persist this month's tunnel usage and log once a month when it nears the budget."""
        assert self.entrance is not None
        usage = self.entrance.usage
        usage.save()
        snapshot = usage.snapshot()
        warning = budget_warning(snapshot, self.options.bytes_budget, self.options.requests_budget)
        if warning and self._budget_warned_month != snapshot["month"]:
            self._budget_warned_month = snapshot["month"]
            log.warning("Tunnel budget: %s.", warning)

    def _check_tunnel(self, tunnel: PublicTunnel, now: float) -> None:
        if self.tunnel_status == "open" and tunnel.healthy():
            self._next_tunnel_check = now + TUNNEL_CHECK_INTERVAL_S
            return
        if self.tunnel_status == "open":
            self._event(f"tunnel {self.public_url} is down; reopening")
        self._reopen_tunnel("the agent died or the tunnel closed")

    def _reopen_tunnel(self, why: str) -> None:
        if self.tunnel is None:  # no tunnel was asked for: nothing to reopen
            return
        self.tunnel_status = "reopening"
        try:
            if self.options.edge_auth and self.tunnel_mode == "ngrok":
                # A new Tunnel, so its log redaction knows the new password too.
                from bridge.serve.tunnel import Tunnel

                self.tunnel.close()
                tunnel_config = self._tunnel_config()
                if tunnel_config is None:
                    raise TunnelError("the ngrok authtoken disappeared; run `bridge login`")
                self.tunnel = Tunnel(self._tunnel_target(), tunnel_config)
            url = self.tunnel.open()
        except (TunnelError, BridgeError) as exc:
            self._tunnel_failures += 1
            self.tunnel_status = "down"
            self.tunnel_error = str(exc)
            delay = compute_backoff_ms(self._tunnel_failures - 1, min_backoff_ms=1000) / 1000
            self._next_tunnel_check = time.time() + delay
            self._event(f"reopening the tunnel failed ({exc}); next try in {delay:.0f} s")
            return
        self._tunnel_failures = 0
        self.tunnel_status = "open"
        self.tunnel_error = None
        self._next_tunnel_check = time.time() + TUNNEL_CHECK_INTERVAL_S
        self.public_url = url
        self.record_url = url
        self._event(f"tunnel reopened at {url} ({why})")
        self._publish()  # even at the same URL (--domain) a fresh record says this session is live

    def _publish(self) -> None:
        """Sign a fresh record for the current URL with the current token and publish it."""
        assert self.entrance is not None and self.record_url is not None
        # Read the token through the entrance, so the record is signed with exactly what it accepts.
        tokens = self.entrance.tokens
        token = tokens.current().decode()
        revision = tokens.revision
        ttl = self.options.record_ttl_s
        record = make_record(
            self.record_url, token=token, instance=self.instance, mlflow_version=_mlflow_version(), ttl_s=ttl
        )
        entry: dict[str, Any] = {"at": time.time(), "target": self.publisher.describe(), "url": record.url}
        try:
            self.publisher.publish(record)
        except (PublishError, BridgeError) as exc:
            self._publish_failures += 1
            delay = compute_backoff_ms(self._publish_failures - 1, min_backoff_ms=2000, max_backoff_ms=300_000) / 1000
            self._next_publish_at = time.time() + delay
            entry.update(ok=False, error=str(exc))
            log.warning("Publishing the record to %s failed (retry in %.0f s): %s", entry["target"], delay, exc)
        else:
            self._publish_failures = 0
            self._next_publish_at = time.time() + ttl / 2  # well before the record expires
            entry.update(ok=True, error=None, expires_at=record.expires_at)
            log.info("Published the record for %s to %s", record.url, entry["target"])
        if self._local_publisher is not None:
            try:
                self._local_publisher.publish(record)
            except BridgeError as exc:
                log.warning("Writing the local record failed: %s", exc)
        self._published_revision = revision
        self.last_publish = entry
        self._write_state()

    def _last_publish_error(self) -> str | None:
        return None if self.last_publish is None else self.last_publish.get("error")

    def _reap_loop(self) -> None:
        from bridge.serve.reaper import reap_stale_runs

        interval = self.options.reap_interval_s
        while not self._stop.wait(interval):
            if not self.mlflow.status.healthy:
                continue
            try:
                killed = reap_stale_runs(self.mlflow.url, self.options.heartbeat_timeout_s)
            except Exception as exc:  # MLflow restarting, or a store hiccup: try again next round
                log.debug("Reaper round failed: %s", exc)
                continue
            self.last_reap = {"at": time.time(), "killed": killed}
            if killed:
                self._event(f"marked {len(killed)} run(s) KILLED after missing heartbeats: {', '.join(killed)}")

    # --- state ------------------------------------------------------------------------------------

    def state(self, *, stopped: bool = False) -> dict[str, Any]:
        """What `bridge status` shows; built from fields that hold no secret."""
        status = self.mlflow.status
        return {
            "pid": os.getpid(),
            "instance": self.instance,
            "started_at": self.started_at,
            "ready_at": self.ready_at,
            "stopped_at": time.time() if stopped else None,
            "mlflow": {
                "url": self.mlflow.url,
                "pid": status.pid,
                "restarts": status.restarts,
                "healthy": status.healthy and not stopped,
                "last_exit": status.last_exit,
                "backend_store_uri": redact_uri(self.mlflow.options.resolved_backend_store_uri()),
                "artifacts_destination": redact_uri(self.mlflow.options.resolved_artifacts_destination()),
                "workers": self.mlflow.options.workers,
            },
            "entrance": {"url": self.entrance.url if self.entrance else None},
            "client_wheel": {
                "path": self.client_wheel.public_path,
                "ready": self.client_wheel.data is not None,
                "error": self.client_wheel.error,
                "downloads": self.entrance.wheel_downloads if self.entrance else 0,
            },
            "tunnel": {
                "mode": self.tunnel_mode,
                "requested": self.options.tunnel,
                "public_url": self.public_url,
                "status": self.tunnel_status,
                "error": self.tunnel_error,
            },
            "usage": self.entrance.usage.snapshot() if self.entrance else None,
            "budget": {"bytes": self.options.bytes_budget, "requests": self.options.requests_budget},
            "secrets_store": self.secrets_store,
            "record_url": self.record_url,
            "last_publish": self.last_publish,
            "heartbeat_timeout_s": self.options.heartbeat_timeout_s,
            "last_reap": self.last_reap,
            "events": self.events[-10:],
        }

    def _write_state(self, *, stopped: bool = False) -> None:
        path = config.paths().state_file
        with self._state_lock:
            data = json.dumps(self.state(stopped=stopped), indent=2, sort_keys=True) + "\n"
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
                tmp.write_text(data)
                os.replace(tmp, path)
            except OSError as exc:
                log.warning("Could not write %s: %s", path, exc)


def primary_address() -> str | None:
    """This machine's IPv4 address on its default route, or None without one (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route is looked up
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address in ("0.0.0.0", "") else address


def _check_bindable(host: str, port: int) -> None:
    """Raise a `ServeError` naming the option to change when the entrance could not listen on host:port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServeError(
                    f"the entrance port {port} on {host} is already in use; choose another with --entrance-port"
                ) from None
            raise ServeError(f"the entrance cannot listen on {host}:{port} ({exc.strerror}); check --host") from None


def _mlflow_version() -> str:
    """The installed MLflow's version (the server runs this one), without the 1-2 s of `import mlflow`."""
    return metadata.version("mlflow")


def read_state() -> dict[str, Any] | None:
    """The state file a `bridge serve` wrote, or None when there is none."""
    path = config.paths().state_file
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ServeError(f"{path} is unreadable ({type(exc).__name__}); is another bridge writing it?") from None


def serve(options: ServeOptions, on_ready=None) -> None:
    """Run `bridge serve` until a stop signal (`STOP_SIGNALS`), then stop everything; `on_ready(info)` once up."""
    supervisor = Supervisor(options)

    def handle(signum, _frame) -> None:
        log.info("Received %s; stopping", signal.Signals(signum).name)
        supervisor.request_stop()

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        try:
            info = supervisor.start()
        except _Interrupted:
            return
        except Exception as exc:  # a stop signal during start-up surfaces as the part's own error
            if supervisor.stop_requested and not isinstance(exc, ConfigError):
                return
            raise
        if on_ready is not None:
            on_ready(info)
        supervisor.mark_ready()
        supervisor.wait()
    finally:
        supervisor.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _local_folder(destination: str) -> Path | None:
    """MLflow's artifact destination as a local folder (a path or file:// URI), or None (S3 and other stores)."""
    if destination.startswith("file://"):
        return Path(urlsplit(destination).path)
    if "://" in destination or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", destination):
        return None
    return Path(destination)
