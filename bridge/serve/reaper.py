"""Mark runs KILLED whose client stopped sending heartbeats (a Colab runtime that vanished mid-training).

Only runs that carry `config.HEARTBEAT_TAG` are ever touched: a run without it was not started by a
bridge client, and its silence means nothing. The run's end time is its last heartbeat. A client that
comes back later may still finish the run; MLflow accepts the later status update.

A silent run may not be a dead training but a duplicate: a `runs/create` held up in the network past the
client's timeout and applied after the client had created the run again (MLflow has no idempotent create). The
client deletes such twins when its run ends; one that lands later, or beside a run that never ends, is deleted
here (tagged `config.DUPLICATE_OF_TAG`) instead of showing as an empty KILLED run — but only when another
active run with its `config.RUN_KEY_TAG` shows that it is the one the client uses (it holds data the twin does
not, it was ended by its client, or it beat later). When that cannot be told, both are marked KILLED as any
silent run: deleting the run a client logs to would turn its later writes into dead letters.

It speaks MLflow's REST API with `requests` instead of importing `MlflowClient`: that import alone
costs the long-running `bridge serve` process ~190 MiB and a ~3 s CPU burst.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import requests

from bridge import config
from bridge.errors import ServeError
from bridge.twins import empty_twin, run_key_search, run_tags

log = logging.getLogger(__name__)

KILLED_REASON_TAG = config.KILLED_REASON_TAG
RUNNING_FILTER = "attributes.status = 'RUNNING'"
#: MLflow's largest page for experiments/search and runs/search.
_PAGE = 1000
#: runs/search takes at most 100 experiment ids per call.
_EXPERIMENTS_PER_SEARCH = 100
REQUEST_TIMEOUT_S = 30.0


def reap_stale_runs(tracking_uri: str, timeout_s: float, now: float | None = None) -> list[str]:
    """Mark RUNNING runs whose heartbeat is older than `timeout_s` as KILLED; return their run ids."""
    if timeout_s <= 0:
        raise ValueError(f"heartbeat timeout must be positive, got {timeout_s}")
    now = time.time() if now is None else now
    api = _MlflowApi(tracking_uri)
    reaped: list[str] = []
    try:
        for experiment_ids in _active_experiment_batches(api):
            for run in _running_runs(api, experiment_ids):
                tags = run_tags(run)
                beat = _heartbeat(tags.get(config.HEARTBEAT_TAG))
                if beat is None:
                    continue
                silent_s = now - beat
                if silent_s <= timeout_s:
                    continue
                run_id = run["info"]["run_id"]
                try:
                    original = _original_of_twin(api, run, tags, beat)
                    if original is not None:
                        api.post("runs/set-tag", {"run_id": run_id, "key": config.DUPLICATE_OF_TAG, "value": original})
                        api.post("runs/delete", {"run_id": run_id})
                        log.warning(
                            "Run %s: an empty duplicate of run %s (a create that arrived late); deleted",
                            run_id,
                            original,
                        )
                        continue
                except ServeError as exc:  # the client removed it first, say: the other silent runs still count
                    log.warning("Run %s: could not remove it as a duplicate: %s", run_id, exc)
                    continue
                reason = f"no heartbeat for {silent_s:.0f} s; marked KILLED by bridge serve"
                api.post("runs/set-tag", {"run_id": run_id, "key": KILLED_REASON_TAG, "value": reason})
                api.post("runs/update", {"run_id": run_id, "status": "KILLED", "end_time": int(beat * 1000)})
                log.warning("Run %s: %s", run_id, reason)
                reaped.append(run_id)
    finally:
        api.close()
    return reaped


def _original_of_twin(api: _MlflowApi, run: dict[str, Any], tags: dict[str, Any], beat: float) -> str | None:
    """The run that `run` (silent, last beat `beat`) duplicates, when it is an empty twin; else None.

    A twin is what a late create leaves (`bridge.twins.empty_twin`, the client's rule too). The original must
    show it is the run in use: a metric, param or tag the twin lacks, an end set by its client (not the reaper's
    KILLED), or a later heartbeat.
    """
    key = tags.get(config.RUN_KEY_TAG)
    data = run.get("data") or {}
    if not key or "'" in key or data.get("metrics") or data.get("params"):
        return None  # written to: no twin, whatever the search would find (and no request made)
    found = api.post("runs/search", run_key_search(run["info"]["experiment_id"], key)).get("runs", [])
    for other in found:
        if other["info"]["run_id"] == run["info"]["run_id"] or not empty_twin(run, other):
            continue  # the silent run holds something the other lacks: written to it, so it is in use
        other_data = other.get("data", {})
        other_tags = run_tags(other)
        other_beat = _heartbeat(other_tags.get(config.HEARTBEAT_TAG))
        in_use = (
            other_data.get("metrics")
            or other_data.get("params")
            or set(other_tags) - set(tags) - {KILLED_REASON_TAG}  # the reaper's own, this very round too
            or (other["info"].get("status") != "RUNNING" and KILLED_REASON_TAG not in other_tags)
            or (other_beat is not None and other_beat > beat)
        )
        if in_use:
            return other["info"]["run_id"]
    return None


class _MlflowApi:
    """POSTs to one MLflow's `/api/2.0/mlflow/…`; any failure becomes a `ServeError` saying what failed."""

    def __init__(self, tracking_uri: str) -> None:
        self._base = tracking_uri.rstrip("/") + "/api/2.0/mlflow/"
        self._session = requests.Session()

    def post(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = self._session.post(self._base + endpoint, json=body, timeout=REQUEST_TIMEOUT_S)
        except requests.RequestException as exc:
            raise ServeError(
                f"could not check runs for missing heartbeats: MLflow unreachable ({type(exc).__name__})"
            ) from None
        if resp.status_code != 200:
            raise ServeError(
                f"could not check runs for missing heartbeats: {endpoint} answered {resp.status_code}: "
                f"{_error_message(resp)}"
            )
        try:
            return resp.json()
        except ValueError:
            raise ServeError(f"could not check runs for missing heartbeats: {endpoint} answered non-JSON") from None

    def close(self) -> None:
        self._session.close()


def _error_message(resp: requests.Response) -> str:
    try:
        return str(resp.json().get("message", ""))[:300] or resp.reason
    except ValueError:
        return resp.text[:300] or resp.reason


def _heartbeat(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        log.debug("Ignoring unparseable %s tag %r", config.HEARTBEAT_TAG, value)
        return None


def _active_experiment_batches(api: _MlflowApi) -> Iterator[list[str]]:
    ids: list[str] = []
    token = None
    while True:
        body: dict[str, Any] = {"max_results": _PAGE, "view_type": "ACTIVE_ONLY"}
        if token:
            body["page_token"] = token
        page = api.post("experiments/search", body)
        ids.extend(e["experiment_id"] for e in page.get("experiments", []))
        token = page.get("next_page_token")
        if not token:
            break
    for start in range(0, len(ids), _EXPERIMENTS_PER_SEARCH):
        yield ids[start : start + _EXPERIMENTS_PER_SEARCH]


def _running_runs(api: _MlflowApi, experiment_ids: list[str]) -> Iterator[dict[str, Any]]:
    # Collected before any is updated: a page token is an offset, and KILLED runs leave the filter.
    runs: list[dict[str, Any]] = []
    token = None
    while True:
        body: dict[str, Any] = {
            "experiment_ids": experiment_ids,
            "filter": RUNNING_FILTER,
            "run_view_type": "ACTIVE_ONLY",
            "max_results": _PAGE,
        }
        if token:
            body["page_token"] = token
        page = api.post("runs/search", body)
        runs.extend(page.get("runs", []))
        token = page.get("next_page_token")
        if not token:
            break
    yield from runs
