"""colab/bridge_yolo.ipynb runs top to bottom headless (nbclient) against a local `bridge serve`."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from mlflow import MlflowClient
from nbclient import NotebookClient

from tests.support.yolo import MODEL_FAMILIES, connect_env

NOTEBOOK = Path(__file__).resolve().parents[1] / "colab" / "bridge_yolo.ipynb"


@pytest.mark.slow
def test_notebook_trains_three_models_and_compares_them(bridge_serve, yolo_dataset, tmp_path, monkeypatch):
    for key, value in connect_env(bridge_serve, tmp_path / "journal.sqlite").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("BRIDGE_NOTEBOOK_DATA", str(yolo_dataset))
    monkeypatch.setenv("BRIDGE_NOTEBOOK_EPOCHS", "1")
    monkeypatch.setenv("BRIDGE_NOTEBOOK_IMGSZ", "64")
    monkeypatch.setenv("BRIDGE_NOTEBOOK_BATCH", "4")
    monkeypatch.setenv("BRIDGE_NOTEBOOK_EXPERIMENT", "notebook")
    monkeypatch.setenv(
        "BRIDGE_NOTEBOOK_TRAIN_ARGS",
        json.dumps({"nbs": 4, "workers": 0, "device": "cpu", "amp": False, "project": str(tmp_path / "runs")}),
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = "\n".join(
        o.get("text", "") or json.dumps(o.get("data", {}))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
    assert "not Colab: Colab-only cells are skipped" in outputs
    assert "all delivered" in outputs
    # The resume cell, run after a finished sweep, trains nothing and names each model's run.
    assert outputs.count("already finished; nothing to resume") == len(MODEL_FAMILIES), outputs[-3000:]
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = nb.cells[-1].outputs[-1]["data"]["text/plain"]
    for name in MODEL_FAMILIES:
        assert name in table

    client = MlflowClient(bridge_serve.mlflow_url)
    exp = client.get_experiment_by_name("notebook")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(MODEL_FAMILIES)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mAP50-95")] == [1]
        assert "val/best/mAP50-95" in run.data.metrics and run.data.tags["source.kind"] == "notebook"
        assert run.data.tags["mlflow.source.type"] == "NOTEBOOK" and run.data.tags["mlflow.source.name"]
        assert (
            run.data.tags["mlflow.source.name"] != "bridge" and "ipykernel" not in run.data.tags["mlflow.source.name"]
        )
        assert "bridge.resume.count" not in run.data.tags
        assert {"weights", "console.log", "data", "plots"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
