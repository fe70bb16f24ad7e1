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

from mlflow.entities import (
    Experiment,
    ExperimentTag,
    LifecycleStage,
    Metric,
    Param,
    Run,
    RunData,
    RunInfo,
    RunStatus,
    ViewType,
)
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    BAD_REQUEST,
    INVALID_PARAMETER_VALUE,
    RESOURCE_ALREADY_EXISTS,
    TEMPORARILY_UNAVAILABLE,
)
from mlflow.protos.service_pb2 import LogInputs
from mlflow.store.entities.paged_list import PagedList
from mlflow.store.tracking import SEARCH_MAX_RESULTS_DEFAULT
from mlflow.store.tracking.abstract_store import AbstractStore
from mlflow.store.tracking.rest_store import RestStore
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
from mlflow.utils.proto_json_utils import message_to_json
from mlflow.utils.rest_utils import MlflowHostCreds
from mlflow.utils.search_utils import SearchUtils
from mlflow.utils.validation import (  # private: see bridge/mlflow_internals.py
    _validate_batch_log_data,
    _validate_metric,
    _validate_param_keys_unique,
)

from bridge import config
from bridge.client import journal as J
from bridge.client.connect import connection_for
from bridge.client.journal.kinds import ARTIFACT_SCHEME, MODEL_METRICS, RUN_ID_TAGS, artifact_uri_for
from bridge.client.link import Link
from bridge.client.plugins import models
from bridge.client.plugins import server_reads as rest
from bridge.client.plugins.models import LoggedModelStoreMixin
from bridge.client.plugins.read_model import (
    EXPERIMENT_OVERLAY_KINDS,
    OVERLAY_KINDS,
    POINT_KINDS,
    Waiting,
    as_stored,
    distinct_points,
    journal_run,
    keep_latest,
    points_of,
    run_with_waiting,
    waiting_run_data,
)
from bridge.errors import ExperimentExistsError

log = logging.getLogger(__name__)

_Offline = rest.Offline

#: Per thread, the experiment name the last `get_experiment_by_name` found nowhere: MLflow's `set_experiment`
#: creates it next, and another process may have created it in between (see `create_experiment`).
_missed = threading.local()


class _ServerReads(RestStore):
    """MLflow's RestStore, but one try per call, through the connection's `Link`, with errors MLflow understands.

    Relies on MLflow internals (listed in bridge/mlflow_internals.py): `RestStore._call_endpoint`, `_METHOD_TO_INFO`,
    `_V3_METHOD_TO_INFO` and `_V3_APIS` — the one place each REST API's endpoint and method are known.
    """

    def __init__(self, link: Link) -> None:
        self._link = link
        super().__init__(lambda: MlflowHostCreds(host=link.url, token=link.token))

    def _call_endpoint(self, api, json_body=None, endpoint=None, retry_timeout_seconds=None, response_proto=None):
        method_to_info = self._V3_METHOD_TO_INFO if api in self._V3_APIS else self._METHOD_TO_INFO
        default_endpoint, method = method_to_info[api]
        return rest.call_endpoint(
            self._link, endpoint or default_endpoint, method, json_body, response_proto or api.Response()
        )


class JournalStore(LoggedModelStoreMixin, AbstractStore):
    """The `bridge+http(s)` tracking store (registered through the `mlflow.tracking_store` entry point)."""

    def __init__(self, store_uri: str | None = None, artifact_uri: str | None = None) -> None:
        super().__init__()
        self.store_uri = store_uri

    # ------------------------------------------------------------------------------- plumbing

    @property
    def connection(self):
        # MLflow always builds a store with its URI; one built by hand without it (None) gets the only open
        # connection, or fails as it always has
        return connection_for(self.store_uri)  # type: ignore[arg-type]

    @staticmethod
    def _server(conn) -> _ServerReads:
        reads = getattr(conn, "_server_reads", None)
        if reads is None:
            reads = conn._server_reads = _ServerReads(conn.link)
        return reads

    def _online(self, conn) -> bool:
        # Known down: do not make the training thread wait for a timeout; the sender notices recovery.
        return conn.link.answers

    # ------------------------------------------------------------------------ id translation

    def _local_run(self, conn, run: Run) -> Run:
        """The server's run, relabelled with local ids and the journal's artifact scheme."""
        info = run.info
        run_id = conn.journal.ids.local_run_id(info.run_id)
        data = run.data
        key = data.tags.get(config.RUN_KEY_TAG)
        if run_id == info.run_id and key and key != run_id and conn.journal.ids.run(key) is not None:
            # Created on the server by this journal, the answer not back yet (lost, or slow): the same run, not
            # a second one beside the journal's (harness H10's read).
            run_id = key
        if any(key in data.tags for key in RUN_ID_TAGS):  # a nested run's parent, by the id this process knows
            proto = data.to_proto()
            for tag in proto.tags:
                if tag.key in RUN_ID_TAGS:
                    tag.value = conn.journal.ids.local_run_id(tag.value)
            data = RunData.from_proto(proto)
        new_info = RunInfo(
            run_id=run_id,
            experiment_id=conn.journal.ids.local_experiment_id(info.experiment_id),
            user_id=info.user_id,
            status=info.status,
            start_time=info.start_time,
            end_time=info.end_time,
            lifecycle_stage=info.lifecycle_stage,
            artifact_uri=artifact_uri_for(run_id),
            run_name=info.run_name,
        )
        return Run(new_info, data, run.inputs, getattr(run, "outputs", None))

    def _local_experiment_entity(self, conn, experiment: Experiment) -> Experiment:
        local = conn.journal.ids.local_experiment_id(experiment.experiment_id)
        if local == experiment.experiment_id:
            return experiment
        return Experiment(
            local,
            experiment.name,
            experiment.artifact_location,
            experiment.lifecycle_stage,
            [ExperimentTag(k, v) for k, v in experiment.tags.items()],
            experiment.creation_time,
            experiment.last_update_time,
        )

    # ------------------------------------------------------------------------------ experiments

    def create_experiment(self, name, artifact_location=None, tags=None):
        conn = self.connection
        if not name:
            raise MlflowException("experiment name must not be empty", INVALID_PARAMETER_VALUE)
        # MLflow's set_experiment looks the name up and creates it when missing. Another process (two
        # `connect(experiment=…)` at once) may create it in between: that create joins its experiment instead of
        # raising, because set_experiment answers RESOURCE_ALREADY_EXISTS by returning the experiment without
        # making it the active one, and the runs that follow would land in the Default experiment.
        raced = getattr(_missed, "name", None) == name
        _missed.name = None
        record = conn.journal.ids.experiment_by_name(name)
        if record is not None:
            if raced:
                return record.local_id
            raise MlflowException(f"Experiment '{name}' already exists.", RESOURCE_ALREADY_EXISTS)
        if self._online(conn) and not raced:
            # As MLflow would: a name the server already has is refused now. Offline this cannot be known;
            # the journaled create then joins the server's experiment of that name (docs/journal.md).
            try:
                found = self._server(conn).get_experiment_by_name(name)
            except _Offline:
                found = None
            if found is not None:
                raise MlflowException(
                    f"Experiment(name={name}) already exists. Error: the server has it as "
                    f"experiment {found.experiment_id}",
                    RESOURCE_ALREADY_EXISTS,
                )
        try:
            return conn.journal.add_experiment(name, {t.key: t.value for t in tags or []}, artifact_location)
        except ExperimentExistsError as exc:  # another process on this journal added it since the look above
            if raced:
                return exc.local_id
            raise MlflowException(f"Experiment '{name}' already exists.", RESOURCE_ALREADY_EXISTS) from None

    def get_experiment(self, experiment_id):
        conn = self.connection
        experiment_id = str(experiment_id)
        record = conn.journal.ids.experiment(experiment_id)
        remote = conn.journal.ids.server_experiment_id(experiment_id)
        waiting = Waiting.read(conn, lambda: self._experiment_writes_waiting(conn, experiment_id))  # _server_run
        if remote is not None and self._online(conn):
            try:
                return self._experiment_with_undelivered(
                    conn, self._local_experiment_entity(conn, self._server(conn).get_experiment(remote)), waiting
                )
            except _Offline:
                pass
        if record is not None:
            return self._experiment_with_undelivered(conn, self._offline_experiment(record), waiting)
        raise MlflowException(
            f"Experiment {experiment_id} is not known locally and the server ({conn.link.url}) does not answer",
            TEMPORARILY_UNAVAILABLE,
        )

    @staticmethod
    def _experiment_writes_waiting(conn, experiment_id: str) -> list[J.Op]:
        """The experiment's creation and tag writes not delivered yet, oldest first, whichever of its ids
        (local or the server's) they were written under."""
        journal = conn.journal
        wanted = {experiment_id, journal.ids.server_experiment_id(experiment_id)} - {None}
        ops = []
        for op in journal.queue.undelivered("", EXPERIMENT_OVERLAY_KINDS):
            written = op.key if op.kind == J.CREATE_EXPERIMENT else str(op.json().get("experiment_id"))
            if written in wanted or journal.ids.server_experiment_id(written) in wanted:
                ops.append(op)
        return ops

    def _experiment_with_undelivered(self, conn, experiment: Experiment, earlier: Waiting | None) -> Experiment:
        """The experiment with its tag writes still on their way (read-your-writes, as for runs)."""

        def read() -> list[J.Op]:
            return self._experiment_writes_waiting(conn, experiment.experiment_id)

        ops = earlier.now(read) if earlier is not None else read()
        if not ops:
            return experiment
        tags = dict(experiment.tags)
        for op in ops:
            if op.kind == J.CREATE_EXPERIMENT:
                tags.update(op.json().get("tags") or {})
            elif op.kind == J.SET_EXPERIMENT_TAG:
                tags[op.named()] = op.json()["value"]
            else:
                tags.pop(op.named(), None)
        return Experiment(
            experiment.experiment_id,
            experiment.name,
            experiment.artifact_location,
            experiment.lifecycle_stage,
            [ExperimentTag(k, v) for k, v in tags.items()],
            experiment.creation_time,
            experiment.last_update_time,
        )

    @staticmethod
    def _offline_experiment(record: J.ExperimentRecord) -> Experiment:
        return Experiment(
            record.local_id, record.name, f"{ARTIFACT_SCHEME}://experiment-{record.local_id}", LifecycleStage.ACTIVE, []
        )

    def get_experiment_by_name(self, experiment_name):
        found = self._experiment_by_name(experiment_name)
        _missed.name = experiment_name if found is None else None
        return found

    def _experiment_by_name(self, experiment_name):
        conn = self.connection
        record = conn.journal.ids.experiment_by_name(experiment_name)
        if record is not None:
            return self.get_experiment(record.local_id)
        if self._online(conn):
            try:
                found = self._server(conn).get_experiment_by_name(experiment_name)
            except _Offline:
                return None
            if found is None:
                return None
            found = self._local_experiment_entity(conn, found)
            return self._experiment_with_undelivered(conn, found, None)
        return None

    def search_experiments(
        self,
        view_type=ViewType.ACTIVE_ONLY,
        max_results=SEARCH_MAX_RESULTS_DEFAULT,
        filter_string=None,
        order_by=None,
        page_token=None,
    ):
        conn = self.connection
        if self._online(conn):
            try:
                page = self._server(conn).search_experiments(
                    view_type, max_results, filter_string, order_by, page_token
                )
                return PagedList([self._local_experiment_entity(conn, e) for e in page], page.token)
            except _Offline:
                pass
        return PagedList([self._offline_experiment(record) for record in conn.journal.ids.experiments()], None)

    def set_experiment_tag(self, experiment_id, tag):
        self.connection.journal.append(
            "", J.SET_EXPERIMENT_TAG, {"experiment_id": str(experiment_id), "value": tag.value}, key=tag.key
        )

    def delete_experiment_tag(self, experiment_id, key):
        self.connection.journal.append("", J.DELETE_EXPERIMENT_TAG, {"experiment_id": str(experiment_id)}, key=key)

    def _online_only(self, what: str):
        conn = self.connection
        if not self._online(conn):
            raise MlflowException(
                f"{what} needs the server, and {conn.link.url} does not answer right now", TEMPORARILY_UNAVAILABLE
            )
        return conn, self._server(conn)

    def _call_online(self, what: str, fn):
        conn, server = self._online_only(what)
        try:
            return fn(conn, server)
        except _Offline:
            raise MlflowException(
                f"{what} needs the server, and {conn.link.url} does not answer right now", TEMPORARILY_UNAVAILABLE
            ) from None

    def delete_experiment(self, experiment_id):
        self._call_online(
            "delete_experiment",
            lambda c, s: s.delete_experiment(
                self._require(c.journal.ids.server_experiment_id(str(experiment_id)), experiment_id)
            ),
        )

    def restore_experiment(self, experiment_id):
        self._call_online(
            "restore_experiment",
            lambda c, s: s.restore_experiment(
                self._require(c.journal.ids.server_experiment_id(str(experiment_id)), experiment_id)
            ),
        )

    def rename_experiment(self, experiment_id, new_name):
        self._call_online(
            "rename_experiment",
            lambda c, s: s.rename_experiment(
                self._require(c.journal.ids.server_experiment_id(str(experiment_id)), experiment_id), new_name
            ),
        )

    @staticmethod
    def _require(remote_id, local_id):
        if remote_id is None:
            raise MlflowException(f"{local_id} has not reached the server yet", TEMPORARILY_UNAVAILABLE)
        return remote_id

    # ------------------------------------------------------------------------------------- runs

    def create_run(self, experiment_id, user_id, start_time, tags, run_name):
        from mlflow.utils.name_utils import _generate_random_name  # private: see bridge/mlflow_internals.py

        conn = self.connection
        tag_map = {t.key: t.value for t in tags or []}
        # The server would invent a name; invent it here so the offline view and the server agree.
        run_name = run_name or tag_map.get(MLFLOW_RUN_NAME) or _generate_random_name()
        tag_map[MLFLOW_RUN_NAME] = run_name
        start_time = int(start_time if start_time is not None else time.time() * 1000)
        local_id = conn.journal.add_run(
            experiment_id=str(experiment_id), user_id=user_id, start_time=start_time, name=run_name, tags=tag_map
        )
        conn.summary(local_id).tags.update(tag_map)
        conn.sender.watch_run(local_id)
        return self._offline_run(conn, conn.journal.ids.run(local_id))

    def update_run_info(self, run_id, run_status, end_time, run_name):
        conn = self.connection
        status = RunStatus.to_string(run_status) if isinstance(run_status, int) else run_status
        conn.journal.update_run(run_id, status=status, end_time=end_time, name=run_name)
        if run_name:
            conn.summary(run_id).tags[MLFLOW_RUN_NAME] = run_name
        if status and RunStatus.is_terminated(RunStatus.from_string(status)):
            conn.sender.unwatch_run(run_id)
        elif status == "RUNNING":
            # Resumed (`start_run(run_id=…)`): it beats again, and a reaper's verdict from while it was
            # gone no longer stands. The tag may be absent: its delete is allowed to find nothing.
            conn.journal.append(run_id, J.DELETE_TAG, {"missing_ok": True}, key=config.KILLED_REASON_TAG)
            conn.sender.watch_run(run_id)
            self._learn_params(conn, run_id)
        record = conn.journal.ids.run(run_id)
        if record is not None:
            return self._offline_run(conn, record).info
        return RunInfo(
            run_id=run_id,
            experiment_id="",
            user_id="",
            status=status,
            start_time=0,
            end_time=end_time,
            lifecycle_stage=LifecycleStage.ACTIVE,
            artifact_uri=artifact_uri_for(run_id),
            run_name=run_name,
        )

    def _learn_params(self, conn, run_id: str) -> None:
        """Remember a resumed run's params, so changing one is refused at once, as MLflow would."""
        remote = conn.journal.ids.server_run(run_id)[0]
        if remote is None or not self._online(conn):
            return
        try:
            params = self._server(conn).get_run(remote).data.params
        except (_Offline, MlflowException):
            return
        for key, value in params.items():
            conn.summary(run_id).params.setdefault(key, value)

    def get_run(self, run_id):
        conn = self.connection
        record = conn.journal.ids.run(run_id)
        remote = conn.journal.ids.server_run(run_id)[0]
        if remote is not None and self._online(conn):
            try:
                return self._server_run(conn, run_id, remote)
            except _Offline:
                pass
        if remote is not None and (asker := models.asked_by_log_model()) is not None:
            # log_model asks for the run's metric names to copy the step's points to its new model; part of them
            # is on the server, which does not answer: the whole copy is made at delivery instead (models.py).
            # Answered without metrics, so log_model reads no history; its params are what the journal knows.
            models.journal_step_metrics_to_model(conn.journal, run_id, asker[0], asker[1])
            if record is not None:
                known = self._offline_run(conn, record)
                return Run(known.info, RunData(params=[Param(k, v) for k, v in known.data.params.items()]))
            return Run(
                RunInfo(
                    run_id=run_id,
                    experiment_id="",
                    user_id="",
                    status="RUNNING",
                    start_time=0,  # not known here; log_model reads only the metric names (MLflow refuses None)
                    end_time=None,
                    lifecycle_stage=LifecycleStage.ACTIVE,
                ),
                RunData(),
            )
        if record is not None:
            return self._offline_run(conn, record)
        raise MlflowException(
            f"Run {run_id} is not known locally and the server ({conn.link.url}) does not answer",
            TEMPORARILY_UNAVAILABLE,
        )

    def _server_run(self, conn, run_id: str, remote: str) -> Run:
        """The server's run `remote` (local `run_id`) with the writes still on their way to it."""
        # Read before the server is asked: a write delivered while the answer is on its way back is in neither
        # the answer nor the journal's waiting rows afterwards (a deleted tag showed; a second `log_table`
        # dropped the first from `mlflow.loggedArtifacts`: harness H16, H17). Applied again, it changes nothing.
        earlier = Waiting.read(conn, lambda: conn.journal.queue.undelivered(run_id, OVERLAY_KINDS))
        run = self._local_run(conn, self._server(conn).get_run(remote))
        # Asked for by another of its ids (the server's): the journal keeps its rows under the local one.
        return self._with_undelivered(conn, run, earlier if run.info.run_id == run_id else None)

    def _with_undelivered(self, conn, run: Run, earlier: Waiting | None = None) -> Run:
        """The server's run with what this journal has not delivered to it yet (read-your-writes); `earlier`:
        what was waiting before the server was asked."""
        if earlier is not None:
            ops = earlier.now(lambda: conn.journal.queue.undelivered(run.info.run_id, OVERLAY_KINDS))
        else:
            ops = conn.journal.queue.undelivered(run.info.run_id, OVERLAY_KINDS)
        return run_with_waiting(run, ops)

    def _offline_run(self, conn, record: J.RunRecord) -> Run:
        """The run as the journal knows it: this process's view plus anything still undelivered."""
        summary = conn.summaries.get(record.local_id)
        if summary is not None:
            return journal_run(record, summary.metrics, summary.params, summary.tags)
        # A run from an earlier process: what it left undelivered.
        return journal_run(
            record,
            *waiting_run_data(
                conn.journal.queue.undelivered(record.local_id, (*POINT_KINDS, J.PARAM, J.TAG, J.CREATE_RUN))
            ),
        )

    def delete_run(self, run_id):
        self._call_online(
            "delete_run", lambda c, s: s.delete_run(self._require(c.journal.ids.server_run(run_id)[0], run_id))
        )

    def restore_run(self, run_id):
        self._call_online(
            "restore_run", lambda c, s: s.restore_run(self._require(c.journal.ids.server_run(run_id)[0], run_id))
        )

    def get_metric_history(self, run_id, metric_key, max_results=None, page_token=None):
        conn = self.connection
        remote = conn.journal.ids.server_run(run_id)[0]
        waiting = [
            as_stored(m)
            for op in conn.journal.queue.undelivered(run_id, POINT_KINDS)
            for m in points_of(op)
            if m.key == metric_key
        ]
        # MLflow keeps one of identical points (same step, timestamp and value): so does this view.
        waiting = distinct_points(waiting)
        # Asked even when the link is known to be failing (only delivery may be refused): the alternative for a
        # history partly on the server is an error, not a faster answer.
        if remote is not None:
            try:
                page = self._server(conn).get_metric_history(remote, metric_key, max_results, page_token)
            except _Offline:
                pass
            else:
                if page.token or not waiting:
                    return page  # the points still waiting come after the server's last page
                points = distinct_points(list(page) + waiting)
                return PagedList(points[:max_results] if max_results else points, None)
        if remote is not None:
            asker = models.asked_by_log_model()
            if asker is not None:
                # log_model copying the step's points to its new model: the copy is made at delivery instead.
                models.journal_step_metrics_to_model(conn.journal, run_id, asker[0], asker[1], metric_key)
                return PagedList([], None)
            # Some of this history is on the server, which does not answer: a part would pass for the whole.
            raise MlflowException(
                f"get_metric_history({run_id!r}, {metric_key!r}): part of this history is on "
                f"the server ({conn.link.url}), which does not answer right now; "
                f"{len(waiting)} points are still waiting in the journal",
                TEMPORARILY_UNAVAILABLE,
            )
        return PagedList(waiting[:max_results] if max_results else waiting, None)

    def _search_runs(self, experiment_ids, filter_string, run_view_type, max_results, order_by, page_token):
        conn = self.connection
        if self._online(conn):
            remote_ids = [r for r in (conn.journal.ids.server_experiment_id(str(e)) for e in experiment_ids) if r]
            changing = (
                None
                if page_token
                else Waiting.read(  # before the search: see _server_run
                    conn, lambda: conn.journal.queue.runs_with_undelivered(OVERLAY_KINDS)
                )
            )
            # So are the runs not created on the server yet: one created during the search is in neither the
            # page nor, having a server id now, the journal's runs still to be created (harness H19).
            unsent = set() if page_token else {r.local_id for r in conn.journal.ids.runs() if not r.remote_id}
            try:
                runs, token = [], None
                if remote_ids:
                    page = self._server(conn).search_runs(
                        remote_ids, filter_string, run_view_type, max_results, order_by, page_token
                    )
                    runs = [self._with_undelivered(conn, self._local_run(conn, run)) for run in page]
                    token = page.token
                if page_token is None:
                    runs = self._with_changes_waiting(
                        conn,
                        runs,
                        changing,
                        unsent,
                        experiment_ids,
                        filter_string,
                        run_view_type,
                        max_results,
                        order_by,
                    )
                return runs, token
            except _Offline:
                pass
        # Offline: MLflow's own filter and sort over what the journal knows (docs/journal.md).
        return self._journal_runs(conn, experiment_ids, filter_string, order_by)[:max_results], None

    def _with_changes_waiting(
        self, conn, runs, changing, unsent, experiment_ids, filter_string, run_view_type, max_results, order_by
    ):
        """The server's page of runs corrected by what the journal has not delivered (read-your-writes).

        The server filtered what it holds: a run whose status, tags, params or metrics are still on their way
        may pass the filter only with them (a `set_terminated` then a search for FINISHED, harness H13) or no
        longer pass it. Such runs are read again, with their waiting writes, and filtered here; runs that have
        not reached the server at all are added from the journal. `changing` and `unsent`: the runs with writes
        waiting, and those not created on the server, before it was asked — one delivered since is in neither
        the page nor the journal.
        """
        wanted = {str(e) for e in experiment_ids}
        changing = changing.now(lambda: conn.journal.queue.runs_with_undelivered(OVERLAY_KINDS)) | unsent
        # One look at the journal's runs for both lists below: a create delivered while the stale runs are read
        # again would leave its run out of both (it was not on the server for the first, is for the second).
        records = conn.journal.ids.runs()
        stale = [r for r in records if r.experiment_id in wanted and r.remote_id and r.local_id in changing]
        if stale:
            ids = {r.local_id for r in stale}
            runs = [run for run in runs if run.info.run_id not in ids]
            reread = [self._server_run(conn, r.local_id, r.remote_id) for r in stale]
            runs += [
                run
                for run in SearchUtils.filter(reread, filter_string)
                if LifecycleStage.matches_view_type(run_view_type, run.info.lifecycle_stage)
            ]
        seen = {run.info.run_id for run in runs}
        waiting = [
            run
            for run in self._journal_runs(
                conn, experiment_ids, filter_string, order_by, records=records, only_undelivered=True
            )
            if run.info.run_id not in seen
        ]
        if stale or waiting:
            runs = SearchUtils.sort(runs + waiting, order_by)[:max_results]
        return runs

    def _journal_runs(
        self, conn, experiment_ids, filter_string, order_by, *, records=None, only_undelivered: bool = False
    ):
        wanted = {str(e) for e in experiment_ids}
        runs = [
            self._offline_run(conn, r)
            for r in (conn.journal.ids.runs() if records is None else records)
            if r.experiment_id in wanted and not (only_undelivered and r.remote_id)
        ]
        return SearchUtils.sort(SearchUtils.filter(runs, filter_string), order_by)

    # ------------------------------------------------------------------------------ run writes

    def log_metric(self, run_id, metric):
        if models.names_a_model(metric):
            # MLflow 3's fluent log_metric names the model logged at the point's step: journaled as log_batch does.
            # Refused, nothing is kept: MLflow's store writes a LogMetric's model point before its run point.
            return self._log_batch(run_id, [metric], [], [], refused_keeps_points=False)
        conn = self.connection
        if metric.key not in conn.valid_metric_keys or not isinstance(metric.value, (float, int)):
            _validate_metric(metric.key, metric.value, metric.timestamp, metric.step)  # what the server checks
            conn.valid_metric_keys.add(metric.key)
        conn.journal.append_batch(run_id, [(metric.key, metric.value, metric.timestamp, metric.step)])
        summary = conn.summaries.get(run_id) or conn.summary(run_id)
        keep_latest(summary.metrics, metric)

    def log_param(self, run_id, param):
        self.log_batch(run_id, [], [param], [])

    def set_tag(self, run_id, tag):
        self.log_batch(run_id, [], [], [tag])

    def log_batch(self, run_id, metrics, params, tags):
        self._log_batch(run_id, metrics, params, tags)

    def _log_batch(self, run_id, metrics, params, tags, *, refused_keeps_points: bool = True) -> None:
        conn = self.connection
        # Refused now, as the server would refuse it, rather than accepted and dead-lettered later.
        metrics, params, tags = _validate_batch_log_data(metrics, params, tags)
        _validate_param_keys_unique(params)
        known = conn.summary(run_id).params
        for param in params:
            before = known.get(param.key)
            if before is not None and before != str(param.value):
                raise MlflowException(
                    f"Changing param values is not allowed. Param with key='{param.key}' was already logged with "
                    f"value='{before}' for run ID='{run_id}'. Attempted logging new value '{param.value}'.",
                    INVALID_PARAMETER_VALUE,
                )
        plain: list[Metric] = []
        linked: list[Metric] = []
        for metric in metrics:
            (linked if models.names_a_model(metric) else plain).append(metric)
        # A point a logged model cannot take (model_point_clash): the server refuses the request, as MLflow's own
        # call would be refused — after the params and the run's points, which its store keeps (it never reaches
        # the tags). So does log_model's copy of a step (MLflow marks the model FAILED). MLflow's client sends
        # 1,000 points a request and stops at the first refused; its async queue logs the error instead.
        refused = self._model_clash(conn, run_id, linked, refused_keeps_points)
        if refused is not None:
            if not refused_keeps_points:
                raise refused
            plain, linked, tags = metrics, [], []
        linked_body = models.model_metrics_body(linked) if linked else None  # may raise: before anything is kept
        conn.journal.append_batch(
            run_id,
            [(m.key, m.value, m.timestamp, m.step) for m in plain],
            [(p.key, str(p.value)) for p in params],
            [(t.key, str(t.value)) for t in tags],
        )
        summary = conn.summary(run_id)
        if linked_body:  # after the batch's plain points, in the run's order (journal.append moves the intake first)
            conn.journal.append(run_id, MODEL_METRICS, linked_body)
            models.remember_model_points(
                linked, summary.model_points, models.local_model_id(conn.journal, conn.local_model_ids)
            )
        for metric in metrics:
            keep_latest(summary.metrics, metric)
        summary.params.update((p.key, str(p.value)) for p in params)
        summary.tags.update((t.key, str(t.value)) for t in tags)
        if refused is not None:
            raise refused

    def _model_clash(self, conn, run_id: str, linked: list, keeps_points: bool) -> MlflowException | None:
        """The error MLflow's server answers a request giving `linked` to their models with, or None."""
        if not linked:
            return None
        found = models.model_point_clash(
            linked, conn.summary(run_id).model_points, models.local_model_id(conn.journal, conn.local_model_ids)
        )
        if found is None:
            return None
        point, why = found
        kept = (
            (
                "the run keeps this request's points, the model none of them; MLflow sends a call's metrics "
                "1,000 a request"
            )
            if keeps_points
            else "nothing of it is kept"
        )
        return _ModelPointRefused(
            f"metric {point.key!r} at step {point.step} and timestamp {point.timestamp} for logged model "
            f"{point.model_id}: a model keeps one point per key, step and millisecond, and {why} ({kept})",
            BAD_REQUEST,
        )

    def log_batch_async(self, run_id, metrics, params, tags):
        # Journaling is as fast as queueing; MLflow's own async queue would only add a second buffer.
        from mlflow.utils.async_logging.run_operations import RunOperations

        try:
            self.log_batch(run_id, metrics, params, tags)
        except _ModelPointRefused as exc:
            # What MLflow's async queue does with a request the server refused: its call has returned already.
            log.error("Run Id %s: Failed to log run data: Exception: %s", run_id, exc.message)
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
        body = json.loads(
            message_to_json(
                LogInputs(
                    run_id=run_id,
                    datasets=[d.to_proto() for d in datasets or []],
                    models=[m.to_proto() for m in models or []],
                )
            )
        )
        self.connection.journal.append(run_id, J.LOG_INPUTS, body)

    def search_logged_models(
        self, experiment_ids, filter_string=None, datasets=None, max_results=None, order_by=None, page_token=None
    ):
        # Logged models are journaled: models.py answers, with ids translated (and offline from the journal).
        return LoggedModelStoreMixin.search_logged_models(
            self, experiment_ids, filter_string, datasets, max_results, order_by, page_token
        )

    def link_traces_to_run(self, trace_ids, run_id):
        self._call_online(
            "link_traces_to_run",
            lambda c, s: s.link_traces_to_run(trace_ids, self._require(c.journal.ids.server_run(run_id)[0], run_id)),
        )

    def __repr__(self) -> str:
        return f"JournalStore({self.store_uri!r})"


class _ModelPointRefused(MlflowException):
    """A point a logged model cannot take (models.model_point_clash), refused at the call as the server would."""


__all__ = ["ARTIFACT_SCHEME", "JournalStore", "artifact_uri_for"]
