"""Links into the MLflow UI that open its "Model training" view, not MLflow 3's default GenAI one.

MLflow ≥ 3 keeps the view in the `workflowType` query parameter of the hash route (`genai` or
`machine_learning`; without it, the browser's last choice, GenAI by default), and opens an experiment on its
runs table when the experiment is tagged `mlflow.experimentKind = custom_model_development`. Checked against
the UI bundle of MLflow 3.x (`WorkflowTypeProvider` reads `workflowType` from the route's search params;
`compareRunsMode=CHART` selects the chart view of the runs page); `tests/test_ui.py` pins both.

The chart view sorts its sections by name. MLflow ≥ 3.17 keeps an experiment's saved views in experiment tags
`mlflow.sharedViewState.<key>` (an envelope `{name, createdAt, updatedAt, state}` whose `state` is the runs
page's UI state as JSON) and opens one from the link's `viewStateShareKey=<key>`, listed under "Views": a
chart link can so open on chosen charts first (`chart_view`). An older UI ignores the tag and the parameter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from urllib.parse import urlencode, urlsplit, urlunsplit

#: The experiment tag MLflow's UI reads to pick an experiment's view, and the value for training runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
#: The UI's query parameter selecting the view, and the value of the "Model training" view.
WORKFLOW_PARAM = "workflowType"
MODEL_TRAINING_WORKFLOW = "machine_learning"
#: A saved view's experiment tag is this prefix and its key; the link's parameter naming the view to open.
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_PARAM = "viewStateShareKey"
#: The UI's names of the sections of unprefixed metrics and of `system/*` ones.
MODEL_METRICS_SECTION = "Model metrics"
SYSTEM_METRICS_SECTION = "System metrics"


def chart_view(name: str, first: Sequence[str], then: Sequence[str] = (), *, now_ms: int) -> str:
    """A saved view of the chart page (the value of its experiment tag): section `name` charts the metrics `first`
    as lines over steps, in that order; then come the sections named in `then`, in that order, each filled by the
    UI with its metrics as usual, and any other section after them. A metric a run lacks shows no empty chart."""
    charts = [
        {
            "uuid": _uuid(key),
            "type": "LINE",
            "metricSectionId": _uuid(name),
            "isGenerated": True,
            "deleted": False,
            "runsCountToCompare": 10,
            "metricKey": key,
            "displayName": key,
            "lineSmoothness": 0,
            "scaleType": "linear",
            "xAxisScaleType": "linear",
            "xAxisKey": "step",
            "selectedXAxisMetricKey": "",
            "yAxisKey": "metric",
            "yAxisExpressions": [],
            "range": {},
            "ignoreOutliers": False,
            "useGlobalXaxisKey": True,
            "useGlobalLineSmoothing": True,
        }
        for key in first
    ]
    # isReordered/isAccordionReordered: the UI keeps this order instead of sorting the sections by name again.
    sections = [{"uuid": _uuid(sec), "name": sec, "display": True, "isReordered": True} for sec in (name, *then)]
    state = {"compareRunCharts": charts, "compareRunSections": sections, "isAccordionReordered": True}
    return json.dumps({"name": name, "createdAt": now_ms, "updatedAt": now_ms, "state": json.dumps(state)})


def _uuid(name: str) -> str:
    return "bridge-" + re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def ui_link(
    base_url: str,
    experiment_id: str | None = None,
    run_id: str | None = None,
    *,
    charts: bool = False,
    view: str | None = None,
) -> str:
    """The MLflow UI at `base_url`, on the model-training view of an experiment (its runs) or of one run.

    `charts` opens an experiment on its chart view (metric curves of all runs) instead of the table, in the saved
    `view` when given (the key of a `chart_view` tag the experiment has). Credentials in `base_url` are dropped:
    a printed link never carries a secret.
    """
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"MLflow UI address {base_url!r}: expected http(s)://host[:port][/path]")
    if run_id and not experiment_id:
        raise ValueError("a run link needs the run's experiment id")
    netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    if parts.port:
        netloc += f":{parts.port}"
    base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    query = {WORKFLOW_PARAM: MODEL_TRAINING_WORKFLOW}
    if not experiment_id:
        route = "/experiments"
    elif run_id:
        route = f"/experiments/{experiment_id}/runs/{run_id}"
    else:
        route = f"/experiments/{experiment_id}/runs"
        if charts:
            query["compareRunsMode"] = "CHART"
            if view:
                query[VIEW_PARAM] = view
    return f"{base}/#{route}?{urlencode(query)}"
