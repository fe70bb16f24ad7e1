"""One table from a journal op kind to what delivers it: no kind is registered by importing a module.

Metric points, params and tags (`batch.BATCH_KINDS`) are not here: the sender coalesces them into log_batch
requests. Every other kind is applied one op at a time by its `Handler` (metric points that name a logged model
are merged per run first: sender.py). A kind missing from the table is an op a newer bridge wrote: a dead letter
with reason `unknown-operation`, never a crash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bridge.client.delivery import logged_models, operations, registry
from bridge.client.delivery.operations import UNKNOWN_OPERATION, Operations
from bridge.client.journal import Op
from bridge.client.journal import kinds as K
from bridge.errors import HttpError, UndeliverableError


@dataclass(frozen=True)
class Handler:
    """How one kind is delivered: `apply(ops, op, body) -> spool files that can go once it is done`."""

    apply: Callable[[Operations, Op, dict], list[str]]
    #: Whether the op must wait for something journaled under another key (a logged model's creation) before
    #: it can be sent; its run waits with it.
    waits: Callable[[Operations, Op, dict], bool] | None = None
    #: The server writes it with SQLAlchemy's `merge` (read, then insert or update). Two tries of one op can
    #: meet there — one the client gave up on (a timeout, a stopping sender's cut) still running, and the next —
    #: and the later is refused on the table's unique key although the earlier wrote the row. Measured on a real
    #: server (SQLite, 2 workers), 2 identical requests at once: set-experiment-tag refused 24 of 400,
    #: registered-models set-tag 26 of 400; a run's tags (log-batch) and a logged model's (a true upsert) never.
    #: Such a refusal is tried again (the sender bounds how often); the merge then updates.
    upsert: bool = False


HANDLERS: dict[str, Handler] = {
    # runs and experiments (operations.py)
    K.CREATE_EXPERIMENT: Handler(operations.apply_create_experiment),
    K.SET_EXPERIMENT_TAG: Handler(operations.apply_set_experiment_tag, upsert=True),
    K.DELETE_EXPERIMENT_TAG: Handler(operations.apply_delete_experiment_tag),
    K.CREATE_RUN: Handler(operations.apply_create_run),
    K.UPDATE_RUN: Handler(operations.apply_update_run, waits=operations.waits_for_files),
    K.DELETE_TAG: Handler(operations.apply_delete_tag),
    K.LOG_INPUTS: Handler(operations.apply_log_inputs),
    K.ARTIFACT: Handler(operations.apply_artifact),
    # logged models (logged_models.py)
    K.CREATE_LOGGED_MODEL: Handler(logged_models.apply_create),
    K.LOG_LOGGED_MODEL_PARAMS: Handler(logged_models.apply_params),
    K.SET_LOGGED_MODEL_TAGS: Handler(logged_models.apply_tags),
    K.DELETE_LOGGED_MODEL_TAG: Handler(logged_models.apply_delete_tag),
    K.FINALIZE_LOGGED_MODEL: Handler(logged_models.apply_finalize, waits=operations.waits_for_files),
    K.LOG_OUTPUTS: Handler(logged_models.apply_outputs),
    K.RECORD_LOGGED_MODEL: Handler(logged_models.apply_record),
    K.MODEL_METRICS: Handler(logged_models.apply_model_metrics, waits=logged_models.waits_for_model),
    K.STEP_METRICS_TO_MODEL: Handler(logged_models.apply_step_metrics, waits=logged_models.waits_for_model),
    # the model registry (registry.py): one order for all of them, under REGISTRY_KEY
    K.CREATE_REGISTERED_MODEL: Handler(registry.apply_registry),
    K.CREATE_MODEL_VERSION: Handler(registry.apply_registry),
    K.SET_ALIAS: Handler(registry.apply_registry, upsert=True),
    K.DELETE_ALIAS: Handler(registry.apply_registry),
    K.SET_MODEL_TAG: Handler(registry.apply_registry, upsert=True),
    K.DELETE_MODEL_TAG: Handler(registry.apply_registry),
    K.SET_VERSION_TAG: Handler(registry.apply_registry, upsert=True),
    K.DELETE_VERSION_TAG: Handler(registry.apply_registry),
}

#: How the databases MLflow runs on word a unique-key violation (SQLite, PostgreSQL, MySQL).
_UNIQUE_VIOLATIONS = ("UNIQUE constraint failed", "duplicate key value violates unique constraint", "Duplicate entry")


def apply(ops: Operations, op: Op) -> list[str]:
    """Apply one op on the server; returns spool files that can go once it is done.

    Raises HttpError (the server refused, or the link failed) or UndeliverableError.
    """
    handler = HANDLERS.get(op.kind)
    if handler is None:
        raise UndeliverableError(UNKNOWN_OPERATION, f"unknown journal operation {op.kind!r}")
    return handler.apply(ops, op, op.json())


def must_wait(ops: Operations, op: Op) -> bool:
    """Whether `op` waits for an op of another key not delivered yet (`Handler.waits`)."""
    handler = HANDLERS.get(op.kind)
    return handler is not None and handler.waits is not None and handler.waits(ops, op, op.json())


def lost_upsert_race(kinds: Iterable[str], exc: BaseException) -> bool:
    """Whether `exc`, the answer to a request writing ops of `kinds`, is an upsert refused on its unique key
    because another try of it got there first (`Handler.upsert`): worth another try."""
    return (
        isinstance(exc, HttpError)
        and exc.status == 400
        and any(kind in HANDLERS and HANDLERS[kind].upsert for kind in kinds)
        and any(text in (exc.message or "") for text in _UNIQUE_VIOLATIONS)
    )
