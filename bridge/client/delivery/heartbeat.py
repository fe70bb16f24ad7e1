"""Heartbeats: how `bridge serve`'s reaper tells a live run from one whose process died.

A live run (created or resumed by this process and not ended) carries a `bridge.heartbeat` tag refreshed
every `heartbeat_s`. The beat rides inside the run's log_batch requests when there are any and costs a
request of its own only when nothing else was sent. After a gap long enough for the reaper to have acted,
and every tenth beat otherwise, the run's server status is read: a run the reaper marked KILLED while this
process was cut off is set RUNNING again (its own final status, sent later by the same thread, still wins).
"""

from __future__ import annotations

import contextlib
import logging
import time

from bridge import config
from bridge.client.delivery.marks import TERMINAL_STATUSES, DeliveryMarks
from bridge.client.journal import Journal
from bridge.client.link import Link
from bridge.client.options import DEFAULT_OTHER_RUNS_EVERY_S
from bridge.errors import HttpError, LinkError, TransportError

log = logging.getLogger(__name__)

#: Whether the server still has a live run RUNNING is read after a gap in its heartbeats (what the reaper acts
#: on) and otherwise only every this many beats.
REVIVE_CHECK_EVERY_BEATS = 10


class Heartbeats:
    """The live runs of this process and when each last beat on the server."""

    def __init__(
        self,
        link: Link,
        journal: Journal,
        heartbeat_s: float,
        *,
        marks: DeliveryMarks | None = None,
        other_runs_every_s: float = DEFAULT_OTHER_RUNS_EVERY_S,
    ) -> None:
        self.link = link
        self.other_runs_every_s = other_runs_every_s
        self.journal = journal
        self.heartbeat_s = heartbeat_s
        self.marks = marks  # a live run's owed delivery marks ride in its heartbeat request
        self.live: set[str] = set()
        #: Runs whose end status waits for their files (the file lane): they beat on until it is sent, or the
        #: reaper would take a run still uploading its weights for a dead one.
        self.ending: set[str] = set()
        self._others: set[str] = set()  # live runs of other living processes that journal here
        self._others_read = 0.0
        self._beats: dict[str, float] = {}  # live run -> when its last heartbeat was delivered
        self._tried: dict[str, float] = {}  # live run -> when a heartbeat request of its own was last sent
        self._unchecked: dict[str, int] = {}  # live run -> beats since the server's status was read

    def watch(self, run: str) -> None:
        """Keep this run's heartbeat going until `unwatch` (this process created or resumed it)."""
        self.live.add(run)

    def unwatch(self, run: str) -> None:
        self.live.discard(run)
        for beats in (self._beats, self._tried, self._unchecked):
            beats.pop(run, None)

    def is_live(self, run: str) -> bool:
        return run in self.live or run in self._others

    def due(self, run: str, after_s: float) -> bool:
        return self.is_live(run) and time.time() - self._beats.get(run, 0.0) >= after_s

    def _read_others(self) -> None:
        now = time.monotonic()
        if now - self._others_read < self.other_runs_every_s:
            return
        self._others_read = now
        try:
            self._others = self.journal.ids.runs_of_live_processes() - self.live
        except Exception as exc:  # a busy journal: ask again next time
            log.debug("bridge: could not list other processes' runs: %s", exc)

    def due_in_batch(self, run: str) -> bool:
        """Whether a batch of `run` going out now should carry a beat (half its period has passed)."""
        return self.due(run, self.heartbeat_s / 2)

    def birth_tags(self, run: str) -> dict[str, str]:
        """Every run is born with a heartbeat, so the reaper can judge it: a live one beats from now on (a
        process killed before its first round is still reaped); a run whose process is gone (delivered later
        by `bridge sync` or another process) carries the time it was journaled, so a crashed one is reaped."""
        self._read_others()
        if self.is_live(run):
            now = time.time()
            self._beats[run] = now
            return {config.HEARTBEAT_TAG: str(int(now))}
        created = self.journal.ids.run_created_at(run)
        return {config.HEARTBEAT_TAG: str(int(created if created is not None else time.time()))}

    @staticmethod
    def tag() -> dict[str, str]:
        return {"key": config.HEARTBEAT_TAG, "value": str(int(time.time()))}

    def beat_round(self) -> None:
        """A heartbeat request for each live run that no batch carried one for within the period."""
        if self.link.online is False:
            return
        self._read_others()
        for run in list(self.live | self._others | self.ending):
            now = time.time()
            if not self.due(run, self.heartbeat_s) or now - self._tried.get(run, 0.0) < self.heartbeat_s:
                continue  # a batch carried one, or this run's own beat was tried (and perhaps refused) lately
            remote, _ = self.journal.ids.server_run(run)
            if remote is None:
                continue
            self._tried[run] = now
            beat = {"key": config.HEARTBEAT_TAG, "value": str(int(now))}
            try:
                owed = {}
                if self.marks is not None:  # both lanes' marks ride along (marks.py)
                    owed = {kind: self.marks.owed_tags((kind, run)) for kind in ("run", "files")}
                marks = [tag for tags in owed.values() for tag in tags]
                if marks:
                    self.link.call(
                        "/runs/log-batch", {"run_id": remote, "metrics": [], "params": [], "tags": [beat, *marks]}
                    )
                    assert self.marks is not None  # the marks came from it
                    for kind, tags in owed.items():
                        self.marks.sent((kind, run), tags)
                else:
                    self.link.call("/runs/set-tag", {"run_id": remote, **beat})
            except HttpError as exc:  # e.g. the run was deleted on the server: the other runs still beat
                log.debug("bridge: heartbeat for run %s refused: %s", run, exc)
                continue
            except TransportError as exc:  # the link: the next round's probe or delivery finds out
                log.debug("bridge: heartbeat for run %s failed: %s", run, exc)
                return
            self.delivered(run, remote)

    def delivered(self, run: str, remote: str) -> None:
        """Note a delivered beat; after a gap the reaper may have acted on, see whether the run needs reviving."""
        now = time.time()
        previous = self._beats.get(run)
        self._beats[run] = now
        unchecked = self._unchecked.get(run, 0) + 1
        # Shorter than the reaper's default timeout whatever this client's period, so no reaping goes unseen.
        gap_s = min(2 * self.heartbeat_s, config.DEFAULT_HEARTBEAT_TIMEOUT_S / 2)
        gap = previous is not None and now - previous > gap_s
        if not gap and unchecked < REVIVE_CHECK_EVERY_BEATS:
            self._unchecked[run] = unchecked
            return
        # After a gap, look again at the next beat too: a reaper pass that listed the run before this beat
        # arrived may still mark it KILLED just after this read.
        self._unchecked[run] = REVIVE_CHECK_EVERY_BEATS - 1 if gap else 0
        try:
            self.revive_if_reaped(run, remote)
        except LinkError as exc:
            self._unchecked[run] = REVIVE_CHECK_EVERY_BEATS  # read it again with the next beat
            log.debug("bridge: could not read the status of run %s: %s", run, exc)

    def revive_if_reaped(self, run: str, remote: str) -> None:
        """Mark RUNNING again a live run the server ended (the reaper, after an outage longer than its timeout)."""
        info = self.link.call("/runs/get", {"run_id": remote}, method="GET")["run"]["info"]
        if info.get("status") == "RUNNING" or not self.is_live(run):
            return
        record = self.journal.ids.run(run)
        if record is not None and record.status in TERMINAL_STATUSES:
            return  # this process ended it: its final status is journaled, on its way
        # The reason goes first, so a run seen RUNNING again never still carries why it was killed.
        with contextlib.suppress(HttpError):  # absent when someone else ended it: nothing to remove
            self.link.call("/runs/delete-tag", {"run_id": remote, "key": config.KILLED_REASON_TAG})
        self.link.call("/runs/update", {"run_id": remote, "run_uuid": remote, "status": "RUNNING"})
        log.warning(
            "bridge: the server had marked run %s %s while it was still logging (no heartbeat got through); "
            "it is RUNNING again",
            run,
            info.get("status"),
        )
