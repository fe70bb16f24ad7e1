"""Keeps the public tunnel open for `bridge serve`: the first open, health checks, a grace period, reopens.

    TunnelKeeper.start()   open once; a failure a retry can fix leaves it `down` with a retry scheduled, so
                           MLflow and the entrance go on serving locally (one that cannot be fixed by waiting,
                           like a refused authtoken, raises)
    TunnelKeeper.tick()    from the supervisor's loop: check the agent when due, retry when due
    TunnelKeeper.reopen()  replace the agent now (the edge password followed the access token)
    TunnelKeeper.close()

What replaces an agent: its process exited, or its tunnel stayed unready for longer than the grace period.
An agent that is alive but unready is reconnecting: a Cloudflare quick tunnel has one edge connection, its
`/ready` says 503 while that connection is down, and cloudflared redials it under the same hostname. Replacing
it then would throw away a URL the clients know for a new one. Each change is reported through `on_event`
as a `TunnelEvent`; the supervisor republishes on a new URL and the CLI prints one line per event.

Timing comes in through the constructor (`clock`, `grace_s`, `check_interval_s`, backoff bounds), so tests
drive the keeper with a fake clock instead of waiting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from bridge import config
from bridge.errors import BridgeError, CloudflaredBinaryError, ConfigError, NgrokAuthtokenError, NgrokBinaryError
from bridge.retry import compute_backoff_ms
from bridge.serve.public_tunnel import PublicTunnel

log = logging.getLogger(__name__)

#: Seconds between two health checks of an open tunnel.
DEFAULT_CHECK_INTERVAL_S = config.DEFAULT_TUNNEL_CHECK_S
#: Seconds an agent that is alive but unready gets to reconnect before it is replaced. From cloudflared's own
#: reconnect schedule (github.com/cloudflare/cloudflared): a quick tunnel runs one edge connection
#: (cmd/cloudflared/tunnel/quick_tunnel.go sets ha-connections to 1) and /ready is 503 while it is down
#: (metrics/readiness.go). A dropped connection waits a random time up to 2 s, 4 s, … (retry/backoffhandler.go,
#: base 1 s, doubling; supervisor/tunnel.go logs "Retrying connection in up to 2s"), then the supervisor waits up
#: to 20 s, 40 s, … more before it dials again (supervisor/supervisor.go, tunnelRetryDuration = 10 s, doubled).
#: Two failed dials can so take 2 + 20 + 4 + 40 = 66 s; 90 s covers them and the registration after.
DEFAULT_GRACE_S = config.DEFAULT_TUNNEL_GRACE_S
#: Backoff between failed opens (a rate limit at Cloudflare, no network): 2 s doubling, capped at 5 minutes.
DEFAULT_MIN_BACKOFF_MS = 2_000
DEFAULT_MAX_BACKOFF_MS = 300_000
#: Errors waiting cannot fix: at start they stop `bridge serve` with their message instead of being retried.
NEVER_RETRIED: tuple[type[BaseException], ...] = (
    ConfigError,
    NgrokAuthtokenError,
    NgrokBinaryError,
    CloudflaredBinaryError,
)


@dataclass(frozen=True)
class TunnelEvent:
    """One change of the tunnel, for the state file and the terminal."""

    #: opened, failed, unready, recovered, replacing, reopened
    kind: str
    message: str
    #: The public URL after the event (None while none is open).
    url: str | None
    #: True when `url` differs from the URL clients were last told.
    url_changed: bool = False


class TunnelKeeper:
    """Owns one `PublicTunnel` made by `make_tunnel`, and the decisions of when to replace it."""

    def __init__(
        self,
        make_tunnel: Callable[[], PublicTunnel],
        *,
        on_event: Callable[[TunnelEvent], None] | None = None,
        grace_s: float = DEFAULT_GRACE_S,
        check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
        min_backoff_ms: float = DEFAULT_MIN_BACKOFF_MS,
        max_backoff_ms: float = DEFAULT_MAX_BACKOFF_MS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if grace_s < 0 or check_interval_s <= 0 or min_backoff_ms <= 0 or max_backoff_ms < min_backoff_ms:
            raise ConfigError(
                f"tunnel timing out of range: grace {grace_s} s, check every {check_interval_s} s, "
                f"backoff {min_backoff_ms}..{max_backoff_ms} ms"
            )
        self._make = make_tunnel
        self._on_event = on_event or (lambda event: None)
        self.grace_s = float(grace_s)
        self.check_interval_s = float(check_interval_s)
        self.min_backoff_ms = min_backoff_ms
        self.max_backoff_ms = max_backoff_ms
        self._clock = clock
        self.tunnel: PublicTunnel | None = None
        #: opening, open, reconnecting (alive, unready, within the grace), reopening, down (retry scheduled), closed
        self.status = "opening"
        self.public_url: str | None = None
        self.error: str | None = None
        self.failures = 0
        self.unready_since: float | None = None
        self.next_at = 0.0
        self._announced_url: str | None = None

    def __repr__(self) -> str:
        return f"TunnelKeeper({self.status}, {self.public_url or 'no URL'}, grace {self.grace_s:.0f} s)"

    def unready_for_s(self) -> float | None:
        """Seconds the agent has been alive but unready (reconnecting); None while it is ready or not running."""
        return None if self.unready_since is None else max(0.0, self._clock() - self.unready_since)

    def retry_in_s(self) -> float | None:
        """Seconds until the next open is tried while down; None otherwise."""
        return max(0.0, self.next_at - self._clock()) if self.status == "down" else None

    # --- the calls the supervisor makes -------------------------------------------------------------

    def start(self) -> str | None:
        """Open the tunnel; its URL, or None when it failed and a retry is scheduled. Raises `NEVER_RETRIED`."""
        self._open("start", first=True)
        return self.public_url

    def tick(self) -> None:
        """Do what is due: retry an open, or check the agent and act on what it says."""
        now = self._clock()
        if self.status == "closed" or now < self.next_at:
            return
        if self.status == "down" or self.tunnel is None:
            self._open("retry")
            return
        tunnel = self.tunnel
        if not tunnel.alive():
            self._emit("replacing", f"the tunnel agent for {self.public_url} exited; starting a new one")
            self._open("the agent exited")
            return
        if tunnel.healthy():
            if self.unready_since is not None:
                self._emit("recovered", f"tunnel {self.public_url} is back after {now - self.unready_since:.0f} s")
            self.unready_since = None
            self.status = "open"
            self.next_at = now + self.check_interval_s
            return
        if self.unready_since is None:
            self.unready_since = now
            self.status = "reconnecting"
            self._emit(
                "unready",
                f"tunnel {self.public_url} lost its edge connection; the agent is reconnecting "
                f"(replaced if not back within {self.grace_s:.0f} s)",
            )
        elif now - self.unready_since >= self.grace_s:
            self._emit(
                "replacing", f"tunnel {self.public_url} not back after {self.grace_s:.0f} s; replacing the agent"
            )
            self._open("the agent did not reconnect in time")
            return
        # Checked more often while reconnecting, so a recovery (or the end of the grace) is seen promptly.
        self.next_at = now + min(self.check_interval_s, max(1.0, self.grace_s / 10))

    def reopen(self, why: str) -> None:
        """Replace the agent now with a freshly made tunnel (closing the old one)."""
        if self.tunnel is not None:
            self.tunnel.close()
        self.tunnel = None
        self._open(why)

    def close(self) -> None:
        self.status = "closed"
        if self.tunnel is not None:
            self.tunnel.close()
        self.public_url = None

    # --- internals ------------------------------------------------------------------------------------

    def _open(self, why: str, *, first: bool = False) -> None:
        self.status = "opening" if self._announced_url is None else "reopening"
        self.unready_since = None
        try:
            if self.tunnel is None:
                self.tunnel = self._make()
            url = self.tunnel.open()  # closes the old agent first
        except NEVER_RETRIED as exc:
            if first:
                self.status = "down"
                self.error = str(exc)
                raise
            self._failed(why, exc)
            return
        except BridgeError as exc:
            self._failed(why, exc)
            return
        self.failures = 0
        self.error = None
        self.status = "open"
        self.public_url = url
        self.next_at = self._clock() + self.check_interval_s
        announced, self._announced_url = self._announced_url, url
        changed = url != announced
        if announced is None:
            self._emit("opened", f"tunnel open at {url}", changed=True)
        elif changed:
            self._emit("reopened", f"tunnel reopened at a new URL {url} ({why})", changed=True)
        else:
            self._emit("reopened", f"tunnel reopened at {url} ({why})", changed=False)

    def _failed(self, why: str, exc: BaseException) -> None:
        self.failures += 1
        delay_s = (
            compute_backoff_ms(
                self.failures - 1, min_backoff_ms=self.min_backoff_ms, max_backoff_ms=self.max_backoff_ms
            )
            / 1000
        )
        self.status = "down"
        self.public_url = None
        self.error = str(exc)
        self.next_at = self._clock() + delay_s
        what = "opening the tunnel" if why in ("start", "retry") else "reopening the tunnel"
        self._emit("failed", f"{what} failed (try {self.failures}: {exc}); next try in {delay_s:.0f} s")

    def _emit(self, kind: str, message: str, *, changed: bool = False) -> None:
        log.info("Tunnel: %s", message)
        try:
            self._on_event(TunnelEvent(kind, message, self.public_url, changed))
        except Exception:  # a failing listener must not stop the keeping
            log.exception("Tunnel event listener failed")
