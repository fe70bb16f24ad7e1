"""Every knob of the client side, read from the environment once, in one place, and validated there.

`ClientOptions.from_env(**overrides)` is what `connect()`, `bridge sync` and child processes use; an argument
given to `connect()` wins over its environment variable. `bridge queue --config` prints the effective values.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from bridge import config
from bridge.errors import ConfigError

HEARTBEAT_ENV = "BRIDGE_HEARTBEAT_S"
SEND_INTERVAL_ENV = "BRIDGE_SEND_INTERVAL_S"
HTTP_TIMEOUT_ENV = "BRIDGE_HTTP_TIMEOUT_S"
EXIT_FLUSH_ENV = "BRIDGE_EXIT_FLUSH_S"
PROBE_TIMEOUT_ENV = "BRIDGE_PROBE_TIMEOUT_S"
JOURNAL_ENV = "BRIDGE_JOURNAL"
JOURNAL_LIMIT_ENV = "BRIDGE_JOURNAL_LIMIT"
SPOOL_LIMIT_ENV = "BRIDGE_SPOOL_LIMIT"
REDISCOVER_INTERVAL_ENV = "BRIDGE_REDISCOVER_INTERVAL_S"
POISON_ATTEMPTS_ENV = "BRIDGE_POISON_ATTEMPTS"
TOKEN_RETRY_MIN_ENV = "BRIDGE_TOKEN_RETRY_MIN_S"
FLUSH_RETRY_ENV = "BRIDGE_FLUSH_RETRY_S"
DURABLE_EVERY_ENV = "BRIDGE_DURABLE_EVERY_S"
CREATE_GRACE_ENV = "BRIDGE_CREATE_GRACE_S"
ADOPT_EVERY_ENV = "BRIDGE_ADOPT_EVERY_S"
OTHER_RUNS_EVERY_ENV = "BRIDGE_OTHER_RUNS_EVERY_S"
UPLOAD_PART_ENV = "BRIDGE_UPLOAD_PART_BYTES"
TWIN_WATCH_ENV = "BRIDGE_TWIN_WATCH_TIMEOUTS"

#: A live run's heartbeat period. `bridge serve` reaps after 300 s without one by default: five missed beats.
#: Every request counts against ngrok's free plan (20,000 a month), and a batch of metrics carries the beat.
DEFAULT_HEARTBEAT_S = 60.0
#: How long new entries wait to be coalesced (a flush does not wait): at 1 s a training loop logging
#: 1,000 points/s costs one request per 1,000 points.
DEFAULT_SEND_INTERVAL_S = 1.0
DEFAULT_HTTP_TIMEOUT_S = 20.0
#: How long the interpreter's exit waits for the journal to be delivered before saying what is left.
DEFAULT_EXIT_FLUSH_S = 10.0
DEFAULT_PROBE_TIMEOUT_S = 3.0
#: Remote record sources are re-read at most this often (GitHub allows 60 anonymous calls an hour).
DEFAULT_REDISCOVER_INTERVAL_S = 20.0
#: An entry the server keeps answering 5xx for is moved aside as a dead letter after this many tries,
#: so one poison entry never stalls every run behind it (`bridge queue --retry` sends it again).
DEFAULT_POISON_ATTEMPTS = 8
#: While the token is rejected, delivery is retried no faster than this (a re-read token may have been fixed).
DEFAULT_TOKEN_RETRY_MIN_S = 5.0
#: While `flush()` waits, a failing link is retried this often instead of after the full backoff.
DEFAULT_FLUSH_RETRY_S = 1.0
#: How often the intake is moved into SQLite and the journal fsynced, whatever delivery is doing: the most
#: an OS crash or power cut can take of what calls had already returned.
DEFAULT_DURABLE_EVERY_S = 1.0
#: How long stopping the sender lets a run/model/version create in flight finish before cutting it (H21).
DEFAULT_CREATE_GRACE_S = 2.0
#: How often the intake files of ended processes (killed children) are looked for.
DEFAULT_ADOPT_EVERY_S = 5.0
#: How often the journal is asked which runs other live processes (DataLoader workers) created, to keep them beating.
DEFAULT_OTHER_RUNS_EVERY_S = 5.0

#: A run create tried again after an unknown outcome is watched for a late twin (an earlier try landing after the
#: retry) this many HTTP timeouts (connect + read) after the retry; one held up longer is left to the reaper.
DEFAULT_TWIN_WATCH_TIMEOUTS = 2.0

#: The most one upload request carries (a part of a resumable upload: delivery/files.py). Cloudflare refuses
#: bodies over 100 MB (its free and pro plans); 32 MiB also keeps a part short on a slow link, so a drop costs
#: little. Halved on the edge's 413 / 524 down to UPLOAD_PART_FLOOR_BYTES.
DEFAULT_UPLOAD_PART_BYTES = 32 * 1024 * 1024
UPLOAD_PART_FLOOR_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ClientOptions:
    """The client's settings; each field's environment variable is in `ENV` below."""

    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    send_interval_s: float = DEFAULT_SEND_INTERVAL_S
    http_timeout_s: float = DEFAULT_HTTP_TIMEOUT_S
    exit_flush_s: float = DEFAULT_EXIT_FLUSH_S
    probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S
    journal: Path | None = None  # None: the platform data folder (config.paths().journal_file)
    journal_limit: int = config.DEFAULT_JOURNAL_LIMIT_BYTES
    #: The most the spooled copies of logged files may hold (they also count against `journal_limit`).
    spool_limit: int = config.DEFAULT_SPOOL_LIMIT_BYTES
    rediscover_interval_s: float = DEFAULT_REDISCOVER_INTERVAL_S
    poison_attempts: int = DEFAULT_POISON_ATTEMPTS
    token_retry_min_s: float = DEFAULT_TOKEN_RETRY_MIN_S
    flush_retry_s: float = DEFAULT_FLUSH_RETRY_S
    durable_every_s: float = DEFAULT_DURABLE_EVERY_S
    create_grace_s: float = DEFAULT_CREATE_GRACE_S
    adopt_every_s: float = DEFAULT_ADOPT_EVERY_S
    other_runs_every_s: float = DEFAULT_OTHER_RUNS_EVERY_S
    upload_part_bytes: int = DEFAULT_UPLOAD_PART_BYTES
    twin_watch_timeouts: float = DEFAULT_TWIN_WATCH_TIMEOUTS
    #: Where each value came from: "default", "environment" or "argument" (for `bridge queue --config`).
    sources: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in (
            "heartbeat_s",
            "send_interval_s",
            "http_timeout_s",
            "probe_timeout_s",
            "token_retry_min_s",
            "flush_retry_s",
            "durable_every_s",
            "adopt_every_s",
            "other_runs_every_s",
            "twin_watch_timeouts",
        ):
            value = getattr(self, name)
            if not value > 0:  # also refuses NaN
                raise ConfigError(f"{_label(name)} must be a positive number of seconds, got {value!r}")
        for name in ("exit_flush_s", "rediscover_interval_s", "create_grace_s"):
            value = getattr(self, name)
            if not value >= 0:
                raise ConfigError(f"{_label(name)} must be 0 or more seconds, got {value!r}")
        for name in ("journal_limit", "spool_limit"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_label(name)} must be a positive number of bytes, got {getattr(self, name)!r}")
        if self.upload_part_bytes < UPLOAD_PART_FLOOR_BYTES:
            raise ConfigError(
                f"{_label('upload_part_bytes')} must be at least {UPLOAD_PART_FLOOR_BYTES} bytes, "
                f"got {self.upload_part_bytes!r}"
            )
        if self.poison_attempts < 1:
            raise ConfigError(f"{_label('poison_attempts')} must be at least 1, got {self.poison_attempts!r}")

    @classmethod
    def from_env(cls, **overrides) -> ClientOptions:
        """Defaults, then the environment, then `overrides` (None means "not given")."""
        values: dict = {}
        sources: dict = {}
        for f in dataclasses.fields(cls):
            if f.name == "sources":
                continue
            env = ENV[f.name]
            raw = os.environ.get(env, "").strip()
            given = overrides.pop(f.name, None)
            if given is not None:
                values[f.name], sources[f.name] = given, "argument"
            elif raw:
                values[f.name], sources[f.name] = _parse(f.name, env, raw), "environment"
            else:
                sources[f.name] = "default"
        if overrides:
            raise ConfigError(f"unknown client option(s): {', '.join(sorted(overrides))}")
        if values.get("journal") is not None:
            values["journal"] = Path(values["journal"]).expanduser()
        return cls(**values, sources=sources)

    @property
    def journal_path(self) -> Path:
        return self.journal if self.journal is not None else config.paths().journal_file

    def replace(self, **changes) -> ClientOptions:
        sources = dict(self.sources)
        sources.update(dict.fromkeys(changes, "argument"))
        return dataclasses.replace(self, **changes, sources=sources)

    def describe(self) -> list[tuple[str, str, str, str]]:
        """(option, value, environment variable, where the value came from) for every option."""
        rows = []
        for f in dataclasses.fields(self):
            if f.name == "sources":
                continue
            value = self.journal_path if f.name == "journal" else getattr(self, f.name)
            rows.append((f.name, str(value), ENV[f.name], self.sources.get(f.name, "default")))
        return rows


#: The environment variable of each option.
ENV = {
    "heartbeat_s": HEARTBEAT_ENV,
    "send_interval_s": SEND_INTERVAL_ENV,
    "http_timeout_s": HTTP_TIMEOUT_ENV,
    "exit_flush_s": EXIT_FLUSH_ENV,
    "probe_timeout_s": PROBE_TIMEOUT_ENV,
    "journal": JOURNAL_ENV,
    "journal_limit": JOURNAL_LIMIT_ENV,
    "spool_limit": SPOOL_LIMIT_ENV,
    "rediscover_interval_s": REDISCOVER_INTERVAL_ENV,
    "poison_attempts": POISON_ATTEMPTS_ENV,
    "token_retry_min_s": TOKEN_RETRY_MIN_ENV,
    "flush_retry_s": FLUSH_RETRY_ENV,
    "durable_every_s": DURABLE_EVERY_ENV,
    "create_grace_s": CREATE_GRACE_ENV,
    "adopt_every_s": ADOPT_EVERY_ENV,
    "other_runs_every_s": OTHER_RUNS_EVERY_ENV,
    "upload_part_bytes": UPLOAD_PART_ENV,
    "twin_watch_timeouts": TWIN_WATCH_ENV,
}


def _label(name: str) -> str:
    return f"{name} ({ENV[name]})"


def _parse(name: str, env: str, raw: str):
    if name == "journal":
        return Path(raw)
    if name in ("journal_limit", "spool_limit", "poison_attempts", "upload_part_bytes"):
        return config.env_int(env, 0)
    return config.env_float(env, 0.0)
