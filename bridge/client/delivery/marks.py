"""Delivery marks: a stale copy of a journal must not undo on the server what was done after it was taken.

A journal file can be delivered twice: a Drive copy that lagged behind the original, a folder copied and
synced later, a new Colab runtime resuming from a snapshot. Metric points and params re-sent change nothing
(MLflow drops an identical point; a param keeps its value), but a tag, a deleted tag, a run's status or an
artifact's bytes delivered again from an old copy would overwrite what the original delivered after it.

So every journaled row is written under the `lineage` of the Journal that wrote it (one per opening of the
file, journal.py), and the server keeps, per run (and per experiment), a mark for each lineage that
delivered to it: the tag `bridge.delivered.<lineage uid>.<local run or experiment id>` = the highest row id of
that lineage delivered or set aside there. Delivery is in row order per run by one sender at a time, so every
row of that lineage and run at or below the mark is done. Before a row that can overwrite something
(MARKED_RUN_KINDS, MARKED_EXPERIMENT_KINDS) goes out, its run's marks are read from the server once per sender;
a row at or below its lineage's mark is done already — by whoever delivered it — and is completed without
sending. A copy opened elsewhere writes under a lineage of its own, so its new rows are never taken for old
ones. The local id in the tag keeps writes to one server run under two ids (the local key and the server id)
from covering each other.

Marks never go ahead of what is done: a mark too low only lets an old write through again (what happened before
this module), one too high would drop a write. So the marks owed are kept in the journal (table owed_marks)
until the server holds them — a sender stopped (a second connect()) or killed first leaves them to the next
sender of that file — and each is sent capped below the first row of its run and lineage not done yet, and
never lower than what the server holds. A dead letter counts as done; retried, it is sent without a lineage.

They cost no request of their own while a run logs: they ride in its log_batch requests and in its heartbeat.
A run that is not live here (ended, or delivered by `bridge sync`) gets its owed mark in one request at the
end of the delivery round that owes it; a live run's owed mark (after an artifact upload, say) waits at most
one heartbeat period — the window in which a copy taken earlier could still bring that upload back.
A flush waits for every owed mark it can pay (sender.py `flush`), retrying one whose request failed until its
own timeout, so a mark is on the server when a flush returns 0 before its timeout.
A run's files travel in a lane of their own (sender.py): records overtake a file still uploading. So a run keeps
two marks per lineage, one per lane, each covering only its own lane's rows, which go in order: the records'
`bridge.delivered.<uid>.<run>` and the files' `bridge.delivered.<uid>.<run>.files` (scope ("files", run)).

Limits: two processes delivering the same run at the same time each read the marks once and do not see the
other's later ones; logged models and registry operations carry no marks (they are applied as get-or-create).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from bridge.client.journal import ARTIFACT, MARKED_EXPERIMENT_KINDS, MARKED_RUN_KINDS, UPDATE_RUN, Journal, Op
from bridge.client.link import Link, Verdict, classify_failure
from bridge.errors import HttpError

log = logging.getLogger(__name__)

#: Run tag (and experiment tag) prefix of a lineage's mark: `bridge.delivered.<lineage uid>.<local id>`.
MARK_TAG_PREFIX = "bridge.delivered."
#: The statuses that end a run (its heartbeat stops; its mark is sent at the round's end).
TERMINAL_STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})
#: MLflow's logged-model ids: their artifacts travel as a run's do, but a model has no tags to hold a mark.
_LOGGED_MODEL_PREFIX = "m-"

#: The suffix of a run's mark for its file lane.
FILES_SUFFIX = ".files"
#: A scope the marks are kept for: ("run", local run id) for a run's records, ("files", local run id) for its
#: files, or ("experiment", local experiment id).
Scope = tuple[str, str]
#: The scope kinds whose marks are tags of a run.
RUN_SCOPES = ("run", "files")


def scope_of(op: Op) -> Scope | None:
    """Where `op`'s mark lives, or None when its kind carries none."""
    if op.run and op.kind in MARKED_RUN_KINDS and not op.run.startswith(_LOGGED_MODEL_PREFIX):
        return ("files" if op.kind == ARTIFACT else "run"), op.run
    if not op.run and op.kind in MARKED_EXPERIMENT_KINDS:
        return "experiment", str(op.json().get("experiment_id"))
    return None


def _key(scope: Scope) -> str:
    return f"{scope[0]}:{scope[1]}"


def parse_marks(scope: Scope, tags: Iterable[tuple[str, str]]) -> dict[str, int]:
    """{lineage uid: mark} of `scope` from (key, value) tags; other tags and unreadable values are ignored."""
    marks = {}
    suffix = "." + scope[1] + (FILES_SUFFIX if scope[0] == "files" else "")
    for key, value in tags:
        if key.startswith(MARK_TAG_PREFIX) and key.endswith(suffix):
            try:
                marks[key[len(MARK_TAG_PREFIX) : -len(suffix)]] = int(value)
            except (TypeError, ValueError):
                continue
    return marks


def mark_tags(scope: Scope, marks: dict[str, int]) -> list[dict[str, str]]:
    suffix = FILES_SUFFIX if scope[0] == "files" else ""
    return [{"key": f"{MARK_TAG_PREFIX}{uid}.{scope[1]}{suffix}", "value": str(n)} for uid, n in sorted(marks.items())]


class DeliveryMarks:
    """The marks on the server of the scopes this sender delivers to; the owed ones live in the journal."""

    def __init__(self, link: Link, journal: Journal) -> None:
        self.link = link
        self.journal = journal
        self._known: dict[Scope, dict[str, int]] = {}  # what the server holds (read once, then kept up to date)
        self._urgent: set[Scope] = set()  # owed by a run that has ended: sent at the round's end

    # ------------------------------------------------------------------------------------ reading

    def learn(self, scope: Scope, tags: Iterable[tuple[str, str]]) -> None:
        """The server's tags of `scope`, as read by someone else (a create that found the run)."""
        self._known[scope] = parse_marks(scope, tags)

    def none_there(self, scope: Scope) -> None:
        """Take `scope` as holding no marks: this sender just created it on the server, or its marks cannot be
        read (the server keeps failing on it)."""
        self._known[scope] = {}

    def _server_marks(self, scope: Scope) -> dict[str, int] | None:
        known = self._known.get(scope)
        if known is not None:
            return known
        kind, local_id = scope
        try:
            if kind in RUN_SCOPES:
                remote, _ = self.journal.ids.server_run(local_id)
                if remote is None:
                    return None  # not created yet: its creation (ahead of it in the journal) tells
                tags = self.link.call("/runs/get", {"run_id": remote}, method="GET")["run"]["data"].get("tags", [])
            else:
                remote = self.journal.ids.server_experiment_id(local_id)
                if remote is None:
                    return None
                tags = self.link.call("/experiments/get", {"experiment_id": remote}, method="GET")["experiment"].get(
                    "tags", []
                )
        except HttpError as exc:
            if classify_failure(exc) is not Verdict.REJECT:
                raise
            # Refused (gone, or not an id the server knows): no marks. What is sent to it meets the same
            # refusal and is set aside on its own, as it was before marks existed.
            tags = []
        self._known[scope] = marks = parse_marks(scope, ((t["key"], t.get("value")) for t in tags))
        return marks

    def done_already(self, op: Op) -> bool:
        """Whether `op` was delivered before, from this journal or a copy of it (raises LinkError)."""
        scope = scope_of(op)
        if scope is None:
            return False
        uid = self.journal.book.epoch_uid(op.epoch)
        if uid is None:
            return False
        marks = self._server_marks(scope)
        return marks is not None and op.id <= marks.get(uid, 0)

    # ------------------------------------------------------------------------------------ writing

    def highest(self, ops: Iterable[Op]) -> dict[tuple[Scope, str], int]:
        """{(scope, lineage uid): highest row id} of the rows in `ops` that carry a mark."""
        found: dict[tuple[Scope, str], int] = {}
        for op in ops:
            scope = scope_of(op)
            if scope is None:
                continue
            uid = self.journal.book.epoch_uid(op.epoch)
            if uid is not None:
                found[(scope, uid)] = max(found.get((scope, uid), 0), op.id)
        return found

    def done(self, ops: Iterable[Op]) -> None:
        """`ops` are being delivered or set aside, in journal order: their marks are owed to the server.

        Called before the rows are completed, never after: a flush that finds nothing left must find their marks
        owed (between a completion and this call it saw neither, returned, and a stale copy's older status went
        through). Owing early is safe: an owed mark is sent capped below the first row still waiting."""
        ops = list(ops)
        owed = self.highest(ops)
        for op in ops:
            if op.kind == UPDATE_RUN and op.json().get("status") in TERMINAL_STATUSES:
                scope = scope_of(op)
                if scope is not None:
                    self._urgent.add(scope)
        if owed:
            self.journal.book.owe_marks({(_key(scope), uid): n for (scope, uid), n in owed.items()})

    def owed_tags(self, scope: Scope, extra: dict[str, int] | None = None) -> list[dict[str, str]]:
        """Mark tags for `scope`: what it is owed, raised by `extra` (a batch's own rows, sent with it), each
        only when above what the server already holds (a mark is never lowered). The server's marks are read
        first when this sender has not seen them (raises LinkError): a copy of the journal owes what the
        original owed when it was taken, and paying that blindly lowered the original's later mark — the
        copy's older artifact then went up over the newer one (harness H18)."""
        marks = self.journal.book.owed_marks(_key(scope)).get(_key(scope), {})
        for uid, n in (extra or {}).items():
            marks[uid] = max(marks.get(uid, 0), n)
        if not marks:
            return []
        known = self._server_marks(scope) or {}
        return mark_tags(scope, {uid: n for uid, n in marks.items() if n > known.get(uid, 0)})

    def sent(self, scope: Scope, tags: list[dict[str, str]]) -> None:
        """The server took `tags` (from owed_tags)."""
        if not tags:
            return
        delivered = parse_marks(scope, ((t["key"], t["value"]) for t in tags))
        known = self._known.setdefault(scope, {})
        for uid, n in delivered.items():
            known[uid] = max(known.get(uid, 0), n)
        self.journal.book.marks_sent(_key(scope), delivered)
        if not self.journal.book.owed_marks(_key(scope)):
            self._urgent.discard(scope)

    def forget(self, scope: Scope) -> None:
        """The server refused the marks (the run was deleted there): nothing to keep owing."""
        self.journal.book.drop_owed_marks(_key(scope))
        self._urgent.discard(scope)

    def urgent(self, scope: Scope) -> bool:
        return scope in self._urgent

    def owing_scopes(self) -> list[Scope]:
        """Scopes with a mark that may be sent now (past what the server is known to hold)."""
        scopes = []
        for owner, marks in self.journal.book.owed_marks().items():
            kind, _, local_id = owner.partition(":")
            scope = (kind, local_id)
            known = self._known.get(scope, {})
            covered = {uid: n for uid, n in marks.items() if n <= known.get(uid, 0)}
            if covered:  # the server holds as much already (a copy delivered further): owed no more
                self.journal.book.marks_sent(owner, known)
            if len(covered) < len(marks):
                scopes.append(scope)
        return scopes

    def pay(self, scope: Scope) -> None:
        """Send what `scope` is owed, in one request per scope kind (raises LinkError)."""
        tags = self.owed_tags(scope)
        if not tags:
            return
        kind, local_id = scope
        try:
            if kind in RUN_SCOPES:
                remote, _ = self.journal.ids.server_run(local_id)
                if remote is None:
                    return self.forget(scope)
                self.link.call("/runs/log-batch", {"run_id": remote, "metrics": [], "params": [], "tags": tags})
            else:
                remote = self.journal.ids.server_experiment_id(local_id)
                if remote is None:
                    return self.forget(scope)
                for tag in tags:  # experiments have no batch call; a round rarely owes more than one
                    self.link.call("/experiments/set-experiment-tag", {"experiment_id": remote, **tag})
        except HttpError as exc:
            if classify_failure(exc) is not Verdict.REJECT:
                raise
            log.debug("bridge: delivery marks for %s %s refused: %s", kind, local_id, exc)
            return self.forget(scope)
        self.sent(scope, tags)
