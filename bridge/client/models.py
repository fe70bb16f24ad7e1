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
import json
import logging
import math
import re
import sys
import time
import uuid
from urllib.parse import quote

from mlflow.entities import LoggedModel, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import NOT_IMPLEMENTED, TEMPORARILY_UNAVAILABLE
from mlflow.store.entities.paged_list import PagedList
from mlflow.store.tracking.abstract_store import AbstractStore
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from bridge.client import journal as J
from bridge.client import operations
from bridge.client.batch import MAX_METRICS_PER_BATCH, json_number
from bridge.errors import HttpError, UndeliverableError

log = logging.getLogger(__name__)

#: Operation kinds (applied by the functions registered at the end of this module).
CREATE_LOGGED_MODEL = "create_logged_model"
LOG_LOGGED_MODEL_PARAMS = "log_logged_model_params"
SET_LOGGED_MODEL_TAGS = "set_logged_model_tags"
DELETE_LOGGED_MODEL_TAG = "delete_logged_model_tag"
FINALIZE_LOGGED_MODEL = "finalize_logged_model"
LOG_OUTPUTS = "log_outputs"
RECORD_LOGGED_MODEL = "record_logged_model"
#: Metric points that name a logged model or a dataset (MLflow 3), journaled under their run; and `log_model`'s
#: copy of the run's metrics at one step to the model, made at delivery (see the module doc).
MODEL_METRICS, STEP_METRICS_TO_MODEL = J.MODEL_METRICS, J.STEP_METRICS_TO_MODEL

#: The tag that finds a model again after a lost answer (like the run key of a run).
MODEL_KEY_TAG = "bridge.modelKey"
#: A logged model this side never heard of (its creation became a dead letter).
MODEL_NOT_CREATED = "model-not-created"

LOGGED_MODELS_API = "/api/2.0/mlflow/logged-models"
_PARAMS_PER_REQUEST = 100

#: Where `Model.log` defines the helper that copies a step's metrics to the model (bridge/mlflow_internals.py).
_MODEL_LOG_FILE = "/".join(("mlflow", "models", "model.py"))
_MODEL_LOG_HELPER = "log_model_metrics_for_step"
#: How many entries of a refused request MLflow's store re-checks at a time (`_log_model_metrics`; see
#: `model_point_clash` and bridge/mlflow_internals.py).
_RECHECK_NAMES = 100
#: Model points of a run remembered for `model_point_clash` (the newest; between half and all of this many): a
#: second value against an older one is met at delivery instead, as one from another process (README).
MODEL_POINTS_KEPT = 20_000

_NEVER_JOURNALED = ("start_trace", "log_spans", "log_spans_async", "get_trace_info", "get_trace", "search_traces",
                    "set_trace_tag", "delete_trace_tag", "delete_traces", "batch_get_traces", "batch_get_trace_infos",
                    "create_assessment", "update_assessment", "delete_assessment", "get_assessment",
                    "link_prompts_to_trace", "unlink_traces_from_run", "calculate_trace_filter_correlation")


def model_artifact_uri(model_id: str) -> str:
    from bridge.client.store import artifact_uri_for

    return artifact_uri_for(model_id)


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
        point = {"key": m.key, "value": json_number(float(m.value)), "timestamp": int(m.timestamp),
                 "step": int(m.step or 0)}
        point.update((k, str(v)) for k, v in (("model_id", m.model_id), ("dataset_name", m.dataset_name),
                                              ("dataset_digest", m.dataset_digest)) if v)
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
        groups = [{m.key for m in instances[i:i + _RECHECK_NAMES]} for i in range(0, len(instances), _RECHECK_NAMES)]
        for m in held:
            if any(m.key not in names for names in groups):
                return m, (f"the model holds it already, which MLflow's server refuses in a request of more than "
                           f"{_RECHECK_NAMES} model points")
    return None


def remember_model_points(metrics: list, known: dict, canonical=lambda model_id: model_id) -> None:
    """Add the points of a journaled batch that name a model to `known` (see `model_point_clash`), keeping the
    newest `MODEL_POINTS_KEPT` at most: a run linking every point (`set_active_model`) must not grow without end."""
    for m in metrics:
        if m.model_id:
            known.setdefault(model_point_key(m, canonical), model_point_row(m))
    if len(known) > MODEL_POINTS_KEPT:  # the older half goes at once: O(1) a point, amortised
        newer = list(known.items())[len(known) // 2:]
        known.clear()
        known.update(newer)


def local_model_id(journal: J.Journal, cache: dict):
    """A function giving this side's id of a logged model named by its server id (a read after delivery
    answers those), or the id itself; answers are kept in `cache`."""
    def local(model_id: str) -> str:
        found = cache.get(model_id)
        if found is None:
            record = journal.entity_for_remote(J.LOGGED_MODEL, model_id)
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
    frame = sys._getframe(1)
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


def journal_step_metrics_to_model(journal: J.Journal, run_id: str, model_id: str, step: int,
                                  key: str | None = None) -> None:
    """Journal `log_model`'s copy of run `run_id`'s metrics at `step` (all, or only `key`) to model `model_id`."""
    body = {"model": model_id, "step": step}
    if key is not None:
        body["key"] = key
    journal.append(run_id, STEP_METRICS_TO_MODEL, body)


def _with_waiting_metrics(journal: J.Journal, metrics: list[Metric], model_id: str) -> list[Metric]:
    """A model's metrics (local ids) with the points naming it that any run has not delivered yet. Points that
    log_model's copy will take from the server at delivery show once it is made."""
    seen = {(m.key, m.timestamp, m.step, m.run_id) for m in metrics}
    for op in journal.undelivered_naming(MODEL_METRICS, model_id):
        for point in op.json()["metrics"]:
            found = (point["key"], point["timestamp"], point["step"], op.run)
            if point.get("model_id") == model_id and found not in seen:
                seen.add(found)
                metrics.append(Metric(point["key"], float(point["value"]), point["timestamp"], point["step"],
                                      dataset_name=point.get("dataset_name"),
                                      dataset_digest=point.get("dataset_digest"), run_id=op.run, model_id=model_id))
    return metrics


class LoggedModelStoreMixin:
    """The LoggedModel half of JournalStore (which provides `connection`, `_online`, `_server`, `_call_online`)."""

    # ------------------------------------------------------------------------------ plumbing

    def _from_server(self, conn, fn):
        """`fn(server reads)` when the server answers; None when it does not (or is known down)."""
        from bridge.client.store import _Offline

        if not self._online(conn):
            return None
        try:
            return fn(self._server(conn))
        except _Offline:
            return None

    def _model_record(self, conn, model_id: str) -> J.EntityRecord | None:
        return conn.journal.entity(J.LOGGED_MODEL, model_id) if model_id.startswith("m-") else None

    def _local_model(self, conn, model: LoggedModel) -> LoggedModel:
        """The server's model, relabelled with local ids; a model created here keeps what this process set."""
        journal = conn.journal
        record = journal.entity_for_remote(J.LOGGED_MODEL, model.model_id)
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
        source_run = journal.local_run_id(model.source_run_id) if model.source_run_id else None
        metrics = [Metric(m.key, m.value, m.timestamp, m.step, dataset_name=m.dataset_name,
                          dataset_digest=m.dataset_digest, run_id=journal.local_run_id(m.run_id) if m.run_id else None,
                          model_id=model_id) for m in model.metrics or ()]
        if record is not None:
            metrics = _with_waiting_metrics(journal, metrics, model_id)
        location = model_artifact_uri(model_id) if record is not None else model.artifact_location
        return LoggedModel(experiment_id=journal.local_experiment_id(model.experiment_id), model_id=model_id,
                           name=model.name, artifact_location=location, creation_timestamp=model.creation_timestamp,
                           last_updated_timestamp=model.last_updated_timestamp, model_type=model.model_type,
                           source_run_id=source_run, status=status, status_message=model.status_message,
                           tags=tags, params=params, metrics=metrics)

    def _offline_model(self, record: J.EntityRecord) -> LoggedModel:
        known = record.json()
        # Offline: the points still waiting only (those delivered are on the server).
        metrics = _with_waiting_metrics(self.connection.journal, [], record.local_id)
        return LoggedModel(experiment_id=known["experiment_id"], model_id=record.local_id, name=known["name"],
                           artifact_location=model_artifact_uri(record.local_id),
                           creation_timestamp=known["creation_timestamp"],
                           last_updated_timestamp=known.get("last_updated_timestamp"),
                           model_type=known.get("model_type"), source_run_id=known.get("source_run_id"),
                           status=LoggedModelStatus(known["status"]), tags=known.get("tags") or {},
                           params=known.get("params") or {}, metrics=metrics)

    def _change_model(self, conn, model_id: str, change) -> None:
        """Apply `change(known)` to what this process knows of a model it created (for reads while offline)."""
        record = self._model_record(conn, model_id)
        if record is not None:
            known = record.json()
            change(known)
            known["last_updated_timestamp"] = int(time.time() * 1000)
            conn.journal.update_entity(J.LOGGED_MODEL, model_id, known)

    # ------------------------------------------------------------------------------ writes

    def create_logged_model(self, experiment_id, name=None, source_run_id=None, tags=None, params=None,
                            model_type=None) -> LoggedModel:
        from mlflow.utils.name_utils import _generate_random_name  # private: see bridge/mlflow_internals.py

        conn = self.connection
        local_id = new_model_id()
        now = int(time.time() * 1000)
        spec = {"experiment_id": str(experiment_id), "name": name or _generate_random_name(),
                "source_run_id": source_run_id, "model_type": model_type,
                "tags": {t.key: str(t.value) for t in tags or []},
                "params": {p.key: str(p.value) for p in params or []}}
        known = {**spec, "status": str(LoggedModelStatus.PENDING), "creation_timestamp": now,
                 "last_updated_timestamp": now}
        conn.journal.add_entity(J.LOGGED_MODEL, local_id, known,
                                op=(local_id, CREATE_LOGGED_MODEL, {"model": local_id, **spec}))
        return self._offline_model(conn.journal.entity(J.LOGGED_MODEL, local_id))

    def log_logged_model_params(self, model_id, params) -> None:
        conn = self.connection
        values = {p.key: str(p.value) for p in params}
        self._change_model(conn, model_id, lambda known: known["params"].update(values))
        conn.journal.append(model_id, LOG_LOGGED_MODEL_PARAMS, {"model": model_id, "params": values})

    def set_logged_model_tags(self, model_id, tags) -> None:
        from bridge.client.registry import REGISTRY_KEY

        conn = self.connection
        values = {t.key: str(t.value) for t in tags}

        def change(known):
            known["tags"].update(values)
            known["deleted_tags"] = [k for k in known.get("deleted_tags") or () if k not in values]

        self._change_model(conn, model_id, change)
        # The model-versions tag names versions registered here: send it after them, in the registry's order.
        if MLFLOW_MODEL_VERSIONS in values:
            conn.journal.append(REGISTRY_KEY, SET_LOGGED_MODEL_TAGS,
                                {"model": model_id, "tags": values, "seq": time.time_ns()})
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
            conn.journal.append(output.model_id, LOG_OUTPUTS,
                                {"run": run_id, "model": output.model_id, "step": output.step})

    def record_logged_model(self, run_id, mlflow_model) -> None:
        self.connection.journal.append(run_id, RECORD_LOGGED_MODEL,
                                       {"run": run_id, "model_json": mlflow_model.get_tags_dict()})

    def delete_logged_model(self, model_id) -> None:
        def delete(conn, server):
            record = self._model_record(conn, model_id)
            remote = record.remote_id if record is not None else model_id
            if remote is None:
                raise MlflowException(f"logged model {model_id} has not reached the server yet",
                                      TEMPORARILY_UNAVAILABLE)
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
        raise MlflowException(f"get_logged_model({model_id!r}): the model is not in the journal and the server "
                              f"({conn.link.url}) does not answer", TEMPORARILY_UNAVAILABLE)

    def search_logged_models(self, experiment_ids, filter_string=None, datasets=None, max_results=None,
                             order_by=None, page_token=None) -> PagedList:
        conn = self.connection
        journal = conn.journal
        wanted = {str(e) for e in experiment_ids}
        match = _simple_filter(filter_string)
        remote_ids = [r for r in (journal.server_experiment_id(str(e)) for e in experiment_ids) if r]
        page = None
        if remote_ids:
            page = self._from_server(conn, lambda s: s.search_logged_models(
                remote_ids, _to_server_ids(journal, filter_string), datasets, max_results, order_by, page_token))
        elif not any(journal.experiment(e) for e in wanted) and self._online(conn):
            page = PagedList([], None)  # experiments the server does not have: nothing there
        if page is None and match is None:
            raise MlflowException(f"search_logged_models(filter_string={filter_string!r}) needs the server, and "
                                  f"{conn.link.url} does not answer right now (offline, only `field = 'value'` "
                                  "conditions joined by AND are answered from the journal)", TEMPORARILY_UNAVAILABLE)
        models = [] if page is None else [self._local_model(conn, m) for m in page]
        if page_token is None and match is not None:
            # Models created here and not on the server yet (all of them, offline) are part of the answer.
            delivered = {m.model_id for m in models}
            for record in journal.entities(J.LOGGED_MODEL):
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
        raise MlflowException(f"{call}: bridge does not journal MLflow tracing yet (traces and spans); log traces to "
                              "the workstation's server directly (mlflow.set_tracking_uri('http://…'))",
                              NOT_IMPLEMENTED)


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
            raise MlflowException(f"{call}: not supported through bridge's journal (bridge+ URIs); call it with "
                                  "MLflow pointed straight at the workstation's server", NOT_IMPLEMENTED) from None

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
            record = journal.entity(J.LOGGED_MODEL, text)
            remote = record.remote_id if record is not None else None
        else:
            record = journal.run(text)
            remote = record.remote_id if record is not None else None
        return f"'{remote}'" if remote else found.group(0)

    return re.sub(r"'([0-9a-zA-Z-]{16,40})'", swap, filter_string)


# ------------------------------------------------------------------------------ delivery (sender thread)


def server_model_id(journal: J.Journal, model_id: str) -> str:
    """The server's id of a model: its mapping when created here, else the id itself."""
    record = journal.entity(J.LOGGED_MODEL, model_id) if model_id.startswith("m-") else None
    if record is None:
        return model_id
    if record.remote_id is None:
        raise UndeliverableError(MODEL_NOT_CREATED, f"logged model {model_id} was never created on the server")
    return record.remote_id


def _server_run_id(journal: J.Journal, run_id: str) -> str:
    remote = journal.server_run(run_id)[0]
    if remote is None:
        raise UndeliverableError(operations.RUN_NOT_CREATED, f"run {run_id} was never created on the server")
    return remote


def _model_url(model_id: str, tail: str = "") -> str:
    return f"{LOGGED_MODELS_API}/{quote(model_id, safe='')}{tail}"


def _find_model(ops: operations.Operations, experiment: str, local_id: str) -> dict | None:
    """The model an earlier try (or a copy of this journal) already created, found by its model key tag."""
    found = ops.link.request("POST", f"{LOGGED_MODELS_API}/search", json_body={
        "experiment_ids": [experiment], "max_results": 1,
        "filter": f"tags.`{MODEL_KEY_TAG}` = '{local_id}'"}).json()
    models = found.get("models") or []
    return models[0]["info"] if models else None


def _apply_create(ops: operations.Operations, op: J.Op, body: dict) -> list[str]:
    journal = ops.journal
    local_id = body["model"]
    record = journal.entity(J.LOGGED_MODEL, local_id)
    if record is not None and record.remote_id is not None:
        return []
    experiment = ops._server_experiment(body["experiment_id"], f"logged model {local_id}")
    source_run = _server_run_id(journal, body["source_run_id"]) if body.get("source_run_id") else None
    # Always looked for first (one request per model): a lost answer or a second copy of the journal must
    # not make a second model.
    info = _find_model(ops, experiment, local_id)
    params = [{"key": k, "value": v} for k, v in (body.get("params") or {}).items()]
    if info is None:
        payload = {"experiment_id": experiment, "name": body["name"],
                   "tags": [{"key": k, "value": v} for k, v in {**(body.get("tags") or {}),
                                                                 MODEL_KEY_TAG: local_id}.items()],
                   "params": params[:_PARAMS_PER_REQUEST]}
        if source_run:
            payload["source_run_id"] = source_run
        if body.get("model_type"):
            payload["model_type"] = body["model_type"]
        with ops.creating():
            info = ops.link.request("POST", LOGGED_MODELS_API, json_body=payload).json()["model"]["info"]
        rest = params[_PARAMS_PER_REQUEST:]
    else:
        rest = params  # params are idempotent: re-send them all
    _send_params(ops, info["model_id"], rest)
    journal.map_entity(J.LOGGED_MODEL, local_id, info["model_id"], info.get("artifact_uri"))
    return []


def _send_params(ops: operations.Operations, remote: str, params: list[dict]) -> None:
    for start in range(0, len(params), _PARAMS_PER_REQUEST):
        ops.link.request("POST", _model_url(remote, "/params"),
                         json_body={"model_id": remote, "params": params[start:start + _PARAMS_PER_REQUEST]})


def _apply_params(ops: operations.Operations, op: J.Op, body: dict) -> list[str]:
    _send_params(ops, server_model_id(ops.journal, body["model"]),
                 [{"key": k, "value": v} for k, v in body["params"].items()])
    return []


def _apply_tags(ops: operations.Operations, op: J.Op, body: dict) -> list[str]:
    from bridge.client.registry import server_versions_tag, wait_turn

    if not wait_turn(ops, op, body):
        return []
    remote = server_model_id(ops.journal, body["model"])
    tags = dict(body["tags"])
    if MLFLOW_MODEL_VERSIONS in tags:
        tags[MLFLOW_MODEL_VERSIONS] = server_versions_tag(ops.journal, tags[MLFLOW_MODEL_VERSIONS])
    ops.link.request("PATCH", _model_url(remote, "/tags"),
                     json_body={"model_id": remote, "tags": [{"key": k, "value": v} for k, v in tags.items()]})
    return []


def _apply_delete_tag(ops: operations.Operations, op: J.Op, body: dict) -> list[str]:
    remote = server_model_id(ops.journal, body["model"])
    try:
        ops.link.request("DELETE", _model_url(remote, "/tags/" + quote(op.key, safe="")))
    except HttpError as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST" or op.attempts == 0:
            raise  # gone already after an earlier, unacknowledged delete: that is the goal
    return []


def _apply_finalize(ops: operations.Operations, op: J.Op, body: dict) -> list[str]:
    remote = server_model_id(ops.journal, body["model"])
    status = LoggedModelStatus(body["status"]).to_proto()
    from mlflow.protos.service_pb2 import LoggedModelStatus as StatusProto

    ops.link.request("PATCH", _model_url(remote), json_body={"model_id": remote,
                                                             "status": StatusProto.Name(status)})
    return []


def _apply_outputs(ops: operations.Operations, op: J.Op, body: dict) -> list[str]:
    run, model, step = _server_run_id(ops.journal, body["run"]), server_model_id(ops.journal, body["model"]), \
        body.get("step") or 0
    try:
        ops.link.call("/runs/outputs", {"run_id": run, "models": [{"model_id": model, "step": step}]})
    except HttpError:
        # Linked already (an unacknowledged try, or a copy of this journal): MLflow refuses the second link.
        found = ops.link.call("/runs/get", {"run_id": run}, method="GET").get("run", {}).get("outputs") or {}
        if not any(o.get("model_id") == model and int(o.get("step") or 0) == step
                   for o in found.get("model_outputs") or ()):
            raise
    return []


def _apply_record(ops: operations.Operations, op: J.Op, body: dict) -> list[str]:
    journal = ops.journal
    run = _server_run_id(journal, body["run"])
    model_json = dict(body["model_json"])
    model_json["run_id"] = run
    for key in ("model_id", "model_uuid"):
        if isinstance(model_json.get(key), str) and model_json[key].startswith("m-"):
            record = journal.entity(J.LOGGED_MODEL, model_json[key])
            if record is not None and record.remote_id:
                model_json[key] = record.remote_id
    ops.link.call("/runs/log-model", {"run_id": run, "model_json": json.dumps(model_json)})
    return []


def _waits_for_model(ops: operations.Operations, op: J.Op, body: dict) -> bool:
    """Whether a model this op names was created here and its creation is still on its way to the server."""
    if op.kind == STEP_METRICS_TO_MODEL:
        named = {body["model"]}
    else:
        named = {p["model_id"] for p in body["metrics"] if p.get("model_id")}
    for model_id in named:
        record = ops.journal.entity(J.LOGGED_MODEL, model_id) if model_id.startswith("m-") else None
        if (record is not None and record.remote_id is None
                and ops.journal.undelivered(model_id, (CREATE_LOGGED_MODEL,))):
            return True
    return False


def _log_batch_metrics(ops: operations.Operations, run: str, points: list[dict]) -> None:
    for start in range(0, len(points), MAX_METRICS_PER_BATCH):
        ops.link.call("/runs/log-batch", {"run_id": run, "metrics": points[start:start + MAX_METRICS_PER_BATCH],
                                          "params": [], "tags": []})


def _apply_model_metrics(ops: operations.Operations, op: J.Op, body: dict) -> list[str]:
    """Several consecutive ops of a run arrive merged into one (sender.py): one request for up to 1,000 points."""
    journal = ops.journal
    run = _server_run_id(journal, op.run)
    points = []
    for point in body["metrics"]:
        if point.get("model_id"):
            try:
                point = dict(point, model_id=server_model_id(journal, point["model_id"]))
            except UndeliverableError as exc:
                # The run's own point is not lost with the model: it goes to the run alone.
                log.warning("bridge: metric %r of run %s goes to the run only: %s", point["key"], op.run, exc.message)
                point = {k: v for k, v in point.items() if k != "model_id"}
        points.append(point)
    _send_model_points(ops, run, points)
    return []


def _send_model_points(ops: operations.Operations, run: str, points: list[dict]) -> None:
    """log-batch `points` of server run `run` (server model ids): the run keeps every point, each model the
    first of each key, step and millisecond.

    MLflow's store keeps one model point per key, step, millisecond and run (the value is not in its key) and
    refuses a whole request holding a second one (stock MLflow's own call raises then). So a second one in
    the request goes to the run alone; refused (400) for one the model holds already, the model's points are
    read and those go to the run alone too; a model the server no longer has takes none (its points go to the run).
    """
    points = _first_of_each(points, set(), set())
    try:
        _log_batch_metrics(ops, run, points)  # the server keeps one of each point: a try again changes nothing
    except HttpError as exc:
        if exc.status != 400 or not any(p.get("model_id") for p in points):
            raise
        held, gone = _model_points_on_server(ops, run, {p["model_id"] for p in points if p.get("model_id")})
        again = _first_of_each(points, held, gone)
        if again == points:
            raise
        _log_batch_metrics(ops, run, again)


def _point_key(point: dict) -> tuple:
    return point.get("model_id"), point["key"], int(point.get("step") or 0), int(point["timestamp"])


def _first_of_each(points: list[dict], held: set[tuple], gone: set[str]) -> list[dict]:
    """`points` with the model's id kept only on the first point of each key, step and millisecond of a model
    (on none `held` by the model already, on none of a model `gone`); the others go to the run alone."""
    seen, out = set(held), []
    for point in points:
        if point.get("model_id"):
            found = _point_key(point)
            if found in seen or point["model_id"] in gone:
                point = {k: v for k, v in point.items() if k != "model_id"}
            seen.add(found)
        out.append(point)
    return out


def _model_points_on_server(ops: operations.Operations, run: str, models: set[str]) -> tuple[set[tuple], set[str]]:
    """(the points of `run` each model holds, the models the server does not have)."""
    held, gone = set(), set()
    for model in models:
        try:
            found = ops.link.request("GET", _model_url(model)).json().get("model", {}).get("data", {})
        except HttpError as exc:
            if exc.status != 404:
                raise
            gone.add(model)
            continue
        held.update(_point_key(dict(m, model_id=model)) for m in found.get("metrics") or ()
                    if not m.get("run_id") or m["run_id"] == run)
    return held, gone


def _apply_step_metrics(ops: operations.Operations, op: J.Op, body: dict) -> list[str]:
    """What `log_model` does online (mlflow/models/model.py), on the server's data: every point of the run at
    the step that names no model yet, again with the model's id. The run's earlier writes are there by now.

    One read per metric key, as MLflow makes them; how far it got is kept in the op (`update_body`), so on a
    link that drops now and then it carries on instead of starting again.
    """
    journal = ops.journal
    run = _server_run_id(journal, op.run)
    model = server_model_id(journal, body["model"])
    step = body.get("step") or 0
    progress = dict(body)
    if "keys" not in progress:
        if body.get("key") is not None:
            keys = [body["key"]]
        else:
            found = ops.link.call("/runs/get", {"run_id": run}, method="GET")
            keys = sorted({m["key"] for m in (found.get("run", {}).get("data", {}).get("metrics") or [])})
        progress.update(keys=keys, read=0, points=[])
        journal.update_body(op.id, progress)
    keys, points = progress["keys"], progress["points"]
    for index in range(progress["read"], len(keys)):
        token, found = None, []
        while True:
            query = {"run_id": run, "metric_key": keys[index]}
            if token:
                query["page_token"] = token
            page = ops.link.call("/metrics/get-history", query, method="GET")
            found.extend({**{k: p[k] for k in ("key", "value", "timestamp", "dataset_name", "dataset_digest")
                             if k in p}, "step": step}
                         for p in page.get("metrics") or () if int(p.get("step") or 0) == step and not p.get("model_id"))
            token = page.get("next_page_token")
            if not token:
                break
        points.extend(found)
        progress["read"] = index + 1
        journal.update_body(op.id, progress)
    _send_model_points(ops, run, [dict(p, model_id=model) for p in points])
    return []


for _kind, _apply in ((CREATE_LOGGED_MODEL, _apply_create), (LOG_LOGGED_MODEL_PARAMS, _apply_params),
                      (SET_LOGGED_MODEL_TAGS, _apply_tags), (DELETE_LOGGED_MODEL_TAG, _apply_delete_tag),
                      (FINALIZE_LOGGED_MODEL, _apply_finalize), (LOG_OUTPUTS, _apply_outputs),
                      (RECORD_LOGGED_MODEL, _apply_record)):
    operations.register_kind(_kind, _apply)
operations.register_kind(MODEL_METRICS, _apply_model_metrics, waits=_waits_for_model)
operations.register_kind(STEP_METRICS_TO_MODEL, _apply_step_metrics, waits=_waits_for_model)

__all__ = ["LoggedModelStoreMixin", "MODEL_KEY_TAG", "server_model_id"]
