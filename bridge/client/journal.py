"""The durable journal: every MLflow write of this process waits here, in SQLite, until the sender delivers it.

Durability policy (measured on this machine, see the tests and benchmarks):
  * Nothing a call has returned from is lost to a ``kill -9`` of the process — the loss window on a process
    crash is zero. Metric points are appended to the intake file with ``write()`` (≈2 µs, see intake.py);
    every other call commits its own small SQLite transaction (WAL, ``synchronous=NORMAL``, ≈10 µs) before
    returning. Either way the bytes are in the kernel's page cache when the call returns — not yet on disk.
  * An OS crash or power cut can lose what calls wrote since the last `sync()`: the sender's journal-sync
    thread (sender.DURABLE_EVERY_S, 1 s) moves the intake into SQLite and fsyncs the WAL, independently of
    delivery rounds, so that window is about a second plus the disk's own fsync time. The intake file
    itself is never fsynced. ``synchronous=FULL`` on every call would close it at ≈120 µs per call.

Rows move pending → in-flight → deleted (done) or dead; in-flight rows go back to pending when a sender
starts, because nothing proves the server applied them (re-sending is safe: see sender.py).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import socket
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from bridge.client import forksafe
from bridge.client import intake as _intake
from bridge.client.options import JOURNAL_LIMIT_ENV, ClientOptions
from bridge.client.spool import Spool
from bridge.errors import JournalCorruptError, JournalError, JournalFullError

log = logging.getLogger(__name__)


PENDING, IN_FLIGHT, DEAD = 0, 1, 3
STATE_NAMES = {PENDING: "pending", IN_FLIGHT: "in-flight", DEAD: "dead"}
#: The states as SQL conditions, so no query spells a state by its number.
_IS_PENDING = f"state={PENDING}"
_IS_IN_FLIGHT = f"state={IN_FLIGHT}"
_IS_DEAD = f"state={DEAD}"
_IS_UNDELIVERED = f"state in ({PENDING},{IN_FLIGHT})"

#: Operation kinds. Metrics, params and tags coalesce into log_batch; the rest are sent one by one.
METRIC, PARAM, TAG = "metric", "param", "tag"
CREATE_EXPERIMENT, SET_EXPERIMENT_TAG = "create_experiment", "set_experiment_tag"
DELETE_EXPERIMENT_TAG = "delete_experiment_tag"
CREATE_RUN, UPDATE_RUN, DELETE_TAG = "create_run", "update_run", "delete_tag"
LOG_INPUTS, ARTIFACT = "log_inputs", "artifact"
#: Metric points that name a logged model or a dataset, and log_model's copy of a step's points (models.py).
MODEL_METRICS, STEP_METRICS_TO_MODEL = "model_metrics", "step_metrics_to_model"
#: Kinds whose repetition from an old copy of the journal would overwrite something newer (marks.py); the step
#: copy reads the server when it is made, so made again later it would copy points logged since.
MARKED_RUN_KINDS = frozenset({TAG, DELETE_TAG, UPDATE_RUN, ARTIFACT, STEP_METRICS_TO_MODEL})
MARKED_EXPERIMENT_KINDS = frozenset({SET_EXPERIMENT_TAG, DELETE_EXPERIMENT_TAG})
#: Kinds of the `entities` table (their operation kinds live in models.py and registry.py).
LOGGED_MODEL, MODEL_VERSION = "logged_model", "model_version"

#: Bytes a row costs beyond its payload (row header, index entry), for the cheap running size estimate.
_ROW_OVERHEAD = 64
_BUSY_TIMEOUT_MS = 30_000

_INSERT_METRIC = "insert into ops(run, kind, key, value, ts, step, created) values(?,'metric',?,?,?,?,?)"
_INSERT_ENTRY = "insert into ops(run, kind, key, value, created, epoch) values(?,?,?,?,?,?)"

_SCHEMA = (
    """create table if not exists ops (
        id integer primary key autoincrement,  -- never reused: newer rows sort after every row ever written
        run text not null,            -- local run id; '' for experiment operations
        kind text not null,
        key text,
        value,                        -- metric value (REAL, or 'NaN'), param/tag value (TEXT)
        ts integer,
        step integer,
        body text,                    -- JSON for the other kinds
        state integer not null default 0,   -- PENDING
        attempts integer not null default 0,
        error text,                   -- a dead letter's message (the server's, or the local problem)
        reason text,                  -- a dead letter's reason: operations.SERVER_REFUSED or a local one
        created real not null,
        epoch integer)                -- lineage.n of the Journal that wrote it (not for metric points)""",
    # Who wrote which rows, for the delivery marks (marks.py): a row per opening of the file. A copy of the
    # file shares the rows written before it was taken and gets rows of its own afterwards.
    """create table if not exists lineage (
        n integer primary key autoincrement,
        uid text not null,            -- random, never reused: names this opening's mark on the server
        created real not null)""",
    # Delivery marks owed to the server (marks.py): per scope ('run:<local id>' or 'experiment:<local id>') and
    # lineage, the highest row delivered or set aside there. Kept until the server holds it, so a sender stopped
    # or killed first leaves it to the next one.
    """create table if not exists owed_marks (
        scope text not null,
        uid text not null,
        done integer not null,
        primary key (scope, uid))""",
    # How many times rows left the undelivered set (delivered, or set aside as dead letters): a read that finds
    # it unchanged after asking the server knows no write reached the server meanwhile (store.py's overlay).
    """create table if not exists settled (
        id integer primary key check (id = 0),
        n integer not null)""",
    # Runs created again after a try whose fate is unknown (a timeout, or a request cut by a stopping sender):
    # that try may still land and make an empty second run. Looked for (operations.remove_twins) when the run
    # ends, on a flush, and at `due` (wall clock), by whichever sender delivers this journal.
    """create table if not exists twin_watch (
        run text primary key,
        due real not null)""",
    # No secondary index: it would cost every log_metric ~3 µs (a quarter of the hot path), while the
    # sender's scans of the rows still undelivered stay cheap at the sizes the journal limit allows.
    """create table if not exists intake (
        name text primary key,        -- an intake file (intake.py) and how far it has been moved in here
        moved integer not null)""",
    """create table if not exists experiments (
        local_id text primary key,
        name text not null unique,
        remote_id text,
        created real not null)""",
    """create table if not exists runs (
        local_id text primary key,
        remote_id text,
        experiment_id text not null,
        name text,
        user_id text,
        start_time integer,
        end_time integer,
        status text not null default 'RUNNING',
        artifact_uri text,            -- the server's artifact root for the run, once created there
        owner_pid integer,            -- the process that created it, on host owner_host: while that process
        owner_host text,              -- lives, whichever sender delivers this journal keeps the run beating
        created real not null)""",
    # Logged models (models.py) and model versions (registry.py) created here: local id -> server id.
    """create table if not exists entities (
        kind text not null,           -- LOGGED_MODEL or MODEL_VERSION
        local_id text not null,       -- the id MLflow was given here
        remote_id text,               -- the server's id, once created there
        location text,                -- the server's artifact location (logged models)
        body text not null,           -- what is known here (JSON), for reads while offline
        created real not null,
        primary key (kind, local_id))""",
)


@dataclass(frozen=True)
class Op:
    """One journaled write, as the sender sees it."""

    id: int
    run: str
    kind: str
    key: str | None
    value: object
    ts: int | None
    step: int | None
    body: str | None
    attempts: int
    #: The `lineage` row of the Journal that wrote it; None for metric points and rows of older journals.
    epoch: int | None = None

    def json(self) -> dict:
        return json.loads(self.body) if self.body else {}


class DeadLetter(NamedTuple):
    """An entry that will not be delivered as it is: why (`reason`) and the message that said so."""

    op: Op
    error: str | None
    reason: str | None


@dataclass(frozen=True)
class RunRecord:
    local_id: str
    remote_id: str | None
    experiment_id: str
    name: str | None
    user_id: str | None
    start_time: int | None
    end_time: int | None
    status: str
    artifact_uri: str | None


@dataclass(frozen=True)
class EntityRecord:
    """A logged model or model version created here; `body` is what is known of it locally (JSON)."""

    local_id: str
    remote_id: str | None
    location: str | None
    body: str

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass(frozen=True)
class ExperimentRecord:
    local_id: str
    name: str
    remote_id: str | None


@dataclass(frozen=True)
class RepairReport:
    """What opening a damaged journal did: where the damaged file went and how much was saved."""

    damaged_file: Path
    problem: str
    rows_recovered: int
    rows_lost: int | None  # None when the damage hides how many rows there were

    def __str__(self) -> str:
        lost = "an unknown number of" if self.rows_lost is None else str(self.rows_lost)
        return (f"journal was damaged ({self.problem}); recovered {self.rows_recovered} entries, "
                f"lost {lost}; the damaged file was kept as {self.damaged_file}")


@dataclass
class Backlog:
    """What is waiting in the journal, per run (local id, '' for experiment operations)."""

    pending: dict[str, int] = field(default_factory=dict)
    dead: dict[str, int] = field(default_factory=dict)
    oldest_created: float | None = None

    @property
    def total(self) -> int:
        return sum(self.pending.values())


def journal_path(path: str | os.PathLike | None = None) -> Path:
    """The journal file: argument → BRIDGE_JOURNAL → the platform data folder (ClientOptions)."""
    return ClientOptions.from_env(journal=path or None).journal_path


def journal_limit(limit: int | None = None) -> int:
    """The size limit in bytes: argument → BRIDGE_JOURNAL_LIMIT → config.DEFAULT_JOURNAL_LIMIT_BYTES."""
    return ClientOptions.from_env(journal_limit=limit).journal_limit


def _encode_value(value: float) -> object:
    # SQLite stores a float NaN as NULL; keep it recognisable instead.
    return "NaN" if value != value else value


def decode_value(value: object) -> float:
    return math.nan if value == "NaN" or value is None else float(value)


class Journal:
    """The SQLite journal at `path`, with its artifact spool folder beside it."""

    def __init__(self, path: str | os.PathLike | None = None, *, limit_bytes: int | None = None,
                 repair: bool = True) -> None:
        self.path = journal_path(path)
        self.limit_bytes = journal_limit(limit_bytes)
        self.repair_report: RepairReport | None = None
        self._local = threading.local()
        # (pid, thread, connection) for every connection opened; those of ended threads are closed.
        self._connections: list[tuple[int, weakref.ref, sqlite3.Connection]] = []
        self._lock = threading.Lock()
        self._writes = 0         # write transactions committed by this process …
        self._synced_writes = 0  # … and how many of them the last sync() made durable
        self._move_lock = threading.Lock()
        forksafe.renew_after_fork(self)
        self._intake: _intake.Intake | None = None
        self._moved = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.spool = Spool(self.path.with_name(self.path.name + ".spool"))
        except OSError as exc:
            raise JournalError(f"cannot create the journal folder {self.path.parent}: {exc}") from None
        problem = self._check_integrity()
        if problem is not None:
            if not repair:
                raise JournalCorruptError(f"journal {self.path} is damaged: {problem}")
            self.repair_report = self._repair(problem)
            log.warning("%s", self.repair_report)
        with self.db() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            _migrate(conn)
            # Every opening writes under a lineage of its own: a copy of this file opened elsewhere never
            # shares it with what is written here from now on (marks.py).
            self.epoch = conn.execute("insert into lineage(uid, created) values(?,?)",
                                      (uuid.uuid4().hex, time.time())).lastrowid
        self._epoch_uids: dict[int, str | None] = {}
        self.adopt_orphans()
        self.sweep_spool()
        self._used_bytes = self.measure_bytes()

    # ------------------------------------------------------------------------------------- sqlite

    def _create_connection(self) -> sqlite3.Connection:
        """Open a connection with every pragma bridge relies on; one per thread."""
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False,
                               timeout=_BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"pragma busy_timeout={_BUSY_TIMEOUT_MS}")
        conn.execute("pragma journal_mode=wal")
        conn.execute("pragma synchronous=NORMAL")  # see the module docstring for why not FULL
        conn.execute("pragma foreign_keys=off")
        return conn

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():  # never use a connection across fork()
            conn = self._create_connection()
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._lock:
                ended = self._prune_connections()
                self._connections.append((os.getpid(), weakref.ref(threading.current_thread()), conn))
            for old in ended:
                with contextlib.suppress(sqlite3.Error):
                    old.close()
        return conn

    def _prune_connections(self) -> list[sqlite3.Connection]:
        """Forget the connections of threads that have ended (a thread pool would otherwise leak them)."""
        pid = os.getpid()
        keep, ended = [], []
        for entry in self._connections:
            owner_pid, thread_ref, conn = entry
            thread = thread_ref()
            if owner_pid != pid:
                continue  # inherited over fork(): never touched here, the parent closes its own
            # At interpreter exit the main thread already counts as not alive while its atexit handlers
            # (the exit flush) still use its connection.
            if thread is None or (not thread.is_alive() and thread is not threading.main_thread()):
                ended.append(conn)
            else:
                keep.append(entry)
        self._connections = keep
        return ended

    @contextlib.contextmanager
    def db(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction on this thread's connection; committed on success, rolled back on error."""
        conn = self._connection()
        try:
            conn.execute("begin immediate" if write else "begin")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):  # keep the error that got us here
                        conn.execute("rollback")
                raise
            try:
                conn.execute("commit")
            except sqlite3.Error:
                # A failed COMMIT (busy, disk full, a deferred constraint) can leave the transaction open:
                # end it, or this thread's connection refuses every later "begin".
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("rollback")
                raise
            if write:
                self._writes += 1
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower():
                raise JournalFullError(f"the disk holding {self.path} is full: {exc}") from None
            if "malformed" in str(exc) or "not a database" in str(exc):
                raise JournalCorruptError(f"journal {self.path} is damaged: {exc}") from None
            raise JournalError(f"journal {self.path}: {exc}") from None

    def _after_fork_in_child(self) -> None:
        # The parent's journal-sync thread may have held these at fork(); the child starts with its own.
        self._lock = threading.Lock()
        self._move_lock = threading.Lock()
        self.spool._after_fork_in_child()

    def close(self) -> None:
        intake = self._intake
        if intake is not None and intake.pid == os.getpid():
            with contextlib.suppress(JournalError, OSError):
                self.move_intake()
                if self._moved == intake.size:  # all of it is in SQLite: the file has no more purpose
                    with self.db() as conn:
                        conn.execute("delete from intake where name=?", (intake.name,))
                    intake.path.unlink(missing_ok=True)
            intake.close()
            self._intake = None
        with self._lock:
            connections, self._connections = self._connections, []
        for owner_pid, _, conn in connections:
            if owner_pid == os.getpid():
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        self._local = threading.local()

    def checkpoint(self) -> None:
        """Copy what it can of the WAL into the main file (SQLite fsyncs both as it does)."""
        with contextlib.suppress(sqlite3.Error):
            self._connection().execute("pragma wal_checkpoint(PASSIVE)")

    def sync(self) -> None:
        """Make everything accepted so far survive an OS crash: intake into SQLite, then fsync the WAL."""
        self.move_intake()
        mark = self._writes
        if mark == self._synced_writes:
            return
        self.checkpoint()
        # A PASSIVE checkpoint syncs only the frames it could copy; fsync the WAL itself for the rest.
        try:
            fd = os.open(str(self.path) + "-wal", os.O_RDONLY)
        except FileNotFoundError:
            fd = None
        if fd is not None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._synced_writes = mark

    # ------------------------------------------------------------------------------- integrity

    def _check_integrity(self) -> str | None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        try:
            conn = sqlite3.connect(str(self.path), isolation_level=None)
            try:
                rows = conn.execute("pragma quick_check").fetchall()
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            return str(exc)
        messages = [r[0] for r in rows]
        return None if messages == ["ok"] else "; ".join(messages[:3])

    def _repair(self, problem: str) -> RepairReport:
        """Move the damaged file aside and copy every row that can still be read into a fresh journal."""
        damaged = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
        os.replace(self.path, damaged)
        for suffix in ("-wal", "-shm"):
            side = Path(str(self.path) + suffix)
            if side.exists():
                os.replace(side, Path(str(damaged) + suffix))
        recovered, lost, known = 0, 0, True
        fresh = sqlite3.connect(str(self.path), isolation_level=None)
        try:
            for statement in _SCHEMA:
                fresh.execute(statement)
            try:
                old = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True, isolation_level=None)
            except sqlite3.DatabaseError:
                return RepairReport(damaged, problem, 0, None)
            try:
                fresh.execute("begin")
                for table in ("lineage", "owed_marks", "twin_watch"):  # bookkeeping, not counted
                    _salvage_table(old, fresh, table)
                for table in ("experiments", "runs", "entities", "ops"):
                    got, missing, exact = _salvage_table(old, fresh, table)
                    recovered += got
                    lost += missing
                    known = known and exact
                fresh.execute("commit")
            finally:
                old.close()
        finally:
            fresh.close()
        return RepairReport(damaged, problem, recovered, lost if known else None)

    # ------------------------------------------------------------------------------------- size

    def measure_bytes(self) -> int:
        """Bytes in use: live database pages plus the spooled artifact files."""
        self.move_intake()
        with self.db(write=False) as conn:
            page_size = conn.execute("pragma page_size").fetchone()[0]
            pages = conn.execute("pragma page_count").fetchone()[0]
            free = conn.execute("pragma freelist_count").fetchone()[0]
        return (pages - free) * page_size + self.spool.bytes

    def _reserve(self, nbytes: int) -> None:
        # The running estimate only over-counts (deleted rows free pages it does not subtract), so it is
        # re-measured exactly before refusing anything.
        if self._used_bytes + nbytes > self.limit_bytes:
            self._used_bytes = self.measure_bytes()
            if self._used_bytes + nbytes > self.limit_bytes:
                raise JournalFullError(
                    f"journal {self.path} is full ({self._used_bytes:,} of {self.limit_bytes:,} bytes; "
                    f"this call needs {nbytes:,} more). Nothing already accepted was dropped; raise "
                    f"{JOURNAL_LIMIT_ENV} / connect(journal_limit=…) or let the sender deliver the backlog."
                )
        self._used_bytes += nbytes

    # ------------------------------------------------------------------------ writes (caller thread)

    def append_batch(self, run: str, metrics: list[tuple[str, float, int, int]] = (),
                     params: list[tuple[str, str]] = (), tags: list[tuple[str, str]] = ()) -> None:
        """Journal metric points (key, value, timestamp ms, step) and params/tags (key, value) in one commit.

        Each point keeps the timestamp of the original call: that is what makes a re-send a no-op.
        """
        nbytes = sum(len(k) + _ROW_OVERHEAD for k, *_ in metrics)
        if params or tags:
            nbytes += sum(len(k) + len(v) + _ROW_OVERHEAD for k, v in (*params, *tags))
        self._reserve(nbytes)
        if metrics:
            intake = self._intake
            if intake is None or intake.pid != os.getpid():
                intake = self._open_intake()
            try:
                if len(metrics) == 1:  # the hot path: one mlflow.log_metric
                    key, value, ts, step = metrics[0]
                    intake.append(_intake.encode(run, key, value, ts, step))
                else:
                    intake.append(b"".join(_intake.encode(run, k, v, ts, step) for k, v, ts, step in metrics))
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise JournalFullError(f"the disk holding {self.path} is full") from None
                raise JournalError(f"cannot append to the journal intake {intake.path}: {exc}") from None
        if params or tags:
            self.move_intake()  # rows written straight to SQLite must sort after every point logged before them
            now = time.time()
            with self.db() as conn:
                if params:
                    conn.executemany(_INSERT_ENTRY, [(run, PARAM, k, v, now, self.epoch) for k, v in params])
                if tags:
                    conn.executemany(_INSERT_ENTRY, [(run, TAG, k, v, now, self.epoch) for k, v in tags])

    def _open_intake(self) -> _intake.Intake:
        with self._move_lock:
            if self._intake is None or self._intake.pid != os.getpid():
                self._intake = _intake.Intake(self.path)  # a forked child gets a file of its own
                self._moved = 0
            return self._intake

    def move_intake(self) -> int:
        """Move metric points from this process's intake into SQLite (one commit); the number moved."""
        intake = self._intake
        if intake is None or intake.pid != os.getpid() or intake.size == self._moved:
            return 0
        with self._move_lock:
            data, end = intake.read(self._moved)
            points, used, skipped = _intake.scan(data)
            if skipped or used < len(data):
                # Every byte up to `end` was a whole append: anything unreadable here is damage, not a write
                # in progress. Step over it; the records after it are kept.
                log.error("journal intake %s is damaged: %d bytes at offset %d could not be read and were "
                          "skipped; %d points around them were kept", intake.path, skipped + len(data) - used,
                          self._moved, len(points))
            used = len(data)
            if used:
                self._insert_points(points, intake.name, self._moved + used)
            self._moved += used
            if intake.rotate_if(self._moved):
                with self.db() as conn:
                    conn.execute("update intake set moved=0 where name=?", (intake.name,))
                self._moved = 0
            return len(points)

    def _insert_points(self, points: list, intake_name: str, moved: int | None) -> None:
        now = time.time()
        with self.db() as conn:
            conn.executemany(_INSERT_METRIC, [(run, key, _encode_value(value), ts, step, now)
                                              for run, key, value, ts, step in points])
            if moved is None:
                conn.execute("delete from intake where name=?", (intake_name,))
            else:
                conn.execute("insert or replace into intake(name, moved) values(?,?)", (intake_name, moved))

    def adopt_orphans(self) -> int:
        """Replay intake files that ended processes left behind (killed, or exited before delivery)."""
        adopted = 0
        own = self._intake.name if self._intake is not None else None
        for path, fd in _intake.orphans(self.path, own):
            try:
                with self.db(write=False) as conn:
                    row = conn.execute("select moved from intake where name=?", (path.name,)).fetchone()
                data = path.read_bytes()
                moved = row[0] if row and row[0] <= len(data) else 0  # > size: it was emptied after moving
                points, used, skipped = _intake.scan(data[moved:])
                self._insert_points(points, path.name, None)
                if skipped:
                    log.error("journal intake %s is damaged: %d bytes in its middle could not be read and were "
                              "skipped; the records after them were kept", path.name, skipped)
                if moved + used < len(data):
                    log.warning("journal intake %s: %d bytes at its end are not a whole record (cut by a crash "
                                "of the machine?) and were dropped", path.name, len(data) - moved - used)
                path.unlink(missing_ok=True)
                adopted += len(points)
            finally:
                os.close(fd)
        return adopted

    def append(self, run: str, kind: str, body: dict, *, key: str | None = None) -> None:
        """Journal any other operation, its arguments as JSON."""
        text = json.dumps(body, separators=(",", ":"))
        self._reserve(len(text) + _ROW_OVERHEAD)
        self.move_intake()  # in call order: points logged before this call get their journal order first
        with self.db() as conn:
            conn.execute("insert into ops(run, kind, key, body, created, epoch) values(?,?,?,?,?,?)",
                         (run, kind, key, text, time.time(), self.epoch))

    def add_experiment(self, name: str, tags: dict[str, str], artifact_location: str | None = None) -> str:
        """Record an experiment created offline and journal its get-or-create; returns the local id."""
        local_id = "bridge-" + uuid.uuid4().hex[:16]
        spec = {"name": name, "tags": tags}
        if artifact_location:
            spec["artifact_location"] = artifact_location
        body = json.dumps(spec, separators=(",", ":"))
        self._reserve(len(body) + 2 * _ROW_OVERHEAD)
        with self.db() as conn:
            conn.execute("insert into experiments(local_id, name, created) values(?,?,?)",
                         (local_id, name, time.time()))
            conn.execute("insert into ops(run, kind, key, body, created, epoch) values('',?,?,?,?,?)",
                         (CREATE_EXPERIMENT, local_id, body, time.time(), self.epoch))
        return local_id

    def add_run(self, *, experiment_id: str, user_id: str | None, start_time: int, name: str | None,
                tags: dict[str, str]) -> str:
        """Record a run created here and journal its creation; returns the local run id (the run key)."""
        local_id = uuid.uuid4().hex
        body = json.dumps({"tags": tags}, separators=(",", ":"))
        self._reserve(len(body) + 2 * _ROW_OVERHEAD)
        now = time.time()
        with self.db() as conn:
            conn.execute("insert into runs(local_id, experiment_id, name, user_id, start_time, owner_pid, owner_host, "
                         "created) values(?,?,?,?,?,?,?,?)",
                         (local_id, experiment_id, name, user_id, start_time, os.getpid(), _HOST, now))
            conn.execute("insert into ops(run, kind, body, created, epoch) values(?,?,?,?,?)",
                         (local_id, CREATE_RUN, body, now, self.epoch))
        return local_id

    def update_run(self, run: str, *, status: str | None, end_time: int | None, name: str | None) -> None:
        body = {"status": status, "end_time": end_time, "run_name": name}
        text = json.dumps(body, separators=(",", ":"))
        self._reserve(len(text) + _ROW_OVERHEAD)
        self.move_intake()  # an end status must never reach the server before the run's last points
        with self.db() as conn:
            conn.execute("update runs set status=coalesce(?, status), end_time=coalesce(?, end_time), "
                         "name=coalesce(?, name) where local_id=?", (status, end_time, name, run))
            conn.execute("insert into ops(run, kind, body, created, epoch) values(?,?,?,?,?)",
                         (run, UPDATE_RUN, text, time.time(), self.epoch))

    def spool_artifact(self, run: str, source: Path, artifact_path: str) -> dict:
        """Copy `source` into the spool now (hashing as it goes) and journal its upload."""
        size = source.stat().st_size
        self._reserve(size + _ROW_OVERHEAD)
        try:
            with self.spool.copy_in(source) as copied:
                body = {"spool": copied.name, "path": artifact_path, "size": copied.size, "sha256": copied.sha256}
                self.append(run, ARTIFACT, body, key=artifact_path)
        except BaseException:
            self._used_bytes -= size + _ROW_OVERHEAD
            raise
        return body

    def sweep_spool(self) -> int:
        """Delete spooled files no undelivered row refers to."""
        return self.spool.sweep(self._spool_names(), self._spool_referenced)

    def _spool_names(self) -> set[str]:
        """Spool files that undelivered rows refer to."""
        with self.db(write=False) as conn:
            rows = conn.execute(f"select body from ops where kind=? and {_IS_UNDELIVERED}", (ARTIFACT,)).fetchall()
        return {json.loads(body).get("spool") for (body,) in rows if body}

    def _spool_referenced(self, name: str) -> bool:
        with self.db(write=False) as conn:
            rows = conn.execute(f"select body from ops where kind=? and {_IS_UNDELIVERED} and body like ?",
                                (ARTIFACT, f'%"{name}"%')).fetchall()
        return any(json.loads(body).get("spool") == name for (body,) in rows)

    # -------------------------------------------------------------------------- lookups (both sides)

    def experiment_by_name(self, name: str) -> ExperimentRecord | None:
        with self.db(write=False) as conn:
            row = conn.execute("select local_id, name, remote_id from experiments where name=?", (name,)).fetchone()
        return ExperimentRecord(*row) if row else None

    def experiment(self, local_id: str) -> ExperimentRecord | None:
        with self.db(write=False) as conn:
            row = conn.execute("select local_id, name, remote_id from experiments where local_id=?",
                               (local_id,)).fetchone()
        return ExperimentRecord(*row) if row else None

    def experiment_for_remote(self, remote_id: str) -> ExperimentRecord | None:
        with self.db(write=False) as conn:
            row = conn.execute("select local_id, name, remote_id from experiments where remote_id=?",
                               (remote_id,)).fetchone()
        return ExperimentRecord(*row) if row else None

    def run(self, local_id: str) -> RunRecord | None:
        with self.db(write=False) as conn:
            row = conn.execute("select local_id, remote_id, experiment_id, name, user_id, start_time, end_time, "
                               "status, artifact_uri from runs where local_id=?", (local_id,)).fetchone()
        return RunRecord(*row) if row else None

    def run_for_remote(self, remote_id: str) -> RunRecord | None:
        with self.db(write=False) as conn:
            row = conn.execute("select local_id, remote_id, experiment_id, name, user_id, start_time, end_time, "
                               "status, artifact_uri from runs where remote_id=?", (remote_id,)).fetchone()
        return RunRecord(*row) if row else None

    # ------------------------------------------------------------- ids: local <-> server, in one place

    def server_experiment_id(self, experiment_id: str) -> str | None:
        """The server's id of `experiment_id`: its mapping when local (None until created there), else itself."""
        record = self.experiment(experiment_id)
        return experiment_id if record is None else record.remote_id

    def server_run(self, run_id: str) -> tuple[str | None, str | None]:
        """(server run id, server artifact root) of `run_id`; a run not created here is the server's own.

        A logged model created here answers too: its artifacts are journaled under its local id (models.py).
        """
        record = self.run(run_id)
        if record is None and run_id.startswith("m-"):
            model = self.entity(LOGGED_MODEL, run_id)
            if model is not None:
                return model.remote_id, model.location
        return (run_id, None) if record is None else (record.remote_id, record.artifact_uri)

    def local_experiment_id(self, server_id: str) -> str:
        """The id this process knows a server experiment by: the local id it was created under, else the server's."""
        record = self.experiment_for_remote(server_id)
        return server_id if record is None else record.local_id

    def local_run_id(self, server_id: str) -> str:
        record = self.run_for_remote(server_id)
        return server_id if record is None else record.local_id

    def runs_of_live_processes(self) -> set[str]:
        """RUNNING runs created by other processes of this machine that are still alive (DataLoader workers,
        DDP children): whoever delivers this journal keeps them beating."""
        with self.db(write=False) as conn:
            rows = conn.execute("select local_id, owner_pid from runs where status='RUNNING' and owner_host=? "
                                "and owner_pid is not null and owner_pid != ?", (_HOST, os.getpid())).fetchall()
        return {run for run, pid in rows if _process_alive(pid)}

    def run_created_at(self, local_id: str) -> float | None:
        """When the run was journaled (seconds since the epoch)."""
        with self.db(write=False) as conn:
            row = conn.execute("select created from runs where local_id=?", (local_id,)).fetchone()
        return row[0] if row else None

    def runs(self) -> list[RunRecord]:
        with self.db(write=False) as conn:
            rows = conn.execute("select local_id, remote_id, experiment_id, name, user_id, start_time, end_time, "
                                "status, artifact_uri from runs order by created").fetchall()
        return [RunRecord(*row) for row in rows]

    # ------------------------------------------- logged models and model versions (models.py, registry.py)

    def add_entity(self, kind: str, local_id: str, body: dict, *, op: tuple[str, str, dict]) -> None:
        """Record an entity created here and journal its creation `op` (run key, op kind, op body) in one commit."""
        text, op_text = json.dumps(body, separators=(",", ":")), json.dumps(op[2], separators=(",", ":"))
        self._reserve(len(text) + len(op_text) + 2 * _ROW_OVERHEAD)
        self.move_intake()
        now = time.time()
        with self.db() as conn:
            conn.execute("insert into entities(kind, local_id, body, created) values(?,?,?,?)",
                         (kind, local_id, text, now))
            conn.execute("insert into ops(run, kind, body, created, epoch) values(?,?,?,?,?)",
                         (op[0], op[1], op_text, now, self.epoch))

    def entity(self, kind: str, local_id: str) -> EntityRecord | None:
        with self.db(write=False) as conn:
            row = conn.execute("select local_id, remote_id, location, body from entities where kind=? and local_id=?",
                               (kind, local_id)).fetchone()
        return EntityRecord(*row) if row else None

    def entity_for_remote(self, kind: str, remote_id: str) -> EntityRecord | None:
        with self.db(write=False) as conn:
            row = conn.execute("select local_id, remote_id, location, body from entities where kind=? and remote_id=?",
                               (kind, remote_id)).fetchone()
        return EntityRecord(*row) if row else None

    def entities(self, kind: str) -> list[EntityRecord]:
        with self.db(write=False) as conn:
            rows = conn.execute("select local_id, remote_id, location, body from entities where kind=? order by created",
                                (kind,)).fetchall()
        return [EntityRecord(*row) for row in rows]

    def update_entity(self, kind: str, local_id: str, body: dict) -> None:
        with self.db() as conn:
            conn.execute("update entities set body=? where kind=? and local_id=?",
                         (json.dumps(body, separators=(",", ":")), kind, local_id))

    def map_entity(self, kind: str, local_id: str, remote_id: str, location: str | None = None) -> None:
        with self.db() as conn:
            conn.execute("update entities set remote_id=?, location=coalesce(?, location) where kind=? and local_id=?",
                         (remote_id, location, kind, local_id))

    def epoch_uid(self, epoch: int | None) -> str | None:
        """The lineage uid of rows written with `epoch` (Op.epoch); None when unknown (a repaired journal)."""
        if epoch is None:
            return None
        if epoch not in self._epoch_uids:
            with self.db(write=False) as conn:
                row = conn.execute("select uid from lineage where n=?", (epoch,)).fetchone()
            self._epoch_uids[epoch] = row[0] if row else None
        return self._epoch_uids[epoch]

    def update_body(self, op_id: int, body: dict) -> None:
        """Keep how far a long op got (models.py's step copy), so a try after a failure carries on from there."""
        with self.db() as conn:
            conn.execute("update ops set body=? where id=?", (json.dumps(body, separators=(",", ":")), op_id))

    def requeue(self, op_id: int) -> None:
        """Move an op to the end of the journal, pending: it waits for something journaled after it."""
        with self.db() as conn:
            # Past every id ever used (the table's AUTOINCREMENT sequence), not only the live ones.
            conn.execute(f"update ops set id=(select max(coalesce(max(id), 0), coalesce((select seq from "
                         f"sqlite_sequence where name='ops'), 0)) + 1 from ops), {_IS_PENDING} where id=?", (op_id,))

    def undelivered(self, run: str, kinds: tuple[str, ...]) -> list[Op]:
        """Ops of `run` not yet delivered (pending or in-flight), oldest first."""
        self.move_intake()
        marks = ",".join("?" * len(kinds))
        with self.db(write=False) as conn:
            rows = conn.execute(f"select id, run, kind, key, value, ts, step, body, attempts, epoch from ops "
                                f"where run=? and {_IS_UNDELIVERED} and kind in ({marks}) order by id",
                                (run, *kinds)).fetchall()
        return [Op(*row) for row in rows]

    def undelivered_naming(self, kind: str, text: str) -> list[Op]:
        """Undelivered ops of `kind`, of any run, whose body holds `text` as a JSON string, oldest first."""
        self.move_intake()
        with self.db(write=False) as conn:
            rows = conn.execute(f"select id, run, kind, key, value, ts, step, body, attempts, epoch from ops where "
                                f"kind=? and {_IS_UNDELIVERED} and body like ? order by id",
                                (kind, f'%{json.dumps(text)}%')).fetchall()
        return [Op(*row) for row in rows]

    # ------------------------------------------------------------------------------ sender side

    def reset_in_flight(self) -> int:
        """Return in-flight rows to pending: a sender starting now cannot know whether they arrived."""
        with self.db() as conn:
            # Counted as an attempt: the server may have applied them, which the next try must check.
            return conn.execute(f"update ops set {_IS_PENDING}, attempts=attempts+1 where {_IS_IN_FLIGHT}").rowcount

    def last_id(self) -> int:
        with self.db(write=False) as conn:
            return conn.execute("select coalesce(max(id), 0) from ops").fetchone()[0]

    def runs_with_undelivered(self, kinds: tuple[str, ...]) -> set[str]:
        """Runs with rows of these kinds not delivered yet."""
        self.move_intake()
        with self.db(write=False) as conn:
            rows = conn.execute(f"select distinct run from ops where {_IS_UNDELIVERED} and kind in "
                                f"({','.join('?' * len(kinds))})", kinds).fetchall()
        return {row[0] for row in rows}

    def runs_with_pending(self) -> list[str]:
        with self.db(write=False) as conn:
            rows = conn.execute(f"select run, min(id) m from ops where {_IS_PENDING} group by run "
                                "order by run != '', m").fetchall()
        return [r[0] for r in rows]

    def pending_ops(self, run: str, limit: int, upto: int | None = None) -> list[Op]:
        """Pending ops of `run`, oldest first, with ids up to `upto` (the end of a delivery round)."""
        with self.db(write=False) as conn:
            rows = conn.execute("select id, run, kind, key, value, ts, step, body, attempts, epoch from ops "
                                f"where {_IS_PENDING} and run=? and id<=? order by id limit ?",
                                (run, upto if upto is not None else 2**62, limit)).fetchall()
        return [Op(*row) for row in rows]

    def superseded(self, op: Op) -> bool:
        """Whether a later, still undelivered upload to the same run and artifact path makes `op`'s pointless.

        MLflow keeps only the last file at a path, so after an outage a file refreshed every 30 s (console.log)
        goes up once, not once per refresh. The later copy must still be on disk to count.
        """
        if op.kind != ARTIFACT:
            return False
        with self.db(write=False) as conn:
            rows = conn.execute(f"select body from ops where id>? and run=? and kind=? and key=? and {_IS_UNDELIVERED}",
                                (op.id, op.run, ARTIFACT, op.key)).fetchall()
        return any(self.spool.path(json.loads(body)["spool"]).is_file() for (body,) in rows)

    def claim(self, ids: list[int]) -> bool:
        """Mark `ids` in-flight, all or nothing: False when another sender took any of them."""
        try:
            with self.db() as conn:
                changed = 0
                for chunk in _chunks(ids, 500):
                    marks = ",".join("?" * len(chunk))
                    changed += conn.execute(f"update ops set {_IS_IN_FLIGHT} where {_IS_PENDING} and id in ({marks})",
                                            chunk).rowcount
                if changed != len(ids):
                    raise _ClaimLost()
        except _ClaimLost:
            return False
        return True

    def complete(self, ids: list[int], *, spool: list[str] = ()) -> None:
        """The server has these: forget them (done), and their spooled files."""
        with self.db() as conn:
            for chunk in _chunks(ids, 500):
                conn.execute(f"delete from ops where id in ({','.join('?' * len(chunk))})", chunk)
            _count_settled(conn)
        for name in spool:
            self.spool.discard(name)

    def settled(self) -> int:
        """A counter that moves whenever rows leave the undelivered set (see the `settled` table)."""
        with self.db(write=False) as conn:
            row = conn.execute("select n from settled").fetchone()
        return row[0] if row else 0

    # ------------------------------------------------------------------------ delivery marks (marks.py)

    def owe_marks(self, done: dict[tuple[str, str], int]) -> None:
        """Rows up to these ids, per (scope, lineage uid), were delivered or set aside: their marks are owed."""
        with self.db() as conn:
            conn.executemany("insert into owed_marks(scope, uid, done) values(?,?,?) on conflict(scope, uid) "
                             "do update set done=max(done, excluded.done)",
                             [(scope, uid, n) for (scope, uid), n in done.items()])

    def owed_marks(self, scope: str | None = None) -> dict[str, dict[str, int]]:
        """{scope: {uid: mark}}: what may be sent now — each owed mark kept below the first row of its scope and
        lineage that is not done yet (a batch split by a pause can deliver rows past one still waiting)."""
        with self.db(write=False) as conn:
            rows = conn.execute("select scope, uid, done from owed_marks" + (" where scope=?" if scope else ""),
                                (scope,) if scope else ()).fetchall()
            result: dict[str, dict[str, int]] = {}
            for owner, uid, done in rows:
                kind, _, local_id = owner.partition(":")
                if kind == "run":
                    where, args = "run=? and kind in ({})".format(",".join("?" * len(MARKED_RUN_KINDS))), \
                        (local_id, *sorted(MARKED_RUN_KINDS))
                else:
                    where, args = ("run='' and kind in ({}) and json_extract(body, '$.experiment_id')=?".format(
                        ",".join("?" * len(MARKED_EXPERIMENT_KINDS))), (*sorted(MARKED_EXPERIMENT_KINDS), local_id))
                (first,) = conn.execute(f"select min(id) from ops where {_IS_UNDELIVERED} and {where} and "
                                        "epoch in (select n from lineage where uid=?)", (*args, uid)).fetchone()
                mark = done if first is None else min(done, first - 1)
                if mark > 0:
                    result.setdefault(owner, {})[uid] = mark
        return result

    def marks_sent(self, scope: str, marks: dict[str, int]) -> None:
        """The server holds these marks of `scope`: what they cover is owed no more."""
        with self.db() as conn:
            conn.executemany("delete from owed_marks where scope=? and uid=? and done<=?",
                             [(scope, uid, n) for uid, n in marks.items()])

    def drop_owed_marks(self, scope: str) -> None:
        with self.db() as conn:
            conn.execute("delete from owed_marks where scope=?", (scope,))

    # ------------------------------------------------------------- late creates (operations.remove_twins)

    def twin_watches(self) -> dict[str, float]:
        """{local run id: when its watch may end (time.time())}."""
        with self.db(write=False) as conn:
            return dict(conn.execute("select run, due from twin_watch").fetchall())

    def unwatch_twins(self, run: str) -> None:
        with self.db() as conn:
            conn.execute("delete from twin_watch where run=?", (run,))

    def release(self, ids: list[int]) -> None:
        """Not delivered this time: back to pending, one more attempt counted."""
        with self.db() as conn:
            for chunk in _chunks(ids, 500):
                conn.execute(f"update ops set {_IS_PENDING}, attempts=attempts+1 "
                             f"where {_IS_IN_FLIGHT} and id in ({','.join('?' * len(chunk))})", chunk)

    def bury(self, ids: list[int], error: str, *, reason: str) -> None:
        """The server refused this entry for good: keep it as a dead letter with the server's message.

        A dead artifact's spooled copy is deleted: nothing will upload it, and it counts against the limit.
        """
        spool = []
        with self.db() as conn:
            for chunk in _chunks(ids, 500):
                rows = conn.execute(f"select body from ops where kind=? and id in ({','.join('?' * len(chunk))})",
                                    (ARTIFACT, *chunk)).fetchall()
                spool.extend(json.loads(body).get("spool") for (body,) in rows if body)
            conn.executemany(f"update ops set {_IS_DEAD}, error=?, reason=? where id=?",
                             [(error[:2000], reason, i) for i in ids])
            _count_settled(conn)
        for name in spool:
            if name:
                self.spool.discard(name)

    def map_experiment(self, local_id: str, remote_id: str) -> None:
        with self.db() as conn:
            conn.execute("update experiments set remote_id=? where local_id=?", (remote_id, local_id))

    def map_run(self, local_id: str, remote_id: str, artifact_uri: str | None, *,
                watch_twins_until: float | None = None) -> None:
        """`local_id` is `remote_id` on the server; with `watch_twins_until`, in the same transaction, a late
        try of its create may still land (twin_watch)."""
        with self.db() as conn:
            conn.execute("update runs set remote_id=?, artifact_uri=? where local_id=?",
                         (remote_id, artifact_uri, local_id))
            if watch_twins_until is not None:
                conn.execute("insert into twin_watch(run, due) values(?,?) on conflict(run) do update set "
                             "due=max(due, excluded.due)", (local_id, watch_twins_until))

    def backlog(self) -> Backlog:
        self.move_intake()
        with self.db(write=False) as conn:
            rows = conn.execute("select run, state, count(*) from ops group by run, state").fetchall()
            oldest = conn.execute(f"select min(created) from ops where {_IS_UNDELIVERED}").fetchone()[0]
        result = Backlog(oldest_created=oldest)
        for run, state, count in rows:
            bucket = result.dead if state == DEAD else result.pending
            bucket[run] = bucket.get(run, 0) + count
        return result

    def retry_dead(self, ids: list[int] | None = None) -> int:
        """Dead letters (all, or `ids`) back to pending with their tries reset; how many."""
        where, args = _ids_clause(ids)
        with self.db() as conn:
            # Its lineage's mark may already be past it (a dead letter counts as done for the marks, marks.py):
            # without one it is sent, never taken for a row a copy delivered.
            return conn.execute(f"update ops set {_IS_PENDING}, attempts=0, error=null, reason=null, epoch=null "
                                f"where {_IS_DEAD}{where}", args).rowcount

    def drop_dead(self, ids: list[int] | None = None) -> int:
        """Delete dead letters (all, or `ids`) for good; how many."""
        where, args = _ids_clause(ids)
        with self.db() as conn:
            return conn.execute(f"delete from ops where {_IS_DEAD}{where}", args).rowcount

    def dead_letters(self) -> list[DeadLetter]:
        with self.db(write=False) as conn:
            rows = conn.execute("select id, run, kind, key, value, ts, step, body, attempts, error, reason from ops "
                                f"where {_IS_DEAD} order by id").fetchall()
        return [DeadLetter(Op(*row[:9]), row[9], row[10]) for row in rows]


_HOST = socket.gethostname()


def _count_settled(conn: sqlite3.Connection) -> None:
    conn.execute("insert into settled(id, n) values(0, 1) on conflict(id) do update set n = n + 1")


def _ids_clause(ids: list[int] | None) -> tuple[str, list[int]]:
    if ids is None:
        return "", []
    return f" and id in ({','.join('?' * len(ids))})", list(ids)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a journal written by an older bridge up to this schema (columns added since)."""
    (ops_sql,) = conn.execute("select sql from sqlite_master where type='table' and name='ops'").fetchone()
    if "autoincrement" not in ops_sql.lower():
        # Row ids used to restart at 1 once every row was delivered; the delivery marks (marks.py) need them
        # never reused. Rebuilt once, in the transaction of the journal's opening (a copy of what it holds).
        log.info("bridge: updating the journal's table of entries to this version (once; %d entries)",
                 conn.execute("select count(*) from ops").fetchone()[0])
        columns = ",".join(r[1] for r in conn.execute("pragma table_info(ops)"))
        conn.execute("alter table ops rename to ops_before_autoincrement")
        conn.execute(_SCHEMA[0])
        conn.execute(f"insert into ops({columns}) select {columns} from ops_before_autoincrement")
        conn.execute("drop table ops_before_autoincrement")
    columns = {row[1] for row in conn.execute("pragma table_info(ops)")}
    for column, kind in (("reason", "text"), ("epoch", "integer")):
        if column not in columns:
            conn.execute(f"alter table ops add column {column} {kind}")
    columns = {row[1] for row in conn.execute("pragma table_info(runs)")}
    for column, kind in (("owner_pid", "integer"), ("owner_host", "text")):
        if column not in columns:
            conn.execute(f"alter table runs add column {column} {kind}")


class _ClaimLost(Exception):
    """Another sender claimed rows first (rolled back by db())."""


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _salvage_table(old: sqlite3.Connection, fresh: sqlite3.Connection, table: str) -> tuple[int, int, bool]:
    """Copy readable rows of `table`; returns (copied, known lost, whether the lost count is exact)."""
    try:
        columns = [r[1] for r in old.execute(f"pragma table_info({table})").fetchall()]
        if not columns:
            return 0, 0, False
        top = old.execute(f"select max(rowid) from {table}").fetchone()[0] or 0
    except sqlite3.DatabaseError:
        return 0, 0, False
    names = ",".join(columns)
    marks = ",".join("?" * len(columns))
    copied = lost = 0
    exact = True
    rowid = 0
    while rowid < top:
        try:
            rows = old.execute(f"select rowid, {names} from {table} where rowid > ? order by rowid limit 256",
                               (rowid,)).fetchall()
        except sqlite3.DatabaseError:
            rows = None
        if rows is None:
            # A damaged page: step over it one row id at a time.
            rowid += 1
            try:
                row = old.execute(f"select {names} from {table} where rowid=?", (rowid,)).fetchone()
            except sqlite3.DatabaseError:
                lost += 1
                exact = False
                continue
            if row is not None:
                fresh.execute(f"insert or ignore into {table}({names}) values({marks})", row)
                copied += 1
            continue
        if not rows:
            break
        for row in rows:
            fresh.execute(f"insert or ignore into {table}({names}) values({marks})", row[1:])
            copied += 1
        rowid = rows[-1][0]
    return copied, lost, exact
