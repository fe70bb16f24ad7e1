"""MLflow's tracking store for `bridge+http(s)://` URIs: writes go to the journal, reads go to the server.

Writes return as soon as the journal has committed them. Runs and experiments created here get local ids
that stay valid for the whole process (and in the journal); the sender maps them to the server's ids.
Reads ask the server when it answers and translate its ids back to local ones; offline they answer from
the journal what it knows (local runs with their params, tags and latest metrics; local experiments).
Online reads show what the server holds, i.e. what has been delivered so far.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import requests

from mlflow.entities import (
    Experiment, ExperimentTag, LifecycleStage, Metric, Param, Run, RunData, RunInfo, RunStatus, RunTag, ViewType,
)
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE, RESOURCE_ALREADY_EXISTS, TEMPORARILY_UNAVAILABLE,
)
from mlflow.protos.service_pb2 import LogInputs
from mlflow.store.entities.paged_list import PagedList
from mlflow.store.tracking import SEARCH_MAX_RESULTS_DEFAULT
from mlflow.store.tracking.abstract_store import AbstractStore
from mlflow.store.tracking.rest_store import RestStore
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_USER
from mlflow.utils.proto_json_utils import message_to_json, parse_dict
from mlflow.utils.rest_utils import MlflowHostCreds

from bridge.client import journal as J
from bridge.client.sender import HttpFailure, TransportFailure

log = logging.getLogger(__name__)

ARTIFACT_SCHEME = "bridge-artifacts"
READ_TIMEOUT = (3.0, 30.0)


def artifact_uri_for(run_id: str) -> str:
    """The artifact URI MLflow sees for a run: it routes log_artifact & co. to JournalArtifactRepository."""
    return f"{ARTIFACT_SCHEME}://{run_id}"


class _Offline(Exception):
    """The server did not answer a read; answer from the journal instead."""


class _ServerReads(RestStore):
    """MLflow's RestStore, but one try per call, the sender's URL and token, and errors bridge understands."""

    def __init__(self, connection) -> None:
        self._connection = connection
        self._sessions = threading.local()  # requests' sessions are not thread-safe; the sender has its own
        super().__init__(lambda: MlflowHostCreds(host=connection.sender.url, token=connection.sender.token))

    def session(self) -> requests.Session:
        """This thread's session (reads come from the training thread, DataLoader workers, callbacks …)."""
        session = getattr(self._sessions, "session", None)
        if session is None:
            session = self._sessions.session = requests.Session()
        return session

    def _call_endpoint(self, api, json_body=None, endpoint=None, retry_timeout_seconds=None, response_proto=None):
        method_to_info = self._V3_METHOD_TO_INFO if api in self._V3_APIS else self._METHOD_TO_INFO
        default_endpoint, method = method_to_info[api]
        endpoint = endpoint or default_endpoint
        body = json.loads(json_body) if json_body else None
        sender = self._connection.sender
        session = self.session()
        try:
            if method == "GET":
                resp = sender.request("GET", endpoint, params=body, timeout=READ_TIMEOUT, session=session)
            else:
                resp = sender.request(method, endpoint, json_body=body, timeout=READ_TIMEOUT, session=session)
        except TransportFailure as exc:
            raise _Offline(str(exc)) from None
        except HttpFailure as exc:
            if exc.error_code is None and exc.status not in (401, 403):
                raise _Offline(str(exc)) from None
            code = exc.error_code or "PERMISSION_DENIED"
            if exc.status in (401, 403):
                message = f"the bridge server rejected the access token (HTTP {exc.status})"
            else:
                message = exc.message
            raise MlflowException(message, error_code=_error_code(code)) from None
        response_proto = response_proto or api.Response()
        parse_dict(js_dict=resp.json() if resp.content else {}, message=response_proto)
        return response_proto


def _error_code(name: str) -> int:
    from mlflow.protos import databricks_pb2

    return getattr(databricks_pb2, name, databricks_pb2.INTERNAL_ERROR)


class JournalStore(AbstractStore):
    """The `bridge+http(s)` tracking store (registered through the `mlflow.tracking_store` entry point)."""

    def __init__(self, store_uri: str | None = None, artifact_uri: str | None = None) -> None:
        super().__init__()
        self.store_uri = store_uri

    # ------------------------------------------------------------------------------- plumbing

    @property
    def connection(self):
        from bridge.client.connect import connection_for

        return connection_for(self.store_uri)

    @staticmethod
    def _server(conn) -> _ServerReads:
        reads = getattr(conn, "_server_reads", None)
        if reads is None:
            reads = conn._server_reads = _ServerReads(conn)
        return reads

    def _online(self, conn) -> bool:
        # Known down: do not make the training thread wait for a timeout; the sender notices recovery.
        return conn.sender.online is not False

    # ------------------------------------------------------------------------ id translation

    def _remote_experiment(self, conn, experiment_id: str) -> str | None:
        record = conn.journal.experiment(experiment_id)
        return experiment_id if record is None else record.remote_id

    def _local_experiment(self, conn, remote_id: str) -> str:
        record = conn.journal.experiment_for_remote(remote_id)
        return remote_id if record is None else record.local_id

    def _local_run(self, conn, run: Run) -> Run:
        """The server's run, relabelled with local ids and the journal's artifact scheme."""
        info = run.info
        record = conn.journal.run_for_remote(info.run_id)
        run_id = record.local_id if record is not None else info.run_id
        new_info = RunInfo(run_id=run_id, experiment_id=self._local_experiment(conn, info.experiment_id),
                           user_id=info.user_id, status=info.status, start_time=info.start_time,
                           end_time=info.end_time, lifecycle_stage=info.lifecycle_stage,
                           artifact_uri=artifact_uri_for(run_id), run_name=info.run_name)
        return Run(new_info, run.data, run.inputs, getattr(run, "outputs", None))

    def _local_experiment_entity(self, conn, experiment: Experiment) -> Experiment:
        local = self._local_experiment(conn, experiment.experiment_id)
        if local == experiment.experiment_id:
            return experiment
        return Experiment(local, experiment.name, experiment.artifact_location, experiment.lifecycle_stage,
                          [ExperimentTag(k, v) for k, v in experiment.tags.items()],
                          experiment.creation_time, experiment.last_update_time)

    # ------------------------------------------------------------------------------ experiments

    def create_experiment(self, name, artifact_location=None, tags=None):
        conn = self.connection
        if not name:
            raise MlflowException("experiment name must not be empty", INVALID_PARAMETER_VALUE)
        if conn.journal.experiment_by_name(name) is not None:
            raise MlflowException(f"Experiment '{name}' already exists.", RESOURCE_ALREADY_EXISTS)
        return conn.journal.add_experiment(name, {t.key: t.value for t in tags or []})

    def get_experiment(self, experiment_id):
        conn = self.connection
        experiment_id = str(experiment_id)
        record = conn.journal.experiment(experiment_id)
        remote = experiment_id if record is None else record.remote_id
        if remote is not None and self._online(conn):
            try:
                return self._local_experiment_entity(conn, self._server(conn).get_experiment(remote))
            except _Offline:
                pass
        if record is not None:
            return self._offline_experiment(record)
        raise MlflowException(f"Experiment {experiment_id} is not known locally and the server "
                              f"({conn.sender.url}) does not answer", TEMPORARILY_UNAVAILABLE)

    @staticmethod
    def _offline_experiment(record: J.ExperimentRecord) -> Experiment:
        return Experiment(record.local_id, record.name, f"{ARTIFACT_SCHEME}://experiment-{record.local_id}",
                          LifecycleStage.ACTIVE, [])

    def get_experiment_by_name(self, experiment_name):
        conn = self.connection
        record = conn.journal.experiment_by_name(experiment_name)
        if record is not None:
            return self.get_experiment(record.local_id)
        if self._online(conn):
            try:
                found = self._server(conn).get_experiment_by_name(experiment_name)
            except _Offline:
                return None
            return None if found is None else self._local_experiment_entity(conn, found)
        return None

    def search_experiments(self, view_type=ViewType.ACTIVE_ONLY, max_results=SEARCH_MAX_RESULTS_DEFAULT,
                           filter_string=None, order_by=None, page_token=None):
        conn = self.connection
        if self._online(conn):
            try:
                page = self._server(conn).search_experiments(view_type, max_results, filter_string, order_by,
                                                             page_token)
                return PagedList([self._local_experiment_entity(conn, e) for e in page], page.token)
            except _Offline:
                pass
        with conn.journal.db(write=False) as db:
            rows = db.execute("select local_id, name, remote_id from experiments order by created").fetchall()
        return PagedList([self._offline_experiment(J.ExperimentRecord(*row)) for row in rows], None)

    def set_experiment_tag(self, experiment_id, tag):
        self.connection.journal.append("", J.SET_EXPERIMENT_TAG, {"experiment_id": str(experiment_id),
                                                                   "value": tag.value}, key=tag.key)

    def _online_only(self, what: str):
        conn = self.connection
        if not self._online(conn):
            raise MlflowException(f"{what} needs the server, and {conn.sender.url} does not answer right now",
                                  TEMPORARILY_UNAVAILABLE)
        return conn, self._server(conn)

    def _call_online(self, what: str, fn):
        conn, server = self._online_only(what)
        try:
            return fn(conn, server)
        except _Offline:
            raise MlflowException(f"{what} needs the server, and {conn.sender.url} does not answer right now",
                                  TEMPORARILY_UNAVAILABLE) from None

    def delete_experiment(self, experiment_id):
        self._call_online("delete_experiment", lambda c, s: s.delete_experiment(
            self._require(self._remote_experiment(c, str(experiment_id)), experiment_id)))

    def restore_experiment(self, experiment_id):
        self._call_online("restore_experiment", lambda c, s: s.restore_experiment(
            self._require(self._remote_experiment(c, str(experiment_id)), experiment_id)))

    def rename_experiment(self, experiment_id, new_name):
        self._call_online("rename_experiment", lambda c, s: s.rename_experiment(
            self._require(self._remote_experiment(c, str(experiment_id)), experiment_id), new_name))

    @staticmethod
    def _require(remote_id, local_id):
        if remote_id is None:
            raise MlflowException(f"{local_id} has not reached the server yet", TEMPORARILY_UNAVAILABLE)
        return remote_id

    # ------------------------------------------------------------------------------------- runs

    def create_run(self, experiment_id, user_id, start_time, tags, run_name):
        from mlflow.utils.name_utils import _generate_random_name

        conn = self.connection
        tag_map = {t.key: t.value for t in tags or []}
        # The server would invent a name; invent it here so the offline view and the server agree.
        run_name = run_name or tag_map.get(MLFLOW_RUN_NAME) or _generate_random_name()
        tag_map[MLFLOW_RUN_NAME] = run_name
        start_time = int(start_time if start_time is not None else time.time() * 1000)
        local_id = conn.journal.add_run(experiment_id=str(experiment_id), user_id=user_id, start_time=start_time,
                                        name=run_name, tags=tag_map)
        conn.summary(local_id).tags.update(tag_map)
        conn.sender.watch_run(local_id)
        return self._offline_run(conn, conn.journal.run(local_id))

    def update_run_info(self, run_id, run_status, end_time, run_name):
        conn = self.connection
        status = RunStatus.to_string(run_status) if isinstance(run_status, int) else run_status
        conn.journal.update_run(run_id, status=status, end_time=end_time, name=run_name)
        if run_name:
            conn.summary(run_id).tags[MLFLOW_RUN_NAME] = run_name
        if status and RunStatus.is_terminated(RunStatus.from_string(status)):
            conn.sender.unwatch_run(run_id)
        record = conn.journal.run(run_id)
        if record is not None:
            return self._offline_run(conn, record).info
        return RunInfo(run_id=run_id, experiment_id="", user_id="", status=status, start_time=0,
                       end_time=end_time, lifecycle_stage=LifecycleStage.ACTIVE,
                       artifact_uri=artifact_uri_for(run_id), run_name=run_name)

    def get_run(self, run_id):
        conn = self.connection
        record = conn.journal.run(run_id)
        remote = run_id if record is None else record.remote_id
        if remote is not None and self._online(conn):
            try:
                return self._local_run(conn, self._server(conn).get_run(remote))
            except _Offline:
                pass
        if record is not None:
            return self._offline_run(conn, record)
        raise MlflowException(f"Run {run_id} is not known locally and the server ({conn.sender.url}) "
                              "does not answer", TEMPORARILY_UNAVAILABLE)

    def _offline_run(self, conn, record: J.RunRecord) -> Run:
        """The run as the journal knows it: this process's view plus anything still undelivered."""
        summary = conn.summaries.get(record.local_id)
        metrics = dict(summary.metrics) if summary else {}
        params = dict(summary.params) if summary else {}
        tags = dict(summary.tags) if summary else {}
        if summary is None:  # a run from an earlier process: what it left undelivered
            for op in conn.journal.undelivered(record.local_id, (J.METRIC, J.PARAM, J.TAG, J.CREATE_RUN)):
                if op.kind == J.METRIC:
                    _keep_latest(metrics, Metric(op.key, J.decode_value(op.value), op.ts, op.step or 0))
                elif op.kind == J.PARAM:
                    params[op.key] = op.value
                elif op.kind == J.TAG:
                    tags[op.key] = op.value
                else:
                    tags.update(op.json().get("tags") or {})
        tags.setdefault(MLFLOW_RUN_NAME, record.name or "")
        if record.user_id:
            tags.setdefault(MLFLOW_USER, record.user_id)
        info = RunInfo(run_id=record.local_id, experiment_id=record.experiment_id, user_id=record.user_id or "",
                       status=record.status, start_time=record.start_time, end_time=record.end_time,
                       lifecycle_stage=LifecycleStage.ACTIVE, artifact_uri=artifact_uri_for(record.local_id),
                       run_name=record.name)
        data = RunData(metrics=list(metrics.values()), params=[Param(k, v) for k, v in params.items()],
                       tags=[RunTag(k, v) for k, v in tags.items()])
        return Run(info, data)

    def delete_run(self, run_id):
        self._call_online("delete_run", lambda c, s: s.delete_run(self._require(self._remote_run(c, run_id), run_id)))

    def restore_run(self, run_id):
        self._call_online("restore_run",
                          lambda c, s: s.restore_run(self._require(self._remote_run(c, run_id), run_id)))

    def _remote_run(self, conn, run_id: str) -> str | None:
        record = conn.journal.run(run_id)
        return run_id if record is None else record.remote_id

    def get_metric_history(self, run_id, metric_key, max_results=None, page_token=None):
        conn = self.connection
        remote = self._remote_run(conn, run_id)
        if remote is not None and self._online(conn):
            try:
                return self._server(conn).get_metric_history(remote, metric_key, max_results, page_token)
            except _Offline:
                pass
        points = [Metric(op.key, J.decode_value(op.value), op.ts, op.step or 0)
                  for op in conn.journal.undelivered(run_id, (J.METRIC,)) if op.key == metric_key]
        return PagedList(points[:max_results] if max_results else points, None)

    def _search_runs(self, experiment_ids, filter_string, run_view_type, max_results, order_by, page_token):
        conn = self.connection
        if self._online(conn):
            remote_ids = [r for r in (self._remote_experiment(conn, str(e)) for e in experiment_ids) if r]
            try:
                if remote_ids:
                    page = self._server(conn).search_runs(remote_ids, filter_string, run_view_type, max_results,
                                                          order_by, page_token)
                    return [self._local_run(conn, run) for run in page], page.token
                if not any(conn.journal.experiment(str(e)) for e in experiment_ids):
                    return [], None
            except _Offline:
                pass
        wanted = {str(e) for e in experiment_ids}
        runs = [self._offline_run(conn, r) for r in conn.journal.runs() if r.experiment_id in wanted]
        return runs[:max_results], None

    # ------------------------------------------------------------------------------ run writes

    def log_metric(self, run_id, metric):
        conn = self.connection
        conn.journal.append_batch(run_id, [(metric.key, metric.value, metric.timestamp, metric.step)])
        summary = conn.summaries.get(run_id) or conn.summary(run_id)
        _keep_latest(summary.metrics, metric)

    def log_param(self, run_id, param):
        self.log_batch(run_id, [], [param], [])

    def set_tag(self, run_id, tag):
        self.log_batch(run_id, [], [], [tag])

    def log_batch(self, run_id, metrics, params, tags):
        conn = self.connection
        conn.journal.append_batch(run_id, [(m.key, m.value, m.timestamp, m.step) for m in metrics],
                                  [(p.key, str(p.value)) for p in params], [(t.key, str(t.value)) for t in tags])
        summary = conn.summary(run_id)
        for metric in metrics:
            _keep_latest(summary.metrics, metric)
        summary.params.update((p.key, str(p.value)) for p in params)
        summary.tags.update((t.key, str(t.value)) for t in tags)

    def log_batch_async(self, run_id, metrics, params, tags):
        # Journaling is as fast as queueing; MLflow's own async queue would only add a second buffer.
        from mlflow.utils.async_logging.run_operations import RunOperations

        self.log_batch(run_id, metrics, params, tags)
        return RunOperations(operation_futures=[])

    def log_metric_async(self, run_id, metric):
        return self.log_batch_async(run_id, [metric], [], [])

    def log_param_async(self, run_id, param):
        return self.log_batch_async(run_id, [], [param], [])

    def set_tag_async(self, run_id, tag):
        return self.log_batch_async(run_id, [], [], [tag])

    def delete_tag(self, run_id, key):
        conn = self.connection
        conn.journal.append(run_id, J.DELETE_TAG, {}, key=key)
        conn.summary(run_id).tags.pop(key, None)

    def log_inputs(self, run_id, datasets=None, models=None):
        body = json.loads(message_to_json(LogInputs(
            run_id=run_id, datasets=[d.to_proto() for d in datasets or []],
            models=[m.to_proto() for m in models or []])))
        self.connection.journal.append(run_id, J.LOG_INPUTS, body)

    def search_logged_models(self, experiment_ids, filter_string=None, datasets=None, max_results=None,
                             order_by=None, page_token=None):
        # Logged models are not journaled; MLflow asks for them when listing a run's artifacts, so an
        # unreachable server simply means "none".
        conn = self.connection
        remote_ids = [r for r in (self._remote_experiment(conn, str(e)) for e in experiment_ids) if r]
        if remote_ids and self._online(conn):
            try:
                return self._server(conn).search_logged_models(remote_ids, filter_string, datasets, max_results,
                                                               order_by, page_token)
            except _Offline:
                pass
        return PagedList([], None)

    def link_traces_to_run(self, trace_ids, run_id):
        self._call_online("link_traces_to_run", lambda c, s: s.link_traces_to_run(
            trace_ids, self._require(self._remote_run(c, run_id), run_id)))

    def __repr__(self) -> str:
        return f"JournalStore({self.store_uri!r})"


def _keep_latest(metrics: dict, metric: Metric) -> None:
    """MLflow's "latest" metric: highest step, then latest timestamp."""
    seen = metrics.get(metric.key)
    if seen is None or (metric.step, metric.timestamp) >= (seen.step, seen.timestamp):
        metrics[metric.key] = metric


__all__ = ["JournalStore", "ARTIFACT_SCHEME", "artifact_uri_for"]
