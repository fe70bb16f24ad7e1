"""What each journaled operation that is not a log_batch entry becomes on the server.

Every application is safe to repeat after a lost answer: experiments are got-or-created by name, runs are
found by their run key before being created again, a tag already deleted is the goal reached, and an upload
whose earlier try may have arrived is uploaded again (a PUT replaces the file whole) or resumed (files.py).
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
from bridge.client.delivery import files
from bridge.client.delivery.heartbeat import Heartbeats
from bridge.client.delivery.marks import RUN_SCOPES, TERMINAL_STATUSES, DeliveryMarks
from bridge.client.journal import Journal, Op, RunRecord
from bridge.client.journal.kinds import LOGGED_MODEL, RUN_ID_TAGS, UPDATE_RUN
from bridge.client.link import Link, Verdict, classify_failure, uploads
from bridge.client.options import DEFAULT_TWIN_WATCH_TIMEOUTS, DEFAULT_UPLOAD_PART_BYTES
from bridge.errors import HttpError, LinkError, TransportError, UndeliverableError
from bridge.twins import empty_twin, run_key_search, run_tags

log = logging.getLogger(__name__)

# Named reasons an entry is undeliverable for something on this side (shown by `bridge queue`).
RUN_NOT_CREATED = "run-not-created"
#: A run created here whose row the journal lost (a torn or damaged copy): its server id is unknown, and its
#: local id must never be sent as if it were the server's.
RUN_ROW_LOST = "run-row-lost"
RUN_NOT_RECORDED = "run-not-recorded"
EXPERIMENT_NOT_CREATED = "experiment-not-created"
SPOOL_FILE_MISSING = "spool-file-missing"
SPOOL_FILE_DAMAGED = "spool-file-damaged"
ARTIFACTS_NOT_PROXIED = "artifacts-not-proxied"
UNKNOWN_OPERATION = "unknown-operation"
PARENT_NOT_CREATED = "parent-run-not-created"
#: A logged model this side never heard of (its creation became a dead letter).
MODEL_NOT_CREATED = "model-not-created"
#: The reason recorded when the server itself refused the entry (its message is kept beside it).
SERVER_REFUSED = "server-refused"
#: The reason recorded when the server kept failing (5xx) on this one entry while answering everything else.
SERVER_FAILS_ON_IT = "server-fails-on-it"


class Operations:
    """What every delivery handler (delivery/handlers.py) works with: the link, the journal, heartbeats, marks,
    the creates in flight; and the applications of the run and experiment kinds."""

    def __init__(
        self, link: Link, journal: Journal, heartbeats: Heartbeats, marks: DeliveryMarks | None = None
    ) -> None:
        self.link = link
        self.journal = journal
        self.heartbeats = heartbeats
        self.marks = marks if marks is not None else DeliveryMarks(link, journal)
        self.upload_part_bytes = DEFAULT_UPLOAD_PART_BYTES  # the sender sets its ClientOptions' value
        self.twin_watch_timeouts = DEFAULT_TWIN_WATCH_TIMEOUTS  # and this one
        self.should_stop: Callable[[], bool] = lambda: False  # the sender's: an upload ends between parts
        #: Told (run record, server run id, server experiment id) when a run is first mapped to its server run:
        #: the connection prints the id and link a person can find it by (issue 19).
        self.on_run_mapped: Callable[[RunRecord, str, str], None] | None = None
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

    def server_tag_value(self, key: str, value: str) -> str:
        """`value` as the server must see it: a run-id tag names the server's run, never a local id."""
        if key not in RUN_ID_TAGS:
            return value
        remote, _ = self.journal.ids.server_run(value)
        if remote is None:
            raise UndeliverableError(
                PARENT_NOT_CREATED, f"tag {key} names run {value}, which was never created on the server"
            )
        return remote

    def _server_experiment(self, experiment_id: str, what: str) -> str:
        remote = self.journal.ids.server_experiment_id(experiment_id)
        if remote is None:
            raise UndeliverableError(
                EXPERIMENT_NOT_CREATED, f"experiment {experiment_id} of {what} was never created on the server"
            )
        return remote

    def create_experiment(
        self, local_id: str, name: str, tags: dict[str, str], artifact_location: str | None = None
    ) -> str:
        """Get-or-create by name, so every process and every retry lands on one server experiment."""

        def lookup() -> str | None:
            try:
                found = self.link.call("/experiments/get-by-name", {"experiment_name": name}, method="GET")
            except HttpError as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return None
                raise
            # Its delivery marks come with it (a copy of this journal may have delivered to it: marks.py).
            self.marks.learn(
                ("experiment", local_id), ((t["key"], t.get("value")) for t in found["experiment"].get("tags", []))
            )
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
        self.journal.ids.map_experiment(local_id, remote)
        return remote

    def create_run(self, op: Op, body: dict) -> None:
        record = self.journal.ids.run(op.run)
        if record is None:
            raise UndeliverableError(RUN_NOT_RECORDED, f"run {op.run} is missing from the journal's run table")
        experiment = self._server_experiment(record.experiment_id, f"run {op.run}")
        # Always looked for first, by its run key: an earlier try whose answer was lost, or a copy of this
        # journal delivered before (Drive sync lag, a copied folder), may have created it. One request per run.
        result = self.link.call("/runs/search", run_key_search(experiment, op.run, view="ALL"))
        chosen = _the_run_in_use(result.get("runs") or [])
        found = chosen["info"] if chosen else None
        if found is not None:  # its delivery marks come with it (marks.py)
            assert chosen is not None  # what it was found in
            tags_found = [(t["key"], t.get("value")) for t in chosen.get("data", {}).get("tags", [])]
            for scope_kind in RUN_SCOPES:
                self.marks.learn((scope_kind, op.run), tags_found)
        else:
            tags = {}
            for key, value in (body.get("tags") or {}).items():
                try:
                    tags[key] = self.server_tag_value(key, value)
                except UndeliverableError as exc:  # the run still goes up, only without that link
                    log.warning("bridge: run %s is created without tag %s: %s", op.run, key, exc.message)
            tags[config.RUN_KEY_TAG] = op.run
            tags.update(self.heartbeats.birth_tags(op.run))
            payload = {
                "experiment_id": experiment,
                "start_time": record.start_time,
                "tags": [{"key": k, "value": v} for k, v in tags.items()],
            }
            if record.user_id:
                payload["user_id"] = record.user_id
            if record.name:
                payload["run_name"] = record.name
            with self.creating():
                found = self.link.call("/runs/create", payload)["run"]["info"]
            for scope_kind in RUN_SCOPES:
                self.marks.none_there((scope_kind, op.run))
        # After a try whose fate is unknown, an earlier try may still land, whichever try made the run.
        watch = time.time() + self.twin_watch_timeouts * sum(self.link.timeout) if op.attempts else None
        self.journal.ids.map_run(op.run, found["run_id"], found.get("artifact_uri"), watch_twins_until=watch)
        if self.on_run_mapped is not None:
            try:
                self.on_run_mapped(record, found["run_id"], experiment)
            except Exception:  # telling the person must never stop delivery
                log.debug("bridge: could not announce run %s", op.run, exc_info=True)

    def remove_twins(self, run: str, *, final: bool = True) -> None:
        """Delete empty runs carrying `run`'s key beside the one it maps to: an earlier try of its create, held
        up in the network past the client's timeout or cut by a stopping sender, applied after the retry had
        looked for it and created the run again (harness H11, H21). MLflow has no idempotent create; this is the
        clean-up. A run holding anything the mapped run lacks (`bridge.twins.empty_twin`), or mapped by another
        local run, is left alone (it cannot be such a try) and said so.

        Looked for when the run ends, on a flush, and once its watch is due; `final` ends the watch.
        One landing after that is deleted by `bridge serve`'s reaper once it is silent (bridge/serve/reaper.py).
        """
        record = self.journal.ids.run(run)
        if record is None or not record.remote_id:
            self.journal.book.unwatch_twins(run)
            return
        remote = record.remote_id
        experiment = self.journal.ids.server_experiment_id(record.experiment_id)
        found: list[dict] = []
        try:
            if experiment:
                found = self.link.call("/runs/search", run_key_search(experiment, run)).get("runs") or []
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
            if not empty_twin(twin, ours) or self.journal.ids.run_for_remote(twin_id) is not None:
                log.warning(
                    "bridge: run %s has a second run %s with its key that is in use; left as it is", run, twin_id
                )
                continue
            try:
                self.link.call("/runs/set-tag", {"run_id": twin_id, "key": config.DUPLICATE_OF_TAG, "value": remote})
                self.link.call("/runs/delete", {"run_id": twin_id})
            except HttpError as exc:
                log.debug("bridge: could not remove the duplicate run %s: %s", twin_id, exc)
                continue
            log.info(
                "bridge: removed run %s, an empty duplicate of run %s left by a create that arrived late",
                twin_id,
                remote,
            )
        if final:
            self.journal.book.unwatch_twins(run)

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
            raise UndeliverableError(
                SPOOL_FILE_MISSING, f"spooled copy of {body['path']} is missing from {self.journal.spool.folder}"
            )

        def check_spool() -> None:
            if sha256_of(spool_file) != body["sha256"]:
                raise UndeliverableError(
                    SPOOL_FILE_DAMAGED,
                    f"the spooled copy of {body['path']} no longer matches the sha256 recorded when it was logged",
                )

        artifact_path = self._artifact_path(artifact_root, body["path"])  # one bridge cannot upload to: say why
        # A file that may have arrived before is sent again, never "checked" first: a listing shows only sizes, so
        # an older copy of the same length would pass for this one. A resumable upload goes on from what the
        # server confirmed; a PUT replaces the file whole, and a 200 comes only once the server read all of it.
        files.deliver_file(
            self.link,
            self.journal,
            op,
            body,
            spool_file,
            artifact_path=artifact_path,
            url=self.link.artifact_url(artifact_root, body["path"]),
            part_bytes=self.upload_part_bytes,
            should_stop=self.should_stop,
            check_spool=check_spool,
        )


def _the_run_in_use(runs: list[dict]) -> dict | None:
    """Of the runs carrying one run key, the one to deliver to: never a twin bridge removed while another is
    there, an active one before a deleted one, then the one holding the most (a copy of a journal must land
    on the run its original writes to, not on an empty twin about to be removed)."""

    def rank(run: dict) -> tuple:
        data = run.get("data") or {}
        return (
            config.DUPLICATE_OF_TAG not in run_tags(run),
            run["info"].get("lifecycle_stage") != "deleted",
            len(data.get("metrics") or []) + len(data.get("params") or []) + len(data.get("tags") or []),
        )

    return max(runs, key=rank) if runs else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def server_run(journal: Journal, run_id: str) -> tuple[str, str | None]:
    """(server run id, server artifact root) of `run_id`; raises when this journal created it and it never reached
    the server."""
    remote, artifact_root = journal.ids.server_run(run_id)
    if remote is None:
        raise run_not_created(journal, run_id)
    return remote, artifact_root


def run_not_created(journal: Journal, run_id: str) -> UndeliverableError:
    """Why entries of `run_id`, which has no server id, cannot be delivered."""
    if journal.ids.row_lost(run_id):
        return UndeliverableError(
            RUN_ROW_LOST,
            f"run {run_id} was created here, but this copy of the journal lost its record (torn or damaged): "
            "its server id is unknown",
        )
    return UndeliverableError(RUN_NOT_CREATED, f"run {run_id} was never created on the server")


def server_model_id(journal: Journal, model_id: str) -> str:
    """The server's id of a model: its mapping when created here, else the id itself."""
    record = journal.ids.entity(LOGGED_MODEL, model_id) if model_id.startswith("m-") else None
    if record is None:
        return model_id
    if record.remote_id is None:
        raise UndeliverableError(MODEL_NOT_CREATED, f"logged model {model_id} was never created on the server")
    return record.remote_id


# --------------------------------------------------------------------------- the run and experiment kinds


def apply_create_experiment(ops: Operations, op: Op, body: dict) -> list[str]:
    ops.create_experiment(op.named(), body["name"], body.get("tags") or {}, body.get("artifact_location"))
    return []


def apply_set_experiment_tag(ops: Operations, op: Op, body: dict) -> list[str]:
    remote = ops._server_experiment(body["experiment_id"], f"the tag {op.key!r}")
    ops.link.call("/experiments/set-experiment-tag", {"experiment_id": remote, "key": op.key, "value": body["value"]})
    return []


def apply_delete_experiment_tag(ops: Operations, op: Op, body: dict) -> list[str]:
    remote = ops._server_experiment(body["experiment_id"], f"the tag {op.key!r}")
    try:
        ops.link.call("/experiments/delete-experiment-tag", {"experiment_id": remote, "key": op.key})
    except HttpError as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST" or not op.attempts:
            raise
    return []


def apply_create_run(ops: Operations, op: Op, body: dict) -> list[str]:
    ops.create_run(op, body)
    return []


def apply_update_run(ops: Operations, op: Op, body: dict) -> list[str]:
    remote, _ = server_run(ops.journal, op.run)
    payload = {"run_id": remote, "run_uuid": remote}
    payload.update({k: v for k, v in body.items() if v is not None})
    ops.link.call("/runs/update", payload)
    due = ops.journal.book.twin_watches().get(op.run) if body.get("status") in TERMINAL_STATUSES else None
    if due is not None:
        ops.remove_twins(op.run, final=time.time() >= due)
    return []


def apply_delete_tag(ops: Operations, op: Op, body: dict) -> list[str]:
    remote, _ = server_run(ops.journal, op.run)
    try:
        ops.link.call("/runs/delete-tag", {"run_id": remote, "key": op.key})
    except HttpError as exc:
        # Gone already after an earlier, unacknowledged delete, or allowed to be absent: the goal.
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST" or not (op.attempts or body.get("missing_ok")):
            raise
    return []


def apply_log_inputs(ops: Operations, op: Op, body: dict) -> list[str]:
    remote, _ = server_run(ops.journal, op.run)
    ops.link.call("/runs/log-inputs", {**body, "run_id": remote})
    return []


def waits_for_files(ops: Operations, op: Op, body: dict) -> bool:
    """A run's end status (or a logged model's finalization) goes only after every file logged before it: the
    server must not show FINISHED (or READY) while its weights are still on their way (the file lane)."""
    if op.kind == UPDATE_RUN and body.get("status") not in TERMINAL_STATUSES:
        return False
    first = ops.journal.queue.first_file(op.run)
    return first is not None and first < op.id


def apply_artifact(ops: Operations, op: Op, body: dict) -> list[str]:
    remote, artifact_root = server_run(ops.journal, op.run)
    # A copy logged after an end status still on its way does not replace this one: the end waits for this file
    # (waits_for_files), and the server must not show the run ended without the file it had then.
    end = next(
        (
            later.id
            for later in ops.journal.queue.undelivered(op.run, (UPDATE_RUN,))
            if later.id > op.id and later.json().get("status") in TERMINAL_STATUSES
        ),
        None,
    )
    if not ops.journal.queue.superseded(op, end):
        ops.upload_artifact(op, body, remote, artifact_root)
        return [body["spool"]]
    # A newer copy of the same path goes up later instead: this one is not sent, and an upload of it that began
    # is dropped on the server now rather than when it expires.
    begun = ops.journal.uploads.get(op.id)
    if begun is not None and begun.location is not None:
        with contextlib.suppress(LinkError):
            uploads.terminate(ops.link, begun.location)
    return [body["spool"]]
