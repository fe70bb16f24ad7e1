"""bridge.ui: links into the MLflow UI's model-training view, and the UI internals they rely on."""

from __future__ import annotations

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
