"""Mark runs KILLED whose client stopped sending heartbeats (a Colab runtime that vanished mid-training).

Only runs that carry `config.HEARTBEAT_TAG` are ever touched: a run without it was not started by a
bridge client, and its silence means nothing. The run's end time is its last heartbeat. A client that
comes back later may still finish the run; MLflow accepts the later status update.
"""

from __future__ import annotations

import logging
import time

from mlflow.entities import RunStatus, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bridge import config
from bridge.errors import ServeError

log = logging.getLogger(__name__)

KILLED_REASON_TAG = "bridge.killed_reason"
_PAGE = 1000


def reap_stale_runs(tracking_uri: str, timeout_s: float, now: float | None = None) -> list[str]:
    """Mark RUNNING runs whose heartbeat is older than `timeout_s` as KILLED; return their run ids."""
    if timeout_s <= 0:
        raise ValueError(f"heartbeat timeout must be positive, got {timeout_s}")
    now = time.time() if now is None else now
    client = MlflowClient(tracking_uri=tracking_uri)
    reaped: list[str] = []
    try:
        for experiment_ids in _active_experiment_batches(client):
            for run in _running_runs(client, experiment_ids):
                beat = _heartbeat(run.data.tags.get(config.HEARTBEAT_TAG))
                if beat is None:
                    continue
                silent_s = now - beat
                if silent_s <= timeout_s:
                    continue
                run_id = run.info.run_id
                reason = f"no heartbeat for {silent_s:.0f} s; marked KILLED by bridge serve"
                client.set_tag(run_id, KILLED_REASON_TAG, reason)
                client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.KILLED), end_time=int(beat * 1000))
                log.warning("Run %s: %s", run_id, reason)
                reaped.append(run_id)
    except MlflowException as exc:
        raise ServeError(f"could not check runs for missing heartbeats: {exc.message}") from None
    return reaped


def _heartbeat(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        log.debug("Ignoring unparseable %s tag %r", config.HEARTBEAT_TAG, value)
        return None


def _active_experiment_batches(client: MlflowClient, batch: int = 100):
    ids: list[str] = []
    token = None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=_PAGE, page_token=token)
        ids.extend(e.experiment_id for e in page)
        token = page.token
        if not token:
            break
    for start in range(0, len(ids), batch):
        yield ids[start : start + batch]


def _running_runs(client: MlflowClient, experiment_ids: list[str]):
    token = None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string="attributes.status = 'RUNNING'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=_PAGE,
            page_token=token,
        )
        yield from page
        token = page.token
        if not token:
            break
