"""Links into the MLflow UI that open its "Model training" view, not MLflow 3's default GenAI one.

MLflow ≥ 3 keeps the view in the `workflowType` query parameter of the hash route (`genai` or
`machine_learning`; without it, the browser's last choice, GenAI by default), and opens an experiment on its
runs table when the experiment is tagged `mlflow.experimentKind = custom_model_development`. Checked against
the UI bundle of MLflow 3.x (`WorkflowTypeProvider` reads `workflowType` from the route's search params;
`compareRunsMode=CHART` selects the chart view of the runs page); `tests/test_ui.py` pins both.
"""

from __future__ import annotations

from urllib.parse import urlencode, urlsplit, urlunsplit

#: The experiment tag MLflow's UI reads to pick an experiment's view, and the value for training runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
#: The UI's query parameter selecting the view, and the value of the "Model training" view.
WORKFLOW_PARAM = "workflowType"
MODEL_TRAINING_WORKFLOW = "machine_learning"


def ui_link(base_url: str, experiment_id: str | None = None, run_id: str | None = None, *, charts: bool = False) -> str:
    """The MLflow UI at `base_url`, on the model-training view of an experiment (its runs) or of one run.

    `charts` opens an experiment on its chart view (metric curves of all runs) instead of the table.
    Credentials in `base_url` are dropped: a printed link never carries a secret.
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
    return f"{base}/#{route}?{urlencode(query)}"
