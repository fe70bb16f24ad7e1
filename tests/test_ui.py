"""bridge.ui: links into the MLflow UI's model-training view, and the UI internals they rely on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge import ui


def test_links_open_the_model_training_view():
    assert ui.ui_link("http://127.0.0.1:5000") == "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
    assert ui.ui_link("https://x.ngrok-free.app/", "7") == (
        "https://x.ngrok-free.app/#/experiments/7/runs?workflowType=machine_learning"
    )
    assert ui.ui_link("https://x.ngrok-free.app", "7", charts=True).endswith(
        "#/experiments/7/runs?workflowType=machine_learning&compareRunsMode=CHART"
    )
    assert ui.ui_link("http://h:1", "7", charts=True, view="v1").endswith(
        "#/experiments/7/runs?workflowType=machine_learning&compareRunsMode=CHART&viewStateShareKey=v1"
    )
    assert "viewStateShareKey" not in ui.ui_link("http://h:1", "7", view="v1")  # a view is of the chart page
    assert ui.ui_link("http://h:1/mlflow", "3", "ab12") == (
        "http://h:1/mlflow/#/experiments/3/runs/ab12?workflowType=machine_learning"
    )


def test_links_never_carry_credentials_and_bad_input_is_named():
    link = ui.ui_link("https://bridge:s3cret-token@x.ngrok-free.app?token=s3cret-token", "1")
    assert "s3cret" not in link and link.startswith("https://x.ngrok-free.app/#/")
    with pytest.raises(ValueError, match="'ftp://x'"):
        ui.ui_link("ftp://x")
    with pytest.raises(ValueError, match="experiment id"):
        ui.ui_link("http://h", run_id="r")


def test_the_installed_mlflow_ui_still_reads_what_the_links_set():
    """Fails loudly if an MLflow upgrade renames the view parameter, its values, or the chart mode."""
    import mlflow.server

    bundle = Path(mlflow.server.__file__).parent / "js" / "build" / "static" / "js"
    text = "\n".join(p.read_text(errors="replace") for p in bundle.glob("*.js"))
    assert '.get("workflowType")' in text, "the UI no longer reads ?workflowType="
    assert 'MACHINE_LEARNING="machine_learning"' in text
    assert '"compareRunsMode"' in text and '"mlflow.experimentKind"' in text
    assert 'CUSTOM_MODEL_DEVELOPMENT="custom_model_development"' in text
    # Saved chart views (chart_view): the tag prefix, the link's parameter, the envelope, the state keys it sets.
    assert '"mlflow.sharedViewState."' in text and '"viewStateShareKey"' in text
    assert "Invalid saved-view envelope" in text
    assert '"compareRunCharts","compareRunSections"' in text and '"isAccordionReordered"' in text
    assert 'MODEL_METRIC_CHARTS="model-metrics"' in text  # the run page's tab the browser test opens


def test_a_chart_view_lists_its_charts_first_then_the_sections_in_order():
    view = ui.chart_view("Learning curves", ["val/mAP50-95", "train/box_loss"], ["val", "Model metrics"], now_ms=7)
    tag = json.loads(view)
    assert (tag["name"], tag["createdAt"], tag["updatedAt"]) == ("Learning curves", 7, 7)
    state = json.loads(tag["state"])  # the envelope holds the UI state as a JSON string
    assert state["isAccordionReordered"] is True  # else the UI sorts the sections by name again
    sections = state["compareRunSections"]
    assert [s["name"] for s in sections] == ["Learning curves", "val", "Model metrics"]
    assert all(s["isReordered"] and s["display"] for s in sections)
    charts = state["compareRunCharts"]
    assert [(c["metricKey"], c["type"], c["metricSectionId"]) for c in charts] == [
        ("val/mAP50-95", "LINE", sections[0]["uuid"]),
        ("train/box_loss", "LINE", sections[0]["uuid"]),
    ]
    assert len({c["uuid"] for c in charts} | {s["uuid"] for s in sections}) == 5


def test_the_yolo_learning_view_fits_an_experiment_tag():
    from mlflow.utils.validation import MAX_EXPERIMENT_TAG_VAL_LENGTH

    from bridge.yolo.callbacks import LEARNING_CHARTS, LEARNING_VIEW, training_experiment_tags

    tags = training_experiment_tags()
    assert tags[ui.EXPERIMENT_KIND_TAG] == ui.MODEL_TRAINING_KIND
    view = tags[ui.SHARED_VIEW_TAG_PREFIX + LEARNING_VIEW]
    assert len(view) < MAX_EXPERIMENT_TAG_VAL_LENGTH
    charts = [c["metricKey"] for c in json.loads(json.loads(view)["state"])["compareRunCharts"]]
    assert charts == list(LEARNING_CHARTS) and charts[:3] == ["val/mAP50-95", "val/mAP50", "train/box_loss"]
