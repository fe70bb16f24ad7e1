"""The sender: one background thread that delivers the journal to the MLflow server, in order per run.

Who decides an entry was delivered: the sender, and only when the server answered 200 — then the rows are
deleted. Anything less (no answer, a cut connection) leaves them to be sent again, which is safe:
  * metric points keep the timestamp of the original call, and MLflow drops a point identical in key, step,
    value and timestamp, so a re-sent batch adds nothing;
  * a param re-sent with the same value is accepted, tags simply overwrite;
  * every other operation is applied so that repeating it changes nothing (operations.py).

One sender delivers a journal at a time, across processes: it holds a flock on `<journal>.lock` until its
threads have ended — past `stop()`'s timeout if a request is still running — so no row is sent by two.

Failures are classified by `link.classify_failure`: network errors, timeouts, 429 and 5xx are retried with
`bridge.retry.compute_backoff_ms`; 401/403 pause delivery ("token rejected") and retry slowly with a
re-read token; anything else the server refuses is split until the one offending entry is isolated and
kept as a dead letter with MLflow's message, while everything else keeps flowing. Entries that can never be
delivered for a local reason (operations.UndeliverableError) become dead letters with that reason.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TextIO, TypeVar

from bridge.client.delivery import files, handlers
from bridge.client.delivery.batch import BATCH_KINDS, MAX_METRICS_PER_BATCH, Batch, Entry, batch_body
from bridge.client.delivery.handlers import lost_upsert_race
from bridge.client.delivery.heartbeat import Heartbeats
from bridge.client.delivery.marks import DeliveryMarks, Scope, scope_of
from bridge.client.delivery.operations import (
    RUN_NOT_CREATED,
    SERVER_FAILS_ON_IT,
    SERVER_REFUSED,
    Operations,
    run_not_created,
)
from bridge.client.journal import Journal, Op
from bridge.client.journal.intake import try_lock
from bridge.client.journal.kinds import (
    ARTIFACT,
    CREATE_LOGGED_MODEL,
    CREATE_RUN,
    MODEL_METRICS,
    RUN_ID_TAGS,
    TAG,
    UPDATE_RUN,
)
from bridge.client.journal.spool import SpoolProgress
from bridge.client.link import Link, Verdict, classify_failure
from bridge.client.link import uploads as tus
from bridge.client.options import UPLOAD_PART_FLOOR_BYTES, ClientOptions
from bridge.errors import HttpError, JournalFullError, LinkError, TransportError, UndeliverableError
from bridge.retry import compute_backoff_ms

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_READ_BATCH = 5000
#: Files looked at per run and pass of the file lane (it goes on at once while any were delivered).
_FILES_PER_LOOK = 20
#: The delivery lanes (their waits are kept in the journal: journal/uploads.py).
RECORDS, FILES = "records", "files"


class _Pause(Exception):
    """Stop this delivery round: the link failed (retry) or the token was refused."""

    def __init__(self, cause: Exception, verdict: Verdict) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.verdict = verdict


class Sender:
    """Delivers `journal` through `link`, in a daemon thread started by `start()`."""

    def __init__(
        self,
        journal: Journal,
        link: Link,
        options: ClientOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`options` hold every timing (ClientOptions); `clock` is the monotonic clock its deadlines read."""
        self.journal = journal
        self._clock = clock
        self.link = link
        self.options = options or ClientOptions.from_env()
        self.send_interval_s = self.options.send_interval_s
        self.marks = DeliveryMarks(link, journal)
        self.heartbeats = Heartbeats(
            link,
            journal,
            self.options.heartbeat_s,
            marks=self.marks,
            other_runs_every_s=self.options.other_runs_every_s,
        )
        self.operations = Operations(link, journal, self.heartbeats, self.marks)
        self.operations.upload_part_bytes = self.options.upload_part_bytes
        self.operations.twin_watch_timeouts = self.options.twin_watch_timeouts
        self.operations.should_stop = self._stop_requested
        self.delivered = 0
        self._wake = threading.Event()
        self._files_wake = threading.Event()
        self._delivering = threading.Event()  # set once this sender holds the journal (_loop)
        self._waits_noted: set[str] = set()  # lanes whose wait is written in the journal (_note_wait)
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._rounds = 0
        self._rounds_changed = threading.Condition()
        self._backing_off = False
        self._files_wait_link = False  # the file lane sleeps out a backoff because the link failed (_files_loop)
        self._flushing = 0
        self._thread: threading.Thread | None = None
        self._files_thread: threading.Thread | None = None
        self._durable_thread: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._threads_alive = 0
        self._on_stopped: list[Callable[[], None]] = []
        self._lock_file: TextIO | None = None
        self._lock_elsewhere = False  # another process holds the journal's delivery lock (_loop)
        self._last_adopt = self._clock()
        self._looks_begun = self._looks_done = 0  # looks for late twins made for a flush (_look_for_twins)
        #: A big file being copied into the spool, with its path on the server: the file lane sends its first
        #: parts meanwhile (head_start).
        self._head_start: tuple[SpoolProgress, str] | None = None

    # ---------------------------------------------------------------------------------- control

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(self._loop,), name="bridge-sender", daemon=True)
            self._files_thread = threading.Thread(
                target=self._run, args=(self._files_loop,), name="bridge-files", daemon=True
            )
            self._durable_thread = threading.Thread(
                target=self._run, args=(self._durable_loop,), name="bridge-journal-sync", daemon=True
            )
            with self._state_lock:
                self._threads_alive = 3
            self._thread.start()
            self._files_thread.start()
            self._durable_thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop delivering; True once the threads have ended, False when one is still busy after `timeout`.

        While a thread is still busy it keeps the journal's delivery lock (so no other sender re-sends what
        it is sending) and the journal must stay open: see `when_stopped`.
        """
        self._stop.set()
        self._wake.set()
        self._files_wake.set()
        deadline = self._clock() + timeout
        # A create in flight may finish first (a cut one can land late and make a twin: operations.creating);
        # any other request in flight fails now (its rows go back to pending) instead of timing out.
        self.operations.wait_for_creates(min(self.options.create_grace_s, timeout))
        self.link.abort()
        threads = (self._thread, self._files_thread, self._durable_thread)
        for thread in threads:
            if thread is not None:
                thread.join(max(0.0, deadline - self._clock()))
        if any(t is not None and t.is_alive() for t in threads):
            log.warning(
                "bridge: the sender did not stop within %.0f s; it keeps journal %s until it ends",
                timeout,
                self.journal.path,
            )
            return False
        self._thread = self._files_thread = self._durable_thread = None
        self.link.close()
        return True

    def when_stopped(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the sender's threads have ended (now, if they have)."""
        with self._state_lock:
            if self._threads_alive:
                self._on_stopped.append(callback)
                return
        callback()

    def _run(self, target: Callable[[], None]) -> None:
        try:
            target()
        finally:
            with self._state_lock:
                self._threads_alive -= 1
                last = self._threads_alive == 0
                callbacks, self._on_stopped = (self._on_stopped, []) if last else ([], self._on_stopped)
            if last:
                for callback in callbacks:
                    try:
                        callback()
                    except Exception:
                        log.exception("bridge: clean-up after the sender stopped failed")
                # Only here, when nothing of this sender can still send, may another sender take over.
                self._release_lock()

    def _stop_requested(self) -> bool:
        return self._stop.is_set()

    def wake(self) -> None:
        """Deliver now rather than after the coalescing interval."""
        self._wake.set()
        self._files_wake.set()

    def head_start(self, run: str, artifact_path: str, size: int) -> SpoolProgress | None:
        """Offer the file lane a head start on a file of `size` bytes that `log_artifact` is about to copy into the
        spool for `run` (delivery/files.py, `head_start`): the progress the copy is to report to, or None where
        there is nothing to gain (a file that goes in one part, a run not on the server yet, no lane running
        here). The lane takes it only when it is free and the server takes the sha256 on a later part."""
        part = self.operations.upload_part_bytes
        if size <= min(part, self.link.upload_parts.get(self.link.url) or part):
            return None  # one part, or one PUT: nothing goes before the sha256
        if not self._delivering.is_set() or self._stop.is_set() or self._files_thread is None:
            return None
        remote, root = self.journal.ids.server_run(run)
        if remote is None or not root:
            return None
        try:
            path = self.link.artifact_path(root, artifact_path)
        except ValueError:
            return None
        progress = SpoolProgress(artifact_path, size)
        with self._state_lock:
            self._head_start = (progress, path)
        self._files_wake.set()
        return progress

    def _run_head_start(self) -> None:
        """The file lane's turn at a head start offered since it last looked (while the copy is still going)."""
        with self._state_lock:
            offered, self._head_start = self._head_start, None
        if offered is None or offered[0].ended:
            return
        progress, path = offered
        if self.journal.queue.runs_with_pending(files=True):
            return  # files logged before it go first, in the lane's order; a head start would hold them up
        try:
            if tus.max_part(self.link) is None or not tus.takes_sha256_later(self.link):
                return
            files.head_start(
                self.link,
                self.journal,
                progress,
                path,
                part_bytes=self.operations.upload_part_bytes,
                should_stop=self._stop_requested,
            )
        except (HttpError, TransportError) as exc:  # the link: the row's own upload does it all
            log.debug("bridge files: no head start for %s: %s", progress.artifact_path, exc)
        except Exception:
            log.warning("bridge files: the head start of %s failed", progress.artifact_path, exc_info=True)

    def wake_files(self) -> None:
        """A file was logged: the file lane starts it now (files are sent one by one, never coalesced)."""
        self._files_wake.set()

    def flush(self, timeout: float | None = None) -> int:
        """Wait until the journal is delivered or `timeout` passes; the number of entries left.

        Delivered includes the delivery marks the delivered entries owe (marks.py): with none left, a flush
        still retries them, link down or not, until they are on the server or `timeout` passes.
        """
        deadline = None if timeout is None else self._clock() + timeout
        self._flushing += 1
        since_look = self._looks_begun
        last_wake = 0.0
        woken_at: int | None = None  # the backlog when the lanes were last woken
        try:
            while True:
                left = self.journal.queue.backlog().total
                if (
                    left == 0 and not self._owes_marks_now() and not self._owes_twin_look(since_look)
                ) or self._thread is None:
                    return left
                now = self._clock()
                if deadline is not None and now >= deadline:
                    return left
                # Someone is waiting: don't sleep out a backoff of up to 30 s once the link may be back, but
                # retry at most once a second so a flush never turns the backoff into a tight loop. Without a
                # backoff, wake the lanes again only when the backlog moved (a round delivered, or more came): a
                # file in upload keeps it still, and waking the idle record lane after each of its rounds made
                # thousands of empty rounds a second for as long as the upload took.
                retry_due = now - last_wake >= self.options.flush_retry_s
                if retry_due or (not self._backing_off and left != woken_at):
                    self._wake.set()
                    self._files_wake.set()
                    last_wake, woken_at = now, left
                # Counting the backlog scans the journal: poll less often while it is large.
                poll = 0.05 if left < 5_000 else 0.25
                self._idle.wait(poll if deadline is None else max(0.0, min(poll, deadline - self._clock())))
                self._idle.clear()
        finally:
            self._flushing -= 1

    def watch_run(self, local_id: str) -> None:
        """Keep this run's heartbeat going until `unwatch_run` (this process created or resumed it)."""
        self.heartbeats.watch(local_id)

    def unwatch_run(self, local_id: str) -> None:
        self.heartbeats.unwatch(local_id)

    @property
    def rounds(self) -> int:
        """Delivery rounds finished so far (successful or not)."""
        return self._rounds

    def wait_rounds(self, count: int, timeout: float) -> bool:
        """Wait until `count` more rounds have finished after now; False on timeout (the "round done" signal)."""
        with self._rounds_changed:
            target = self._rounds + count
            self._wake.set()
            return self._rounds_changed.wait_for(lambda: self._rounds >= target, timeout)

    # ------------------------------------------------------------------------------------- loop

    def _acquire_lock(self) -> bool:
        """One sender per journal at a time, across processes (a live process and `bridge sync`)."""
        # Kept open while this sender lives: the flock is held as long as the handle is (closed in _release_lock).
        handle = open(str(self.journal.path) + ".lock", "a+")  # noqa: SIM115
        if not try_lock(handle.fileno()):
            handle.close()
            return False
        self._lock_file = handle
        return True

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _loop(self) -> None:
        while not self._acquire_lock():
            self._lock_elsewhere = True
            self.link.last_error = f"another process is delivering journal {self.journal.path}; waiting for it"
            with contextlib.suppress(Exception):
                self.journal.move_intake()  # so that process's sender sees this one's points
            if self._stop.wait(0.5):
                return
        self._lock_elsewhere = False
        self.journal.queue.reset_in_flight()
        for lane in (RECORDS, FILES):  # what an earlier sender of this journal said no longer holds
            self._waits_noted.add(lane)
            self._note_wait(lane, None)
        self._delivering.set()
        attempts = 0
        while not self._stop.is_set():
            try:
                if not self.deliver_records() and self.link.online is not True:
                    self._checked(self.link.check)  # nothing to send, but reads want to know it is back
                self.heartbeats.beat_round()
                attempts = 0
                wait = self.send_interval_s
                self._note_wait(RECORDS, None)
                if self._files_wait_link:  # the link answers again: the file lane need not sleep out its backoff
                    self._files_wait_link = False
                    self._files_wake.set()
            except _Pause as pause:
                attempts += 1
                wait = compute_backoff_ms(attempts) / 1000
                self._note_wait(RECORDS, str(pause.cause), attempts, wait)
                if pause.verdict is Verdict.TOKEN:
                    wait = max(
                        wait,
                        compute_backoff_ms(attempts, min_backoff_ms=int(self.options.token_retry_min_s * 1000)) / 1000,
                    )
                    self.link.refresh_token()
                elif not self._stop.is_set():
                    self.link.maybe_rediscover(interval_s=self.options.rediscover_interval_s)
            except JournalFullError as exc:  # said once, by the journal (room.py): no traceback every round
                self.link.last_error = str(exc)
                attempts += 1
                wait = min(compute_backoff_ms(attempts) / 1000, self.options.flush_retry_s)
            except Exception as exc:  # a bug or a journal problem must not kill delivery for good
                log.exception("bridge sender: unexpected error, retrying")
                self.link.last_error = f"{type(exc).__name__}: {exc}"
                attempts += 1
                wait = compute_backoff_ms(attempts) / 1000
            if self._clock() - self._last_adopt > self.options.adopt_every_s:
                with contextlib.suppress(Exception):
                    self.journal.adopt_orphans()  # points of a child process that was killed meanwhile
                self._last_adopt = self._clock()
            self._backing_off = attempts > 0
            with self._rounds_changed:
                self._rounds += 1
                self._rounds_changed.notify_all()
            self._idle.set()
            self._wake.wait(wait)
            self._wake.clear()
        if self.link.online is not False:  # last chance for marks still owed (a live run's, see marks.py)
            for scope in self.marks.owing_scopes():
                with contextlib.suppress(Exception):
                    self.marks.pay(scope)

    def _files_loop(self) -> None:
        """The file lane: uploads go one after another here, so no record (a metric, a status) waits for a file."""
        while not self._delivering.wait(0.2):
            if self._stop.is_set():
                return
        attempts = 0
        while not self._stop.is_set():
            wait = self.send_interval_s
            self._run_head_start()
            sent_before = self.link.upload_bytes_sent
            try:
                if self.deliver_files():
                    wait = 0.0  # more may wait: go on at once
                    self._wake.set()  # a run's end status may have waited for these files
                attempts = 0
                self._note_wait(FILES, None)
            except _Pause as pause:
                # A try that moved an upload on (a part went before the cut) starts the backoff again: on a link
                # cut every few seconds each try is progress, and a grown backoff would outlast the link's up-time.
                moved_on = self.link.upload_bytes_sent - sent_before >= UPLOAD_PART_FLOOR_BYTES
                attempts = 1 if moved_on else attempts + 1
                if isinstance(pause.cause, files.WaitForServer):
                    wait = min(5.0, 0.5 * attempts)
                else:
                    wait = compute_backoff_ms(attempts) / 1000
                    # Cut by the link (a flapping one): the record lane's next good round wakes this one, so an
                    # upload goes on within a second of the link coming back, not after a backoff grown meanwhile.
                    self._files_wait_link = isinstance(pause.cause, TransportError)
                if pause.verdict is Verdict.TOKEN:
                    wait = max(wait, self.options.token_retry_min_s)
                self._note_wait(FILES, str(pause.cause), attempts, wait)
            except JournalFullError as exc:  # said once, by the journal (room.py)
                attempts += 1
                wait = min(compute_backoff_ms(attempts) / 1000, self.options.flush_retry_s)
                self._note_wait(FILES, str(exc), attempts, wait)
            except Exception as exc:  # a bug or a journal problem must not stop the uploads for good
                log.exception("bridge files: unexpected error, retrying")
                attempts += 1
                wait = compute_backoff_ms(attempts) / 1000
                self._note_wait(FILES, f"{type(exc).__name__}: {exc}", attempts, wait)
            self._idle.set()
            if wait > 0:
                self._files_wake.wait(wait if not self._flushing else min(wait, self.options.flush_retry_s))
                self._files_wake.clear()

    def _note_wait(self, lane: str, error: str | None, attempts: int = 0, wait_s: float = 0.0) -> None:
        """Say in the journal why `lane` waits (for `bridge queue` in another process); cleared once it delivers."""
        if error is None and lane not in self._waits_noted:
            return
        if error is not None and self._stop.is_set():
            return  # a request cut by stop() says nothing about why delivery waits
        with contextlib.suppress(Exception):  # a full or busy disk must not stop delivery for a status line
            self.journal.uploads.note_wait(lane, error, attempts, time.time() + wait_s if error else None)
            if error is None:
                self._waits_noted.discard(lane)
            else:
                self._waits_noted.add(lane)

    def _durable_loop(self) -> None:
        """Every `options.durable_every_s`, `journal.sync()`: not tied to delivery rounds, which can take minutes."""
        while not self._stop.wait(self.options.durable_every_s):
            try:
                self.journal.sync()
            except JournalFullError:
                pass  # said once, by the journal (room.py); tried again every second
            except Exception as exc:  # the disk is busy: say so, keep trying
                log.warning("bridge: could not sync journal %s: %s", self.journal.path, exc)
        with contextlib.suppress(Exception):
            self.journal.sync()

    def deliver_round(self) -> int:
        """Deliver everything pending now, records then files, in this thread; rows delivered. Raises _Pause."""
        return self.deliver_records() + self.deliver_files() + self.deliver_records()

    def deliver_files(self) -> int:
        """Upload the files pending now, per run in journal order; rows delivered. Raises _Pause.

        A file waits for its run (or logged model) to be created on the server by the record lane."""
        delivered = 0
        held: _Pause | None = None  # the first file the server answered an error for: its run's later files wait
        upto = self.journal.queue.last_id()
        for run in self.journal.queue.runs_with_pending(files=True):
            try:
                for op in self.journal.queue.pending_ops(run, _FILES_PER_LOOK, upto, files=True):
                    if self._stop.is_set():
                        return delivered
                    if self._not_created_yet(op.run):
                        break
                    if op.epoch is not None and self._done_already(op):
                        delivered += self._skip(op)
                        continue
                    delivered += self._send_single(op)
            except _Pause as pause:
                # The server answered (a file it cannot take yet): other runs' files go on. No answer at all
                # (the link is down) pauses the lane.
                if not isinstance(pause.cause, HttpError) or pause.verdict is Verdict.TOKEN:
                    raise
                held = held or pause
        if held is not None and not delivered:
            raise held
        return delivered

    def _not_created_yet(self, run: str) -> bool:
        """Whether `run` (or a logged model) has no server id yet while its creation still waits to be delivered."""
        if self.journal.ids.server_run(run)[0] is not None:
            return False
        if run.startswith("m-"):
            return bool(self.journal.queue.undelivered_naming(CREATE_LOGGED_MODEL, run))
        return bool(self.journal.queue.undelivered(run, (CREATE_RUN,)))

    def deliver_records(self) -> int:
        """Deliver every record (not file) pending now; the number of journal rows delivered. Raises _Pause."""
        delivered = 0
        # A round delivers what was logged before it began; points logged meanwhile wait for the next one,
        # so a steady trickle is coalesced instead of chased in tiny batches. On a full disk the points still in
        # the intake wait: delivering what SQLite holds frees the pages they need.
        self.journal.move_intake_if_room()
        upto = self.journal.queue.last_id()
        for run in self.journal.queue.runs_with_pending(files=False):
            if self._stop.is_set():
                break
            while True:
                ops = self.journal.queue.pending_ops(run, _READ_BATCH, upto, files=False)
                if not ops:
                    break
                last = len(ops) < _READ_BATCH
                count, held = self._deliver_ops(run, ops, hold_tail=last and not self._flushing)
                delivered += count
                if held or last or self._stop.is_set():
                    break
        # Marks owed by runs and experiments that will not send anything soon: also those of an earlier round
        # that paused before paying them.
        for scope in self.marks.owing_scopes():
            if self._pays_now(scope):
                self._checked(functools.partial(self.marks.pay, scope))
        self._look_for_twins()
        return delivered

    def _look_for_twins(self) -> None:
        """Remove a late create's empty twin of a watched run (operations.remove_twins) once its watch is due,
        and on every round of a flush: a flush returns only after a round that looked (`flush`)."""
        flushing = bool(self._flushing)
        if flushing:
            self._looks_begun += 1
            look = self._looks_begun
        now = time.time()
        for run, due in self.journal.book.twin_watches().items():
            if due <= now or flushing:
                self._checked(functools.partial(self.operations.remove_twins, run, final=due <= now))
        if flushing:
            self._looks_done = look

    def _owes_twin_look(self, since_look: int) -> bool:
        """Whether a flush, begun when `since_look` looks had begun, still waits for one begun after it — only
        while this sender delivers (holds the journal) and the server answers."""
        return (
            self._looks_done <= since_look
            and self.link.online is not False
            and not self._lock_elsewhere
            and not self._stop.is_set()
            and bool(self.journal.book.twin_watches())
        )

    def _owes_marks_now(self) -> bool:
        """Whether a flush still waits for delivery marks: while this sender delivers (the process holding the
        journal pays them), whether or not the link answers now — the request paying a mark can time out as
        the flush ends, and a flush that returned then left the mark owed when the connection closed: a stale
        copy then brought back an older status (found under load)."""
        return not self._lock_elsewhere and any(self._pays_now(s) for s in self.marks.owing_scopes())

    def _pays_now(self, scope: Scope) -> bool:
        """Whether `scope`'s owed marks go at the end of this round: a live run's ride in its next request."""
        kind, local_id = scope
        return (
            kind == "experiment"
            or self.marks.urgent(scope)
            or not self.heartbeats.is_live(local_id)
            or bool(self._flushing)
            or self._stop.is_set()
        )

    def _deliver_ops(self, run: str, ops: list[Op], *, hold_tail: bool = False) -> tuple[int, bool]:
        """Send `ops` in order; (rows delivered, whether the rest was held for the next round: a small trailing
        batch, or an op that waits for another key's — `Operations.must_wait`).

        A steady stream would otherwise cost two requests a round (a full batch and a sliver): the sliver
        waits one round and rides in a full batch instead.
        """
        batch = Batch()
        in_batch: list[Op] = []
        merged: list[Op] = []  # consecutive model-metric ops: one request (_send_merged)
        merged_points = 0
        count = 0
        sent_full = False
        for op in ops:
            if self._stop.is_set():
                return count, False  # what is not sent yet stays pending, for whoever delivers next
            if op.epoch is not None and self._done_already(op):
                count += self._skip(op)
                continue
            points = len(op.json()["metrics"]) if op.kind == MODEL_METRICS else 0
            if merged and (not points or merged_points + points > MAX_METRICS_PER_BATCH):
                count += self._send_merged(merged)
                merged, merged_points = [], 0
            if op.kind in BATCH_KINDS:
                if not batch.add(op):
                    count += self._send_batch(run, batch, in_batch)
                    sent_full = True
                    batch, in_batch = Batch(), []
                    batch.add(op)
                in_batch.append(op)
                continue
            if batch:
                count += self._send_batch(run, batch, in_batch)
                batch, in_batch = Batch(), []
            if handlers.must_wait(self.operations, op):
                if op.kind == UPDATE_RUN:  # its end waits for its files: keep it beating meanwhile
                    self.heartbeats.ending.add(run)
                if merged:
                    count += self._send_merged(merged)
                return count, True  # the run waits a round for what it needs (a logged model's creation)
            if op.kind == MODEL_METRICS:
                merged.append(op)
                merged_points += points
                continue
            count += self._send_single(op)
        if merged:
            count += self._send_merged(merged)
        if batch:
            if hold_tail and sent_full and batch.metrics == len(batch.entries):
                return count, True
            count += self._send_batch(run, batch, in_batch)
        return count, False

    def _done_already(self, op: Op) -> bool:
        """marks.done_already, the read of the marks failing like any request; one the server keeps failing on
        (a 5xx for this run again and again while it answers the rest) is taken as "no marks", so the op is sent
        and its own answer decides — never a journal stuck behind one run."""
        try:
            return self._checked(lambda: self.marks.done_already(op), poison=op.attempts)
        except _Pause:
            if self.journal.queue.claim([op.id]):
                self.journal.queue.release([op.id])  # counted as a try of the op, for the poison rule above
            raise
        except HttpError:
            scope = scope_of(op)
            if scope is not None:
                self.marks.none_there(scope)
            return False

    def _skip(self, op: Op) -> int:
        """`op` was delivered before, from a copy of this journal (marks.py): done without sending."""
        log.info(
            "bridge: %s of run %s was delivered already from a copy of this journal; not sent again",
            op.kind,
            op.run or "-",
        )
        self.journal.queue.complete([op.id], spool=[op.json()["spool"]] if op.kind == ARTIFACT else [])
        return 1

    # ----------------------------------------------------------------------------- deliveries

    def _checked(self, fn: Callable[[], _T], *, poison: int | None = None, kinds: tuple = ()) -> _T:
        """Run one request; a failure that is not the content's fault pauses the round.

        With `poison` (how often the entries in it have failed already): a server error that has come back
        for them `poison_attempts` times while the server answers a probe is treated as the entries' fault —
        raised like a refusal, so they are isolated and moved aside while the rest keeps flowing. So is an
        upsert of ops of `kinds` refused because an earlier try of it got there first (lost_upsert_race): tried
        again until then, as the server has written it.
        """
        try:
            return fn()
        except LinkError as exc:
            verdict = classify_failure(exc)
            if verdict is Verdict.REJECT:
                if poison is not None and poison + 1 < self.options.poison_attempts and lost_upsert_race(kinds, exc):
                    raise _Pause(exc, Verdict.RETRY) from None
                raise
            if (
                poison is not None
                and isinstance(exc, HttpError)
                and exc.status >= 500
                and poison + 1 >= self.options.poison_attempts
                and self.link.probe()
            ):
                raise _ServerFailsOnIt(exc.status, exc.error_code, exc.message) from None
            raise _Pause(exc, verdict) from None

    def _send_batch(self, run: str, batch: Batch, ops: list[Op]) -> int:
        remote, _ = self.journal.ids.server_run(run)
        ids = batch.ids
        if remote is None:
            self.marks.done(ops)  # owed before done (Marks.done)
            if self.journal.ids.row_lost(run):
                why = run_not_created(self.journal, run)
                self.journal.queue.bury(ids, str(why), reason=why.reason)
            else:
                self.journal.queue.bury(
                    ids,
                    f"run {run} was never created on the server (its creation failed; see above)",
                    reason=RUN_NOT_CREATED,
                )
            return 0
        if not self.journal.queue.claim(ids):
            raise _Pause(RuntimeError("another sender claimed these entries"), Verdict.RETRY)
        entries = self._server_values(batch.entries)
        # A live run's heartbeat rides along when half its period has passed: no request of its own then.
        beat_run = (
            run if self.heartbeats.due_in_batch(run) and batch.has_room_for_tags([Heartbeats.tag()["key"]]) else None
        )
        # So do the run's delivery marks, this batch's own rows included (applied with them, or not at all).
        scope = ("run", run)
        own = {uid: n for (of, uid), n in self.marks.highest(ops).items() if of == scope}
        # Owed before any of them is completed (Marks.done); owed marks are capped below rows still waiting,
        # so owing the whole batch before a pause cuts it short lets no mark run ahead.
        self.marks.done(ops)
        try:
            marks = self._checked(lambda: self.marks.owed_tags(scope, own))
            if not batch.has_room_for_tags([t["key"] for t in marks] + ([Heartbeats.tag()["key"]] if beat_run else [])):
                marks = []
            count, carried = (
                self._deliver_entries(remote, entries, beat_run=beat_run, marks=marks) if entries else (0, False)
            )
            if carried:
                self.marks.sent(scope, marks)
            return count
        finally:
            self.journal.queue.release(ids)  # only rows still in flight (a pause mid-way) go back to pending

    def _server_values(self, entries: list[Entry]) -> list[Entry]:
        """`entries` with run-id tag values translated to server ids; one that cannot be is set aside."""
        kept = []
        for entry in entries:
            if entry.kind == TAG and entry.key in RUN_ID_TAGS:
                assert isinstance(entry.value, str)  # a tag's value is text (Journal.append_batch)
                try:
                    entry.value = self.operations.server_tag_value(entry.key, entry.value)
                except UndeliverableError as exc:
                    self.journal.queue.bury(entry.ids, exc.message, reason=exc.reason)
                    continue
            kept.append(entry)
        return kept

    def _deliver_entries(
        self, remote: str, entries: list[Entry], *, beat_run: str | None = None, marks: Sequence[dict[str, str]] = ()
    ) -> tuple[int, bool]:
        """Send `entries` (split on a refusal); (rows delivered, whether the beat and `marks` went with them)."""
        body = batch_body(remote, entries)
        if beat_run is not None:
            body["tags"].append(Heartbeats.tag())
        body["tags"].extend(marks)
        ids = [i for e in entries for i in e.ids]
        try:
            self._checked(lambda: self.link.call("/runs/log-batch", body), poison=max(e.attempts for e in entries))
        except HttpError as exc:  # REJECT (or a poison entry): find the one entry the server objects to
            if beat_run is not None or marks:
                return self._deliver_entries(remote, entries)[0], False  # the same again without beat and marks
            if len(entries) == 1 or _refuses_the_run(exc):
                what = f"{entries[0].kind} {entries[0].key!r}" if len(entries) == 1 else f"{len(ids)} entries"
                reason = _dead_letter_reason(exc)
                log.warning("bridge: server refused %s: %s (kept as dead letters, %s)", what, exc.message, reason)
                self.journal.queue.bury(ids, exc.message, reason=reason)
                return 0, False
            mid = len(entries) // 2
            return self._deliver_entries(remote, entries[:mid])[0] + self._deliver_entries(remote, entries[mid:])[
                0
            ], False
        self.journal.queue.complete(ids)
        self.delivered += len(ids)
        if beat_run is not None:
            self.heartbeats.delivered(beat_run, remote)
        return len(ids), True

    def _send_merged(self, ops: list[Op]) -> int:
        """Consecutive model-metric ops of one run (MLflow links every point logged at a logged model's step to
        it) in one request; refused, they are sent one by one, so only the op at fault is set aside."""
        if len(ops) == 1:
            return self._send_single(ops[0])
        ids = [op.id for op in ops]
        if not self.journal.queue.claim(ids):
            raise _Pause(RuntimeError("another sender claimed these entries"), Verdict.RETRY)
        first = ops[0]
        whole = Op(
            first.id,
            first.run,
            first.kind,
            None,
            None,
            None,
            None,
            json.dumps({"metrics": [p for op in ops for p in op.json()["metrics"]]}),
            max(op.attempts for op in ops),
        )
        try:
            try:
                self._checked(lambda: handlers.apply(self.operations, whole), poison=whole.attempts)
            except (HttpError, UndeliverableError):
                refused = True
            else:
                refused = False
                self.marks.done(ops)  # owed before done (Marks.done)
                self.journal.queue.complete(ids, spool=[])
                self.delivered += len(ops)
        finally:
            self.journal.queue.release(ids)
        return sum(self._send_single(op) for op in ops) if refused else len(ops)

    def _send_single(self, op: Op) -> int:
        if not self.journal.queue.claim([op.id]):
            raise _Pause(RuntimeError("another sender claimed this entry"), Verdict.RETRY)
        # A resumable upload's failures are counted and judged by the upload itself (files.py: a part too big, too
        # slow, a file damaged in transit): a 5xx while it goes is the link's (a tunnel's 524), not the file's.
        poison = None if op.kind == ARTIFACT and self.journal.uploads.get(op.id) is not None else op.attempts
        try:
            try:
                spool = self._checked(lambda: handlers.apply(self.operations, op), poison=poison, kinds=(op.kind,))
            except HttpError as exc:
                reason = _dead_letter_reason(exc)
                log.warning(
                    "bridge: server refused %s of run %s: %s (kept as a dead letter, %s)",
                    op.kind,
                    op.run or "-",
                    exc.message,
                    reason,
                )
                self.marks.done([op])  # owed before done (Marks.done)
                self.journal.queue.bury([op.id], exc.message, reason=reason)
                return 0
            except UndeliverableError as exc:
                log.warning(
                    "bridge: %s of run %s cannot be delivered: %s (kept as a dead letter)",
                    op.kind,
                    op.run or "-",
                    exc.message,
                )
                self.marks.done([op])  # owed before done (Marks.done)
                self.journal.queue.bury([op.id], exc.message, reason=exc.reason)
                return 0
            self.marks.done([op])  # owed before done (Marks.done)
            self.journal.queue.complete([op.id], spool=spool)
            self.delivered += 1
            return 1
        finally:
            self.journal.queue.release([op.id])
            if op.kind == UPDATE_RUN:
                self.heartbeats.ending.discard(op.run)


class _ServerFailsOnIt(HttpError):
    """A server error that keeps coming back for the same entries while the server is otherwise fine."""


def _dead_letter_reason(exc: HttpError) -> str:
    return SERVER_FAILS_ON_IT if isinstance(exc, _ServerFailsOnIt) else SERVER_REFUSED


def _refuses_the_run(exc: HttpError) -> bool:
    """Whether MLflow refused a batch for its run (deleted, gone) rather than for one of its entries."""
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "must be in the 'active' state" in exc.message
