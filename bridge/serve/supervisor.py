"""`bridge serve`: wire MLflow, the entrance, the tunnel and the publisher together, and keep them up.

    access token ──▶ MlflowProcess.start() ──▶ Entrance ──▶ Tunnel (optional) ──▶ Publisher (signed record)

The record also goes, sealed, to a token-derived topic on a relay (bridge/rendezvous.py; `--relay`), so a
client holding only the token finds it; republished on every change and before the relay forgets it.

The tunnel is ngrok's (bridge/serve/tunnel.py) or a Cloudflare quick tunnel (bridge/serve/tunnel_cloudflared.py);
`--tunnel auto` picks ngrok when an authtoken is configured, else cloudflared when its binary is there, else none.

While it runs, the supervisor restarts MLflow when it dies (without touching the entrance or the
tunnel), keeps the tunnel open through a `TunnelKeeper` (bridge/serve/tunnel_keeper.py: a tunnel that fails at
start is retried with backoff while MLflow and the entrance serve locally; an agent that loses its edge
connection gets a grace period to reconnect before it is replaced) and republishes each new URL, republishes
before the record expires and after the token rotates, reaps runs whose client stopped sending heartbeats, and
writes what it sees to the state file that `bridge status` reads. No secret goes into that file. Every event
also goes to `on_event`, for the CLI to print one line each.
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
from bridge.record import LOOPBACK_HOSTS, EndpointRecord, make_record
from bridge.rendezvous import DEFAULT_RELAY, DEFAULT_REPUBLISH_S, MIN_REPUBLISH_S, relay_url
from bridge.retry import compute_backoff_ms
from bridge.serve.entrance import CLIENT_HEADERS, Entrance
from bridge.serve.mlflow_process import MlflowOptions, MlflowProcess, redact_uri
from bridge.serve.publisher import FilePublisher, Publisher, RelayPublisher, publisher_for
from bridge.serve.tunnel_keeper import DEFAULT_CHECK_INTERVAL_S, DEFAULT_GRACE_S, TunnelEvent, TunnelKeeper
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
    #: The ntfy-compatible relay the sealed record goes to (bridge/rendezvous.py), or None: no relay.
    relay: str | None = DEFAULT_RELAY
    relay_republish_s: float = DEFAULT_REPUBLISH_S
    backend_store_uri: str | None = None
    artifacts_destination: str | None = None
    workers: int = config.DEFAULT_WORKERS
    heartbeat_timeout_s: float = config.DEFAULT_HEARTBEAT_TIMEOUT_S
    record_ttl_s: float = config.DEFAULT_RECORD_TTL_S
    mlflow_start_timeout_s: float = 90.0
    bytes_budget: float = config.DEFAULT_TUNNEL_BYTES_BUDGET
    requests_budget: int = config.DEFAULT_TUNNEL_REQUESTS_BUDGET
    #: Seconds an agent that lost its edge connection (alive, not ready) gets to reconnect before it is replaced.
    tunnel_grace_s: float = DEFAULT_GRACE_S
    #: Seconds between two health checks of the tunnel.
    tunnel_check_interval_s: float = DEFAULT_CHECK_INTERVAL_S

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
        if self.tunnel_grace_s < 0 or self.tunnel_check_interval_s <= 0:
            raise ConfigError(
                f"--tunnel-grace must be 0 or more seconds and {config.TUNNEL_CHECK_ENV} more than 0, got "
                f"{self.tunnel_grace_s} and {self.tunnel_check_interval_s}"
            )
        if self.relay is not None:  # "off" means none; a URL is checked and loses its trailing slash
            object.__setattr__(self, "relay", relay_url(self.relay, what="--relay"))
        if not self.relay_republish_s >= MIN_REPUBLISH_S:
            raise ConfigError(
                f"--relay-republish must be at least {MIN_REPUBLISH_S:.0f} s, got {self.relay_republish_s}"
            )
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
    #: What --tunnel resolved to (ngrok, cloudflared, none), and whether it is open now or being retried.
    tunnel_mode: str = "none"
    tunnel_status: str = "disabled"
    #: Where the sealed record goes (`relay ntfy.sh (…)`), or None when no relay is used; its first error.
    relay: str | None = None
    relay_error: str | None = None


@dataclass(frozen=True)
class ServeEvent:
    """Something that changed while serving, for the terminal: one line; `record_url` set when the URL changed."""

    at: float
    message: str
    record_url: str | None = None


def _loopback(url: str | None) -> bool:
    """Whether `url` reaches only this machine (what the record names while no tunnel is open)."""
    return (urlsplit(url or "").hostname or "") in LOOPBACK_HOSTS


class _Interrupted(Exception):
    """A stop was requested while starting."""


class Supervisor:
    """Starts the parts in order, watches them, and stops them all; `start()`, then `wait()`, then `stop()`."""

    def __init__(self, options: ServeOptions, on_event: Callable[[ServeEvent], None] | None = None) -> None:
        self.options = options
        self.on_event = on_event
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
        self.relay: RelayPublisher | None = (
            RelayPublisher(options.relay, self._current_token) if options.relay is not None else None
        )
        self.relay_note: str | None = None if self.relay is not None else "switched off (--no-relay)"
        self.last_relay: dict[str, Any] | None = None
        self._next_relay_at = 0.0
        self._relay_failures = 0
        self._relay_published: tuple[str, int] | None = None  # (URL, token revision) the relay last took
        self.entrance: Entrance | None = None
        self.keeper: TunnelKeeper | None = None  # holds ngrok's or cloudflared's tunnel, imported only when used
        self.tunnel_mode = "none"  # what --tunnel resolved to: ngrok, cloudflared or none
        self.public_url: str | None = None
        self.record_url: str | None = None
        self.last_publish: dict[str, Any] | None = None
        self.last_reap: dict[str, Any] | None = None
        self.ready_at: float | None = None
        self.events: list[dict[str, Any]] = []
        self._published_revision = -1
        self._next_publish_at = 0.0
        self._publish_failures = 0
        self._state_lock = threading.Lock()
        self._next_usage_save = 0.0
        self.secrets_store = secrets.describe_store()
        self._budget_warned_month: str | None = None
        self._stopped = False
        self._serving = False  # start-up is over: events reach `on_event`, a new tunnel URL is republished
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
            self.keeper = TunnelKeeper(
                make_tunnel, on_event=self._tunnel_event,
                grace_s=opts.tunnel_grace_s, check_interval_s=opts.tunnel_check_interval_s,
            )  # fmt: skip
            # A failure waiting can fix (a rate limit, no network) leaves MLflow and the entrance serving locally.
            self.public_url = self.keeper.start()
            if self.public_url is None:
                self.notes.append(
                    f"The tunnel did not open ({self.keeper.error}); MLflow and the entrance serve locally meanwhile, "
                    "and the tunnel is retried with backoff: its URL is printed and published once it opens."
                )
        self.record_url = self.public_url or self._advertised_entrance_url()
        if self.relay is not None and self.keeper is None and _loopback(self.record_url):
            # Nobody the relay could reach can use a loopback URL: publishing it would only spend the relay's quota.
            # (A tunnel that failed at start keeps the relay: its URL goes there once it opens.)
            self.relay.close()
            self.relay = None
            self.relay_note = "not used: the record's URL is this machine only (no tunnel)"
        self._publish()
        self._serving = True
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
            tunnel_mode=self.tunnel_mode,
            tunnel_status="disabled" if self.keeper is None else self.keeper.status,
            relay=self.relay.describe() if self.relay is not None else None,
            relay_error=None if self.last_relay is None else self.last_relay.get("error"),
        )

    def _choose_tunnel(self) -> Callable[[], PublicTunnel] | None:
        """Resolve `--tunnel` now: a factory for the tunnel, or None (with a note saying why) for the entrance alone."""
        mode = self.options.tunnel
        if mode == "none":
            return None
        if mode == "cloudflared" or (
            mode == "auto" and not self.options.domain and not self.options.edge_auth and not secrets.ngrok_authtoken()
        ):
            from bridge.serve.tunnel_cloudflared import (
                CloudflaredConfig,
                CloudflaredTunnel,
                check_binary,
                install_help,
            )

            cf_config = CloudflaredConfig.from_environment()
            if mode == "cloudflared":
                check_binary(cf_config.binary)  # before MLflow starts: said in a second, not after its start-up
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

        def make_ngrok() -> PublicTunnel:
            # With --edge-auth the password is the access token: a fresh config (and redaction) after each rotation.
            current = self._tunnel_config() if self.options.edge_auth else tunnel_config
            if current is None:
                raise TunnelError("the ngrok authtoken disappeared; run `bridge login`")
            return Tunnel(self._tunnel_target(), current)

        return make_ngrok

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
        if self.keeper is not None:
            try:
                self.keeper.close()
            except Exception as exc:  # keep stopping the rest
                log.warning("Closing the tunnel failed: %s", type(exc).__name__)
        if self.entrance is not None:
            self.entrance.stop()
            self.entrance.usage.save()
        self.client_wheel.stop()  # a build still running
        self.mlflow.stop()
        for thread in self._threads:
            thread.join(timeout=15)
        for publisher in (self.publisher, self.relay):
            try:
                if publisher is not None:
                    publisher.close()
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

    def _event(self, message: str, *, url_changed: bool = False) -> None:
        at = time.time()
        with self._state_lock:
            self.events = [*self.events, {"at": at, "event": message}][-20:]
        self._write_state()
        if self.on_event is not None and self._serving:  # start-up's own events are in the start-up output
            try:
                self.on_event(ServeEvent(at, message, self.record_url if url_changed else None))
            except Exception:  # printing must never stop the supervisor
                log.exception("The serve event listener failed")

    def _tunnel_event(self, event: TunnelEvent) -> None:
        """A change the keeper made: republish on a new (or reopened) URL; tell the state file and the terminal."""
        if event.kind in ("opened", "reopened") and event.url is not None:
            self.public_url = event.url
            if self._serving:  # after start-up: the record follows the tunnel (start-up publishes once itself)
                self.record_url = event.url
                self._publish()  # even at the same URL (--domain) a fresh record says this session is live
        elif event.kind == "failed":
            self.public_url = None
        self._event(event.message, url_changed=event.url_changed and self.record_url == event.url)

    def _tick(self) -> None:
        now = time.time()
        if self.keeper is not None:
            self.keeper.tick()
        assert self.entrance is not None
        self.entrance.tokens.current()  # notices a rotation even when no request has come in since
        revision = self.entrance.tokens.revision
        if revision != self._published_revision:
            self._event("access token changed; republishing the record under the new key")
            if self.keeper is not None and self.options.edge_auth and self.tunnel_mode == "ngrok":
                self.keeper.reopen("the edge password follows the access token")
            self._publish()
        elif now >= self._next_publish_at:
            self._publish()
        elif self.relay is not None and now >= self._next_relay_at and not _loopback(self.record_url):
            record, token = self._sign()
            self._publish_relay(record, token)
            self._write_state()
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
        warning = budget_warning(
            snapshot, self.options.bytes_budget, self.options.requests_budget, tunnel=self.tunnel_mode
        )
        if warning and self._budget_warned_month != snapshot["month"]:
            self._budget_warned_month = snapshot["month"]
            log.warning("Tunnel budget: %s.", warning)
            self._event(f"tunnel budget: {warning}")

    def _current_token(self) -> str | None:
        # Read through the entrance, so records are signed and sealed with exactly what it accepts.
        return None if self.entrance is None else self.entrance.tokens.current().decode()

    def _sign(self) -> tuple[EndpointRecord, str]:
        """A fresh record for the current URL, signed with the current token; and that token."""
        assert self.record_url is not None
        token = self._current_token()
        assert token is not None
        record = make_record(
            self.record_url,
            token=token,
            instance=self.instance,
            mlflow_version=_mlflow_version(),
            ttl_s=self.options.record_ttl_s,
        )
        return record, token

    def _publish(self) -> None:
        """Sign a fresh record for the current URL with the current token and publish it (the relay too)."""
        assert self.entrance is not None and self.record_url is not None
        revision = self.entrance.tokens.revision
        ttl = self.options.record_ttl_s
        record, token = self._sign()
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
        # The relay only when something changed or it is due: a failing --publish target retried every few seconds
        # must not spend the relay's daily message quota.
        if (
            self.relay is not None
            and not _loopback(record.url)  # a tunnel not open yet: its URL goes to the relay once it opens
            and (self._relay_published != (record.url, revision) or time.time() >= self._next_relay_at)
        ):
            self._publish_relay(record, token)
            if self.last_relay and self.last_relay["ok"]:
                self._relay_published = (record.url, revision)
        self._published_revision = revision
        self.last_publish = entry
        self._write_state()

    def _publish_relay(self, record: EndpointRecord, token: str) -> None:
        """Post the sealed record to the token's topic; on success, next time before the relay forgets it."""
        assert self.relay is not None
        entry: dict[str, Any] = {"at": time.time(), "target": self.relay.describe(), "url": record.url}
        try:
            self.relay.publish(record, token=token)
        except BridgeError as exc:
            self._relay_failures += 1
            # 10 s at least (twice ntfy's refill of one request per 5 s), then doubling to 15 min: the daily quota
            # lasts a day.
            delay = compute_backoff_ms(self._relay_failures - 1, min_backoff_ms=10_000, max_backoff_ms=900_000) / 1000
            self._next_relay_at = time.time() + delay
            entry.update(ok=False, error=str(exc))
            log.warning("Publishing the record to the %s failed (retry in %.0f s): %s", entry["target"], delay, exc)
        else:
            self._relay_failures = 0
            now = time.time()
            due = now + self.options.relay_republish_s
            if self.relay.expires_at is not None and self.relay.expires_at > now:
                due = min(due, now + (self.relay.expires_at - now) / 2)  # the relay said when it forgets
            self._next_relay_at = due
            entry.update(ok=True, error=None, next_at=due)
        self.last_relay = entry

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
            "entrance": self._entrance_state(),
            "client_wheel": {
                "path": self.client_wheel.public_path,
                "ready": self.client_wheel.data is not None,
                "error": self.client_wheel.error,
                "downloads": self.entrance.wheel_downloads if self.entrance else 0,
            },
            "tunnel": self._tunnel_state(),
            "usage": self.entrance.usage.snapshot() if self.entrance else None,
            "budget": {"bytes": self.options.bytes_budget, "requests": self.options.requests_budget},
            "secrets_store": self.secrets_store,
            "record_url": self.record_url,
            "last_publish": self.last_publish,
            "relay": {
                "target": self.relay.describe() if self.relay is not None else None,
                "note": self.relay_note,
                "republish_s": self.options.relay_republish_s,
                "last": self.last_relay,
            },
            "heartbeat_timeout_s": self.options.heartbeat_timeout_s,
            "last_reap": self.last_reap,
            "events": self.events[-10:],
        }

    def _entrance_state(self) -> dict[str, Any]:
        entrance = self.entrance
        if entrance is None:
            return {"url": None}
        return {
            "url": entrance.url,
            "requests": entrance.requests,
            "refused_logins": entrance.refused_logins,
            "throttled": entrance.throttled,
            "last_refused_at": entrance.last_refused_at,
        }

    def _tunnel_state(self) -> dict[str, Any]:
        keeper = self.keeper
        state: dict[str, Any] = {
            "mode": self.tunnel_mode,
            "requested": self.options.tunnel,
            "public_url": self.public_url,
            "status": "disabled" if keeper is None else keeper.status,
            "error": None if keeper is None else keeper.error,
            "grace_s": self.options.tunnel_grace_s,
        }
        if keeper is not None:
            retry_in = keeper.retry_in_s()
            state.update(
                failures=keeper.failures,
                next_try_at=None if retry_in is None else time.time() + retry_in,
                unready_s=keeper.unready_for_s(),
            )
        return state

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


def serve(options: ServeOptions, on_ready=None, on_event: Callable[[ServeEvent], None] | None = None) -> None:
    """Run `bridge serve` until a stop signal (`STOP_SIGNALS`), then stop everything; `on_ready(info)` once up,
    `on_event(event)` for each change after that (and during start-up)."""
    supervisor = Supervisor(options, on_event=on_event)

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
