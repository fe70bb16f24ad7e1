"""What can wait in the journal: every operation kind, the `entities` kinds, and the keys shared by writer and sender.

The plugins (bridge/client/plugins/) write ops of these kinds; the sender (bridge/client/delivery/) applies them.
Metric points, params and tags coalesce into log_batch; the rest are sent one by one (delivery/handlers.py).
"""

from __future__ import annotations

# ------------------------------------------------------------------------------------------- runs, experiments

METRIC, PARAM, TAG = "metric", "param", "tag"
CREATE_EXPERIMENT, SET_EXPERIMENT_TAG = "create_experiment", "set_experiment_tag"
DELETE_EXPERIMENT_TAG = "delete_experiment_tag"
CREATE_RUN, UPDATE_RUN, DELETE_TAG = "create_run", "update_run", "delete_tag"
LOG_INPUTS, ARTIFACT = "log_inputs", "artifact"

# ------------------------------------------------------------------------------------------------ logged models

#: Metric points that name a logged model or a dataset (MLflow 3), journaled under their run; and `log_model`'s
#: copy of the run's metrics at one step to the model, made at delivery (delivery/logged_models.py).
MODEL_METRICS, STEP_METRICS_TO_MODEL = "model_metrics", "step_metrics_to_model"
CREATE_LOGGED_MODEL = "create_logged_model"
LOG_LOGGED_MODEL_PARAMS = "log_logged_model_params"
SET_LOGGED_MODEL_TAGS = "set_logged_model_tags"
DELETE_LOGGED_MODEL_TAG = "delete_logged_model_tag"
FINALIZE_LOGGED_MODEL = "finalize_logged_model"
LOG_OUTPUTS = "log_outputs"
RECORD_LOGGED_MODEL = "record_logged_model"

# ----------------------------------------------------------------------------------------------------- registry

#: The run key every registry write is journaled under (one order for all of them).
REGISTRY_KEY = "registry"
CREATE_REGISTERED_MODEL = "create_registered_model"
CREATE_MODEL_VERSION = "create_model_version"
SET_ALIAS, DELETE_ALIAS = "set_registered_model_alias", "delete_registered_model_alias"
SET_MODEL_TAG, DELETE_MODEL_TAG = "set_registered_model_tag", "delete_registered_model_tag"
SET_VERSION_TAG, DELETE_VERSION_TAG = "set_model_version_tag", "delete_model_version_tag"
#: Every kind journaled under REGISTRY_KEY: they keep one order between them (a waiting one holds the rest).
REGISTRY_KINDS = (
    CREATE_REGISTERED_MODEL,
    CREATE_MODEL_VERSION,
    SET_ALIAS,
    DELETE_ALIAS,
    SET_MODEL_TAG,
    DELETE_MODEL_TAG,
    SET_VERSION_TAG,
    DELETE_VERSION_TAG,
    SET_LOGGED_MODEL_TAGS,
)

# ------------------------------------------------------------------------------------------------------ marks

#: Kinds whose repetition from an old copy of the journal would overwrite something newer (delivery/marks.py); the
#: step copy reads the server when it is made, so made again later it would copy points logged since.
MARKED_RUN_KINDS = frozenset({TAG, DELETE_TAG, UPDATE_RUN, ARTIFACT, STEP_METRICS_TO_MODEL})
MARKED_EXPERIMENT_KINDS = frozenset({SET_EXPERIMENT_TAG, DELETE_EXPERIMENT_TAG})

# -------------------------------------------------------------------------------------------------- entities

#: Kinds of the `entities` table: logged models and model versions created here, and registered models.
LOGGED_MODEL, MODEL_VERSION, REGISTERED_MODEL = "logged_model", "model_version", "registered_model"

# -------------------------------------------------------------------------------------------- keys and tags

#: The tag that finds a logged model again after a lost answer (like the run key of a run).
MODEL_KEY_TAG = "bridge.modelKey"
#: The tag that finds a model version again after a lost answer.
VERSION_KEY_TAG = "bridge.versionKey"
#: Run tags whose value is a run id: a local id is translated to the server's before it leaves.
RUN_ID_TAGS = frozenset({"mlflow.parentRunId"})
#: The scheme of the artifact URIs MLflow sees for runs and models created here (plugins/artifacts.py).
ARTIFACT_SCHEME = "bridge-artifacts"


def artifact_uri_for(owner_id: str) -> str:
    """The artifact URI MLflow sees for a run or logged model: it routes log_artifact & co. into the journal."""
    return f"{ARTIFACT_SCHEME}://{owner_id}"


def version_key(name: str, version) -> str:
    """How the `entities` table names a version of a registered model (local and server side alike)."""
    return f"{version}/{name}"


def version_number(key: str) -> str:
    return key.split("/", 1)[0]


__all__ = [
    "ARTIFACT",
    "ARTIFACT_SCHEME",
    "CREATE_EXPERIMENT",
    "CREATE_LOGGED_MODEL",
    "CREATE_MODEL_VERSION",
    "CREATE_REGISTERED_MODEL",
    "CREATE_RUN",
    "DELETE_ALIAS",
    "DELETE_EXPERIMENT_TAG",
    "DELETE_LOGGED_MODEL_TAG",
    "DELETE_MODEL_TAG",
    "DELETE_TAG",
    "DELETE_VERSION_TAG",
    "FINALIZE_LOGGED_MODEL",
    "LOGGED_MODEL",
    "LOG_INPUTS",
    "LOG_LOGGED_MODEL_PARAMS",
    "LOG_OUTPUTS",
    "MARKED_EXPERIMENT_KINDS",
    "MARKED_RUN_KINDS",
    "METRIC",
    "MODEL_KEY_TAG",
    "MODEL_METRICS",
    "MODEL_VERSION",
    "PARAM",
    "RECORD_LOGGED_MODEL",
    "REGISTERED_MODEL",
    "REGISTRY_KEY",
    "REGISTRY_KINDS",
    "RUN_ID_TAGS",
    "SET_ALIAS",
    "SET_EXPERIMENT_TAG",
    "SET_LOGGED_MODEL_TAGS",
    "SET_MODEL_TAG",
    "SET_VERSION_TAG",
    "STEP_METRICS_TO_MODEL",
    "TAG",
    "UPDATE_RUN",
    "VERSION_KEY_TAG",
    "artifact_uri_for",
    "version_key",
    "version_number",
]
