"""`bridge.connect()`: find the server, check it, and route every MLflow call of this process through the journal.

    secrets ──▶ discovery (verify record) ──▶ probe ──▶ MLflow plugin wiring (MLFLOW_TRACKING_URI=bridge+https://…)

The tracking store plugin (store.py) and the artifact plugin (artifacts.py) find the process's `Connection`
here by tracking URI; a process that inherited `MLFLOW_TRACKING_URI=bridge+…` without calling `connect()`
(a DataLoader worker, a DDP child) gets one made from the environment on first use.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from bridge import config, rendezvous
from bridge.client.delivery.sender import Sender
from bridge.client.journal import Journal, RunRecord
from bridge.client.journal.records import Backlog, DeadLetter
from bridge.client.journal.replica import (
    REPLICA_EVERY_ENV,
    Replica,
    ReplicaKeeper,
    local_journal_for,
    network_filesystem,
)
from bridge.client.journal.uploads import FileWaiting, LaneWait
from bridge.client.link import Link, Transport, discovery
from bridge.client.options import EXIT_FLUSH_ENV, JOURNAL_ENV, JOURNAL_LIMIT_ENV, ClientOptions
from bridge.errors import ConfigError
from bridge.rendezvous import RELAY_ENV
from bridge.ui import ui_link

log = logging.getLogger(__name__)

SCHEME_PREFIX = "bridge+"

_registry_lock = threading.RLock()


def _renew_registry_lock() -> None:
    global _registry_lock
    _registry_lock = threading.RLock()  # the parent may have held it at fork()


os.register_at_fork(after_in_child=_renew_registry_lock)
_connections: dict[str, Connection] = {}
_registry_uri_set: str | None = None
#: The journal (path, size limit) of the connection closed by the interpreter-exit handler, once it ran.
_closed_at_exit: tuple[Path, int] | None = None
#: Endpoint sources that name the URL explicitly: such a URL is pinned, never replaced by re-discovery.
PINNED_SOURCES = ("argument", discovery.URL_ENV)


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
    #: Files not delivered yet, with the bytes the server has confirmed of each (journal/uploads.py).
    files: list[FileWaiting] = field(default_factory=list)
    #: Why a delivery lane ("records", "files") waits right now: its last error, attempts, next try.
    waits: dict[str, LaneWait] = field(default_factory=dict)
    #: Entries accepted but kept out of SQLite by a full disk (metric points, run ends): waiting too.
    unmoved: int = 0
    #: What the person was told when the disk filled (journal/room.py), while it stays full; else None.
    disk_full: str | None = None

    @property
    def pending(self) -> int:
        return sum(self.backlog.values()) + self.unmoved

    @property
    def file_bytes(self) -> tuple[int, int]:
        """(bytes the server confirmed, bytes in all) of the files still waiting."""
        return sum(f.confirmed for f in self.files), sum(f.size for f in self.files)


class QueueView(NamedTuple):
    """What `bridge queue` shows of a journal."""

    backlog: Backlog
    dead: list[DeadLetter]
    runs: dict[str, RunRecord]
    path: Path
    files: list[FileWaiting]
    waits: dict[str, LaneWait]
    repairs: tuple[str, ...] = ()  # repairs of the journal no sync or connect() has said yet


@dataclass
class RunSummary:
    """What this process logged to a run, kept in memory so `get_run` can answer while offline."""

    metrics: dict = field(default_factory=dict)  # key -> mlflow Metric (latest by step, then timestamp)
    params: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    #: (model id, key, step, timestamp) -> value of the points naming a model that this process journaled for
    #: the run: the server keeps one per run, model, key, step and millisecond and refuses a second value.
    model_points: dict = field(default_factory=dict)


class Connection:
    """A journal, the link to the server, the sender between them; what `connect()` returns."""

    def __init__(self, journal: Journal, link: Link, sender: Sender, options: ClientOptions) -> None:
        self.journal = journal
        self.link = link
        self.sender = sender
        self.options = options
        self.summaries: dict[str, RunSummary] = {}
        #: Metric names already checked the way the server checks them (log_metric's hot path skips them).
        self.valid_metric_keys: set[str] = set()
        #: Logged-model id (the server's or this side's) -> this side's, for `RunSummary.model_points`.
        self.local_model_ids: dict[str, str] = {}
        #: Keeps the replica on a network filesystem (open_journal), or None.
        self.replica: ReplicaKeeper | None = None
        self._closed = False
        sender.operations.on_run_mapped = self._announce_run

    def _announce_run(self, run: RunRecord, server_id: str, experiment_id: str) -> None:
        """Say, once a run exists on the server, the id and link the MLflow UI knows it by: the id MLflow gives
        this process (`mlflow.active_run().info.run_id`) is the journal's own. The server run carries that one
        as tag `bridge.run_key`, so a search for either finds it. The link goes on a line of its own so a
        terminal shows it whole."""
        name = f"'{run.name}' " if run.name else ""
        print(
            f"bridge: run {name}is on the server as {server_id} (here {run.local_id}):\n"
            f"  {ui_link(self.link.url, experiment_id, server_id)}",
            file=sys.stderr,
        )

    def server_run_id(self, run_id: str) -> str | None:
        """The server's id of run `run_id` (the id MLflow gave this process), or None while it is not there yet."""
        record = self.journal.ids.run(run_id)
        return None if record is None else record.remote_id

    @property
    def url(self) -> str:
        return self.link.url

    @property
    def journal_path(self) -> Path:
        """The journal as the person named it: on a network filesystem, its replica there (what a new runtime
        passes to `bridge sync`), not the local file it runs in."""
        return self.replica.replica.target if self.replica is not None else self.journal.path

    @property
    def tracking_uri(self) -> str:
        return SCHEME_PREFIX + self.link.url

    def status(self) -> Status:
        backlog = self.journal.queue.backlog()
        pending = {("experiments" if run == "" else run): n for run, n in backlog.pending.items()}
        oldest = None if backlog.oldest_created is None else max(0.0, time.time() - backlog.oldest_created)
        return Status(
            online=self.link.online,
            url=self.link.url,
            journal=self.journal.path,
            backlog=pending,
            oldest_undelivered_s=oldest,
            dead_letters=sum(backlog.dead.values()),
            last_error=self.link.last_error,
            token_rejected=self.link.token_rejected,
            files=self.journal.uploads.files_waiting(),
            waits=self.journal.uploads.waits(),
            unmoved=backlog.unmoved,
            disk_full=self.journal.room.message() if self.journal.room.full else None,
        )

    def flush(self, timeout: float | None = None) -> int:
        """Block until everything is delivered or `timeout` seconds pass; returns the entries left."""
        left = self.sender.flush(timeout)
        if self.replica is not None:
            self.replica.snapshot_now()
        return left

    def close(self) -> None:
        """Stop delivering; what is left stays in the journal for the next `connect()` or `bridge sync`."""
        if self._closed:
            return
        self._closed = True
        stopped = self.sender.stop()
        if self.replica is not None:
            self.replica.stop()
        with _registry_lock:
            for uri, conn in list(_connections.items()):
                if conn is self:
                    del _connections[uri]
        if stopped:
            self.journal.close()
        else:
            # The sender thread is still inside a request: closing the journal under it would break it, and
            # it still holds the journal's delivery lock, so no other sender can re-send what it is sending.
            log.warning(
                "bridge: the sender is still finishing a request; journal %s is closed when it ends", self.journal.path
            )
            self.sender.when_stopped(self.journal.close)

    def summary(self, run_id: str) -> RunSummary:
        found = self.summaries.get(run_id)
        if found is None:
            found = self.summaries[run_id] = RunSummary()
        return found

    def run_record(self, run_id: str) -> RunRecord | None:
        return self.journal.ids.run(run_id)

    def _at_exit(self) -> None:
        global _closed_at_exit
        with _registry_lock:  # the connection in use at exit names the journal for calls made after it
            if _closed_at_exit is None or any(conn is self for conn in _connections.values()):
                _closed_at_exit = (self.journal.path, self.journal.limit_bytes)
        if self._closed:
            return
        # MLflow's own exit hook (registered when mlflow was imported, so it runs after this one) would end
        # the active run only after this connection is closed: end it here, while its journal is open.
        _end_active_runs()
        # Never silent: whatever happens here, the person learns what is left and the command that sends it.
        try:
            left = self.flush(self.options.exit_flush_s)
        except Exception as exc:  # a plugin never breaks the user's exit, but it says what it could not do
            print(
                f"bridge: the exit flush failed ({type(exc).__name__}: {exc}); what was not delivered is kept "
                f"in journal {self.journal_path}. {sync_hint(self.journal_path)}",
                file=sys.stderr,
            )
            left = 0
        if left:
            print(
                f"bridge: {left} entries not delivered yet (the exit waited {self.options.exit_flush_s:g} s, "
                f"{EXIT_FLUSH_ENV}) are kept in journal {self.journal_path}. {sync_hint(self.journal_path)}",
                file=sys.stderr,
            )
        try:
            self.close()
        except Exception as exc:
            print(f"bridge: closing the journal at exit failed: {exc}", file=sys.stderr)

    def __repr__(self) -> str:
        return f"Connection(url={self.link.url!r}, journal={str(self.journal.path)!r})"


def sync_hint(journal: Path) -> str:
    """The sentence that tells a person how to deliver what a journal still holds."""
    return f"Deliver it with `bridge sync --journal {journal}` or the next bridge.connect()."


def _end_active_runs() -> None:
    """End the fluent API's active runs (FINISHED), as MLflow's exit hook would; never raises."""
    import mlflow

    for _ in range(100):  # nested runs end innermost first; bounded in case end_run cannot pop
        try:
            if mlflow.active_run() is None:
                return
            mlflow.end_run()
        except Exception as exc:  # a plugin never breaks the user's exit
            log.warning("bridge: could not end the active MLflow run at exit: %s", exc)
            return


def _resolve(url: str | None, token: str | None) -> tuple[str, str | None, str]:
    """(url, token, source) by the discovery order."""
    token = discovery.find_token(token)
    endpoint = discovery.find_endpoint(url, token)
    return endpoint.url, token, endpoint.source


def _token_source(explicit: str | None):
    if explicit:
        return None
    return lambda: discovery.find_token(None)


def _open(
    url: str,
    token: str | None,
    options: ClientOptions,
    *,
    explicit_token: str | None,
    rediscover: bool = True,
    transport: Transport | None = None,
) -> Connection:
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"server URL must start with http:// or https://, got {url[:60]!r}")
    store, keeper = open_journal(options.journal_path, options.journal_limit, options.spool_limit)
    for repair in store.database.repairs(take=True):  # also one an earlier open (`bridge queue`) made
        print(f"bridge: {repair}", file=sys.stderr)
    dead = dead_letter_summary(store)
    if dead:
        print(f"bridge: journal {store.path} holds {dead}", file=sys.stderr)
    link = Link(
        url,
        token,
        transport=transport,
        token_source=_token_source(explicit_token),
        http_timeout_s=options.http_timeout_s,
        rediscover=rediscover,
    )
    conn = Connection(store, link, Sender(store, link, options), options)
    conn.replica = keeper
    return conn


def open_journal(
    path: Path, limit_bytes: int | None = None, spool_limit_bytes: int | None = None
) -> tuple[Journal, ReplicaKeeper | None]:
    """The journal at `path`; on a network filesystem (Google Drive, NFS, SMB) SQLite must not run there, so the
    journal runs on local disk (restored from the replica at `path` in a new runtime) and a started
    `ReplicaKeeper` keeps `path` a consistent copy of it."""
    kind = network_filesystem(path)
    if kind is None:
        return Journal(path, limit_bytes=limit_bytes, spool_limit_bytes=spool_limit_bytes), None
    local = local_journal_for(path, config.paths().data_dir)
    replica = Replica(local, Path(path))
    restored = replica.restore()
    print(
        f"bridge: journal {path} is on a network filesystem ({kind}), where SQLite must not run: it runs at "
        f"{local}{' (restored from there)' if restored else ''} and {path} is kept as its replica",
        file=sys.stderr,
    )
    store = Journal(local, limit_bytes=limit_bytes, spool_limit_bytes=spool_limit_bytes)
    keeper = ReplicaKeeper(replica, store.sync, config.env_float(REPLICA_EVERY_ENV, 5.0))
    keeper.start()
    return store, keeper


def dead_letter_summary(store: Journal) -> str | None:
    """'N dead letters (count per reason) …' for the terminal, or None when the journal holds none."""
    letters = store.queue.dead_letters()
    if not letters:
        return None
    reasons: dict[str, int] = {}
    for letter in letters:
        reasons[letter.reason or "unknown"] = reasons.get(letter.reason or "unknown", 0) + 1
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    return (
        f"{len(letters)} entries that could not be delivered (dead letters: {why}); "
        "`bridge queue` lists them, `bridge queue --retry` sends them again"
    )


def _register(conn: Connection) -> None:
    with _registry_lock:
        for old in list(_connections.values()):
            if old is not conn:
                _carry_live_runs(old, conn)
                old.close()
        _connections[conn.tracking_uri] = conn

    def follow(new_url: str) -> None:  # the sender re-discovered a new URL: keep the store's lookup working
        global _registry_uri_set
        with _registry_lock:
            _connections[SCHEME_PREFIX + new_url] = conn
            if _registry_uri_set is not None and os.environ.get("MLFLOW_REGISTRY_URI") == _registry_uri_set:
                import mlflow

                mlflow.set_registry_uri(SCHEME_PREFIX + new_url)  # the journaled registry (registry.py) follows
                _registry_uri_set = SCHEME_PREFIX + new_url

    conn.link.url_listeners.append(follow)


def _carry_live_runs(old: Connection, new: Connection) -> None:
    """A second connect() in a process keeps beating for the runs the first one still had live."""
    same_journal = old.journal.path.resolve() == new.journal.path.resolve()
    if same_journal:  # what this process logged stays readable offline (harness finding H3)
        for run, summary in old.summaries.items():
            new.summaries.setdefault(run, summary)
    for run in list(old.sender.heartbeats.live):
        if same_journal:
            new.sender.watch_run(run)
        else:
            remote, _ = old.journal.ids.server_run(run)
            if remote is not None:
                new.sender.watch_run(remote)


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
        url = store_uri[len(SCHEME_PREFIX) :]
        if _closed_at_exit is not None:
            return _open_after_exit(store_uri, url)
        token = discovery.find_token(None)
        conn = _open(url, token, ClientOptions.from_env(), explicit_token=None)
        _connections[store_uri] = conn
        conn.sender.start()
        atexit.register(conn._at_exit)
        log.info("bridge: logging to journal %s for %s (from MLFLOW_TRACKING_URI)", conn.journal.path, url)
        return conn


def _open_after_exit(store_uri: str, url: str) -> Connection:
    """An MLflow call after the exit handler closed the connection: journal it where the rest went.

    Nothing delivers it in this process any more; the next `connect()` or `bridge sync` on that journal does.
    """
    assert _closed_at_exit is not None  # the caller saw it set; it is never unset
    path, limit = _closed_at_exit
    options = ClientOptions.from_env(journal=path, journal_limit=limit, exit_flush_s=0.0)
    conn = _open(url, discovery.find_token(None), options, explicit_token=None, rediscover=False)
    _connections[store_uri] = conn  # its sender is never started: the interpreter is exiting
    print(
        f"bridge: an MLflow call after bridge's exit handler was kept in journal {path}; the next "
        "bridge.connect() or `bridge sync` delivers it.",
        file=sys.stderr,
    )
    return conn


def connect(
    url: str | None = None,
    token: str | None = None,
    *,
    experiment: str | None = None,
    journal: str | os.PathLike | None = None,
    journal_limit: int | None = None,
    probe_timeout: float | None = None,
    flush_at_exit: float | None = None,
    options: ClientOptions | None = None,
    transport: Transport | None = None,
    relay: str | None = None,
) -> Connection:
    """Route this process's MLflow calls through a durable journal delivered to the bridge server.

    `url`/`token` default to discovery (BRIDGE_URL, BRIDGE_TOKEN, the published record: with the token alone, the
    one sealed on the relay); `relay` names a self-hosted relay or "off", exported as BRIDGE_RELAY so re-discovery
    and child processes use it too. Every other knob
    to `ClientOptions.from_env()` (BRIDGE_JOURNAL, BRIDGE_EXIT_FLUSH_S, …), which the keyword arguments
    override. Succeeds offline: logging starts at once and is delivered later. A URL given as argument or
    BRIDGE_URL is pinned (never re-discovered); `journal`/`journal_limit` given here are exported as
    BRIDGE_JOURNAL/BRIDGE_JOURNAL_LIMIT so child processes journal to the same place. `transport` replaces
    the HTTP layer (tests).
    """
    import mlflow

    overrides = {
        "journal": journal,
        "journal_limit": journal_limit,
        "probe_timeout_s": probe_timeout,
        "exit_flush_s": flush_at_exit,
    }
    if options is None:
        options = ClientOptions.from_env(**overrides)
    else:
        options = options.replace(**{k: v for k, v in overrides.items() if v is not None})
    if relay is not None:
        os.environ[RELAY_ENV] = "off" if rendezvous.relay_url(relay, what="relay") is None else relay.strip()
    found_url, found_token, source = _resolve(url, token)
    conn = _open(
        found_url,
        found_token,
        options,
        explicit_token=token,
        transport=transport,
        rediscover=source not in PINNED_SOURCES,
    )
    online = conn.link.probe(options.probe_timeout_s)
    _register(conn)
    os.environ["MLFLOW_TRACKING_URI"] = conn.tracking_uri
    if journal is not None:
        os.environ[JOURNAL_ENV] = str(conn.journal.path.absolute())
    if journal_limit is not None:
        os.environ[JOURNAL_LIMIT_ENV] = str(conn.journal.limit_bytes)
    mlflow.set_tracking_uri(conn.tracking_uri)
    global _registry_uri_set
    if os.environ.get("MLFLOW_REGISTRY_URI") in (None, "", _registry_uri_set):
        # Registry writes are journaled too (registry.py, the `bridge+` registry store). Setting it also spares
        # every MlflowClient() a failing `import pyspark` (≈50 µs per log_metric).
        mlflow.set_registry_uri(conn.tracking_uri)
        _registry_uri_set = conn.tracking_uri
        if found_token:
            # Process-wide, but auth.py adds the token only to requests for this connection's server URL.
            os.environ.setdefault("MLFLOW_TRACKING_AUTH", "bridge")
    conn.sender.start()
    atexit.register(conn._at_exit)
    if experiment:
        mlflow.set_experiment(experiment)
    if online:
        message = (
            f"bridge: logging to {found_url} (from {source}) through journal {conn.journal.path}; "
            f"MLflow UI: {ui_link(found_url)}"
        )
    elif conn.link.token_rejected:
        message = (
            f"bridge: {found_url} rejected the access token; logging to journal {conn.journal.path} "
            "and delivery is paused until a valid token is found"
        )
    else:
        message = f"bridge: offline mode: logging to journal {conn.journal.path}, will deliver when {found_url} answers"
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
    waits: dict[str, LaneWait] = field(default_factory=dict)
    files: list[FileWaiting] = field(default_factory=list)
    dead_letters: str | None = None  # how many could not be delivered, and why

    @property
    def left(self) -> int:
        return sum(self.after.values())

    @property
    def undelivered(self) -> int:
        """Entries accepted that did not reach the server: still waiting, or dead letters."""
        return self.left + sum(self.dead.values())


def sync(
    journal: str | os.PathLike | None = None,
    url: str | None = None,
    *,
    timeout: float = 300.0,
    on_progress=None,
    on_bytes=None,
) -> SyncReport:
    """Deliver a journal left by an earlier process, for at most `timeout` seconds.

    `on_progress(done, total)` is called as entries are delivered; `on_bytes(done, total)` as the bytes of the
    files waiting at the start arrive (confirmed by the server, resumed uploads included).
    """
    found_url, token, source = _resolve(url, None)
    options = ClientOptions.from_env(journal=journal).replace(heartbeat_s=float("inf"), send_interval_s=0.2)
    store, keeper = open_journal(options.journal_path, options.journal_limit, options.spool_limit)
    link = Link(
        found_url,
        token,
        token_source=_token_source(None),
        http_timeout_s=options.http_timeout_s,
        rediscover=source not in PINNED_SOURCES,
    )
    sender = Sender(store, link, options)
    try:
        repairs = store.database.repairs(take=True)
        before = store.queue.backlog()
        total = before.total
        files_before = {f.op: f.size for f in store.uploads.files_waiting()}
        file_bytes = sum(files_before.values())
        sender.start()
        deadline = time.monotonic() + timeout
        left = total
        while left and time.monotonic() < deadline:
            left = sender.flush(min(0.5, max(0.0, deadline - time.monotonic())))
            if on_progress is not None:
                on_progress(total - left, total)
            if on_bytes is not None and file_bytes:
                waiting = {f.op: f for f in store.uploads.files_waiting()}
                done = sum(size if op not in waiting else waiting[op].confirmed for op, size in files_before.items())
                on_bytes(done, file_bytes)
        if not left:  # what a flush does after delivering (marks, a look for late twins), unhurried
            sender.flush(max(0.0, deadline - time.monotonic()))
        sender.stop()
        after = store.queue.backlog()
        return SyncReport(
            journal=store.path,
            url=found_url,
            before=before.pending,
            after=after.pending,
            dead=after.dead,
            last_error=link.last_error if after.total else None,
            waits=store.uploads.waits() if after.total else {},
            files=store.uploads.files_waiting() if after.total else [],
            repair="\n".join(repairs) or None,
            dead_letters=dead_letter_summary(store) if after.dead else None,
        )
    finally:
        stopped = sender.stop()
        if keeper is not None:
            keeper.stop()
        if stopped:
            store.close()
        else:
            sender.when_stopped(store.close)


def queue(journal: str | os.PathLike | None = None, *, retry: list[int] | bool = False, drop: list[int] | bool = False):
    """(backlog, dead letters, run records, path) of a journal, for `bridge queue`.

    `retry`/`drop`: True for every dead letter, or a list of their ids — sent again by the next sender
    (`bridge sync`, `bridge.connect()`), or deleted for good — before the listing is taken.
    """
    store, keeper = open_journal(ClientOptions.from_env(journal=journal).journal_path)
    try:
        if retry:
            store.queue.retry_dead(None if retry is True else list(retry))
        if drop:
            store.queue.drop_dead(None if drop is True else list(drop))
        return QueueView(
            store.queue.backlog(),
            store.queue.dead_letters(),
            {r.local_id: r for r in store.ids.runs()},
            store.path,
            store.uploads.files_waiting(),
            store.uploads.waits(),
            tuple(store.database.repairs()),
        )
    finally:
        if keeper is not None:
            keeper.stop()
        store.close()
