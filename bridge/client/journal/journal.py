"""The durable journal: every MLflow write of this process waits here, in SQLite, until the sender delivers it.

Durability policy (measured on this machine, see the tests and benchmarks):
  * Nothing a call has returned from is lost to a ``kill -9`` of the process — the loss window on a process
    crash is zero. Metric points are appended to the intake file with ``write()`` (≈2 µs, see intake.py);
    every other call commits its own small SQLite transaction (WAL, ``synchronous=NORMAL``, ≈10 µs) before
    returning. Either way the bytes are in the kernel's page cache when the call returns — not yet on disk.
  * An OS crash or power cut can lose what calls wrote since the last `sync()`: the sender's journal-sync
    thread (ClientOptions.durable_every_s, 1 s) moves the intake into SQLite and fsyncs the WAL, independently of
    delivery rounds, so that window is about a second plus the disk's own fsync time. The intake file
    itself is never fsynced. ``synchronous=FULL`` on every call would close it at ≈120 µs per call.

What the journal offers, by who uses it:
  * the calls (bridge/client/plugins/): the write methods of `Journal` — `append_batch`, `append`, `add_experiment`,
    `add_run`, `update_run`, `spool_artifact`, `add_entity`, `update_entity` — and the reads of `ids` and `queue`;
  * the sender (bridge/client/delivery/): `queue` (claim, complete, release, bury), `ids` (map the server's ids),
    `book` (lineage, owed marks, twin watches), `sync()` and `adopt_orphans()`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from bridge.client import forksafe
from bridge.client.journal import intake as _intake
from bridge.client.journal.bookkeeping import Bookkeeping
from bridge.client.journal.database import Database
from bridge.client.journal.ids import HOST, IdMaps, new_local_run_id
from bridge.client.journal.kinds import ARTIFACT, CREATE_EXPERIMENT, CREATE_RUN, PARAM, TAG, UPDATE_RUN
from bridge.client.journal.queue import OpQueue
from bridge.client.journal.records import RepairReport, encode_value, entry_crc
from bridge.client.journal.room import RESERVE_BYTES, Room
from bridge.client.journal.spool import Spool, SpoolProgress
from bridge.client.journal.uploads import UploadBook
from bridge.client.options import JOURNAL_LIMIT_ENV, SPOOL_LIMIT_ENV, ClientOptions
from bridge.errors import ExperimentExistsError, JournalError, JournalFullError

log = logging.getLogger(__name__)

#: Bytes a row costs beyond its payload (row header, index entry), for the cheap running size estimate.
_ROW_OVERHEAD = 64
_INSERT_METRIC = "insert into ops(run, kind, key, value, ts, step, created, crc) values(?,'metric',?,?,?,?,?,?)"
_INSERT_ENTRY = "insert into ops(run, kind, key, value, created, epoch, crc) values(?,?,?,?,?,?,?)"
_INSERT_BODY = "insert into ops(run, kind, key, body, created, epoch, crc) values(?,?,?,?,?,?,?)"


def _entry_row(run: str, kind: str, key: str, value: str, now: float, epoch: int) -> tuple:
    return run, kind, key, value, now, epoch, entry_crc(run, kind, key, value, None, None, None)


def _metric_row(run: str, key: str, value: float, ts: int, step: int, now: float) -> tuple:
    encoded = encode_value(value)
    return run, key, encoded, ts, step, now, entry_crc(run, "metric", key, encoded, ts, step, None)


def _body_row(run: str, kind: str, key: str | None, body: str, now: float, epoch: int) -> tuple:
    return run, kind, key, body, now, epoch, entry_crc(run, kind, key, None, None, None, body)


#: Intake moved into SQLite per commit (move_intake).
MOVE_CHUNK_BYTES = 1024 * 1024
#: The smallest: a full disk with no reserve left moves a few pages' worth at a time.
MOVE_CHUNK_MIN_BYTES = 4096


def journal_path(path: str | os.PathLike | None = None) -> Path:
    """The journal file: argument → BRIDGE_JOURNAL → the platform data folder (ClientOptions)."""
    return ClientOptions.from_env(journal=path or None).journal_path


def journal_limit(limit: int | None = None) -> int:
    """The size limit in bytes: argument → BRIDGE_JOURNAL_LIMIT → config.DEFAULT_JOURNAL_LIMIT_BYTES."""
    return ClientOptions.from_env(journal_limit=limit).journal_limit


class Journal:
    """The journal at `path`: its SQLite `database`, the `ids`, the op `queue`, the delivery `book`, and beside
    the file the intake of metric points and the `spool` of logged files."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        limit_bytes: int | None = None,
        spool_limit_bytes: int | None = None,
        repair: bool = True,
    ) -> None:
        self.path = journal_path(path)
        self.limit_bytes = journal_limit(limit_bytes)
        self.spool_limit_bytes = ClientOptions.from_env(spool_limit=spool_limit_bytes).spool_limit
        self.room = Room(self.path)
        # Run ends (run, status, end_time, name) a full disk kept out of SQLite: written by sync() once it can.
        self._held_ends: list[tuple[str, str | None, int | None, str | None]] = []
        self._synced_writes = 0  # write transactions the last sync() made durable (database.writes)
        self._move_lock = threading.Lock()
        self._held_lock = threading.RLock()
        forksafe.renew_after_fork(self)
        self._intake: _intake.Intake | None = None
        self._moved = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.spool = Spool(self.path.with_name(self.path.name + ".spool"))
        except OSError as exc:
            raise JournalError(f"cannot create the journal folder {self.path.parent}: {exc}") from None
        self.database = Database(self.path, repair=repair, on_full=self.room.met_full)
        self.ids = IdMaps(self.database)
        self.queue = OpQueue(self.database, self.spool, self.move_intake_if_room, self.unmoved)
        self.book = Bookkeeping(self.database)
        self.uploads = UploadBook(self.database)
        try:
            self.epoch = self.book.open_lineage()
        except JournalFullError:  # a full disk: the first try released the reserve (room.py), so `bridge sync`
            self.epoch = self.book.open_lineage()  # and the next connect() can still open and deliver
        try:
            self.adopt_orphans()
        except JournalFullError:
            pass  # adopted by the sender once delivering has freed pages (Sender: adopt_every_s)
        self.sweep_spool()
        self._used_bytes = self.measure_bytes()

    @property
    def repair_report(self) -> RepairReport | None:
        """What opening a damaged file did (None when it was whole)."""
        return self.database.repair_report

    # -------------------------------------------------------------------------------- durability

    def sync(self) -> None:
        """Make everything accepted so far survive an OS crash: intake into SQLite, then fsync the WAL.

        Also keeps the disk's reserve (room.py) and writes the run ends a full disk held back, once it can."""
        self.room.tend()
        self.move_intake_if_room()
        with contextlib.suppress(JournalFullError):  # kept, and tried again at the next sync
            self._write_held_ends()
        mark = self.database.writes
        if mark == self._synced_writes:
            return
        self.database.checkpoint()
        self.database.fsync_wal()
        self._synced_writes = mark

    def close(self) -> None:
        try:
            self._write_held_ends()
        except JournalError as exc:
            log.error(
                "bridge: %d run change(s) (run ends) could not be written to journal %s and are lost: %s; those "
                "runs stay RUNNING on the server until its reaper ends them",
                len(self._held_ends),
                self.path,
                exc,
            )
        intake = self._intake
        if intake is not None and intake.pid == os.getpid():
            with contextlib.suppress(JournalError, OSError):
                self.move_intake()
                if self._moved == intake.size:  # all of it is in SQLite: the file has no more purpose
                    with self.database.db() as conn:
                        conn.execute("delete from intake where name=?", (intake.name,))
                    intake.path.unlink(missing_ok=True)
            intake.close()
            self._intake = None
        self.database.close()

    def _after_fork_in_child(self) -> None:
        # The parent's journal-sync thread may have held these at fork(); the child starts with its own.
        self._move_lock = threading.Lock()
        self._held_lock = threading.RLock()
        self._held_ends = []  # the parent's to write
        self.spool._after_fork_in_child()

    # -------------------------------------------------------------------------------------- size

    def measure_bytes(self) -> int:
        """Bytes in use: live database pages plus the spooled artifact files."""
        self.move_intake_if_room()
        return self.database.live_bytes() + self.spool.bytes

    def _reserve(self, nbytes: int) -> None:
        if self.room.full and not self.room.tend():
            raise JournalFullError(self.room.message())
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

    def append_batch(
        self,
        run: str,
        metrics: Sequence[tuple[str, float, int, int]] = (),
        params: Sequence[tuple[str, str]] = (),
        tags: Sequence[tuple[str, str]] = (),
    ) -> None:
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
                    self.room.met_full(f"writing the intake {intake.path.name}")
                    raise JournalFullError(self.room.message()) from None
                raise JournalError(f"cannot append to the journal intake {intake.path}: {exc}") from None
        if params or tags:
            self.move_intake()  # rows written straight to SQLite must sort after every point logged before them
            now = time.time()
            with self.database.db() as conn:
                if params:
                    conn.executemany(_INSERT_ENTRY, [_entry_row(run, PARAM, k, v, now, self.epoch) for k, v in params])
                if tags:
                    conn.executemany(_INSERT_ENTRY, [_entry_row(run, TAG, k, v, now, self.epoch) for k, v in tags])

    def _open_intake(self) -> _intake.Intake:
        with self._move_lock:
            if self._intake is None or self._intake.pid != os.getpid():
                self._intake = _intake.Intake(self.path)  # a forked child gets a file of its own
                self._moved = 0
            return self._intake

    def move_intake(self, chunk_bytes: int = MOVE_CHUNK_BYTES) -> int:
        """Move metric points from this process's intake into SQLite; the number moved.

        In commits of at most `chunk_bytes` of intake each: on a full disk each commit needs only the pages that
        delivering the rows before it freed (SQLite reuses the pages of deleted rows).
        """
        intake = self._intake
        if intake is None or intake.pid != os.getpid() or intake.size == self._moved:
            return 0
        with self._move_lock:
            data, _end = intake.read(self._moved)
            base, pos, moved = self._moved, 0, 0
            while pos < len(data):
                points, end = _intake.decode(data, pos, pos + chunk_bytes)
                if end == pos:
                    # Every byte up to `end` was a whole append: anything unreadable here is damage, not a write
                    # in progress. Step over it; the records after it are kept.
                    points, used, skipped = _intake.scan(data[pos:])
                    log.error(
                        "journal intake %s is damaged: %d bytes at offset %d could not be read and were "
                        "skipped; %d points around them were kept",
                        intake.path,
                        skipped + len(data) - pos - used,
                        base + pos,
                        len(points),
                    )
                    end = len(data)
                self._insert_points(points, intake.name, base + end)
                self._moved = base + end
                moved += len(points)
                pos = end
            if intake.rotate_if(self._moved):
                with self.database.db() as conn:
                    conn.execute("update intake set moved=0 where name=?", (intake.name,))
                self._moved = 0
            return moved

    def move_intake_if_room(self) -> int:
        """move_intake, except on a full disk: then what is in SQLite already is all a reader sees (it is older
        than anything still in the intake)."""
        chunk = MOVE_CHUNK_BYTES
        while True:
            try:
                return self.move_intake(chunk)
            except JournalFullError:
                if not self.room.full:
                    raise
                if chunk <= MOVE_CHUNK_MIN_BYTES:
                    return 0  # the next round tries again, after delivering frees more pages
                chunk //= 8

    def unmoved(self) -> int:
        """Metric points of this process not in SQLite yet (the disk was full), and run ends held in memory."""
        intake = self._intake
        points = 0
        if intake is not None and intake.pid == os.getpid() and intake.size > self._moved:
            points = len(_intake.scan(intake.read(self._moved)[0])[0])
        return points + len(self._held_ends)

    def _insert_points(self, points: list, intake_name: str, moved: int | None) -> None:
        now = time.time()
        with self.database.db() as conn:
            conn.executemany(
                _INSERT_METRIC, [_metric_row(run, key, value, ts, step, now) for run, key, value, ts, step in points]
            )
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
                with self.database.db(write=False) as conn:
                    row = conn.execute("select moved from intake where name=?", (path.name,)).fetchone()
                data = path.read_bytes()
                moved = row[0] if row and row[0] <= len(data) else 0  # > size: it was emptied after moving
                points, used, skipped = _intake.scan(data[moved:])
                self._insert_points(points, path.name, None)
                if skipped:
                    log.error(
                        "journal intake %s is damaged: %d bytes in its middle could not be read and were "
                        "skipped; the records after them were kept",
                        path.name,
                        skipped,
                    )
                if moved + used < len(data):
                    log.warning(
                        "journal intake %s: %d bytes at its end are not a whole record (cut by a crash "
                        "of the machine?) and were dropped",
                        path.name,
                        len(data) - moved - used,
                    )
                path.unlink(missing_ok=True)
                adopted += len(points)
            finally:
                os.close(fd)
        return adopted

    def append(self, run: str, kind: str, body: dict, *, key: str | None = None) -> int:
        """Journal any other operation, its arguments as JSON; its row's id."""
        text = json.dumps(body, separators=(",", ":"))
        self._reserve(len(text) + _ROW_OVERHEAD)
        self.move_intake()  # in call order: points logged before this call get their journal order first
        with self.database.db() as conn:
            row = conn.execute(_INSERT_BODY, _body_row(run, kind, key, text, time.time(), self.epoch)).lastrowid
        assert row is not None
        return row

    def add_experiment(self, name: str, tags: dict[str, str], artifact_location: str | None = None) -> str:
        """Record an experiment created offline and journal its get-or-create; returns the local id.

        Raises ExperimentExistsError when the journal has one of that name: also one another process on this
        journal added since the caller looked (two `connect(experiment=…)` at the same moment).
        """
        local_id = "bridge-" + uuid.uuid4().hex[:16]
        spec = {"name": name, "tags": tags}
        if artifact_location:
            spec["artifact_location"] = artifact_location
        body = json.dumps(spec, separators=(",", ":"))
        self._reserve(len(body) + 2 * _ROW_OVERHEAD)
        with self.database.db() as conn:
            # Looked up in the write transaction (begin immediate): no other process can add it in between.
            row = conn.execute("select local_id from experiments where name=?", (name,)).fetchone()
            if row is not None:
                raise ExperimentExistsError(name, row[0])
            conn.execute(
                "insert into experiments(local_id, name, created) values(?,?,?)", (local_id, name, time.time())
            )
            conn.execute(_INSERT_BODY, _body_row("", CREATE_EXPERIMENT, local_id, body, time.time(), self.epoch))
        return local_id

    def add_run(
        self, *, experiment_id: str, user_id: str | None, start_time: int, name: str | None, tags: dict[str, str]
    ) -> str:
        """Record a run created here and journal its creation; returns the local run id (the run key)."""
        local_id = new_local_run_id()
        body = json.dumps({"tags": tags}, separators=(",", ":"))
        self._reserve(len(body) + 2 * _ROW_OVERHEAD)
        now = time.time()
        with self.database.db() as conn:
            conn.execute(
                "insert into runs(local_id, experiment_id, name, user_id, start_time, owner_pid, owner_host, "
                "created) values(?,?,?,?,?,?,?,?)",
                (local_id, experiment_id, name, user_id, start_time, os.getpid(), HOST, now),
            )
            conn.execute(_INSERT_BODY, _body_row(local_id, CREATE_RUN, None, body, now, self.epoch))
        return local_id

    def update_run(self, run: str, *, status: str | None, end_time: int | None, name: str | None) -> None:
        """Journal a run's change of status, end time or name.

        Never refused for the size limit, and on a full disk it takes the reserve (room.py); if even that is not
        enough the change is held here and written by sync() as soon as the disk has room — so `end_run()`
        always ends the run (lost only if the process dies before then)."""
        change = (run, status, end_time, name)
        with self._held_lock:
            self._held_ends.append(change)  # in order after any still held
            try:
                for _ in range(2):  # the first try that meets a full disk releases the reserve for the second
                    try:
                        self._write_held_ends()
                        return
                    except JournalFullError:
                        if not self.room.full:
                            raise
            except BaseException:
                if self._held_ends and self._held_ends[-1] is change:
                    self._held_ends.pop()
                raise
            log.warning("bridge: a change of run %s waits in memory until the disk holding %s has room", run, self.path)

    def _write_held_ends(self) -> None:
        """Write the run changes held back, oldest first; raises JournalFullError (keeping the rest) on a full disk."""
        with self._held_lock:
            while self._held_ends:
                self._update_run(*self._held_ends[0])
                self._held_ends.pop(0)

    def _update_run(self, run: str, status: str | None, end_time: int | None, name: str | None) -> None:
        body = {"status": status, "end_time": end_time, "run_name": name}
        text = json.dumps(body, separators=(",", ":"))
        self._used_bytes += len(text) + _ROW_OVERHEAD
        self.move_intake()  # an end status must never reach the server before the run's last points
        with self.database.db() as conn:
            conn.execute(
                "update runs set status=coalesce(?, status), end_time=coalesce(?, end_time), "
                "name=coalesce(?, name) where local_id=?",
                (status, end_time, name, run),
            )
            conn.execute(_INSERT_BODY, _body_row(run, UPDATE_RUN, None, text, time.time(), self.epoch))

    def spool_artifact(
        self, run: str, source: Path, artifact_path: str, *, progress: SpoolProgress | None = None
    ) -> dict:
        """Copy `source` into the spool now (hashing as it goes) and journal its upload. `progress` follows the
        copy (a head start of the upload reads it: delivery/files.py) and learns the row, or that there is none.

        Over the spool's budget (or the journal's limit), older copies of the same path still waiting make room
        first (MLflow keeps only the last); if that is not enough, or the disk lacks room for the copy, the call
        is refused with JournalFullError and nothing accepted before is dropped.
        """
        try:
            return self._spool_artifact(run, source, artifact_path, progress)
        finally:
            if progress is not None and not progress.ended:
                progress.end(None)  # refused before the copy, or failed in it: no row

    def _spool_artifact(self, run: str, source: Path, artifact_path: str, progress: SpoolProgress | None) -> dict:
        size = source.stat().st_size
        replaced = self.queue.replaced_files(run, artifact_path)
        over = self.spool.bytes + size > self.spool_limit_bytes or self._used_bytes + size > self.limit_bytes
        freed = sum(n for _, _, n in replaced) if over else 0
        if self.spool.bytes - freed + size > self.spool_limit_bytes:
            raise JournalFullError(
                f"the spool of journal {self.path} holds {self.spool.bytes:,} bytes of files still to upload; "
                f"{source} ({size:,} bytes) would take it over its budget of {self.spool_limit_bytes:,} bytes. "
                f"Nothing already accepted was dropped; raise {SPOOL_LIMIT_ENV} or let the uploads finish first."
            )
        free = self.room.free()
        if size + RESERVE_BYTES > free:
            raise JournalFullError(
                f"the disk holding journal {self.path} has {free:,} bytes free; spooling {source} needs "
                f"{size + RESERVE_BYTES:,}. Nothing already accepted was dropped; free space on that disk."
            )
        self._reserve(max(0, size - freed) + _ROW_OVERHEAD)
        op: int | None = None
        try:
            with self.spool.copy_in(source, progress) as copied:
                body = {"spool": copied.name, "path": artifact_path, "size": copied.size, "sha256": copied.sha256}
                op = self.append(run, ARTIFACT, body, key=artifact_path)
        except OSError as exc:
            self._used_bytes -= max(0, size - freed) + _ROW_OVERHEAD
            if exc.errno != errno.ENOSPC:
                raise
            self.room.met_full(f"copying {source.name} into the spool")
            raise JournalFullError(self.room.message()) from None
        except BaseException:
            self._used_bytes -= max(0, size - freed) + _ROW_OVERHEAD
            raise
        if progress is not None and op is not None:
            progress.end(op)
        if freed:
            dropped = self.queue.drop_replaced([op_id for op_id, _, _ in replaced])
            log.info("bridge: %s: %d bytes of older copies still waiting were dropped", artifact_path, dropped)
        return body

    def add_entity(self, kind: str, local_id: str, body: dict, *, op: tuple[str, str, dict]) -> None:
        """Record an entity created here and journal its creation `op` (run key, op kind, op body) in one commit."""
        text, op_text = json.dumps(body, separators=(",", ":")), json.dumps(op[2], separators=(",", ":"))
        self._reserve(len(text) + len(op_text) + 2 * _ROW_OVERHEAD)
        self.move_intake()
        now = time.time()
        with self.database.db() as conn:
            conn.execute(
                "insert into entities(kind, local_id, body, created) values(?,?,?,?)", (kind, local_id, text, now)
            )
            conn.execute(_INSERT_BODY, _body_row(op[0], op[1], None, op_text, now, self.epoch))

    def update_entity(self, kind: str, local_id: str, body: dict) -> None:
        with self.database.db() as conn:
            conn.execute(
                "update entities set body=? where kind=? and local_id=?",
                (json.dumps(body, separators=(",", ":")), kind, local_id),
            )

    def sweep_spool(self) -> int:
        """Delete spooled files no undelivered row refers to."""
        return self.spool.sweep(self.queue.spool_names(), self.queue.spool_referenced)
