"""What each journaled operation that is not a log_batch entry becomes on the server.

Every application is safe to repeat after a lost answer: experiments are got-or-created by name, runs are
found by their run key before being created again, a tag already deleted is the goal reached, and an upload
whose earlier try may have arrived is simply uploaded again (a PUT replaces the file whole).
Local reasons an entry can never be delivered raise `UndeliverableError` with a named reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bridge import config
from bridge.client import forksafe
from bridge.client.heartbeat import Heartbeats
from bridge.client.journal import (
    ARTIFACT, CREATE_EXPERIMENT, CREATE_RUN, DELETE_EXPERIMENT_TAG, DELETE_TAG, LOG_INPUTS, SET_EXPERIMENT_TAG,
    UPDATE_RUN, Journal, Op,
)
from bridge.client.link import Link, Verdict, classify_failure, upload_read_timeout
from bridge.client.marks import TERMINAL_STATUSES, DeliveryMarks
from bridge.errors import HttpError, TransportError, UndeliverableError

log = logging.getLogger(__name__)

# Named reasons an entry is undeliverable for something on this side (shown by `bridge queue`).
RUN_NOT_CREATED = "run-not-created"
RUN_NOT_RECORDED = "run-not-recorded"
EXPERIMENT_NOT_CREATED = "experiment-not-created"
SPOOL_FILE_MISSING = "spool-file-missing"
SPOOL_FILE_DAMAGED = "spool-file-damaged"
ARTIFACTS_NOT_PROXIED = "artifacts-not-proxied"
UNKNOWN_OPERATION = "unknown-operation"
PARENT_NOT_CREATED = "parent-run-not-created"
#: The reason recorded when the server itself refused the entry (its message is kept beside it).
SERVER_REFUSED = "server-refused"
#: The reason recorded when the server kept failing (5xx) on this one entry while answering everything else.
SERVER_FAILS_ON_IT = "server-fails-on-it"
#: Run tags whose value is a run id: a local id is translated to the server's before it leaves.
RUN_ID_TAGS = frozenset({"mlflow.parentRunId"})
#: A create tried again after an unknown outcome is watched for a late twin this many HTTP timeouts (connect +
#: read) after the retry; a try held up in the network longer than that is left to the reaper.
TWIN_WATCH_TIMEOUTS = 2


#: Appliers of operation kinds defined outside this module (logged models, the registry: models.py,
#: registry.py), registered with `register_kind`: `apply(operations, op, body) -> spool files to discard`.
_EXTRA_KINDS: dict[str, Callable[..., list[str]]] = {}
#: For some of them, `waits(operations, op, body) -> bool`: whether the op must wait for something journaled
#: under another key (a logged model's creation) before it can be sent; its run waits with it.
_WAITS: dict[str, Callable[..., bool]] = {}


#: Kinds MLflow's server writes with SQLAlchemy's `merge` (read, then insert or update). Two tries of one op can
#: meet there — one the client gave up on (a timeout, a stopping sender's cut) still running, and the next — and
#: the later is refused on the table's unique key although the earlier wrote the row. Measured on a real server
#: (SQLite, 2 workers), 2 identical requests at once: set-experiment-tag refused 24 of 400, registered-models
#: set-tag 26 of 400; a run's tags (log-batch) and a logged model's (a true upsert) never. Such a refusal is tried
#: again (the sender bounds how often); the merge then updates.
_UPSERTS: set[str] = {SET_EXPERIMENT_TAG}
#: How the databases MLflow runs on word a unique-key violation (SQLite, PostgreSQL, MySQL).
_UNIQUE_VIOLATIONS = ("UNIQUE constraint failed", "duplicate key value violates unique constraint", "Duplicate entry")


def register_kind(kind: str, apply: Callable[..., list[str]], waits: Callable[..., bool] | None = None, *,
                  upsert: bool = False) -> None:
    """Teach the sender a new journal operation kind (`upsert`: the server writes it with `merge`, see _UPSERTS)."""
    _EXTRA_KINDS[kind] = apply
    if waits is not None:
        _WAITS[kind] = waits
    if upsert:
        _UPSERTS.add(kind)


def lost_upsert_race(kinds, exc: BaseException) -> bool:
    """Whether `exc`, the answer to a request writing ops of `kinds`, is an upsert refused on its unique key
    because another try of it got there first (_UPSERTS): worth another try."""
    return (isinstance(exc, HttpError) and exc.status == 400 and any(kind in _UPSERTS for kind in kinds)
            and any(text in (exc.message or "") for text in _UNIQUE_VIOLATIONS))


_BUILTIN_KINDS = frozenset({ARTIFACT, CREATE_EXPERIMENT, CREATE_RUN, DELETE_EXPERIMENT_TAG, DELETE_TAG, LOG_INPUTS,
                            SET_EXPERIMENT_TAG, UPDATE_RUN})


def _extra_kind(kind: str) -> Callable[..., list[str]] | None:
    """The applier of `kind`, importing the modules that register kinds first if need be.

    `bridge sync` (or any sender without MLflow's stores loaded) has not imported them; importing them
    costs an `import mlflow`, so only for a kind this module does not know.
    """
    if kind not in _EXTRA_KINDS and kind not in _BUILTIN_KINDS:
        import bridge.client.models  # noqa: F401  (registers the logged-model kinds)
        import bridge.client.registry  # noqa: F401  (registers the registry kinds)
    return _EXTRA_KINDS.get(kind)


class Operations:
    """Applies journaled operations of one journal to the server behind `link`."""

    def __init__(self, link: Link, journal: Journal, heartbeats: Heartbeats,
                 marks: DeliveryMarks | None = None) -> None:
        self.link = link
        self.journal = journal
        self.heartbeats = heartbeats
        self.marks = marks if marks is not None else DeliveryMarks(link, journal)
        self._renew_create_state()
        forksafe.renew_after_fork(self)

    def _renew_create_state(self) -> None:
        self._creates = 0  # creates without a key of their own in flight (`creating`)
        self._creates_lock = threading.Lock()
        self._no_create = threading.Event()  # set while `_creates` is 0
        self._no_create.set()
        self._stopping = False

    def _after_fork_in_child(self) -> None:
        self._renew_create_state()  # the parent's sender may have been creating; the child's is not

    @contextlib.contextmanager
    def creating(self) -> Iterator[None]:
        """Around a create MLflow cannot make idempotent (a run, a logged model, a model version): a stopping
        sender lets it finish before cutting requests (`wait_for_creates`) — cut after it left, it may land
        after the next sender looked for it, and make a second one (H21). Once the sender is stopping, none
        begins: the op goes back to pending for the next sender, which looks for the run first."""
        with self._creates_lock:
            self._creates += 1
            self._no_create.clear()
        try:
            # Counted first, then the flag read; `wait_for_creates` sets the flag, then reads the count: one of
            # the two sees the other.
            if self._stopping:
                raise TransportError("the sender is stopping; the create is left to the next one")
            yield
        finally:
            with self._creates_lock:
                self._creates -= 1
                if not self._creates:
                    self._no_create.set()

    def wait_for_creates(self, timeout: float) -> bool:
        """Stop beginning creates; wait up to `timeout` for those in flight. True when none is left."""
        self._stopping = True
        return self._no_create.wait(timeout)

    def must_wait(self, op: Op) -> bool:
        """Whether `op` waits for an op of another key not delivered yet (see `register_kind`)."""
        if op.kind in _BUILTIN_KINDS or _extra_kind(op.kind) is None:  # imports the modules that register waits
            return False
        waits = _WAITS.get(op.kind)
        return waits is not None and waits(self, op, op.json())

    def apply(self, op: Op) -> list[str]:
        """Apply one op on the server; returns spool files that can go once it is done.

        Raises HttpError (the server refused, or the link failed) or UndeliverableError.
        """
        body = op.json()
        extra = _extra_kind(op.kind)
        if extra is not None:
            return extra(self, op, body)
        if op.kind == CREATE_EXPERIMENT:
            self.create_experiment(op.key, body["name"], body.get("tags") or {}, body.get("artifact_location"))
            return []
        if op.kind == DELETE_EXPERIMENT_TAG:
            remote = self._server_experiment(body["experiment_id"], f"the tag {op.key!r}")
            try:
                self.link.call("/experiments/delete-experiment-tag", {"experiment_id": remote, "key": op.key})
            except HttpError as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST" or not op.attempts:
                    raise
            return []
        if op.kind == SET_EXPERIMENT_TAG:
            remote = self._server_experiment(body["experiment_id"], f"the tag {op.key!r}")
            self.link.call("/experiments/set-experiment-tag",
                           {"experiment_id": remote, "key": op.key, "value": body["value"]})
            return []
        if op.kind == CREATE_RUN:
            self.create_run(op, body)
            return []
        remote, artifact_root = self.journal.server_run(op.run)
        if remote is None:
            raise UndeliverableError(RUN_NOT_CREATED, f"run {op.run} was never created on the server")
        if op.kind == UPDATE_RUN:
            payload = {"run_id": remote, "run_uuid": remote}
            payload.update({k: v for k, v in body.items() if v is not None})
            self.link.call("/runs/update", payload)
            due = self.journal.twin_watches().get(op.run) if body.get("status") in TERMINAL_STATUSES else None
            if due is not None:
                self.remove_twins(op.run, final=time.time() >= due)
        elif op.kind == DELETE_TAG:
            try:
                self.link.call("/runs/delete-tag", {"run_id": remote, "key": op.key})
            except HttpError as exc:
                # Gone already after an earlier, unacknowledged delete, or allowed to be absent: the goal.
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST" or not (op.attempts or body.get("missing_ok")):
                    raise
        elif op.kind == LOG_INPUTS:
            self.link.call("/runs/log-inputs", {**body, "run_id": remote})
        elif op.kind == ARTIFACT:
            if not self.journal.superseded(op):  # else a newer copy of the same path goes up later instead
                self.upload_artifact(op, body, remote, artifact_root)
            return [body["spool"]]
        else:
            raise UndeliverableError(UNKNOWN_OPERATION, f"unknown journal operation {op.kind!r}")
        return []

    def server_tag_value(self, key: str, value: str) -> str:
        """`value` as the server must see it: a run-id tag names the server's run, never a local id."""
        if key not in RUN_ID_TAGS:
            return value
        remote, _ = self.journal.server_run(value)
        if remote is None:
            raise UndeliverableError(PARENT_NOT_CREATED, f"tag {key} names run {value}, which was never created "
                                                         "on the server")
        return remote

    def _server_experiment(self, experiment_id: str, what: str) -> str:
        remote = self.journal.server_experiment_id(experiment_id)
        if remote is None:
            raise UndeliverableError(EXPERIMENT_NOT_CREATED,
                                     f"experiment {experiment_id} of {what} was never created on the server")
        return remote

    def create_experiment(self, local_id: str, name: str, tags: dict[str, str],
                          artifact_location: str | None = None) -> str:
        """Get-or-create by name, so every process and every retry lands on one server experiment."""
        def lookup() -> str | None:
            try:
                found = self.link.call("/experiments/get-by-name", {"experiment_name": name}, method="GET")
            except HttpError as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return None
                raise
            # Its delivery marks come with it (a copy of this journal may have delivered to it: marks.py).
            self.marks.learn(("experiment", local_id), ((t["key"], t.get("value"))
                                                        for t in found["experiment"].get("tags", [])))
            return found["experiment"]["experiment_id"]

        remote = lookup()
        if remote is None:
            try:
                spec = {"name": name, "tags": [{"key": k, "value": v} for k, v in tags.items()]}
                if artifact_location:
                    spec["artifact_location"] = artifact_location
                created = self.link.call("/experiments/create", spec)
                remote = created["experiment_id"]
                self.marks.none_there(("experiment", local_id))
            except HttpError as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                remote = lookup()  # created meanwhile, by us (a lost answer) or someone else
                if remote is None:
                    raise
        self.journal.map_experiment(local_id, remote)
        return remote

    def create_run(self, op: Op, body: dict) -> None:
        record = self.journal.run(op.run)
        if record is None:
            raise UndeliverableError(RUN_NOT_RECORDED, f"run {op.run} is missing from the journal's run table")
        experiment = self._server_experiment(record.experiment_id, f"run {op.run}")
        # Always looked for first, by its run key: an earlier try whose answer was lost, or a copy of this
        # journal delivered before (Drive sync lag, a copied folder), may have created it. One request per run.
        result = self.link.call("/runs/search", {
            "experiment_ids": [experiment], "run_view_type": "ALL", "max_results": 10,
            "filter": f"tags.`{config.RUN_KEY_TAG}` = '{op.run}'"})
        chosen = _the_run_in_use(result.get("runs") or [])
        found = chosen["info"] if chosen else None
        if found is not None:  # its delivery marks come with it (marks.py)
            self.marks.learn(("run", op.run), ((t["key"], t.get("value"))
                                               for t in chosen.get("data", {}).get("tags", [])))
        else:
            tags = {}
            for key, value in (body.get("tags") or {}).items():
                try:
                    tags[key] = self.server_tag_value(key, value)
                except UndeliverableError as exc:  # the run still goes up, only without that link
                    log.warning("bridge: run %s is created without tag %s: %s", op.run, key, exc.message)
            tags[config.RUN_KEY_TAG] = op.run
            tags.update(self.heartbeats.birth_tags(op.run))
            payload = {"experiment_id": experiment, "start_time": record.start_time,
                       "tags": [{"key": k, "value": v} for k, v in tags.items()]}
            if record.user_id:
                payload["user_id"] = record.user_id
            if record.name:
                payload["run_name"] = record.name
            with self.creating():
                found = self.link.call("/runs/create", payload)["run"]["info"]
            self.marks.none_there(("run", op.run))
        # After a try whose fate is unknown, an earlier try may still land, whichever try made the run.
        watch = time.time() + TWIN_WATCH_TIMEOUTS * sum(self.link.timeout) if op.attempts else None
        self.journal.map_run(op.run, found["run_id"], found.get("artifact_uri"), watch_twins_until=watch)

    def remove_twins(self, run: str, *, final: bool = True) -> None:
        """Delete empty runs carrying `run`'s key beside the one it maps to: an earlier try of its create, held
        up in the network past the client's timeout or cut by a stopping sender, applied after the retry had
        looked for it and created the run again (harness H11, H21). MLflow has no idempotent create; this is the
        clean-up. A run holding anything the mapped run lacks (`_empty_twin`), or mapped by another local run, is
        left alone (it cannot be such a try) and said so.

        Looked for when the run ends, on a flush, and once its watch is due; `final` ends the watch.
        One landing after that is deleted by `bridge serve`'s reaper once it is silent (bridge/serve/reaper.py).
        """
        record = self.journal.run(run)
        remote = record and record.remote_id
        if not remote:
            self.journal.unwatch_twins(run)
            return
        experiment = self.journal.server_experiment_id(record.experiment_id)
        found = []
        try:
            if experiment:
                found = self.link.call("/runs/search", {
                    "experiment_ids": [experiment], "run_view_type": "ACTIVE_ONLY", "max_results": 10,
                    "filter": f"tags.`{config.RUN_KEY_TAG}` = '{run}'"}).get("runs") or []
        except HttpError as exc:
            if classify_failure(exc) is not Verdict.REJECT:
                raise  # the link: the run's end is sent again, and this looked for again
            log.debug("bridge: could not look for duplicates of run %s: %s", run, exc)
            found = []
        ours = next((r for r in found if r["info"]["run_id"] == remote), None)
        for twin in found:
            twin_id = twin["info"]["run_id"]
            if twin_id == remote or ours is None:
                continue
            if not _empty_twin(twin, ours) or self.journal.run_for_remote(twin_id) is not None:
                log.warning("bridge: run %s has a second run %s with its key that is in use; left as it is", run,
                            twin_id)
                continue
            try:
                self.link.call("/runs/set-tag", {"run_id": twin_id, "key": config.DUPLICATE_OF_TAG, "value": remote})
                self.link.call("/runs/delete", {"run_id": twin_id})
            except HttpError as exc:
                log.debug("bridge: could not remove the duplicate run %s: %s", twin_id, exc)
                continue
            log.info("bridge: removed run %s, an empty duplicate of run %s left by a create that arrived late",
                     twin_id, remote)
        if final:
            self.journal.unwatch_twins(run)

    # ------------------------------------------------------------------------------- artifacts

    def _artifact_path(self, artifact_root: str, path: str) -> str:
        try:
            return self.link.artifact_path(artifact_root, path)
        except ValueError as exc:
            raise UndeliverableError(ARTIFACTS_NOT_PROXIED, str(exc)) from None

    def upload_artifact(self, op: Op, body: dict, remote: str, artifact_root: str | None) -> None:
        if not artifact_root:
            artifact_root = self.link.call("/runs/get", {"run_id": remote}, method="GET")["run"]["info"]["artifact_uri"]
        spool_file: Path = self.journal.spool.path(body["spool"])
        if not spool_file.exists():
            raise UndeliverableError(SPOOL_FILE_MISSING, f"spooled copy of {body['path']} is missing from "
                                                         f"{self.journal.spool.folder}")
        if sha256_of(spool_file) != body["sha256"]:
            raise UndeliverableError(SPOOL_FILE_DAMAGED, f"the spooled copy of {body['path']} no longer matches "
                                                         "the sha256 recorded when it was logged")
        self._artifact_path(artifact_root, body["path"])  # an artifact root bridge cannot upload to: say why
        url = self.link.artifact_url(artifact_root, body["path"])
        # Always uploaded again after a failed try, never "checked" first: a listing shows only sizes, so an
        # older copy of the same length would pass for this one. A PUT replaces the file whole, costs the
        # same one request as a listing, and inbound bytes are free on ngrok's plan. A 200 comes only after
        # the server has read the whole Content-Length body.
        with open(spool_file, "rb") as fh:
            read_s = upload_read_timeout(spool_file.stat().st_size, self.link.timeout[1])
            self.link.request("PUT", url, data=fh, timeout=(self.link.timeout[0], read_s))


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t.get("value") for t in (run.get("data") or {}).get("tags", [])}


def _empty_twin(twin: dict, ours: dict) -> bool:
    """Whether `twin` can be what a late try of `ours`'s create left: no metric, no param, and no tag that
    `ours` lacks (the reaper's rule, bridge/serve/reaper.py). Anything else was written to it: it is in use."""
    data = twin.get("data") or {}
    return not data.get("metrics") and not data.get("params") and set(_tags(twin)) <= set(_tags(ours))


def _the_run_in_use(runs: list[dict]) -> dict | None:
    """Of the runs carrying one run key, the one to deliver to: never a twin bridge removed while another is
    there, an active one before a deleted one, then the one holding the most (a copy of a journal must land
    on the run its original writes to, not on an empty twin about to be removed)."""
    def rank(run: dict) -> tuple:
        data = run.get("data") or {}
        return (config.DUPLICATE_OF_TAG not in _tags(run), run["info"].get("lifecycle_stage") != "deleted",
                len(data.get("metrics") or []) + len(data.get("params") or []) + len(data.get("tags") or []))
    return max(runs, key=rank) if runs else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
