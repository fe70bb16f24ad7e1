"""What `bridge serve` needs of a tunnel, whichever kind it is, and the target check every kind shares.

    PublicTunnel.open()     start it (closing an earlier one); the public URL
    PublicTunnel.healthy()  still forwarding?
    PublicTunnel.alive()    is its agent process still running (forwarding or reconnecting)?
    PublicTunnel.close()    stop it; safe to repeat

Two kinds implement it: ngrok's `Tunnel` (bridge/serve/tunnel.py, through pyngrok) and `CloudflaredTunnel`
(bridge/serve/tunnel_cloudflared.py, a Cloudflare quick tunnel). The supervisor holds either one as a
`PublicTunnel` through a `TunnelKeeper` (bridge/serve/tunnel_keeper.py): an agent that is not `alive()` is replaced at
once, one that is alive but not `healthy()` gets a grace period to reconnect first; `open()` is retried with backoff.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable
from urllib.parse import urlsplit

from bridge.errors import ConfigError


@runtime_checkable
class PublicTunnel(Protocol):
    """A tunnel from a public URL to the entrance, run by an agent process this object starts and stops."""

    #: Which kind it is, as `--tunnel` names it: "ngrok" or "cloudflared".
    kind: ClassVar[str]
    #: The request header in which the tunnel's edge names the client it saw (the entrance throttles by it).
    client_header: ClassVar[str]
    #: The entrance's URL, where the tunnel forwards to.
    target_url: str
    #: The public URL while open; None while closed.
    public_url: str | None

    def open(self) -> str:
        """Start the tunnel, closing any earlier one first, and return its public URL; a `TunnelError` if not."""
        ...

    def healthy(self) -> bool:
        """True while the agent runs and still forwards the public URL; False once either stopped."""
        ...

    def alive(self) -> bool:
        """True while the agent process runs, even while it is reconnecting to its edge; False once it exited."""
        ...

    def close(self) -> None:
        """Stop the tunnel and its agent and forget the public URL; safe to call again, or before `open()`."""
        ...


def tunnel_target(target_url: str) -> str:
    """`target_url` (the entrance) without a trailing slash; a ConfigError unless it is http(s) with a port."""
    parts = urlsplit(target_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise ConfigError(f"tunnel target {target_url!r} must be an http(s) URL with a port")
    return target_url.rstrip("/")
