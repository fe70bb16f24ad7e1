"""Where bridge keeps its files, and the named defaults shared by both sides.

The environment is read when a function is called, never at import, so tests and
several instances can point `BRIDGE_HOME` elsewhere at any time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from bridge.errors import ConfigError

APP_NAME = "bridge"

DEFAULT_MLFLOW_PORT = 5000
DEFAULT_HOST = "127.0.0.1"
DEFAULT_WORKERS = 1
DEFAULT_RECORD_TTL_S = 24 * 3600
DEFAULT_HEARTBEAT_TIMEOUT_S = 300
DEFAULT_JOURNAL_LIMIT_BYTES = 2 * 1024**3
#: The spooled copies of logged files: a few versions of a large checkpoint (older versions of a path go first).
DEFAULT_SPOOL_LIMIT_BYTES = 1536 * 1024**2
#: ngrok's free plan: 1 GB a month sent out by the workstation, and 20,000 HTTP requests.
DEFAULT_TUNNEL_BYTES_BUDGET = 1_000_000_000
DEFAULT_TUNNEL_REQUESTS_BUDGET = 20_000
#: `bridge status` warns once a month's use passes this fraction of either budget.
TUNNEL_BUDGET_WARN_FRACTION = 0.8
#: Seconds a tunnel agent that lost its edge connection gets to reconnect before it is replaced (where the number
#: comes from: bridge/serve/tunnel_keeper.py).
DEFAULT_TUNNEL_GRACE_S = 90.0
#: Seconds between two health checks of an open tunnel; `BRIDGE_TUNNEL_CHECK_S` changes it (tests set it low).
DEFAULT_TUNNEL_CHECK_S = 5.0
TUNNEL_CHECK_ENV = "BRIDGE_TUNNEL_CHECK_S"

#: The run tag that carries the client-generated key making a retried create idempotent.
RUN_KEY_TAG = "bridge.run_key"
#: The run tag a live client refreshes so `bridge serve` can tell a dead run from a slow one.
HEARTBEAT_TAG = "bridge.heartbeat"
#: Set by `bridge serve`'s reaper on a run it marked KILLED; a live client that reappears removes it.
KILLED_REASON_TAG = "bridge.killed_reason"
#: Set on an empty second run a create left behind (applied after its client had given up and created the run
#: again), which the client then deletes: the run id of the real one.
DUPLICATE_OF_TAG = "bridge.duplicate_of"


@dataclass(frozen=True)
class Paths:
    """Every file and folder bridge writes, resolved once from `BRIDGE_HOME` or the platform defaults."""

    data_dir: Path
    config_dir: Path

    @property
    def mlflow_db(self) -> Path:
        return self.data_dir / "mlflow.db"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def uploads_dir(self) -> Path:
        """Resumable uploads being received, outside MLflow's artifact store (bridge/serve/uploads.py)."""
        return self.data_dir / "uploads"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def record_file(self) -> Path:
        """The default published endpoint record (`--publish file:` writes here unless told otherwise)."""
        return self.data_dir / "endpoint.json"

    @property
    def state_file(self) -> Path:
        """What a running `bridge serve` reports about itself, read by `bridge status`."""
        return self.data_dir / "serve-state.json"

    @property
    def secrets_file(self) -> Path:
        """The 0600 fallback secret store, used only when no keyring backend works."""
        return self.config_dir / "secrets.json"

    @property
    def token_revision_file(self) -> Path:
        """Touched whenever the access token changes, so a running entrance reloads it at once."""
        return self.data_dir / "token.rev"

    @property
    def journal_file(self) -> Path:
        return self.data_dir / "journal.sqlite"

    @property
    def tunnel_usage_file(self) -> Path:
        """Requests and bytes sent out through the tunnel this calendar month (no secret in it)."""
        return self.data_dir / "tunnel-usage.json"

    @property
    def client_wheel_dir(self) -> Path:
        """The cached client wheel the entrance serves to notebooks (bridge/serve/wheel.py); no secret in it.
        `BRIDGE_CLIENT_WHEEL_DIR` names another (the test suite shares one, so each `bridge serve` builds no wheel)."""
        override = os.environ.get("BRIDGE_CLIENT_WHEEL_DIR", "").strip()
        return Path(override).expanduser() if override else self.data_dir / "client-wheel"

    @property
    def ngrok_config(self) -> Path:
        return self.config_dir / "ngrok.yml"

    def ensure(self) -> Paths:
        for folder in (self.data_dir, self.config_dir, self.logs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self


def bridge_home() -> Path | None:
    """The folder named by `BRIDGE_HOME`, or None when the platform defaults apply."""
    value = os.environ.get("BRIDGE_HOME", "").strip()
    return Path(value).expanduser().resolve() if value else None


def paths() -> Paths:
    """Resolve bridge's folders now: `BRIDGE_HOME` holds everything when set."""
    home = bridge_home()
    if home is not None:
        return Paths(data_dir=home, config_dir=home)
    return Paths(
        data_dir=platformdirs.user_data_path(APP_NAME),
        config_dir=platformdirs.user_config_path(APP_NAME),
    )


def env_float(name: str, default: float) -> float:
    """A float from the environment, with an error that names the variable when it is not one."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
