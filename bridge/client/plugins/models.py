"""MLflow 3 logged models through the journal: `log_model` (pytorch, pyfunc, autolog) works offline too.

A logged model created here gets a local id (`m-<hex>`, like the server's) and the artifact location
`bridge-artifacts://<local id>`, so its files go through the spool like a run's. Everything about the model
is journaled under its local id as the run key, in call order:

    create ──▶ params / tags ──▶ artifacts (models/<id>/artifacts on the server) ──▶ finalize (READY)

so the server sees READY only after the last file arrived. The run↔model link (`log_outputs`) is sent under
the model's key too: by then the run (created earlier) and the model exist on the server. Ids are
translated both ways: the sender maps the local id to the server's; reads relabel the server's ids.

Metrics that name a model (or a dataset) are the run's: journaled under the run, in call order with its other
writes, and sent once the model they name exists on the server (the run's delivery waits a round for it).
`log_model` copies the run's metrics at its step to the new model by reading them back; while the server
does not answer, that copy is journaled instead (`STEP_METRICS_TO_MODEL`) and read on the server at delivery,
when every earlier point of the run is there — the model gets what stock MLflow would have given it.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import re
import sys
import time
import uuid
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

from mlflow.entities import LoggedModel, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import NOT_IMPLEMENTED, TEMPORARILY_UNAVAILABLE
from mlflow.store.entities.paged_list import PagedList
from mlflow.store.tracking.abstract_store import AbstractStore
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from bridge.client import journal as J
from bridge.client.delivery.batch import json_number
from bridge.client.journal.kinds import (
    CREATE_LOGGED_MODEL,
    DELETE_LOGGED_MODEL_TAG,
    FINALIZE_LOGGED_MODEL,
    LOG_LOGGED_MODEL_PARAMS,
    LOG_OUTPUTS,
    MODEL_KEY_TAG,
    MODEL_METRICS,
    RECORD_LOGGED_MODEL,
    REGISTRY_KEY,
    SET_LOGGED_MODEL_TAGS,
    STEP_METRICS_TO_MODEL,
    artifact_uri_for,
)
from bridge.client.plugins.server_reads import Offline

if TYPE_CHECKING:
    from mlflow.store.tracking.rest_store import RestStore

    from bridge.client.connect import Connection

log = logging.getLogger(__name__)

#: Where `Model.log` defines the helper that copies a step's metrics to the model (bridge/mlflow_internals.py).
_MODEL_LOG_FILE = "/".join(("mlflow", "models", "model.py"))
_MODEL_LOG_HELPER = "log_model_metrics_for_step"
#: How many entries of a refused request MLflow's store re-checks at a time (`_log_model_metrics`; see
#: `model_point_clash` and bridge/mlflow_internals.py).
_RECHECK_NAMES = 100
#: Model points of a run remembered for `model_point_clash` (the newest; between half and all of this many): a
#: second value against an older one is met at delivery instead, as one from another process (docs/journal.md).
MODEL_POINTS_KEPT = 20_000

_NEVER_JOURNALED = (
    "start_trace",
    "log_spans",
    "log_spans_async",
    "get_trace_info",
    "get_trace",
    "search_traces",
    "set_trace_tag",
    "delete_trace_tag",
    "delete_traces",
    "batch_get_traces",
    "batch_get_trace_infos",
    "create_assessment",
    "update_assessment",
    "delete_assessment",
    "get_assessment",
    "link_prompts_to_trace",
    "unlink_traces_from_run",
    "calculate_trace_filter_correlation",
)


def new_model_id() -> str:
    return "m-" + uuid.uuid4().hex


def names_a_model(metric) -> bool:
    """Whether a metric carries more than a run's point: a logged model or a dataset it belongs to."""
    return bool(metric.model_id or metric.dataset_name or metric.dataset_digest)


def model_metrics_body(metrics: list) -> dict:
    """The journal body of metric points that name a model or dataset (`names_a_model`); plain numbers only
    (numpy's int64 steps and timestamps included), so it is built before anything of the call is journaled."""
    points = []
    for m in metrics:
        point = {
            "key": m.key,
            "value": json_number(float(m.value)),
            "timestamp": int(m.timestamp),
            "step": int(m.step or 0),
        }
        point.update(
            (k, str(v))
            for k, v in (
                ("model_id", m.model_id),
                ("dataset_name", m.dataset_name),
                ("dataset_digest", m.dataset_digest),
            )
            if v
        )
        points.append(point)
    return {"metrics": points}


def model_point_clash(metrics: list, known: dict, canonical=lambda model_id: model_id) -> tuple | None:
    """(the point, why) that MLflow's store refuses one log_batch request for, or None.

    The server keeps one point per model, key, step, millisecond and run (logged_model_metrics' key) and refuses
    a second in the request, or one the model holds already as another point (value as the store keeps it, or
    dataset). Its recovery re-checks a request against the run's points in groups of `_RECHECK_NAMES` entries
    and refuses a point held already, identical or not, when a group without its key comes first or after
    (sqlalchemy_store.py `_log_model_metrics`, bridge/mlflow_internals.py). `known`: the run's model points
    (`RunSummary.model_points`), keyed by `canonical` model id.
    """
    seen, taken, instances, held = set(), set(), [], []
    for m in metrics:
        if not m.model_id:
            continue
        if m in seen and not math.isnan(m.value):  # the server parses two NaNs apart: never equal there
            continue
        seen.add(m)
        instances.append(m)
        found = model_point_key(m, canonical)
        if found in taken:
            return m, "this request gives it twice"
        taken.add(found)
        before = known.get(found)
        if before is not None:
            if before != model_point_row(m):
                return m, "the model holds another point there already"
            held.append(m)
    if held and len(instances) > _RECHECK_NAMES:
        groups = [{m.key for m in instances[i : i + _RECHECK_NAMES]} for i in range(0, len(instances), _RECHECK_NAMES)]
        for m in held:
            if any(m.key not in names for names in groups):
                return m, (
                    f"the model holds it already, which MLflow's server refuses in a request of more than "
                    f"{_RECHECK_NAMES} model points"
                )
    return None


def remember_model_points(metrics: list, known: dict, canonical=lambda model_id: model_id) -> None:
    """Add the points of a journaled batch that name a model to `known` (see `model_point_clash`), keeping the
    newest `MODEL_POINTS_KEPT` at most: a run linking every point (`set_active_model`) must not grow without end."""
    for m in metrics:
        if m.model_id:
            known.setdefault(model_point_key(m, canonical), model_point_row(m))
    if len(known) > MODEL_POINTS_KEPT:  # the older half goes at once: O(1) a point, amortised
        newer = list(known.items())[len(known) // 2 :]
        known.clear()
        known.update(newer)


def local_model_id(journal: J.Journal, cache: dict):
    """A function giving this side's id of a logged model named by its server id (a read after delivery
    answers those), or the id itself; answers are kept in `cache`."""

    def local(model_id: str) -> str:
        found = cache.get(model_id)
        if found is None:
            record = journal.ids.entity_for_remote(J.LOGGED_MODEL, model_id)
            found = cache[model_id] = model_id if record is None else record.local_id
        return found

    return local


def model_point_key(m, canonical) -> tuple:
    return canonical(m.model_id), m.key, int(m.step or 0), int(m.timestamp)


def model_point_row(m) -> float | tuple:
    """What MLflow's store compares a model point by besides its key: the value as kept (and dataset)."""
    if m.dataset_name or m.dataset_digest:
        return stored_value(m.value), m.dataset_name or None, m.dataset_digest or None
    return stored_value(m.value)


def stored_value(value) -> float:
    """A model point's value as MLflow's SQL store keeps and compares it: ±inf as the largest float, NaN as 0."""
    value = float(value)
    if math.isnan(value):
        return 0.0
    return math.copysign(sys.float_info.max, value) if math.isinf(value) else value


def model_metric_points(op: J.Op) -> list[tuple[str, float, int, int]]:
    """(key, value, timestamp, step) of a MODEL_METRICS op, for the reads that merge what is still waiting."""
    return [(p["key"], float(p["value"]), p["timestamp"], p.get("step") or 0) for p in op.json()["metrics"]]


def asked_by_log_model() -> tuple[str, int] | None:
    """(model id, step) when MLflow's `log_model` is reading the run's metrics to copy them to a new model.

    `Model.log` does that in a nested helper (`log_model_metrics_for_step`, a private MLflow name: see
    bridge/mlflow_internals.py), reading `get_run` and `get_metric_history`; a frame of it up the stack is
    the only sign of who is asking. Cheap enough for the reads it is used on: those the server cannot answer.
    """
    frame: FrameType | None = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            return None
        code = frame.f_code
        if code.co_name == _MODEL_LOG_HELPER and code.co_filename.replace("\\", "/").endswith(_MODEL_LOG_FILE):
            found = frame.f_locals
            model_id, step = found.get("model_id"), found.get("step")
            return (model_id, int(step or 0)) if isinstance(model_id, str) else None
        frame = frame.f_back
    return None


def journal_step_metrics_to_model(
    journal: J.Journal, run_id: str, model_id: str, step: int, key: str | None = None
) -> None:
    """Journal `log_model`'s copy of run `run_id`'s metrics at `step` (all, or only `key`) to model `model_id`."""
    body = {"model": model_id, "step": step}
    if key is not None:
        body["key"] = key
    journal.append(run_id, STEP_METRICS_TO_MODEL, body)


def _with_waiting_metrics(journal: J.Journal, metrics: list[Metric], model_id: str) -> list[Metric]:
    """A model's metrics (local ids) with the points naming it that any run has not delivered yet. Points that
    log_model's copy will take from the server at delivery show once it is made."""
    seen = {(m.key, m.timestamp, m.step, m.run_id) for m in metrics}
    for op in journal.queue.undelivered_naming(MODEL_METRICS, model_id):
        for point in op.json()["metrics"]:
            found = (point["key"], point["timestamp"], point["step"], op.run)
            if point.get("model_id") == model_id and found not in seen:
                seen.add(found)
                metrics.append(
                    Metric(
                        point["key"],
                        float(point["value"]),
                        point["timestamp"],
                        point["step"],
                        dataset_name=point.get("dataset_name"),
                        dataset_digest=point.get("dataset_digest"),
                        run_id=op.run,
                        model_id=model_id,
                    )
                )
    return metrics


class LoggedModelStoreMixin:
    """The LoggedModel half of JournalStore (which provides `connection`, `_online`, `_server`, `_call_online`)."""

    if TYPE_CHECKING:  # what JournalStore provides (plugins/store.py)

        @property
        def connection(self) -> Connection: ...

        def _online(self, conn: Connection) -> bool: ...

        @staticmethod
        def _server(conn: Connection) -> RestStore: ...

        def _call_online(self, what: str, fn) -> Any: ...

    # ------------------------------------------------------------------------------ plumbing

    def _from_server(self, conn, fn):
        """`fn(server reads)` when the server answers; None when it does not (or is known down)."""
        if not self._online(conn):
            return None
        try:
            return fn(self._server(conn))
        except Offline:
            return None

    def _model_record(self, conn, model_id: str) -> J.EntityRecord | None:
        return conn.journal.ids.entity(J.LOGGED_MODEL, model_id) if model_id.startswith("m-") else None

    def _local_model(self, conn, model: LoggedModel) -> LoggedModel:
        """The server's model, relabelled with local ids; a model created here keeps what this process set."""
        journal = conn.journal
        record = journal.ids.entity_for_remote(J.LOGGED_MODEL, model.model_id)
        tags, params, status = dict(model.tags), dict(model.params), model.status
        model_id = model.model_id
        if record is not None:
            known = record.json()
            model_id = record.local_id
            tags.update(known.get("tags") or {})
            for key in known.get("deleted_tags") or ():
                tags.pop(key, None)
            params.update(known.get("params") or {})
            status = LoggedModelStatus(known["status"])
        tags.pop(MODEL_KEY_TAG, None)
        source_run = journal.ids.local_run_id(model.source_run_id) if model.source_run_id else None
        metrics = [
            Metric(
                m.key,
                m.value,
                m.timestamp,
                m.step,
                dataset_name=m.dataset_name,
                dataset_digest=m.dataset_digest,
                run_id=journal.ids.local_run_id(m.run_id) if m.run_id else None,
                model_id=model_id,
            )
            for m in model.metrics or ()
        ]
        if record is not None:
            metrics = _with_waiting_metrics(journal, metrics, model_id)
        location = artifact_uri_for(model_id) if record is not None else model.artifact_location
        return LoggedModel(
            experiment_id=journal.ids.local_experiment_id(model.experiment_id),
            model_id=model_id,
            name=model.name,
            artifact_location=location,
            creation_timestamp=model.creation_timestamp,
            last_updated_timestamp=model.last_updated_timestamp,
            model_type=model.model_type,
            source_run_id=source_run,
            status=status,
            status_message=model.status_message,
            tags=tags,
            params=params,
            metrics=metrics,
        )

    def _offline_model(self, record: J.EntityRecord) -> LoggedModel:
        known = record.json()
        # Offline: the points still waiting only (those delivered are on the server).
        metrics = _with_waiting_metrics(self.connection.journal, [], record.local_id)
        return LoggedModel(
            experiment_id=known["experiment_id"],
            model_id=record.local_id,
            name=known["name"],
            artifact_location=artifact_uri_for(record.local_id),
            creation_timestamp=known["creation_timestamp"],
            # always written with the model (create_logged_model, _change_model)
            last_updated_timestamp=cast(int, known.get("last_updated_timestamp")),
            model_type=known.get("model_type"),
            source_run_id=known.get("source_run_id"),
            status=LoggedModelStatus(known["status"]),
            tags=known.get("tags") or {},
            params=known.get("params") or {},
            metrics=metrics,
        )

    def _change_model(self, conn, model_id: str, change) -> None:
        """Apply `change(known)` to what this process knows of a model it created (for reads while offline)."""
        record = self._model_record(conn, model_id)
        if record is not None:
            known = record.json()
            change(known)
            known["last_updated_timestamp"] = int(time.time() * 1000)
            conn.journal.update_entity(J.LOGGED_MODEL, model_id, known)

    # ------------------------------------------------------------------------------ writes

    def create_logged_model(
        self, experiment_id, name=None, source_run_id=None, tags=None, params=None, model_type=None
    ) -> LoggedModel:
        from mlflow.utils.name_utils import _generate_random_name  # private: see bridge/mlflow_internals.py

        conn = self.connection
        local_id = new_model_id()
        now = int(time.time() * 1000)
        spec = {
            "experiment_id": str(experiment_id),
            "name": name or _generate_random_name(),
            "source_run_id": source_run_id,
            "model_type": model_type,
            "tags": {t.key: str(t.value) for t in tags or []},
            "params": {p.key: str(p.value) for p in params or []},
        }
        known = {
            **spec,
            "status": str(LoggedModelStatus.PENDING),
            "creation_timestamp": now,
            "last_updated_timestamp": now,
        }
        conn.journal.add_entity(
            J.LOGGED_MODEL, local_id, known, op=(local_id, CREATE_LOGGED_MODEL, {"model": local_id, **spec})
        )
        record = conn.journal.ids.entity(J.LOGGED_MODEL, local_id)
        assert record is not None  # added just now
        return self._offline_model(record)

    def log_logged_model_params(self, model_id, params) -> None:
        conn = self.connection
        values = {p.key: str(p.value) for p in params}
        self._change_model(conn, model_id, lambda known: known["params"].update(values))
        conn.journal.append(model_id, LOG_LOGGED_MODEL_PARAMS, {"model": model_id, "params": values})

    def set_logged_model_tags(self, model_id, tags) -> None:
        conn = self.connection
        values = {t.key: str(t.value) for t in tags}

        def change(known):
            known["tags"].update(values)
            known["deleted_tags"] = [k for k in known.get("deleted_tags") or () if k not in values]

        self._change_model(conn, model_id, change)
        # The model-versions tag names versions registered here: send it after them, in the registry's order.
        if MLFLOW_MODEL_VERSIONS in values:
            conn.journal.append(
                REGISTRY_KEY, SET_LOGGED_MODEL_TAGS, {"model": model_id, "tags": values, "seq": time.time_ns()}
            )
        else:
            conn.journal.append(model_id, SET_LOGGED_MODEL_TAGS, {"model": model_id, "tags": values})

    def delete_logged_model_tag(self, model_id, key) -> None:
        conn = self.connection

        def change(known):
            known["tags"].pop(key, None)
            known["deleted_tags"] = sorted({*(known.get("deleted_tags") or ()), key})

        self._change_model(conn, model_id, change)
        conn.journal.append(model_id, DELETE_LOGGED_MODEL_TAG, {"model": model_id}, key=key)

    def finalize_logged_model(self, model_id, status) -> LoggedModel:
        conn = self.connection
        status = LoggedModelStatus(status)
        self._change_model(conn, model_id, lambda known: known.update(status=str(status)))
        # Journaled after every artifact of the model (same run key, later id): READY arrives after the files.
        conn.journal.append(model_id, FINALIZE_LOGGED_MODEL, {"model": model_id, "status": str(status)})
        record = self._model_record(conn, model_id)
        return self._offline_model(record) if record is not None else self.get_logged_model(model_id)

    def log_outputs(self, run_id, models) -> None:
        conn = self.connection
        for output in models:
            conn.journal.append(
                output.model_id, LOG_OUTPUTS, {"run": run_id, "model": output.model_id, "step": output.step}
            )

    def record_logged_model(self, run_id, mlflow_model) -> None:
        self.connection.journal.append(
            run_id, RECORD_LOGGED_MODEL, {"run": run_id, "model_json": mlflow_model.get_tags_dict()}
        )

    def delete_logged_model(self, model_id) -> None:
        def delete(conn, server):
            record = self._model_record(conn, model_id)
            remote = record.remote_id if record is not None else model_id
            if remote is None:
                raise MlflowException(
                    f"logged model {model_id} has not reached the server yet", TEMPORARILY_UNAVAILABLE
                )
            server.delete_logged_model(remote)

        self._call_online("delete_logged_model", delete)

    # ------------------------------------------------------------------------------- reads

    def get_logged_model(self, model_id, allow_deleted=False) -> LoggedModel:
        conn = self.connection
        record = self._model_record(conn, model_id)
        remote = model_id if record is None else record.remote_id
        if remote is not None:
            try:
                found = self._from_server(conn, lambda s: s.get_logged_model(remote, allow_deleted))
            except MlflowException as exc:
                if record is None or exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                found = None
            if found is not None:
                return self._local_model(conn, found)
        if record is not None:
            return self._offline_model(record)
        raise MlflowException(
            f"get_logged_model({model_id!r}): the model is not in the journal and the server "
            f"({conn.link.url}) does not answer",
            TEMPORARILY_UNAVAILABLE,
        )

    def search_logged_models(
        self, experiment_ids, filter_string=None, datasets=None, max_results=None, order_by=None, page_token=None
    ) -> PagedList:
        conn = self.connection
        journal = conn.journal
        wanted = {str(e) for e in experiment_ids}
        match = _simple_filter(filter_string)
        remote_ids = [r for r in (journal.ids.server_experiment_id(str(e)) for e in experiment_ids) if r]
        page = None
        if remote_ids:
            page = self._from_server(
                conn,
                lambda s: s.search_logged_models(
                    remote_ids, _to_server_ids(journal, filter_string), datasets, max_results, order_by, page_token
                ),
            )
        elif not any(journal.ids.experiment(e) for e in wanted) and self._online(conn):
            page = PagedList([], None)  # experiments the server does not have: nothing there
        if page is None and match is None:
            raise MlflowException(
                f"search_logged_models(filter_string={filter_string!r}) needs the server, and "
                f"{conn.link.url} does not answer right now (offline, only `field = 'value'` "
                "conditions joined by AND are answered from the journal)",
                TEMPORARILY_UNAVAILABLE,
            )
        models = [] if page is None else [self._local_model(conn, m) for m in page]
        if page_token is None and match is not None:
            # Models created here and not on the server yet (all of them, offline) are part of the answer.
            delivered = {m.model_id for m in models}
            for record in journal.ids.entities(J.LOGGED_MODEL):
                if record.local_id in delivered or (page is not None and record.remote_id is not None):
                    continue
                model = self._offline_model(record)
                if model.experiment_id in wanted and match(model):
                    models.append(model)
        if max_results:
            models = models[:max_results]
        return PagedList(models, None if page is None else page.token)

    # ------------------------------------------------------------------------------ tracing

    def _tracing_not_journaled(self, call: str):
        raise MlflowException(
            f"{call}: bridge does not journal MLflow tracing yet (traces and spans); log traces to "
            "the workstation's server directly (mlflow.set_tracking_uri('http://…'))",
            NOT_IMPLEMENTED,
        )


def _make_refusal(call: str):
    def refuse(self, *args, **kwargs):
        self._tracing_not_journaled(call)

    refuse.__name__ = call
    refuse.__doc__ = f"Not journaled: raises MlflowException naming `{call}`."
    return refuse


for _call in _NEVER_JOURNALED:
    setattr(LoggedModelStoreMixin, _call, _make_refusal(_call))


def name_unsupported_calls(cls: type, base: type) -> None:
    """Make every call of `base` that `cls` leaves unimplemented raise an MlflowException naming the call.

    MLflow's abstract stores raise a bare `NotImplementedError(<store class>)`, which does not say what failed.
    """
    for name, fn in list(vars(base).items()):
        if name.startswith("_") or name in vars(cls) or not inspect.isfunction(fn) or inspect.iscoroutinefunction(fn):
            continue
        setattr(cls, name, _translated(name, fn))


def _translated(call: str, fn):
    @functools.wraps(fn)
    def translated(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except NotImplementedError:
            raise MlflowException(
                f"{call}: not supported through bridge's journal (bridge+ URIs); call it with "
                "MLflow pointed straight at the workstation's server",
                NOT_IMPLEMENTED,
            ) from None

    return translated


name_unsupported_calls(LoggedModelStoreMixin, AbstractStore)


_CONDITION = re.compile(r"\s*(?P<field>[\w.`]+)\s*=\s*'(?P<value>(?:[^']|'')*)'\s*")


def _simple_filter(filter_string: str | None):
    """A predicate for `a = 'x' AND b = 'y'` over name/model_type/status/source_run_id/tags./params.; else None."""
    if not filter_string or not filter_string.strip():
        return lambda model: True
    conditions = []
    for part in re.split(r"\s+(?i:and)\s+", filter_string.strip()):
        found = _CONDITION.fullmatch(part)
        if found is None:
            return None
        field, value = found["field"].replace("`", ""), found["value"].replace("''", "'")
        conditions.append((field, value))

    def value_of(model: LoggedModel, field: str):
        if field.startswith("tags."):
            return model.tags.get(field[5:])
        if field.startswith("params."):
            return model.params.get(field[7:])
        if field in ("name", "model_type", "source_run_id", "model_id"):
            return getattr(model, field)
        if field == "status":
            return str(model.status)
        return object()  # an unknown field never matches

    return lambda model: all(value_of(model, f) == v for f, v in conditions)


def _to_server_ids(journal: J.Journal, filter_string: str | None) -> str | None:
    """`filter_string` with quoted local run and model ids replaced by the server's."""
    if not filter_string:
        return filter_string

    def swap(found: re.Match) -> str:
        text = found.group(1)
        if text.startswith("m-"):
            record: J.EntityRecord | J.RunRecord | None = journal.ids.entity(J.LOGGED_MODEL, text)
            remote = record.remote_id if record is not None else None
        else:
            record = journal.ids.run(text)
            remote = record.remote_id if record is not None else None
        return f"'{remote}'" if remote else found.group(0)

    return re.sub(r"'([0-9a-zA-Z-]{16,40})'", swap, filter_string)
