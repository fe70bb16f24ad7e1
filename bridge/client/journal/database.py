"""The journal's SQLite file: one connection per thread, every transaction through `db()`, the schema, and the
integrity check and repair at opening (huey's storage is the model: pragmas in one place, one transaction helper).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

from bridge.client import forksafe
from bridge.client.journal import integrity
from bridge.client.journal.records import RepairReport, entry_crc
from bridge.errors import JournalCorruptError, JournalError, JournalFullError

log = logging.getLogger(__name__)

_BUSY_TIMEOUT_MS = 30_000

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
        epoch integer,                -- lineage.n of the Journal that wrote it (not for metric points)
        crc integer)                  -- records.entry_crc of what the row says: a repair keeps only whole rows""",
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
    # Rows deleted from ops (delivered, replaced, dropped). With it every id up to ops' counter is accounted for,
    # so a view that lacks rows nobody deleted shows (integrity.py: a database copied before its WAL's generation).
    """create table if not exists ops_deleted (
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
    # Resumable uploads under way (journal/uploads.py): the server's address of each and the bytes it confirmed.
    """create table if not exists uploads (
        op integer primary key,       -- the artifact row (ops.id) this upload delivers
        size integer not null,
        part integer not null,        -- bytes per request now
        location text,                -- the upload's path on the server, once begun there
        confirmed integer not null default 0,
        error text,                   -- why the last try failed
        tries integer not null default 0,
        next_try real,
        timeouts integer not null default 0,  -- parts in a row that timed out at the smallest part size
        damaged integer not null default 0,   -- times the whole file arrived with another sha256
        updated real not null)""",
    # Why a delivery lane waits (journal/uploads.py), for `bridge queue` in another process.
    """create table if not exists lane_waits (
        lane text primary key,
        error text not null,
        attempts integer not null,
        next_try real,
        since real not null)""",
    """create table if not exists entities (
        kind text not null,           -- LOGGED_MODEL or MODEL_VERSION
        local_id text not null,       -- the id MLflow was given here
        remote_id text,               -- the server's id, once created there
        location text,                -- the server's artifact location (logged models)
        body text not null,           -- what is known here (JSON), for reads while offline
        created real not null,
        primary key (kind, local_id))""",
    # What opening a damaged journal did (records.RepairReport), kept until a sync or connect() said it on the
    # terminal: the open that repairs is often not the one a person watches (`bridge sync` reads the queue first).
    """create table if not exists repairs (
        id integer primary key,
        at real not null,
        text text not null,
        reported integer not null default 0)""",
)


class Database:
    """The SQLite file at `path`, checked (and repaired unless `repair` is False) and brought to this schema."""

    def __init__(self, path: Path, *, repair: bool = True, on_full: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.on_full = on_full  # told when a write finds the disk full (room.Room.met_full), before it raises
        self.repair_report: RepairReport | None = None
        self._local = threading.local()
        # (pid, thread, connection) for every connection opened; those of ended threads are closed.
        self._connections: list[tuple[int, weakref.ref, sqlite3.Connection]] = []
        self._lock = threading.Lock()
        self.writes = 0  # write transactions committed by this process
        forksafe.renew_after_fork(self)
        verdict = integrity.check(self.path)
        try:
            if verdict.state in (integrity.STALE_WAL, integrity.DAMAGED_WAL, integrity.DAMAGED):
                if not repair:
                    raise JournalCorruptError(f"journal {self.path} is damaged: {verdict.problem}")
                if verdict.state == integrity.DAMAGED:
                    self.repair_report = self._repair(verdict)
                else:
                    self.repair_report = self._set_wal_aside(verdict)
                log.warning("%s", self.repair_report)
        finally:
            verdict.cleanup()
        with self.db() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            _migrate(conn)
            # A journal from before the count (or a repaired one): what is missing now is counted as deleted.
            conn.execute(
                "insert or ignore into ops_deleted(id, n) select 0, coalesce((select seq from sqlite_sequence "
                "where name='ops'), 0) - (select count(*) from ops)"
            )
            if self.repair_report is not None:
                conn.execute("insert into repairs(at, text) values(?,?)", (time.time(), str(self.repair_report)))

    def repairs(self, *, take: bool = False) -> list[str]:
        """What repairs of this journal were not yet said on the terminal; `take` marks them said."""
        with self.db(write=take) as conn:
            rows = conn.execute("select id, text from repairs where reported=0 order by id").fetchall()
            if take and rows:
                conn.execute(
                    f"update repairs set reported=1 where id in ({','.join('?' * len(rows))})", [r[0] for r in rows]
                )
        return [text for _, text in rows]

    def _create_connection(self) -> sqlite3.Connection:
        """Open a connection with every pragma bridge relies on; one per thread."""
        conn = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_MS / 1000
        )
        conn.execute(f"pragma busy_timeout={_BUSY_TIMEOUT_MS}")
        _set_wal(conn)
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
        try:
            conn = self._connection()
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
                self.writes += 1
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower():
                if self.on_full is not None:
                    self.on_full(str(exc))
                raise JournalFullError(f"the disk holding {self.path} is full: {exc}") from None
            if "malformed" in str(exc) or "not a database" in str(exc):
                raise JournalCorruptError(f"journal {self.path} is damaged: {exc}") from None
            raise JournalError(f"journal {self.path}: {exc}") from None

    def checkpoint(self) -> None:
        """Copy what it can of the WAL into the main file (SQLite fsyncs both as it does)."""
        with contextlib.suppress(sqlite3.Error):
            self._connection().execute("pragma wal_checkpoint(PASSIVE)")

    def _set_wal_aside(self, verdict: integrity.Verdict) -> RepairReport:
        """Rename the WAL (and its index) aside, unapplied: the database file alone is the journal."""
        stamp = int(time.time())
        wal = integrity.wal_path(self.path)
        kept = integrity.set_aside(wal, "set-aside", stamp)
        shm = Path(str(self.path) + "-shm")
        if shm.exists():
            os.replace(shm, Path(str(kept) + "-shm"))
        return RepairReport(kept, verdict.problem or "its WAL", 0, None, wal_only=True)

    def _repair(self, verdict: integrity.Verdict) -> RepairReport:
        """Move the damaged files aside and copy every row that can still be read (from the check's private copy)
        into a fresh journal, with the counters and intake offsets it had."""
        problem = verdict.problem or "damaged"
        damaged = integrity.set_aside(self.path, "damaged")
        for suffix in ("-wal", "-shm"):
            side = Path(str(self.path) + suffix)
            if side.exists():
                os.replace(side, Path(str(damaged) + suffix))
        source = verdict.copy if verdict.copy is not None else damaged
        recovered, lost, known = 0, 0, True
        fresh = sqlite3.connect(str(self.path), isolation_level=None)
        try:
            for statement in _SCHEMA:
                fresh.execute(statement)
            try:
                old = sqlite3.connect(f"file:{source}?mode=ro", uri=True, isolation_level=None)
            except sqlite3.DatabaseError:
                return RepairReport(damaged, problem, 0, None)
            try:
                fresh.execute("begin")
                # Bookkeeping, not counted. The intake offsets keep points already moved from being journaled
                # twice when the intake files are adopted.
                for table in ("lineage", "owed_marks", "twin_watch", "uploads", "intake", "settled"):
                    _salvage_table(old, fresh, table)
                for table in ("experiments", "runs", "entities", "ops"):
                    got, missing, exact = _salvage_table(old, fresh, table)
                    recovered += got
                    lost += missing
                    known = known and exact
                _keep_counters(old, fresh)
                fresh.execute("commit")
            finally:
                old.close()
        finally:
            fresh.close()
        return RepairReport(damaged, problem, recovered, lost if known else None)

    def fsync_wal(self) -> None:
        """fsync the WAL file: a PASSIVE checkpoint syncs only the frames it could copy."""
        try:
            fd = os.open(str(self.path) + "-wal", os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def live_bytes(self) -> int:
        """Bytes of live database pages."""
        with self.db(write=False) as conn:
            page_size = conn.execute("pragma page_size").fetchone()[0]
            pages = conn.execute("pragma page_count").fetchone()[0]
            free = conn.execute("pragma freelist_count").fetchone()[0]
        return (pages - free) * page_size

    def close(self) -> None:
        """Close this process's connections (a forked child's inherited ones are the parent's to close)."""
        with self._lock:
            connections, self._connections = self._connections, []
        for owner_pid, _, conn in connections:
            if owner_pid == os.getpid():
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        self._local = threading.local()

    def _after_fork_in_child(self) -> None:
        # The parent's journal-sync thread may have held it at fork(); the child starts with its own.
        self._lock = threading.Lock()


def _set_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, waiting out other processes doing the same on a new file.

    Switching needs an exclusive lock, and SQLite answers "database is locked" at once, without its busy
    handler, to all but one of several processes that ask together (four `connect()` on a new journal).
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("pragma journal_mode=wal")
            return
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def _is_busy(exc: sqlite3.DatabaseError) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a journal written by an older bridge up to this schema (columns added since)."""
    (ops_sql,) = conn.execute("select sql from sqlite_master where type='table' and name='ops'").fetchone()
    if "autoincrement" not in ops_sql.lower():
        # Row ids used to restart at 1 once every row was delivered; the delivery marks (marks.py) need them
        # never reused. Rebuilt once, in the transaction of the journal's opening (a copy of what it holds).
        log.info(
            "bridge: updating the journal's table of entries to this version (once; %d entries)",
            conn.execute("select count(*) from ops").fetchone()[0],
        )
        copied = ",".join(r[1] for r in conn.execute("pragma table_info(ops)"))
        conn.execute("alter table ops rename to ops_before_autoincrement")
        conn.execute(_SCHEMA[0])
        conn.execute(f"insert into ops({copied}) select {copied} from ops_before_autoincrement")
        conn.execute("drop table ops_before_autoincrement")
    columns = {row[1] for row in conn.execute("pragma table_info(ops)")}
    for column, kind in (("reason", "text"), ("epoch", "integer"), ("crc", "integer")):
        if column not in columns:
            conn.execute(f"alter table ops add column {column} {kind}")
    columns = {row[1] for row in conn.execute("pragma table_info(runs)")}
    for column, kind in (("owner_pid", "integer"), ("owner_host", "text")):
        if column not in columns:
            conn.execute(f"alter table runs add column {column} {kind}")


def _keep_counters(old: sqlite3.Connection, fresh: sqlite3.Connection) -> None:
    """Row ids are never reused (the delivery marks rely on it): the fresh file's counters start where the old
    file's stood, not at the highest row still in it."""
    try:
        counters = old.execute("select name, seq from sqlite_sequence").fetchall()
    except sqlite3.DatabaseError:
        counters = []
    for name, seq in counters:
        if fresh.execute("update sqlite_sequence set seq=max(seq, ?) where name=?", (seq, name)).rowcount == 0:
            fresh.execute("insert into sqlite_sequence(name, seq) values(?,?)", (name, seq))


#: Row ids a repair steps over one at a time after a read hits damage, before it strides.
_SALVAGE_STEPS = 4096


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
    whole = _whole_entry(columns) if table == "ops" else None

    def keep(row: tuple) -> None:
        nonlocal copied, lost
        if whole is not None and not whole(row):
            lost += 1  # a row the damaged page made up, or one it garbled: not copied
            return
        fresh.execute(f"insert or ignore into {table}({names}) values({marks})", row)
        copied += 1

    # A damaged page can make up a huge max(rowid): an autoincrement table's rows never pass its counter.
    with contextlib.suppress(sqlite3.DatabaseError):
        (seq,) = old.execute("select coalesce(max(seq), 0) from sqlite_sequence where name=?", (table,)).fetchone()
        if seq and 0 < int(seq) < top:
            top = int(seq)
    failures = 0  # reads in a row that hit damage
    while rowid < top:
        try:
            rows = old.execute(
                f"select rowid, {names} from {table} where rowid > ? order by rowid limit 256", (rowid,)
            ).fetchall()
        except sqlite3.DatabaseError:
            rows = None
        if rows:
            # A damaged tree can answer rows at or before where the walk stands (cells out of order, a page
            # pointing back): those make no progress, and taking the last one's id would walk in a circle.
            rows = [row for row in rows if row[0] > rowid] or None
        if rows is None:
            # A damaged page: step over it one row id at a time, then in growing strides (a made-up range of
            # row ids can be as wide as 2^63: stepping over it one by one would never end).
            failures += 1
            stride = 1 if failures <= _SALVAGE_STEPS else 1 << min(failures - _SALVAGE_STEPS, 62)
            rowid += stride
            exact = False if stride > 1 else exact
            try:
                row = old.execute(f"select {names} from {table} where rowid=?", (rowid,)).fetchone()
            except sqlite3.DatabaseError:
                lost += 1
                exact = False
                continue
            if row is not None:
                keep(row)
            continue
        failures = 0
        if not rows:
            break
        for row in rows:
            keep(row[1:])
        rowid = max(row[0] for row in rows)
    return copied, lost, exact


def _whole_entry(columns: list[str]):
    """A predicate over `ops` rows (in `columns` order): whether the row's checksum matches what it says. Rows
    written before entries carried one (crc null) are kept as they read."""
    if "crc" not in columns:
        return None
    at = [columns.index(c) for c in ("run", "kind", "key", "value", "ts", "step", "body")]
    crc = columns.index("crc")

    def whole(row: tuple) -> bool:
        if row[crc] is None:
            return True
        try:
            return entry_crc(*(row[i] for i in at)) == row[crc]
        except Exception:  # a value of a type no entry has
            return False

    return whole
