"""The private MLflow names bridge relies on are all still there (bridge/mlflow_internals.py lists them)."""

from __future__ import annotations

import pytest

from bridge import mlflow_internals


def test_every_mlflow_internal_bridge_relies_on_still_exists():
    gone = mlflow_internals.missing()
    assert gone == [], "this MLflow lacks internals bridge relies on — update bridge for it:\n" + "\n".join(gone)


@pytest.mark.parametrize(
    "module,attribute,why", mlflow_internals.INTERNALS, ids=[f"{m}.{a}" for m, a, _ in mlflow_internals.INTERNALS]
)
def test_each_internal_is_the_kind_of_object_bridge_uses(module, attribute, why):
    target = mlflow_internals.resolve(module, attribute)
    if attribute.endswith(("_METHOD_TO_INFO", "_V3_APIS")):
        assert len(target) > 0, f"{module}.{attribute} is empty"
    else:
        assert callable(target), f"{module}.{attribute} is no longer callable"


def test_a_removed_internal_is_reported_with_why(monkeypatch):
    monkeypatch.setattr(mlflow_internals, "INTERNALS", (("mlflow.utils.name_utils", "_no_such_name", "a test entry"),))
    assert mlflow_internals.missing() == ["mlflow.utils.name_utils._no_such_name: a test entry"]


def test_a_helper_gone_from_an_mlflow_function_is_reported_with_why(monkeypatch):
    monkeypatch.setattr(
        mlflow_internals, "SOURCES", (("mlflow.models.model", "Model.log", "def no_such_helper(", "a test entry"),)
    )
    assert mlflow_internals.missing() == ["mlflow.models.model.Model.log defining 'def no_such_helper(': a test entry"]


def test_the_tag_names_the_sender_spells_out_are_mlflow_s():
    """The sender never imports mlflow (tests/test_layers.py), so it spells MLflow's tag names itself."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    from bridge.client.delivery import logged_models

    assert logged_models.MLFLOW_MODEL_VERSIONS == MLFLOW_MODEL_VERSIONS
