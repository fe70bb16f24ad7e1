"""Every private MLflow name bridge relies on, in one place, each with why.

MLflow may rename or remove any of these in a release. `missing()` lists those this installed MLflow lacks;
tests/test_mlflow_internals.py fails loudly on any, so an upgrade breaks a test rather than silently
breaking a Colab session. Where a fallback exists the code using the name says so.
"""

from __future__ import annotations

import importlib
import inspect

#: (module, attribute path, who uses it and why)
INTERNALS: tuple[tuple[str, str, str], ...] = (
    (
        "mlflow.store.tracking.rest_store",
        "RestStore._call_endpoint",
        "client/plugins/store.py: the one method every RestStore read goes through; overridden so reads use the "
        "client's Link (its token, timeouts and failure translation) and make one try instead of MLflow's retries.",
    ),
    (
        "mlflow.store.tracking.rest_store",
        "RestStore._METHOD_TO_INFO",
        "client/plugins/store.py: endpoint and HTTP method of each REST API, so the override needs no table of "
        "its own.",
    ),
    (
        "mlflow.store.tracking.rest_store",
        "RestStore._V3_METHOD_TO_INFO",
        "client/plugins/store.py: the same for the MLflow 3 APIs (logged models, traces).",
    ),
    ("mlflow.store.tracking.rest_store", "RestStore._V3_APIS", "client/plugins/store.py: which APIs use the V3 table."),
    (
        "mlflow.utils.name_utils",
        "_generate_random_name",
        "client/plugins/store.py, client/plugins/models.py: a run (a logged model) created offline is named the way the"
        " server would name it, so the offline view and the server agree.",
    ),
    (
        "mlflow.utils.validation",
        "_validate_batch_log_data",
        "client/plugins/store.py: a log_batch is checked (names, lengths, values) exactly as the server will check it, "
        "so a bad entry raises at the call instead of being accepted and dead-lettered later.",
    ),
    (
        "mlflow.utils.validation",
        "_validate_metric",
        "client/plugins/store.py: the same for log_metric (once per metric name: the hot path).",
    ),
    (
        "mlflow.utils.validation",
        "_validate_param_keys_unique",
        "client/plugins/store.py: duplicate param keys in one batch raise at the call, as on the server.",
    ),
    (
        "mlflow.store.model_registry.rest_store",
        "RestStore._call_endpoint",
        "client/plugins/registry.py: overridden so registry reads go through the client's Link, one try each, like the "
        "tracking reads (store.py).",
    ),
    (
        "mlflow.store.model_registry.rest_store",
        "_METHOD_TO_INFO",
        "client/plugins/registry.py: endpoint and HTTP method of each registry REST API.",
    ),
    (
        "mlflow.server",
        "_exec_cmd",
        "serve/mlflow_process.py: replaced so `mlflow server` becomes its uvicorn (one process, ~300 MB less); "
        "without it MLflow runs as the usual two processes (tested fallback).",
    ),
)


#: Private code inside public MLflow functions that bridge recognises: (module, function, text its source must
#: hold, who relies on it and why). A nested function is no attribute, so its definition is looked for.
SOURCES: tuple[tuple[str, str, str, str], ...] = (
    (
        "mlflow.models.model",
        "Model.log",
        "def log_model_metrics_for_step(client, model_id, run_id, step):",
        "client/plugins/models.py (asked_by_log_model): log_model reads the run back (get_run, get_metric_history) to "
        "copy its metrics at the step to the new model; while the server is away bridge recognises this helper's frame "
        "by name and locals (model_id, step) and makes the copy at delivery instead of failing the model.",
    ),
    (
        "mlflow.store.tracking.sqlalchemy_store",
        "SqlAlchemyStore._log_model_metrics",
        "metric_keys[i : i + 100] for i in range(0, len(metric_keys), 100)",
        "client/plugins/models.py (model_point_clash, _RECHECK_NAMES): which log_batch the server refuses for a logged "
        "model's points, raised at the call as there; its recovery re-checks a request in groups of 100 entries "
        "and refuses a point held already when a group lacks its key. Changed: compare with the differential "
        "tests (tests/test_models.py::test_h24_…) and follow.",
    ),
)


def resolve(module: str, attribute: str):
    """The object at `module`.`attribute` (a dotted path); AttributeError/ImportError when it is gone."""
    target = importlib.import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def missing() -> list[str]:
    """The internals this MLflow does not have, as 'module.attribute: why it matters'."""
    gone = []
    for module, attribute, why in INTERNALS:
        try:
            resolve(module, attribute)
        except (ImportError, AttributeError):
            gone.append(f"{module}.{attribute}: {why}")
    for module, function, text, why in SOURCES:
        try:
            source = inspect.getsource(resolve(module, function))
        except (ImportError, AttributeError, OSError, TypeError):
            source = ""
        if text not in source:
            gone.append(f"{module}.{function} defining {text!r}: {why}")
    return gone
