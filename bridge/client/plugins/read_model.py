"""The read model: what a read shows is the server's answer joined with what this journal has not delivered yet
(read-your-writes), or — offline — what the journal knows. MLflow entities in, MLflow entities out; no I/O here
but the journal reads the caller hands in.
"""

from __future__ import annotations

import math

from mlflow.entities import LifecycleStage, Metric, Param, Run, RunData, RunInfo, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

from bridge.client import journal as J
from bridge.client.journal.kinds import MODEL_METRICS, artifact_uri_for
from bridge.client.plugins import models

#: Ops holding metric points of a run (`points_of`).
POINT_KINDS = (J.METRIC, MODEL_METRICS)
#: What a read of a run merges from the journal into the server's answer: what it has not delivered yet.
OVERLAY_KINDS = (*POINT_KINDS, J.PARAM, J.TAG, J.DELETE_TAG, J.UPDATE_RUN)
#: The same for an experiment.
EXPERIMENT_OVERLAY_KINDS = (J.CREATE_EXPERIMENT, J.SET_EXPERIMENT_TAG, J.DELETE_EXPERIMENT_TAG)


def run_with_waiting(run: Run, ops: list[J.Op]) -> Run:
    """The server's `run` with the journal's undelivered `ops` of it (of OVERLAY_KINDS, oldest first) applied."""
    if not ops:
        return run
    metrics = {m.key: Metric.from_proto(m) for m in run.data.to_proto().metrics}
    params = dict(run.data.params)
    tags = dict(run.data.tags)
    info = run.info
    status, end_time, name = info.status, info.end_time, info.run_name
    for op in ops:
        if op.kind in POINT_KINDS:
            for metric in points_of(op):
                keep_latest(metrics, metric)
        elif op.kind == J.PARAM:
            params.setdefault(op.named(), op.text())
        elif op.kind == J.TAG:
            tags[op.named()] = op.text()
        elif op.kind == J.DELETE_TAG:
            tags.pop(op.named(), None)
        else:  # UPDATE_RUN
            body = op.json()
            status = body.get("status") or status
            end_time = body.get("end_time") if body.get("end_time") is not None else end_time
            name = body.get("run_name") or name
    if name:
        tags[MLFLOW_RUN_NAME] = name
    new_info = RunInfo(
        run_id=info.run_id,
        experiment_id=info.experiment_id,
        user_id=info.user_id,
        status=status,
        start_time=info.start_time,
        end_time=end_time,
        lifecycle_stage=info.lifecycle_stage,
        artifact_uri=info.artifact_uri,
        run_name=name,
    )
    data = RunData(
        metrics=list(metrics.values()),
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    return Run(new_info, data, run.inputs, getattr(run, "outputs", None))


def waiting_run_data(ops: list[J.Op]) -> tuple[dict, dict, dict]:
    """(metrics, params, tags) of a run from its undelivered ops (points, params, tags, its create's tags)."""
    metrics: dict = {}
    params: dict = {}
    tags: dict = {}
    for op in ops:
        if op.kind in POINT_KINDS:
            for metric in points_of(op):
                keep_latest(metrics, metric)
        elif op.kind == J.PARAM:
            params[op.key] = op.value
        elif op.kind == J.TAG:
            tags[op.key] = op.value
        else:
            tags.update(op.json().get("tags") or {})
    return metrics, params, tags


def journal_run(record: J.RunRecord, metrics: dict, params: dict, tags: dict) -> Run:
    """A run created here as the journal knows it: its record with these latest metrics, params and tags."""
    tags = dict(tags)
    tags.setdefault(MLFLOW_RUN_NAME, record.name or "")
    info = RunInfo(
        run_id=record.local_id,
        experiment_id=record.experiment_id,
        user_id=record.user_id or "",
        status=record.status,
        start_time=record.start_time,
        end_time=record.end_time,
        lifecycle_stage=LifecycleStage.ACTIVE,
        artifact_uri=artifact_uri_for(record.local_id),
        run_name=record.name,
    )
    data = RunData(
        metrics=list(metrics.values()),
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    return Run(info, data)


#: What MLflow's SQL store keeps for ±inf (it cannot store infinities): the largest finite double.
STORED_INF = 1.7976931348623157e308


class Waiting:
    """What the journal held undelivered before a server read, to be joined with what it holds after.

    A write delivered while the server's answer was on its way back is in neither that answer nor the journal
    afterwards, so the overlay keeps it from before (applied again, it sets what it set). The journal's
    `settled` counter says whether any row left the undelivered set meanwhile; when none did, the rows read
    before are still the ones waiting and the journal is not read twice.
    """

    def __init__(self, journal: J.Journal, settled: int, items) -> None:
        self.journal, self.settled, self.items = journal, settled, items

    @classmethod
    def read(cls, conn, read) -> Waiting:
        return cls(conn.journal, conn.journal.queue.settled(), read())

    def now(self, read):
        """The rows (a list of ops, oldest first) or runs (a set) to overlay after the server has answered."""
        if self.journal.queue.settled() == self.settled:
            return self.items
        later = read()
        if isinstance(self.items, set):
            return self.items | later
        return sorted({op.id: op for op in (*self.items, *later)}.values(), key=lambda op: op.id)


def points_of(op: J.Op) -> list[Metric]:
    """The metric points of an op of `POINT_KINDS`: a metric row's one, or those naming a model."""
    if op.kind == J.METRIC:
        assert op.ts is not None  # a metric row always has its timestamp (journal/intake.py)
        return [Metric(op.named(), J.decode_value(op.value), op.ts, op.step or 0)]
    return [Metric(*point) for point in models.model_metric_points(op)]


def as_stored(metric: Metric) -> Metric:
    """`metric` as the server will hold it (±inf become ±the largest double), so local views agree with it."""
    if math.isinf(metric.value):
        return Metric(metric.key, math.copysign(STORED_INF, metric.value), metric.timestamp, metric.step)
    return metric


def keep_latest(metrics: dict, metric: Metric) -> None:
    """MLflow's "latest" metric: the greatest (step, timestamp, value), NaN compared as the 0 it is stored as."""
    metric = as_stored(metric)
    seen = metrics.get(metric.key)
    if seen is None or _recency(metric) > _recency(seen):
        metrics[metric.key] = metric


def distinct_points(points: list[Metric]) -> list[Metric]:
    """`points` without repeats of a (step, timestamp, value) — NaN equal to NaN — first ones kept."""
    seen, kept = set(), []
    for m in points:
        key = (m.step, m.timestamp, "nan" if math.isnan(m.value) else m.value)
        if key not in seen:
            seen.add(key)
            kept.append(m)
    return kept


def _recency(metric: Metric) -> tuple:
    return metric.step, metric.timestamp, 0.0 if math.isnan(metric.value) else metric.value
