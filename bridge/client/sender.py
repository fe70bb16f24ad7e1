"""The sender: one background thread that delivers the journal to the MLflow server, in order per run.

Who decides an entry was delivered: the sender, and only when the server answered 200 — then the rows are
deleted. Anything less (no answer, a cut connection) leaves them to be sent again, which is safe:
  * metric points keep the timestamp of the original call, and MLflow drops a point identical in key, step,
    value and timestamp, so a re-sent batch adds nothing;
  * a param re-sent with the same value is accepted, tags simply overwrite;
  * a run is created with a client run key tag, and a create that may have been applied before (attempts > 0)
    first searches for that key, so a lost answer never leaves a ghost run;
  * an artifact whose upload may have been applied is checked by listing before it is sent again.

One sender delivers a journal at a time, across processes: it holds a flock on `<journal>.lock` until its
threads have ended — past `stop()`'s timeout if a request is still running — so no row is sent by two.

Failures are classified by `classify_failure`: network errors, timeouts, 429 and 5xx are retried for ever
with `bridge.retry.compute_backoff_ms`; 401/403 pause delivery ("token rejected") and retry slowly with a
re-read token; anything else the server refuses is split until the one offending entry is isolated and
kept as a dead letter with MLflow's message, while everything else keeps flowing.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
import math
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import requests
import urllib3

from bridge import config
from bridge.client import discovery
from bridge.client.intake import try_lock
from bridge.client.journal import (
    ARTIFACT, CREATE_EXPERIMENT, CREATE_RUN, DELETE_TAG, LOG_INPUTS, METRIC, PARAM, SET_EXPERIMENT_TAG, TAG,
    UPDATE_RUN, Journal, Op, decode_value,
)
from bridge.errors import TokenRejectedError
from bridge.retry import compute_backoff_ms

log = logging.getLogger(__name__)

#: MLflow's log_batch limits (mlflow.utils.validation).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_ENTRIES_PER_BATCH = 1000

HEARTBEAT_ENV = "BRIDGE_HEARTBEAT_S"
SEND_INTERVAL_ENV = "BRIDGE_SEND_INTERVAL_S"
HTTP_TIMEOUT_ENV = "BRIDGE_HTTP_TIMEOUT_S"
#: A live run's heartbeat period. `bridge serve` reaps after 300 s without one by default: five missed beats.
#: Every request counts against ngrok's free plan (20,000 a month), and a batch of metrics carries the beat.
DEFAULT_HEARTBEAT_S = 60.0
#: Whether the server still has a live run RUNNING is read after a gap in its heartbeats (what the reaper acts
#: on) and otherwise only every this many beats.
REVIVE_CHECK_EVERY_BEATS = 10
#: While `flush()` waits, a failing link is retried this often instead of after the full backoff.
FLUSH_RETRY_S = 1.0
#: How long new entries wait to be coalesced (a flush does not wait): at 1 s a training loop logging
#: 1,000 points/s costs one request per 1,000 points.
DEFAULT_SEND_INTERVAL_S = 1.0
DEFAULT_HTTP_TIMEOUT_S = 20.0
#: While the token is rejected, retry no faster than this.
TOKEN_RETRY_MIN_MS = 5_000
#: Consecutive network failures, and seconds of them, before the published record is re-read.
REDISCOVER_AFTER_FAILURES = 3
REDISCOVER_AFTER_S = 5.0
#: How often the intake is moved into SQLite and the journal fsynced, whatever delivery is doing: the most
#: an OS crash or power cut can take of what calls had already returned.
DURABLE_EVERY_S = 1.0
_TERMINAL_STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})
_READ_BATCH = 5000

API = "/api/2.0/mlflow"
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"


class Verdict(enum.Enum):
    RETRY = "retry"          # try the same request again later
    TOKEN = "token"          # the token was refused: pause, re-read it, retry slowly
    REJECT = "reject"        # the server refuses this content: isolate the entry, dead-letter it


class TransportFailure(Exception):
    """No usable HTTP answer: refused, reset, timed out, or cut mid-response."""


class HttpFailure(Exception):
    """The server answered with an error status."""

    def __init__(self, status: int, error_code: str | None, message: str) -> None:
        super().__init__(f"HTTP {status}" + (f" {error_code}" if error_code else "") + f": {message}")
        self.status = status
        self.error_code = error_code
        self.message = message


def classify_failure(exc: BaseException) -> Verdict:
    """What to do after `exc`: a pure function of the failure, never of how often it happened."""
    if isinstance(exc, TransportFailure):
        return Verdict.RETRY
    if isinstance(exc, HttpFailure):
        if exc.status in (401, 403):
            return Verdict.TOKEN
        if exc.status in (408, 425, 429) or exc.status >= 500:
            return Verdict.RETRY
        if exc.error_code is None:
            # Not MLflow speaking (a tunnel's "endpoint offline" 404, a proxy page): the link is wrong, not the data.
            return Verdict.RETRY
        return Verdict.REJECT
    return Verdict.RETRY


def retry_when(attempts: int, exc: BaseException) -> bool:
    """Whether to send again after `attempts` failures ending in `exc` (dramatiq's predicate shape)."""
    return classify_failure(exc) is not Verdict.REJECT


def _json_number(value: float) -> float | str:
    # Proto3 JSON spells the non-finite doubles as strings; bare NaN is not JSON.
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


@dataclass
class _Entry:
    """One log_batch entry; several journal rows when identical params or repeated tags were merged."""

    kind: str
    key: str
    value: object
    ts: int | None = None
    step: int | None = None
    ids: list[int] = field(default_factory=list)

    def payload(self) -> dict:
        if self.kind == METRIC:
            return {"key": self.key, "value": _json_number(decode_value(self.value)),
                    "timestamp": self.ts, "step": self.step or 0}
        return {"key": self.key, "value": self.value}


class _Batch:
    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.params: dict[str, _Entry] = {}
        self.tags: dict[str, _Entry] = {}
        self.metrics = 0

    def __bool__(self) -> bool:
        return bool(self.entries)

    def has_room_for_tag(self, key: str) -> bool:
        """Whether one more tag `key` fits MLflow's limits without touching what the batch already says."""
        return (len(self.entries) < MAX_ENTRIES_PER_BATCH and len(self.tags) < MAX_TAGS_PER_BATCH
                and key not in self.tags)

    def add(self, op: Op) -> bool:
        """Take `op` if it fits MLflow's limits and keeps the batch's meaning; False means send first."""
        if len(self.entries) >= MAX_ENTRIES_PER_BATCH:
            return False
        if op.kind == METRIC:
            if self.metrics >= MAX_METRICS_PER_BATCH:
                return False
            self.metrics += 1
            self.entries.append(_Entry(METRIC, op.key, op.value, op.ts, op.step, [op.id]))
        elif op.kind == PARAM:
            seen = self.params.get(op.key)
            if seen is not None:
                if seen.value != op.value:
                    return False  # a changed value must reach the server on its own (and be refused there)
                seen.ids.append(op.id)
                return True
            if len(self.params) >= MAX_PARAMS_PER_BATCH:
                return False
            self.params[op.key] = entry = _Entry(PARAM, op.key, op.value, ids=[op.id])
            self.entries.append(entry)
        else:
            seen = self.tags.get(op.key)
            if seen is not None:
                seen.value = op.value  # tags overwrite: only the last value matters
                seen.ids.append(op.id)
                return True
            if len(self.tags) >= MAX_TAGS_PER_BATCH:
                return False
            self.tags[op.key] = entry = _Entry(TAG, op.key, op.value, ids=[op.id])
            self.entries.append(entry)
        return True


class _AbortableAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter, plus `abort()`: cut its open connections from another thread.

    `Session.close()` only drops idle pooled connections; a request in flight would run to its timeout
    (20 s, 300 s for uploads) while `stop()` waits for it.
    """

    def __init__(self) -> None:
        self._open: weakref.WeakSet = weakref.WeakSet()
        self._open_lock = threading.Lock()
        super().__init__()

    def _track(self, conn) -> None:
        with self._open_lock:
            self._open.add(conn)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        track = self._track

        class HTTPPool(urllib3.HTTPConnectionPool):
            def _new_conn(self):
                conn = super()._new_conn()
                track(conn)
                return conn

        class HTTPSPool(urllib3.HTTPSConnectionPool):
            def _new_conn(self):
                conn = super()._new_conn()
                track(conn)
                return conn

        self.poolmanager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}

    def abort(self) -> None:
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            sock = getattr(conn, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    # socket.socket's own shutdown, not SSLSocket's (which drops its TLS state under the reader).
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Pause(Exception):
    """Stop this delivery round: the link failed (retry) or the token was refused."""

    def __init__(self, cause: Exception, verdict: Verdict) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.verdict = verdict


class Sender:
    """Delivers `journal` to the MLflow server at `url`, in a daemon thread started by `start()`."""

    def __init__(self, journal: Journal, url: str, token: str | None, *,
                 token_source: Callable[[], str | None] | None = None,
                 heartbeat_s: float | None = None, send_interval_s: float | None = None,
                 http_timeout_s: float | None = None, rediscover: bool = True) -> None:
        self.journal = journal
        self.url = url.rstrip("/")
        self._token = token
        self._token_source = token_source
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else config.env_float(HEARTBEAT_ENV,
                                                                                        DEFAULT_HEARTBEAT_S)
        self.send_interval_s = send_interval_s if send_interval_s is not None else config.env_float(
            SEND_INTERVAL_ENV, DEFAULT_SEND_INTERVAL_S)
        timeout = http_timeout_s if http_timeout_s is not None else config.env_float(HTTP_TIMEOUT_ENV,
                                                                                     DEFAULT_HTTP_TIMEOUT_S)
        self.timeout = (min(5.0, timeout), timeout)
        self.rediscover_enabled = rediscover
        self.online: bool | None = None
        self.last_error: str | None = None
        self.token_rejected = False
        self.delivered = 0
        self.requests = 0
        self._adapter = _AbortableAdapter()
        self._session = requests.Session()
        self._session.mount("http://", self._adapter)
        self._session.mount("https://", self._adapter)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._backing_off = False
        self._flushing = 0
        self._thread: threading.Thread | None = None
        self._durable_thread: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._threads_alive = 0
        self._on_stopped: list[Callable[[], None]] = []
        self._lock_file = None
        self._live_runs: set[str] = set()
        self._beats: dict[str, float] = {}  # live run -> when its last heartbeat was delivered
        self._beats_tried: dict[str, float] = {}  # live run -> when a heartbeat request of its own was last sent
        self._beats_unchecked: dict[str, int] = {}  # live run -> beats since the server's status was read
        self._failures = 0
        self._failing_since: float | None = None
        self._last_adopt = time.monotonic()
        self.url_listeners: list[Callable[[str], None]] = []

    # ---------------------------------------------------------------------------------- control

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(self._loop,), name="bridge-sender",
                                            daemon=True)
            self._durable_thread = threading.Thread(target=self._run, args=(self._durable_loop,),
                                                    name="bridge-journal-sync", daemon=True)
            with self._state_lock:
                self._threads_alive = 2
            self._thread.start()
            self._durable_thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop delivering; True once the threads have ended, False when one is still busy after `timeout`.

        While a thread is still busy it keeps the journal's delivery lock (so no other sender re-sends what
        it is sending) and the journal must stay open: see `when_stopped`.
        """
        self._stop.set()
        self._wake.set()
        self._adapter.abort()  # a request in flight fails now (its rows go back to pending) instead of timing out
        deadline = time.monotonic() + timeout
        for thread in (self._thread, self._durable_thread):
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        if any(t is not None and t.is_alive() for t in (self._thread, self._durable_thread)):
            log.warning("bridge: the sender did not stop within %.0f s; it keeps journal %s until it ends",
                        timeout, self.journal.path)
            return False
        self._thread = self._durable_thread = None
        self._session.close()
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

    def wake(self) -> None:
        """Deliver now rather than after the coalescing interval."""
        self._wake.set()

    def flush(self, timeout: float | None = None) -> int:
        """Wait until the journal is delivered or `timeout` passes; the number of entries left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._flushing += 1
        last_wake = 0.0
        try:
            while True:
                left = self.journal.backlog().total
                if left == 0 or self._thread is None:
                    return left
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return left
                # Someone is waiting: don't sleep out a backoff of up to 30 s once the link may be back, but
                # retry at most once a second so a flush never turns the backoff into a tight loop.
                if not self._backing_off or now - last_wake >= FLUSH_RETRY_S:
                    self._wake.set()
                    last_wake = now
                # Counting the backlog scans the journal: poll less often while it is large.
                poll = 0.05 if left < 5_000 else 0.25
                self._idle.wait(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
                self._idle.clear()
        finally:
            self._flushing -= 1

    def watch_run(self, local_id: str) -> None:
        """Keep this run's heartbeat going until `unwatch_run` (it was created by this process)."""
        self._live_runs.add(local_id)

    def unwatch_run(self, local_id: str) -> None:
        self._live_runs.discard(local_id)
        for beats in (self._beats, self._beats_tried, self._beats_unchecked):
            beats.pop(local_id, None)

    @property
    def token(self) -> str | None:
        return self._token

    # ------------------------------------------------------------------------------------- loop

    def _acquire_lock(self) -> bool:
        """One sender per journal at a time, across processes (a live process and `bridge sync`)."""
        handle = open(str(self.journal.path) + ".lock", "a+")
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
            self.last_error = f"another process is delivering journal {self.journal.path}; waiting for it"
            with contextlib.suppress(Exception):
                self.journal.move_intake()  # so that process's sender sees this one's points
            if self._stop.wait(0.5):
                return
        self.journal.reset_in_flight()
        attempts = 0
        while not self._stop.is_set():
            try:
                if not self.deliver_round() and self.online is not True:
                    self.probe()  # nothing to send, but reads want to know when the server is back
                self._heartbeat()
                attempts = 0
                wait = self.send_interval_s
            except _Pause as pause:
                attempts += 1
                wait = compute_backoff_ms(attempts) / 1000
                if pause.verdict is Verdict.TOKEN:
                    wait = max(wait, compute_backoff_ms(attempts, min_backoff_ms=TOKEN_RETRY_MIN_MS) / 1000)
                    self._refresh_token()
                elif not self._stop.is_set():
                    self._maybe_rediscover()
            except Exception as exc:  # a bug or a journal problem must not kill delivery for good
                log.exception("bridge sender: unexpected error, retrying")
                self.last_error = f"{type(exc).__name__}: {exc}"
                attempts += 1
                wait = compute_backoff_ms(attempts) / 1000
            if time.monotonic() - self._last_adopt > 5.0:
                with contextlib.suppress(Exception):
                    self.journal.adopt_orphans()  # points of a child process that was killed meanwhile
                self._last_adopt = time.monotonic()
            self._backing_off = attempts > 0
            self._idle.set()
            self._wake.wait(wait)
            self._wake.clear()

    def _durable_loop(self) -> None:
        """Every DURABLE_EVERY_S, `journal.sync()`: not tied to delivery rounds, which can take minutes."""
        while not self._stop.wait(DURABLE_EVERY_S):
            try:
                self.journal.sync()
            except Exception as exc:  # the disk is full or busy: say so, keep trying
                log.warning("bridge: could not sync journal %s: %s", self.journal.path, exc)
        with contextlib.suppress(Exception):
            self.journal.sync()

    def probe(self) -> None:
        """One cheap authenticated request; raises _Pause when the server is not usable."""
        self._checked(lambda: self.call("/experiments/search", {"max_results": 1}, method="GET"))

    def deliver_round(self) -> int:
        """Deliver everything pending now; the number of journal rows delivered. Raises _Pause."""
        delivered = 0
        # A round delivers what was logged before it began; points logged meanwhile wait for the next one,
        # so a steady trickle is coalesced instead of chased in tiny batches.
        self.journal.move_intake()
        upto = self.journal.last_id()
        for run in self.journal.runs_with_pending():
            if self._stop.is_set():
                break
            while True:
                ops = self.journal.pending_ops(run, _READ_BATCH, upto)
                if not ops:
                    break
                last = len(ops) < _READ_BATCH
                count, held = self._deliver_ops(run, ops, hold_tail=last and not self._flushing)
                delivered += count
                if held or last or self._stop.is_set():
                    break
        return delivered

    def _deliver_ops(self, run: str, ops: list[Op], *, hold_tail: bool = False) -> tuple[int, bool]:
        """Send `ops` in order; (rows delivered, whether a small trailing batch was held for the next round).

        A steady stream would otherwise cost two requests a round (a full batch and a sliver): the sliver
        waits one round and rides in a full batch instead.
        """
        batch = _Batch()
        count = 0
        sent_full = False
        for op in ops:
            if self._stop.is_set():
                return count, False  # what is not sent yet stays pending, for whoever delivers next
            if op.kind in (METRIC, PARAM, TAG):
                if not batch.add(op):
                    count += self._send_batch(run, batch)
                    sent_full = True
                    batch = _Batch()
                    batch.add(op)
                continue
            if batch:
                count += self._send_batch(run, batch)
                batch = _Batch()
            count += self._send_single(op)
        if batch:
            if hold_tail and sent_full and batch.metrics == len(batch.entries):
                return count, True
            count += self._send_batch(run, batch)
        return count, False

    # ---------------------------------------------------------------------------------- http

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def request(self, method: str, path: str, *, json_body: dict | None = None, params: dict | None = None,
                data=None, timeout: tuple[float, float] | None = None,
                session: requests.Session | None = None) -> requests.Response:
        """One HTTP request to the server; errors as TransportFailure / HttpFailure, never with the token.

        Other threads (the store's reads) pass their own `session`: requests' sessions are not shared safely.
        """
        self.requests += 1
        try:
            resp = (session or self._session).request(method, self.url + path, json=json_body, params=params, data=data,
                                         headers=self._headers(), timeout=timeout or self.timeout)
        except requests.RequestException as exc:
            self._note_failure(f"{type(exc).__name__} talking to {self.url}")
            raise TransportFailure(f"{type(exc).__name__} talking to {self.url}") from None
        if resp.status_code >= 400:
            error_code, message = None, resp.text[:500]
            with contextlib.suppress(ValueError, AttributeError):
                body = resp.json()
                error_code, message = body.get("error_code"), body.get("message", message)
            failure = HttpFailure(resp.status_code, error_code, message)
            if classify_failure(failure) is not Verdict.REJECT:
                self._note_failure(str(failure))
            raise failure
        self._note_success()
        return resp

    def call(self, endpoint: str, body: dict, *, method: str = "POST") -> dict:
        if method == "GET":
            resp = self.request("GET", API + endpoint, params=body)
        else:
            resp = self.request(method, API + endpoint, json_body=body)
        try:
            return resp.json() if resp.content else {}
        except ValueError:
            raise TransportFailure(f"{self.url}{API}{endpoint} answered with something that is not JSON") from None

    def _note_failure(self, message: str) -> None:
        self.online = False
        self.last_error = message
        self._failures += 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()

    def _note_success(self) -> None:
        self.online = True
        self._failures = 0
        self._failing_since = None
        if self.token_rejected:
            log.info("bridge: the server accepts the token again; delivery resumed")
        self.token_rejected = False

    def _checked(self, fn: Callable[[], object]) -> object:
        """Run one request; a failure that is not the content's fault pauses the round."""
        try:
            return fn()
        except (TransportFailure, HttpFailure) as exc:
            verdict = classify_failure(exc)
            if verdict is Verdict.REJECT:
                raise
            if verdict is Verdict.TOKEN:
                if not self.token_rejected:
                    log.warning("bridge: %s — delivery paused; the journal keeps everything",
                                TokenRejectedError("the server rejected the access token (HTTP %d)" % exc.status))
                self.token_rejected = True
                self.last_error = f"token rejected (HTTP {exc.status}); delivery paused, retrying slowly"
            raise _Pause(exc, verdict) from None

    def _refresh_token(self) -> None:
        if self._token_source is None:
            return
        with contextlib.suppress(Exception):
            token = self._token_source()
            if token:
                self._token = token

    def _maybe_rediscover(self) -> None:
        if not self.rediscover_enabled or self._failures < REDISCOVER_AFTER_FAILURES:
            return
        if self._failing_since is None or time.monotonic() - self._failing_since < REDISCOVER_AFTER_S:
            return
        try:
            endpoint = discovery.rediscover(self._token, self.url)
        except Exception as exc:  # re-discovery is best effort; delivery keeps retrying the old URL
            log.debug("bridge: re-discovery failed: %s", exc)
            return
        if endpoint is not None and endpoint.url.rstrip("/") != self.url:
            log.warning("bridge: the server moved to %s (%s); delivering there", endpoint.url, endpoint.source)
            self.url = endpoint.url.rstrip("/")
            self._failures = 0
            self._failing_since = None
            for listener in self.url_listeners:
                with contextlib.suppress(Exception):
                    listener(self.url)

    # --------------------------------------------------------------------------- run metadata

    def remote_experiment_id(self, experiment_id: str) -> str | None:
        """The server's id for `experiment_id` (a local id once mapped, or already a server id)."""
        record = self.journal.experiment(experiment_id)
        if record is None:
            return experiment_id
        return record.remote_id

    def remote_run(self, run: str) -> tuple[str | None, str | None]:
        """(server run id, server artifact root) for a local run id; a run not created here is the server's."""
        record = self.journal.run(run)
        if record is None:
            return run, None
        return record.remote_id, record.artifact_uri

    # ----------------------------------------------------------------------------- deliveries

    def _send_batch(self, run: str, batch: _Batch) -> int:
        remote, _ = self.remote_run(run)
        ids = [i for entry in batch.entries for i in entry.ids]
        if remote is None:
            self.journal.bury(ids, f"run {run} was never created on the server (its creation failed; see above)")
            return 0
        if not self.journal.claim(ids):
            raise _Pause(RuntimeError("another sender claimed these entries"), Verdict.RETRY)
        # A live run's heartbeat rides along when half its period has passed: no request of its own then.
        beat_run = run if self._beat_due(run, self.heartbeat_s / 2) and batch.has_room_for_tag(
            config.HEARTBEAT_TAG) else None
        try:
            return self._deliver_entries(remote, batch.entries, beat_run=beat_run)
        finally:
            self.journal.release(ids)  # only rows still in flight (a pause mid-way) go back to pending

    def _deliver_entries(self, remote: str, entries: list[_Entry], *, beat_run: str | None = None) -> int:
        body = {"run_id": remote,
                "metrics": [e.payload() for e in entries if e.kind == METRIC],
                "params": [e.payload() for e in entries if e.kind == PARAM],
                "tags": [e.payload() for e in entries if e.kind == TAG]}
        if beat_run is not None:
            body["tags"].append({"key": config.HEARTBEAT_TAG, "value": str(int(time.time()))})
        ids = [i for e in entries for i in e.ids]
        try:
            self._checked(lambda: self.call("/runs/log-batch", body))
        except HttpFailure as exc:  # REJECT: find the one entry the server objects to
            if beat_run is not None:
                return self._deliver_entries(remote, entries)  # the same again without the beat
            if len(entries) == 1 or _refuses_the_run(exc):
                what = f"{entries[0].kind} {entries[0].key!r}" if len(entries) == 1 else f"{len(ids)} entries"
                log.warning("bridge: server refused %s: %s (kept as dead letters)", what, exc.message)
                self.journal.bury(ids, exc.message)
                return 0
            mid = len(entries) // 2
            return self._deliver_entries(remote, entries[:mid]) + self._deliver_entries(remote, entries[mid:])
        self.journal.complete(ids)
        self.delivered += len(ids)
        if beat_run is not None:
            self._beat_delivered(beat_run, remote)
        return len(ids)

    def _send_single(self, op: Op) -> int:
        if not self.journal.claim([op.id]):
            raise _Pause(RuntimeError("another sender claimed this entry"), Verdict.RETRY)
        spool: list[str] = []
        try:
            try:
                spool = self._apply(op)
            except HttpFailure as exc:
                log.warning("bridge: server refused %s of run %s: %s (kept as a dead letter)", op.kind,
                            op.run or "-", exc.message)
                self.journal.bury([op.id], exc.message)
                return 0
            self.journal.complete([op.id], spool=spool)
            self.delivered += 1
            return 1
        finally:
            self.journal.release([op.id])

    def _apply(self, op: Op) -> list[str]:
        """Apply one non-batch op on the server; returns spool files that can go once it is done."""
        body = op.json()
        if op.kind == CREATE_EXPERIMENT:
            self._create_experiment(op.key, body["name"], body.get("tags") or {})
            return []
        if op.kind == SET_EXPERIMENT_TAG:
            remote = self.remote_experiment_id(body["experiment_id"])
            self._checked(lambda: self.call("/experiments/set-experiment-tag",
                                            {"experiment_id": remote, "key": op.key, "value": body["value"]}))
            return []
        if op.kind == CREATE_RUN:
            self._create_run(op, body)
            return []
        remote, artifact_root = self.remote_run(op.run)
        if remote is None:
            raise HttpFailure(400, "RUN_NOT_CREATED", f"run {op.run} was never created on the server")
        if op.kind == UPDATE_RUN:
            payload = {"run_id": remote, "run_uuid": remote}
            payload.update({k: v for k, v in body.items() if v is not None})
            self._checked(lambda: self.call("/runs/update", payload))
        elif op.kind == DELETE_TAG:
            try:
                self._checked(lambda: self.call("/runs/delete-tag", {"run_id": remote, "key": op.key}))
            except HttpFailure as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST" or op.attempts == 0:
                    raise  # gone already after an earlier, unacknowledged delete: that is the goal
        elif op.kind == LOG_INPUTS:
            self._checked(lambda: self.call("/runs/log-inputs", {**body, "run_id": remote}))
        elif op.kind == ARTIFACT:
            if not self.journal.superseded(op):  # else a newer copy of the same path goes up later instead
                self._upload_artifact(op, body, remote, artifact_root)
            return [body["spool"]]
        else:
            raise HttpFailure(400, "UNKNOWN_OPERATION", f"unknown journal operation {op.kind!r}")
        return []

    def _create_experiment(self, local_id: str, name: str, tags: dict[str, str]) -> str:
        """Get-or-create by name, so every process and every retry lands on one server experiment."""
        def lookup() -> str | None:
            try:
                found = self._checked(lambda: self.call("/experiments/get-by-name", {"experiment_name": name},
                                                        method="GET"))
            except HttpFailure as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return None
                raise
            return found["experiment"]["experiment_id"]

        remote = lookup()
        if remote is None:
            try:
                created = self._checked(lambda: self.call("/experiments/create", {
                    "name": name, "tags": [{"key": k, "value": v} for k, v in tags.items()]}))
                remote = created["experiment_id"]
            except HttpFailure as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                remote = lookup()  # created meanwhile, by us (a lost answer) or someone else
                if remote is None:
                    raise
        self.journal.map_experiment(local_id, remote)
        return remote

    def _create_run(self, op: Op, body: dict) -> None:
        record = self.journal.run(op.run)
        if record is None:
            raise HttpFailure(400, "RUN_NOT_RECORDED", f"run {op.run} is missing from the journal's run table")
        experiment = self.remote_experiment_id(record.experiment_id)
        if experiment is None:
            raise HttpFailure(400, "EXPERIMENT_NOT_CREATED",
                              f"experiment {record.experiment_id} of run {op.run} was never created on the server")
        found = None
        if op.attempts > 0:  # an earlier try may have created it: find it by its run key, never make a ghost
            result = self._checked(lambda: self.call("/runs/search", {
                "experiment_ids": [experiment], "run_view_type": "ALL", "max_results": 1,
                "filter": f"tags.`{config.RUN_KEY_TAG}` = '{op.run}'"}))
            runs = result.get("runs") or []
            found = runs[0]["info"] if runs else None
        if found is None:
            tags = dict(body.get("tags") or {})
            tags[config.RUN_KEY_TAG] = op.run
            if op.run in self._live_runs:
                # Born with a heartbeat: a process killed before its first heartbeat round still gets reaped.
                tags[config.HEARTBEAT_TAG] = str(int(time.time()))
                self._beats[op.run] = time.time()
            payload = {"experiment_id": experiment, "start_time": record.start_time,
                       "tags": [{"key": k, "value": v} for k, v in tags.items()]}
            if record.user_id:
                payload["user_id"] = record.user_id
            if record.name:
                payload["run_name"] = record.name
            found = self._checked(lambda: self.call("/runs/create", payload))["run"]["info"]
        self.journal.map_run(op.run, found["run_id"], found.get("artifact_uri"))

    def _beat_due(self, run: str, after_s: float) -> bool:
        return run in self._live_runs and time.time() - self._beats.get(run, 0.0) >= after_s

    def _heartbeat(self) -> None:
        """A heartbeat request for each live run that no batch carried one for within the period."""
        if self.online is False:
            return
        for run in list(self._live_runs):
            now = time.time()
            if not self._beat_due(run, self.heartbeat_s) or now - self._beats_tried.get(run, 0.0) < self.heartbeat_s:
                continue  # a batch carried one, or this run's own beat was tried (and perhaps refused) lately
            remote, _ = self.remote_run(run)
            if remote is None:
                continue
            self._beats_tried[run] = now
            try:
                self.call("/runs/set-tag", {"run_id": remote, "key": config.HEARTBEAT_TAG, "value": str(int(now))})
            except HttpFailure as exc:  # e.g. the run was deleted on the server: the other runs still beat
                log.debug("bridge: heartbeat for run %s refused: %s", run, exc)
                continue
            except TransportFailure as exc:  # the link: the next round's probe or delivery finds out
                log.debug("bridge: heartbeat for run %s failed: %s", run, exc)
                return
            self._beat_delivered(run, remote)

    def _beat_delivered(self, run: str, remote: str) -> None:
        """Note a delivered beat; after a gap the reaper may have acted on, see whether the run needs reviving."""
        now = time.time()
        previous = self._beats.get(run)
        self._beats[run] = now
        unchecked = self._beats_unchecked.get(run, 0) + 1
        # Shorter than the reaper's default timeout whatever this client's period, so no reaping goes unseen.
        gap_s = min(2 * self.heartbeat_s, config.DEFAULT_HEARTBEAT_TIMEOUT_S / 2)
        gap = previous is not None and now - previous > gap_s
        if not gap and unchecked < REVIVE_CHECK_EVERY_BEATS:
            self._beats_unchecked[run] = unchecked
            return
        # After a gap, look again at the next beat too: a reaper pass that listed the run before this beat
        # arrived may still mark it KILLED just after this read.
        self._beats_unchecked[run] = REVIVE_CHECK_EVERY_BEATS - 1 if gap else 0
        try:
            self._revive_if_reaped(run, remote)
        except (TransportFailure, HttpFailure) as exc:
            self._beats_unchecked[run] = REVIVE_CHECK_EVERY_BEATS  # read it again with the next beat
            log.debug("bridge: could not read the status of run %s: %s", run, exc)

    def _revive_if_reaped(self, run: str, remote: str) -> None:
        """Mark RUNNING again a live run the server ended (the reaper, after an outage longer than its timeout).

        Its own final status is sent later by this same thread, so that one still wins.
        """
        info = self.call("/runs/get", {"run_id": remote}, method="GET")["run"]["info"]
        if info.get("status") == "RUNNING" or run not in self._live_runs:
            return
        record = self.journal.run(run)
        if record is None or record.status in _TERMINAL_STATUSES:
            return  # this process ended it: its final status is journaled, on its way
        # The reason goes first, so a run seen RUNNING again never still carries why it was killed.
        with contextlib.suppress(HttpFailure):  # absent when someone else ended it: nothing to remove
            self.call("/runs/delete-tag", {"run_id": remote, "key": config.KILLED_REASON_TAG})
        self.call("/runs/update", {"run_id": remote, "run_uuid": remote, "status": "RUNNING"})
        log.warning("bridge: the server had marked run %s %s while it was still logging (no heartbeat got through); "
                    "it is RUNNING again", run, info.get("status"))

    # ------------------------------------------------------------------------------- artifacts

    def artifact_url(self, artifact_root: str, path: str) -> str:
        """The mlflow-artifacts proxy URL of `path` under a run's server artifact root."""
        if not artifact_root or not artifact_root.startswith("mlflow-artifacts:"):
            raise HttpFailure(400, "ARTIFACTS_NOT_PROXIED",
                              f"the server's artifact root for this run is {artifact_root!r}; bridge uploads only "
                              "through the server's artifact proxy (mlflow server --serve-artifacts)")
        rest = artifact_root[len("mlflow-artifacts:"):]
        if rest.startswith("//"):
            rest = rest[2:].split("/", 1)[1] if "/" in rest[2:] else ""
        base = rest.strip("/")
        return ARTIFACTS_API + "/" + quote(f"{base}/{path}".strip("/"))

    def _remote_size(self, artifact_root: str, path: str) -> int | None:
        folder, _, name = path.rpartition("/")
        base = self.artifact_url(artifact_root, "")[len(ARTIFACTS_API) + 1:]
        listing = self._checked(lambda: self.request("GET", ARTIFACTS_API, params={
            "path": f"{base}/{folder}".strip("/") if folder else base}).json())
        for item in listing.get("files") or []:
            if item.get("path") == name and not item.get("is_dir"):
                return int(item.get("file_size") or 0)
        return None

    def _upload_artifact(self, op: Op, body: dict, remote: str, artifact_root: str | None) -> None:
        if not artifact_root:
            found = self._checked(lambda: self.call("/runs/get", {"run_id": remote}, method="GET"))
            artifact_root = found["run"]["info"]["artifact_uri"]
        spool_file: Path = self.journal.spool_dir / body["spool"]
        if not spool_file.exists():
            raise HttpFailure(400, "SPOOL_FILE_MISSING", f"spooled copy of {body['path']} is missing from "
                                                         f"{self.journal.spool_dir}")
        if _sha256(spool_file) != body["sha256"]:
            raise HttpFailure(400, "SPOOL_FILE_DAMAGED", f"the spooled copy of {body['path']} no longer matches "
                                                         "the sha256 recorded when it was logged")
        if op.attempts > 0 and self._remote_size(artifact_root, body["path"]) == body["size"]:
            return  # an earlier, unacknowledged upload arrived whole
        url = self.artifact_url(artifact_root, body["path"])
        # A 200 comes only after the server has read the whole Content-Length body: no listing to check it
        # (every request counts against ngrok's free plan).
        with open(spool_file, "rb") as fh:
            self._checked(lambda: self.request("PUT", url, data=fh, timeout=(self.timeout[0], max(300.0,
                                                                                               self.timeout[1]))))


def _refuses_the_run(exc: HttpFailure) -> bool:
    """Whether MLflow refused a batch for its run (deleted, gone) rather than for one of its entries."""
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "must be in the 'active' state" in exc.message


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
