"""`bridge.connect()`: find the server, check it, and route every MLflow call of this process through the journal.

    secrets ──▶ discovery (verify record) ──▶ probe ──▶ MLflow plugin wiring (MLFLOW_TRACKING_URI=bridge+https://…)

The tracking store plugin (store.py) and the artifact plugin (artifacts.py) find the process's `Connection`
here by tracking URI; a process that inherited `MLFLOW_TRACKING_URI=bridge+…` without calling `connect()`
(a DataLoader worker, a DDP child) gets one made from the environment on first use.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bridge.client.journal import Journal, RunRecord
from bridge.client.sender import Sender, TransportFailure, HttpFailure
from bridge.errors import ConfigError, DiscoveryError

log = logging.getLogger(__name__)

SCHEME_PREFIX = "bridge+"
PROBE_PATH = "/experiments/search"

_registry_lock = threading.RLock()
_connections: dict[str, "Connection"] = {}
_registry_uri_set: str | None = None


@dataclass(frozen=True)
class Status:
    """Where delivery stands; `backlog` maps local run ids ('experiments' for experiment calls) to entries left."""

    online: bool | None
    url: str
    journal: Path
    backlog: dict[str, int]
    oldest_undelivered_s: float | None
    dead_letters: int
    last_error: str | None
    token_rejected: bool

    @property
    def pending(self) -> int:
        return sum(self.backlog.values())


@dataclass
class RunSummary:
    """What this process logged to a run, kept in memory so `get_run` can answer while offline."""

    metrics: dict = field(default_factory=dict)   # key -> mlflow Metric (latest by step, then timestamp)
    params: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)


class Connection:
    """A journal, its sender, and where they deliver; what `connect()` returns."""

    def __init__(self, journal: Journal, sender: Sender, *, flush_at_exit: float = 10.0) -> None:
        self.journal = journal
        self.sender = sender
        self.flush_at_exit = flush_at_exit
        self.summaries: dict[str, RunSummary] = {}
        self._closed = False

    @property
    def url(self) -> str:
        return self.sender.url

    @property
    def tracking_uri(self) -> str:
        return SCHEME_PREFIX + self.sender.url

    def status(self) -> Status:
        backlog = self.journal.backlog()
        pending = {("experiments" if run == "" else run): n for run, n in backlog.pending.items()}
        oldest = None if backlog.oldest_created is None else max(0.0, time.time() - backlog.oldest_created)
        return Status(online=self.sender.online, url=self.sender.url, journal=self.journal.path, backlog=pending,
                      oldest_undelivered_s=oldest, dead_letters=sum(backlog.dead.values()),
                      last_error=self.sender.last_error, token_rejected=self.sender.token_rejected)

    def flush(self, timeout: float | None = None) -> int:
        """Block until everything is delivered or `timeout` seconds pass; returns the entries left."""
        return self.sender.flush(timeout)

    def close(self) -> None:
        """Stop delivering; what is left stays in the journal for the next `connect()` or `bridge sync`."""
        if self._closed:
            return
        self._closed = True
        self.sender.stop()
        with _registry_lock:
            for uri, conn in list(_connections.items()):
                if conn is self:
                    del _connections[uri]
        self.journal.close()

    def summary(self, run_id: str) -> RunSummary:
        found = self.summaries.get(run_id)
        if found is None:
            found = self.summaries[run_id] = RunSummary()
        return found

    def run_record(self, run_id: str) -> RunRecord | None:
        return self.journal.run(run_id)

    def probe(self, timeout: float) -> bool:
        """One authenticated request with a short timeout: is the server there and does it accept us?"""
        try:
            self.sender.request("GET", "/api/2.0/mlflow" + PROBE_PATH, params={"max_results": 1},
                                timeout=(timeout, timeout))
            return True
        except HttpFailure as exc:
            if exc.status in (401, 403):
                self.sender.token_rejected = True
                self.sender.last_error = f"token rejected (HTTP {exc.status}); delivery paused"
            return False
        except TransportFailure:
            return False

    def _at_exit(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(Exception):
            left = self.flush(self.flush_at_exit)
            if left:
                print(f"bridge: {left} entries not delivered yet are kept in journal {self.journal.path}; "
                      "the next bridge.connect() or `bridge sync` delivers them.", file=sys.stderr)
            self.close()

    def __repr__(self) -> str:
        return f"Connection(url={self.sender.url!r}, journal={str(self.journal.path)!r})"


def _discovery():
    try:
        from bridge.client import discovery
    except ImportError:  # discovery is optional until present; explicit arguments always work
        return None
    return discovery


def _resolve(url: str | None, token: str | None) -> tuple[str, str | None, str]:
    """(url, token, source) by the discovery order, or from the arguments/environment alone."""
    discovery = _discovery()
    if discovery is not None:
        token = discovery.find_token(token)
        endpoint = discovery.find_endpoint(url, token)
        return endpoint.url, token, endpoint.source
    token = token or os.environ.get("BRIDGE_TOKEN") or None
    source = "argument" if url else "BRIDGE_URL"
    url = url or os.environ.get("BRIDGE_URL")
    if not url:
        raise DiscoveryError("no server URL: pass connect(url=…) or set BRIDGE_URL")
    return url.rstrip("/"), token, source


def _token_source(explicit: str | None):
    discovery = _discovery()
    if explicit or discovery is None:
        return None
    return lambda: discovery.find_token(None)


def _open(url: str, token: str | None, *, journal: str | os.PathLike | None, journal_limit: int | None,
          flush_at_exit: float, explicit_token: str | None) -> Connection:
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"server URL must start with http:// or https://, got {url[:60]!r}")
    store = Journal(journal, limit_bytes=journal_limit)
    if store.repair_report is not None:
        print(f"bridge: {store.repair_report}", file=sys.stderr)
    sender = Sender(store, url, token, token_source=_token_source(explicit_token))
    return Connection(store, sender, flush_at_exit=flush_at_exit)


def _register(conn: Connection) -> None:
    with _registry_lock:
        for uri, old in list(_connections.items()):
            if old is not conn:
                old.close()
        _connections[conn.tracking_uri] = conn

    def follow(new_url: str) -> None:  # the sender re-discovered a new URL: keep the store's lookup working
        with _registry_lock:
            _connections[SCHEME_PREFIX + new_url] = conn

    conn.sender.url_listeners.append(follow)


def active_connection() -> Connection | None:
    with _registry_lock:
        return next(iter(_connections.values()), None)


def connection_for(store_uri: str) -> Connection:
    """The connection serving tracking URI `store_uri`, made from the environment when there is none."""
    conn = _connections.get(store_uri)
    if conn is not None:
        return conn
    with _registry_lock:
        conn = _connections.get(store_uri)
        if conn is not None:
            return conn
        if len(_connections) == 1:  # the URL changed under a cached store (re-discovery): same link
            return next(iter(_connections.values()))
        if not store_uri.startswith(SCHEME_PREFIX):
            raise ConfigError(f"{store_uri!r} is not a bridge tracking URI")
        url = store_uri[len(SCHEME_PREFIX):]
        discovery = _discovery()
        token = discovery.find_token(None) if discovery is not None else os.environ.get("BRIDGE_TOKEN")
        conn = _open(url, token, journal=None, journal_limit=None, flush_at_exit=10.0, explicit_token=None)
        _connections[store_uri] = conn
        conn.sender.start()
        atexit.register(conn._at_exit)
        log.info("bridge: logging to journal %s for %s (from MLFLOW_TRACKING_URI)", conn.journal.path, url)
        return conn


def connect(url: str | None = None, token: str | None = None, *, experiment: str | None = None,
            journal: str | os.PathLike | None = None, journal_limit: int | None = None,
            probe_timeout: float = 3.0, flush_at_exit: float = 10.0) -> Connection:
    """Route this process's MLflow calls through a durable journal delivered to the bridge server.

    `url`/`token` default to discovery (BRIDGE_URL, BRIDGE_TOKEN, the published record); `journal` to
    BRIDGE_JOURNAL or the data folder. Succeeds offline: logging starts at once and is delivered later.
    """
    import mlflow

    found_url, found_token, source = _resolve(url, token)
    conn = _open(found_url, found_token, journal=journal, journal_limit=journal_limit,
                 flush_at_exit=flush_at_exit, explicit_token=token)
    online = conn.probe(probe_timeout)
    _register(conn)
    os.environ["MLFLOW_TRACKING_URI"] = conn.tracking_uri
    mlflow.set_tracking_uri(conn.tracking_uri)
    global _registry_uri_set
    if os.environ.get("MLFLOW_REGISTRY_URI") in (None, "", _registry_uri_set):
        # The model registry is not journaled: it talks to the server directly, with the bridge token.
        # Setting it also spares every MlflowClient() a failing `import pyspark` (≈50 µs per log_metric).
        os.environ.setdefault("MLFLOW_TRACKING_AUTH", "bridge")
        mlflow.set_registry_uri(found_url)
        _registry_uri_set = found_url
    conn.sender.start()
    atexit.register(conn._at_exit)
    if experiment:
        mlflow.set_experiment(experiment)
    if online:
        message = f"bridge: logging to {found_url} (from {source}) through journal {conn.journal.path}"
    elif conn.sender.token_rejected:
        message = (f"bridge: {found_url} rejected the access token; logging to journal {conn.journal.path} "
                   "and delivery is paused until a valid token is found")
    else:
        message = (f"bridge: offline mode: logging to journal {conn.journal.path}, "
                   f"will deliver when {found_url} answers")
    log.info("%s", message)
    print(message, file=sys.stderr)
    return conn


@dataclass(frozen=True)
class SyncReport:
    """What `sync()` did: entries per run before and after, dead letters, and why it stopped early."""

    journal: Path
    url: str
    before: dict[str, int]
    after: dict[str, int]
    dead: dict[str, int]
    last_error: str | None
    repair: str | None

    @property
    def left(self) -> int:
        return sum(self.after.values())


def sync(journal: str | os.PathLike | None = None, url: str | None = None, *, timeout: float = 300.0,
         on_progress=None) -> SyncReport:
    """Deliver a journal left by an earlier process, for at most `timeout` seconds.

    `on_progress(done, total)` is called as entries are delivered.
    """
    found_url, token, _ = _resolve(url, None)
    store = Journal(journal)
    sender = Sender(store, found_url, token, token_source=_token_source(None), heartbeat_s=float("inf"),
                    send_interval_s=0.2)
    try:
        before = store.backlog()
        total = before.total
        sender.start()
        deadline = time.monotonic() + timeout
        left = total
        while left and time.monotonic() < deadline:
            left = sender.flush(min(0.5, max(0.0, deadline - time.monotonic())))
            if on_progress is not None:
                on_progress(total - left, total)
        sender.stop()
        after = store.backlog()
        return SyncReport(journal=store.path, url=found_url, before=before.pending, after=after.pending,
                          dead=after.dead, last_error=sender.last_error if after.total else None,
                          repair=None if store.repair_report is None else str(store.repair_report))
    finally:
        sender.stop()
        store.close()


def queue(journal: str | os.PathLike | None = None):
    """(backlog, dead letters, run records) of a journal, for `bridge queue`."""
    store = Journal(journal)
    try:
        return store.backlog(), store.dead_letters(), {r.local_id: r for r in store.runs()}, store.path
    finally:
        store.close()
