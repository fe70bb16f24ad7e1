"""A Cloudflare quick tunnel to the entrance: `cloudflared tunnel --url …`, no account, a new URL per start.

    CloudflaredConfig ──▶ CloudflaredTunnel.open() ──▶ `cloudflared tunnel --url http://127.0.0.1:<entrance>`
                          URL read from its log ("Your quick Tunnel has been created! …"), ready when a
                          connection is registered (its metrics server's /ready says 200)
                          CloudflaredTunnel.healthy()  process alive and /ready still 200
                          CloudflaredTunnel.alive()    process alive (it redials a lost edge connection itself)
                          CloudflaredTunnel.close()    SIGTERM, then SIGKILL after a grace period

The same `PublicTunnel` (bridge/serve/public_tunnel.py) as the ngrok `Tunnel` (bridge/serve/tunnel.py), so the
supervisor's `TunnelKeeper` (bridge/serve/tunnel_keeper.py) restarts either one with backoff and republishes its new
URL; an unready quick tunnel whose process lives gets a grace period first, as cloudflared reconnects in place.
A quick tunnel needs no secret: nothing here can leak one. Cloudflare's limits for quick tunnels (200 requests in
flight, 100 MB bodies, no server-sent events, for testing) are far above one workstation's use.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from bridge.errors import CloudflaredBinaryError, ConfigError, TunnelError
from bridge.serve.public_tunnel import PublicTunnel, tunnel_target

log = logging.getLogger(__name__)

#: The environment variable naming a cloudflared binary to use instead of PATH's.
CLOUDFLARED_PATH_ENV = "BRIDGE_CLOUDFLARED_PATH"
#: Seconds from start to a registered connection before the start counts as failed (cloudflared usually takes 3-8).
DEFAULT_STARTUP_TIMEOUT_S = 30.0
#: Seconds cloudflared gets to shut down after SIGTERM before it is killed.
STOP_GRACE_S = 5.0
#: Seconds for one request to cloudflared's local metrics server.
METRICS_TIMEOUT_S = 2.0
#: Log lines kept to explain a failed start.
LOG_TAIL_LINES = 40

_URL = re.compile(r"https://[a-z0-9-]+\.trycloudflare\.com")
_REGISTERED = "Registered tunnel connection"
_CREATED = "Your quick Tunnel has been created"


def resolve_cloudflared_path() -> str | None:
    """`BRIDGE_CLOUDFLARED_PATH`, else a `cloudflared` on PATH, else None (read now, not at import)."""
    explicit = os.environ.get(CLOUDFLARED_PATH_ENV, "").strip()
    if explicit:
        return str(Path(explicit).expanduser())
    return shutil.which("cloudflared")


def install_help() -> str:
    return (
        "install cloudflared (Debian/Ubuntu: the cloudflared .deb from https://github.com/cloudflare/cloudflared/"
        "releases or pkg.cloudflare.com; macOS: `brew install cloudflared`) or set "
        f"{CLOUDFLARED_PATH_ENV} to a cloudflared binary"
    )


def check_binary(binary: str | None) -> str:
    """`binary` when it names an executable file; else a `CloudflaredBinaryError` saying how to install one.

    `bridge serve` calls it before MLflow starts, so a missing binary is said in a second, not after MLflow's start.
    """
    if not binary:
        raise CloudflaredBinaryError(
            f"--tunnel cloudflared needs the cloudflared binary, and none is on PATH; {install_help()}"
        )
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise CloudflaredBinaryError(f"cloudflared at {binary} is not an executable file; {install_help()}")
    return binary


class CloudflaredConfig:
    """How to run the quick tunnel: which binary, and how long its start may take."""

    def __init__(self, binary: str | None, *, startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S) -> None:
        if binary is not None and not str(binary).strip():
            raise ConfigError(f"{CLOUDFLARED_PATH_ENV} / binary is empty")
        if startup_timeout_s <= 0:
            raise ConfigError(f"startup_timeout_s must be positive, got {startup_timeout_s!r}")
        self.binary = str(binary) if binary is not None else None
        self.startup_timeout_s = float(startup_timeout_s)

    @classmethod
    def from_environment(cls) -> CloudflaredConfig:
        return cls(resolve_cloudflared_path())

    def __repr__(self) -> str:
        return f"CloudflaredConfig(binary={self.binary!r}, startup_timeout_s={self.startup_timeout_s})"


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: cloudflared gets SIGTERM when the thread that started it (bridge serve's main loop) dies, even by
    SIGKILL, so no quick tunnel outlives bridge. Best effort elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


class CloudflaredTunnel(PublicTunnel):
    """A quick tunnel from a random `https://….trycloudflare.com` to `target_url` (the entrance)."""

    kind = "cloudflared"
    #: The header in which the edge names the client it saw (the entrance throttles by it).
    client_header = "Cf-Connecting-Ip"

    def __init__(self, target_url: str, config: CloudflaredConfig) -> None:
        self.target_url = tunnel_target(target_url)
        self.config = config
        self.public_url: str | None = None
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._metrics: str | None = None
        self._lines: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._url_seen: str | None = None
        self._registered = threading.Event()
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"CloudflaredTunnel({self.target_url!r} via {self.public_url or 'closed'}, {self.config!r})"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def open(self) -> str:
        """Start cloudflared (closing any earlier one) and wait for its URL and a registered connection."""
        with self._lock:
            self.close()
            binary = self.config.binary
            if not binary:
                raise CloudflaredBinaryError(f"no cloudflared binary found; {install_help()}")
            self._metrics = f"127.0.0.1:{_free_loopback_port()}"
            self._lines.clear()
            self._url_seen = None
            self._registered.clear()
            command = [binary, "tunnel", "--no-autoupdate", "--metrics", self._metrics, "--url", self.target_url]
            try:
                self._proc = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True, errors="replace", bufsize=1, preexec_fn=_die_with_parent,
                )  # fmt: skip
            except OSError as exc:
                raise CloudflaredBinaryError(
                    f"cloudflared at {binary} could not be started ({type(exc).__name__}: {exc.strerror}); "
                    f"{install_help()}"
                ) from None
            # Drained for the life of the process, so its log pipe never fills and blocks it.
            self._reader = threading.Thread(
                target=self._read_output, args=(self._proc,), name="bridge-cloudflared-log", daemon=True
            )
            self._reader.start()
            try:
                url = self._wait_until_ready()
            except BaseException:
                self.close()
                raise
            self.public_url = url
            log.info("Tunnel open: %s -> %s (cloudflared quick tunnel)", url, self.target_url)
            return url

    def healthy(self) -> bool:
        """True while cloudflared runs and its metrics server reports a ready connection."""
        with self._lock:
            if self.public_url is None or self._proc is None or self._proc.poll() is not None:
                return False
            return self._ready_status() == 200

    def alive(self) -> bool:
        """True while the cloudflared process runs (connected or redialling its edge)."""
        with self._lock:
            return self.public_url is not None and self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Stop cloudflared (SIGTERM, then SIGKILL) and forget the URL; safe to repeat."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(STOP_GRACE_S)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
            if self._reader is not None:
                self._reader.join(timeout=2)
                self._reader = None
            self.public_url = None

    def __enter__(self) -> CloudflaredTunnel:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------------

    def _read_output(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        announced = False
        try:
            for raw in proc.stdout:
                line = raw.rstrip()
                self._lines.append(line)
                log.debug("cloudflared: %s", line)
                if _CREATED in line:
                    announced = True
                match = _URL.search(line)
                # The account-less notice names other cloudflare.com pages: only the box's URL counts.
                if match and announced and self._url_seen is None:
                    self._url_seen = match.group(0)
                if _REGISTERED in line:
                    self._registered.set()
        except (OSError, ValueError):  # the pipe closed under us at close()
            pass

    def _wait_until_ready(self) -> str:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                if self._reader is not None:
                    self._reader.join(timeout=2)
                raise TunnelError(
                    f"cloudflared exited with code {proc.returncode} before the tunnel was up: {self._reason()}"
                )
            if self._url_seen and (self._registered.is_set() or self._ready_status() == 200):
                return self._url_seen
            time.sleep(0.05)
        raise TunnelError(
            f"cloudflared gave no working quick tunnel within {self.config.startup_timeout_s:.0f} s "
            f"({'URL ' + self._url_seen + ' but no registered connection' if self._url_seen else 'no URL'}): "
            f"{self._reason()}"
        )

    def _ready_status(self) -> int | None:
        if self._metrics is None:
            return None
        try:
            with urllib.request.urlopen(f"http://{self._metrics}/ready", timeout=METRICS_TIMEOUT_S) as reply:
                return reply.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (OSError, ValueError):
            return None

    def _reason(self) -> str:
        """The most telling lines of cloudflared's log: its errors, else the last line."""
        lines = list(self._lines)
        errors = [line for line in lines if " ERR " in line or "failed" in line.lower()]
        chosen = errors[-3:] or lines[-1:] or ["(no output)"]
        text = " | ".join(" ".join(line.split()) for line in chosen)
        return text if len(text) <= 600 else text[:599] + "…"
