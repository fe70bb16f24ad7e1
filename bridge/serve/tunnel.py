"""The ngrok tunnel to the entrance, opened through pyngrok; pyngrok's errors become bridge's here.

(The other tunnel, a Cloudflare quick tunnel, is bridge/serve/tunnel_cloudflared.py; both implement `PublicTunnel`,
bridge/serve/public_tunnel.py: open/healthy/close.)

    TunnelConfig ──▶ Tunnel.open() ──▶ pyngrok ──▶ ngrok agent (`ngrok start --none`) ──▶ public URL
                     Tunnel.healthy()   agent alive and the tunnel still listed by its local API
                     Tunnel.close()     tunnel disconnected, agent killed

The authtoken goes into a 0600 agent config file, never onto the agent's command line (where `ps` would show
it) and never into a log line or a message: a logging filter on pyngrok's loggers and `_redact` on every error
message remove it, and the edge-auth password with it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from pyngrok import conf, installer, ngrok, process
from pyngrok.exception import PyngrokError, PyngrokNgrokError, PyngrokNgrokHTTPError, PyngrokNgrokInstallError

from bridge import secrets
from bridge.config import paths
from bridge.errors import (
    ConfigError,
    NgrokAgentRunningError,
    NgrokAuthtokenError,
    NgrokBinaryError,
    TunnelError,
)
from bridge.serve.public_tunnel import PublicTunnel, tunnel_target

log = logging.getLogger(__name__)

#: Seconds pyngrok waits for the agent to report a session before giving up.
DEFAULT_STARTUP_TIMEOUT_S = 15.0
#: Seconds for one request to the agent's local API.
DEFAULT_API_TIMEOUT_S = 4.0
#: Seconds pyngrok may spend fetching its managed ngrok binary before we call it not downloadable.
DEFAULT_DOWNLOAD_TIMEOUT_S = 10.0
#: The environment variable naming an ngrok binary to use instead of PATH's or pyngrok's own.
NGROK_PATH_ENV = "BRIDGE_NGROK_PATH"

_AUTHTOKEN_CODES = {"ERR_NGROK_4018", "ERR_NGROK_105", "ERR_NGROK_107"}
_AGENT_RUNNING_CODES = {"ERR_NGROK_108"}
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$")
# Edge basic-auth limits ngrok enforces; checked here so the user hears it before the agent starts.
_EDGE_PASSWORD_MIN, _EDGE_PASSWORD_MAX = 8, 128

AUTHTOKEN_HELP = (
    "Run `bridge login` to store your ngrok authtoken (from https://dashboard.ngrok.com/get-started/your-authtoken) "
    "or set NGROK_AUTHTOKEN; `bridge serve --tunnel none` serves without a tunnel."
)


def resolve_authtoken() -> str | None:
    """The ngrok authtoken, in `bridge.secrets.ngrok_authtoken()`'s order (read now, not at import)."""
    return secrets.ngrok_authtoken()


def resolve_ngrok_path() -> str | None:
    """`BRIDGE_NGROK_PATH`, else an `ngrok` on PATH (e.g. the snap), else None for pyngrok's managed binary."""
    explicit = os.environ.get(NGROK_PATH_ENV, "").strip()
    if explicit:
        return str(Path(explicit).expanduser())
    return shutil.which("ngrok")


def managed_ngrok_path() -> Path:
    """Where pyngrok installs (and finds) its own ngrok binary for bridge: under bridge's config folder."""
    return paths().config_dir / "ngrok-bin" / installer.get_ngrok_bin()


def default_config_path(ngrok_path: str) -> Path:
    """The agent config file bridge writes: under bridge's config folder, or where a snap ngrok may read it.

    A strictly confined snap cannot read hidden folders of $HOME such as ~/.config, but can read its own
    ~/snap/ngrok/common; the name carries bridge's config folder so separate instances do not share a file.
    """
    own = paths().ngrok_config
    if os.path.realpath(ngrok_path).startswith("/snap/") or ngrok_path.startswith("/snap/"):
        try:
            hidden = any(part.startswith(".") for part in own.relative_to(Path.home()).parts)
        except ValueError:
            hidden = False
        if hidden:
            tag = hashlib.sha256(str(own).encode()).hexdigest()[:8]
            return Path.home() / "snap" / "ngrok" / "common" / f"bridge-{tag}.yml"
    return own


class TunnelConfig:
    """How to open the tunnel: authtoken, optional reserved domain, optional edge basic auth, agent binary."""

    def __init__(
        self,
        authtoken: str | None,
        domain: str | None = None,
        edge_auth: tuple[str, str] | None = None,
        ngrok_path: str | None = None,
        config_path: Path | None = None,
        *,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    ) -> None:
        if authtoken is not None:
            if not isinstance(authtoken, str) or not authtoken.strip() or any(c.isspace() for c in authtoken.strip()):
                raise ConfigError("the ngrok authtoken is empty or contains whitespace; " + AUTHTOKEN_HELP)
            authtoken = authtoken.strip()
        if domain is not None:
            domain = _normalise_domain(domain)
        if edge_auth is not None:
            edge_auth = _check_edge_auth(edge_auth)
        if ngrok_path is not None and not str(ngrok_path).strip():
            raise ConfigError(f"{NGROK_PATH_ENV} / ngrok_path is empty")
        if startup_timeout_s <= 0:
            raise ConfigError(f"startup_timeout_s must be positive, got {startup_timeout_s!r}")
        self.authtoken = authtoken
        self.domain = domain
        self.edge_auth = edge_auth
        self.ngrok_path = str(ngrok_path) if ngrok_path is not None else None
        self.config_path = Path(config_path) if config_path is not None else None
        self.startup_timeout_s = float(startup_timeout_s)

    @classmethod
    def from_environment(cls, domain: str | None = None, edge_auth: tuple[str, str] | None = None) -> TunnelConfig:
        """A config with the authtoken and agent binary resolved from the keyring, environment and PATH now."""
        return cls(resolve_authtoken(), domain=domain, edge_auth=edge_auth, ngrok_path=resolve_ngrok_path())

    def __repr__(self) -> str:
        edge = "off" if self.edge_auth is None else f"({self.edge_auth[0]!r}, '***')"
        return (
            f"TunnelConfig(authtoken={'<set>' if self.authtoken else '<unset>'}, domain={self.domain!r}, "
            f"edge_auth={edge}, ngrok_path={self.ngrok_path!r}, config_path={self.config_path!r})"
        )

    def secrets(self) -> list[str]:
        """Every secret string this config holds, for redaction."""
        found = [self.authtoken] if self.authtoken else []
        if self.edge_auth:
            found += [self.edge_auth[1], f"{self.edge_auth[0]}:{self.edge_auth[1]}"]
        return found


def _normalise_domain(domain: str) -> str:
    value = domain.strip().lower()
    if value.startswith(("https://", "http://")):
        value = value.split("://", 1)[1]
    value = value.rstrip("/")
    if not _HOSTNAME.match(value):
        raise ConfigError(
            f"--domain {domain!r} is not a host name; give the reserved ngrok domain, e.g. my-lab.ngrok-free.app"
        )
    return value


def _check_edge_auth(edge_auth: tuple[str, str]) -> tuple[str, str]:
    try:
        user, password = edge_auth
    except (TypeError, ValueError):
        raise ConfigError("edge auth must be a (user, password) pair") from None
    if not isinstance(user, str) or not user or ":" in user:
        raise ConfigError("edge auth user name must be non-empty and contain no ':'")
    if not isinstance(password, str) or not (_EDGE_PASSWORD_MIN <= len(password) <= _EDGE_PASSWORD_MAX):
        raise ConfigError(
            f"edge auth password must be {_EDGE_PASSWORD_MIN} to {_EDGE_PASSWORD_MAX} characters (ngrok's rule)"
        )
    return user, password


class _Redactor(logging.Filter):
    """Replaces registered secrets in log records of pyngrok's loggers (it logs tunnel options at DEBUG)."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, values: list[str]) -> None:
        with self._lock:
            self._secrets.update(v for v in values if v)

    def redact(self, text: str) -> str:
        with self._lock:
            ordered = sorted(self._secrets, key=len, reverse=True)
        for value in ordered:
            text = text.replace(value, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self.redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_redactor = _Redactor()
# Filters on a logger apply only to records created on that very logger, so each of pyngrok's gets one.
for _name in ("pyngrok", "pyngrok.ngrok", "pyngrok.process", "pyngrok.process.ngrok", "pyngrok.installer"):
    logging.getLogger(_name).addFilter(_redactor)


def _redact(text: str) -> str:
    return _redactor.redact(text)


class Tunnel(PublicTunnel):
    """An ngrok tunnel from a public URL to `target_url` (the entrance), run by an agent pyngrok starts."""

    kind = "ngrok"
    #: The header in which ngrok's edge names the client it saw (last entry); the entrance throttles by it.
    client_header = "X-Forwarded-For"

    def __init__(self, target_url: str, config: TunnelConfig) -> None:
        self.target_url = tunnel_target(target_url)
        self.config = config
        self.public_url: str | None = None
        self._tunnel: ngrok.NgrokTunnel | None = None
        self._lock = threading.RLock()
        _redactor.add(config.secrets())
        ngrok_path = config.ngrok_path or str(managed_ngrok_path())
        config_path = config.config_path or default_config_path(ngrok_path)
        self._pyngrok = conf.PyngrokConfig(
            ngrok_path=ngrok_path,
            config_path=str(config_path),
            auth_token=None,
            startup_timeout=config.startup_timeout_s,  # type: ignore[arg-type]  # float works: a deadline
            request_timeout=DEFAULT_API_TIMEOUT_S,
            monitor_thread=True,  # keeps draining the agent's stdout, so its log pipe never fills
            ngrok_version="3",
            # The agent API's /api/tunnels (v2 shapes) exists in every ngrok 3 agent; /api/endpoints only in new ones.
            config_version="2",
        )
        # PyngrokConfig falls back to NGROK_AUTHTOKEN, which would put it on the agent's command line.
        self._pyngrok.auth_token = None

    def __repr__(self) -> str:
        return f"Tunnel({self.target_url!r} via {self.public_url or 'closed'}, {self.config!r})"

    @property
    def ngrok_path(self) -> str:
        return self._pyngrok.ngrok_path

    @property
    def config_path(self) -> Path:
        return Path(self._pyngrok.config_path or "")

    def open(self) -> str:
        """Start the agent (if needed) and the tunnel; return the public URL. Reopens when already open."""
        with self._lock:
            self.close()
            self._ensure_binary()
            self._write_agent_config()
            # A plain name: pyngrok's default embeds the target URL, slashes and all, in the API path.
            name = f"bridge-{urlsplit(self.target_url).port}-{uuid.uuid4().hex[:8]}"
            options: dict[str, object] = {"inspect": False}  # the local inspector would keep request bodies
            if self.config.domain:
                options["domain"] = self.config.domain
            if self.config.edge_auth:
                user, password = self.config.edge_auth
                options["basic_auth"] = [f"{user}:{password}"]
            try:
                tunnel = ngrok.connect(
                    self.target_url, proto="http", name=name, pyngrok_config=self._pyngrok, **options
                )
            except PyngrokError as exc:
                self._kill_agent()
                error = self._translate(exc)
                _scrub(exc)  # it stays chained as __cause__, where a traceback would print it
                raise error from exc
            except OSError as exc:
                self._kill_agent()
                if exc.filename == self.ngrok_path:  # Popen could not execute the binary
                    raise NgrokBinaryError(
                        f"ngrok at {self.ngrok_path} could not be started ({type(exc).__name__}: {exc.strerror}); "
                        f"{_binary_help()}"
                    ) from exc
                # pyngrok wraps only some socket errors; a reset from a dying agent arrives raw.
                raise TunnelError(f"the ngrok agent stopped answering its local API ({type(exc).__name__})") from exc
            self._tunnel = tunnel
            self.public_url = tunnel.public_url
            log.info("Tunnel open: %s -> %s", self.public_url, self.target_url)
            return self.public_url  # type: ignore[return-value]

    def healthy(self) -> bool:
        """True while the agent process lives and its local API still lists this tunnel."""
        with self._lock:
            if self._tunnel is None or not process.is_process_running(self.ngrok_path):
                return False
            try:
                ngrok.api_request(
                    f"{self._tunnel.api_url}{self._tunnel.uri}", method="GET", timeout=DEFAULT_API_TIMEOUT_S
                )
            except (PyngrokError, OSError, ValueError):  # OSError: a reset from an agent that is dying
                return False
            return True

    def alive(self) -> bool:
        """True while the agent process runs (ngrok reconnects its session to the edge by itself)."""
        with self._lock:
            return self._tunnel is not None and process.is_process_running(self.ngrok_path)

    def close(self) -> None:
        """Disconnect the tunnel and kill the agent (and with it every forwarding it ran); safe to repeat."""
        with self._lock:
            if self.public_url is not None and process.is_process_running(self.ngrok_path):
                try:
                    ngrok.disconnect(self.public_url, pyngrok_config=self._pyngrok)
                except (PyngrokError, OSError, ValueError) as exc:
                    log.debug("Tunnel disconnect failed (the agent is killed next): %s", _redact(str(exc)))
            self._kill_agent()
            self._tunnel = None
            self.public_url = None

    def __enter__(self) -> Tunnel:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------------

    def _kill_agent(self) -> None:
        try:
            process.kill_process(self.ngrok_path)
        except OSError as exc:  # pragma: no cover - already gone
            log.debug("Killing the ngrok agent failed: %s", exc)

    def _ensure_binary(self) -> None:
        """Make sure an agent binary exists, downloading pyngrok's with a bounded timeout when none does."""
        path = self.ngrok_path
        if os.path.exists(path):
            return
        log.info("No ngrok binary at %s; pyngrok will try to download one.", path)
        try:
            installer.install_ngrok(path, ngrok_version=self._pyngrok.ngrok_version, timeout=DEFAULT_DOWNLOAD_TIMEOUT_S)
        except (PyngrokError, OSError) as exc:
            reason = _redact(str(exc))
            raise NgrokBinaryError(
                f"no ngrok agent at {path} and it could not be downloaded ({_shorten(reason)}); {_binary_help()}"
            ) from exc

    def _write_agent_config(self) -> None:
        """Write the agent config (0600: it holds the authtoken), keeping settings a user added to it."""
        path = self.config_path
        data: dict = {}
        if path.exists():
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError):
                log.warning("Replacing unreadable ngrok config %s", path)
                data = {}
        if str(data.get("version")) == "3":  # a v3 file a user made: keep its shape
            agent = data.setdefault("agent", {})
            agent.pop("authtoken", None)
            if self.config.authtoken:
                agent["authtoken"] = self.config.authtoken
        else:
            data["version"] = "2"
            data.pop("authtoken", None)
            if self.config.authtoken:
                data["authtoken"] = self.config.authtoken
        secrets.write_private_file(path, yaml.safe_dump(data))
        # pyngrok caches the parsed file per path; make it read this version.
        installer.get_ngrok_config(str(path), use_cache=False, ngrok_version="3", config_version="2")

    def _translate(self, exc: PyngrokError) -> TunnelError:
        code = getattr(exc, "ngrok_error_code", None) or _error_code(exc)
        detail = _shorten(_redact(_describe(exc)))
        if isinstance(exc, PyngrokNgrokInstallError):
            return NgrokBinaryError(f"the ngrok agent binary could not be installed ({detail}); {_binary_help()}")
        if code in _AUTHTOKEN_CODES or (code is None and not self.config.authtoken and "authtoken" in detail):
            what = "no ngrok authtoken is configured" if not self.config.authtoken else "ngrok refused the authtoken"
            return NgrokAuthtokenError(f"{what} ({code or 'ERR_NGROK_4018'}). {AUTHTOKEN_HELP}")
        if code in _AGENT_RUNNING_CODES:
            return NgrokAgentRunningError(
                "another ngrok agent is already running on this ngrok account (ERR_NGROK_108; free accounts allow "
                "one agent session at a time). Stop the other `ngrok` (on this or another machine) or end its session "
                "at https://dashboard.ngrok.com/agents, then start `bridge serve` again."
            )
        if code == "ERR_NGROK_334":
            return TunnelError(
                f"the domain {self.config.domain} is already online through another agent or tunnel (ERR_NGROK_334); "
                "stop that one or use another --domain."
            )
        return TunnelError(f"the ngrok tunnel could not be opened: {detail}")


def _scrub(exc: PyngrokError) -> None:
    """Redact secrets from a pyngrok error in place: the agent may echo its authtoken (ERR_NGROK_105)."""
    exc.args = tuple(_redact(a) if isinstance(a, str) else a for a in exc.args)
    if isinstance(exc, PyngrokNgrokError):
        if exc.ngrok_error:
            exc.ngrok_error = _redact(exc.ngrok_error)
        exc.ngrok_logs = []
    if isinstance(exc, PyngrokNgrokHTTPError):
        exc.body = _redact(exc.body)
        exc.url = _redact(exc.url)


def _describe(exc: PyngrokError) -> str:
    """The useful part of a pyngrok error: the agent's own error text or API body, else the message."""
    if isinstance(exc, PyngrokNgrokHTTPError):
        return f"agent API {exc.status_code}: {exc.body.strip()}"
    if isinstance(exc, PyngrokNgrokError) and exc.ngrok_error:
        return exc.ngrok_error.replace("\\r", "").replace("\\n", " ").strip()
    return str(exc)


def _error_code(exc: PyngrokError) -> str | None:
    match = re.search(r"ERR_NGROK_\d+", _describe(exc))
    return match.group(0) if match else None


def _shorten(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _binary_help() -> str:
    return (
        "install ngrok (e.g. `sudo snap install ngrok`, or from https://ngrok.com/download) "
        f"or set {NGROK_PATH_ENV} to an ngrok binary"
    )
