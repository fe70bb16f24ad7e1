"""`bridge train` input checks and model-name resolution (no training needed for these)."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from bridge.cli import app
from bridge.errors import ConfigError
from bridge.yolo.sweep import resolve_model


def flat(text: str) -> str:
    """Rich wraps long lines at the console width; compare on single spaces."""
    return " ".join(text.split())


@pytest.fixture
def runner():
    yield CliRunner()
    mlflow.set_tracking_uri("")


def test_missing_data_yaml_is_named_before_connecting(runner, tmp_path):
    # Wide enough for the whole path: rich folds a word longer than the line, and tmp_path's length is the runner's.
    missing = tmp_path / "nope.yaml"
    result = runner.invoke(app, ["train", "-m", "yolov8n", "--data", str(missing)], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "nope.yaml" in flat(result.output) and "no such file" in flat(result.output)


def test_bad_model_name_and_bad_arg_are_clear_errors(runner, yolo_dataset):
    result = runner.invoke(app, ["train", "-m", "yolov8n.txt", "--data", str(yolo_dataset)])
    assert result.exit_code == 1 and "yolov8n.txt" in flat(result.output)
    result = runner.invoke(app, ["train", "-m", "yolov8n", "--data", str(yolo_dataset), "--arg", "nbs"])
    assert result.exit_code == 1 and "'nbs': expected KEY=VALUE" in flat(result.output)


def test_a_model_that_cannot_load_is_reported_and_the_exit_code_says_so(runner, yolo_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/m.db"
    result = runner.invoke(
        app,
        ["train", "-m", str(tmp_path / "missing.yaml"), "--data", str(yolo_dataset), "--tracking-uri", uri],
        env={"COLUMNS": "250"},
    )
    assert result.exit_code == 1
    assert "missing" in flat(result.output) and "FileNotFoundError" in flat(result.output)
    exp = MlflowClient(uri).get_experiment_by_name("yolo")
    assert exp is None or MlflowClient(uri).search_runs([exp.experiment_id]) == []  # no half-made run


def test_model_names_resolve_to_weights_or_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model("yolov8n.yaml") == "yolov8n.yaml"
    assert resolve_model("/w/best.pt") == "/w/best.pt"
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    assert resolve_model("yolo11n") == "yolo11n.yaml"  # no weights here and no download allowed
    (tmp_path / "yolo11n.pt").write_bytes(b"")
    assert resolve_model("yolo11n") == "yolo11n.pt"  # weights on disk are preferred
    monkeypatch.setenv("YOLO_OFFLINE", "0")
    assert resolve_model("yolo26n") == "yolo26n.pt"  # Ultralytics downloads them
    with pytest.raises(ConfigError, match=r"yolo26n.onnx"):
        resolve_model("yolo26n.onnx")
    with pytest.raises(ConfigError):
        resolve_model("  ")
