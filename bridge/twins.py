"""Twins: the empty second run a `runs/create` held up in the network leaves when it lands after the client created
the run again (MLflow has no idempotent create).

One rule, used by both sides that clean them up: the client when a run ends (bridge/client/delivery/operations.py)
and `bridge serve`'s reaper when a run falls silent (bridge/serve/reaper.py). Runs are MLflow REST dicts
(`{"info": …, "data": {"metrics": …, "params": …, "tags": [{"key", "value"}]}}`).
"""

from __future__ import annotations

from typing import Any

from bridge import config


def run_tags(run: dict[str, Any]) -> dict[str, Any]:
    """A REST run's tags as a dict."""
    return {t.get("key"): t.get("value") for t in (run.get("data") or {}).get("tags", [])}


def empty_twin(twin: dict[str, Any], original: dict[str, Any]) -> bool:
    """Whether `twin` can be what a late try of `original`'s create left: no metric, no param, and no tag that
    `original` lacks. Anything else was written to it: it is in use."""
    data = twin.get("data") or {}
    return not data.get("metrics") and not data.get("params") and set(run_tags(twin)) <= set(run_tags(original))


def run_key_search(experiment_id: str, key: str, *, view: str = "ACTIVE_ONLY", max_results: int = 10) -> dict:
    """The `runs/search` body that finds every run carrying run key `key` (config.RUN_KEY_TAG) in one experiment."""
    return {
        "experiment_ids": [experiment_id],
        "run_view_type": view,
        "max_results": max_results,
        "filter": f"tags.`{config.RUN_KEY_TAG}` = '{key}'",
    }
