"""`bridge.yolo.compare` and `bridge compare`: the table, its order, the PNG, and the summary run."""

from __future__ import annotations

import csv
import io

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from bridge.cli import app
from bridge.yolo.compare import compare


def _rgb(colour: str) -> tuple[int, int, int]:
    from matplotlib.colors import to_rgb

    return tuple(round(c * 255) for c in to_rgb(colour))


def _has_colour(png, colour: str, min_pixels: int = 30) -> bool:
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    return int((np.abs(pixels.astype(int) - _rgb(colour)).sum(axis=1) < 8).sum()) >= min_pixels


@pytest.fixture
def handmade_experiment(tmp_path):
    """Three tracked runs with known final metrics and curves, a foreign run and an earlier summary run."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("handmade", artifact_location=str(tmp_path / "artifacts"))
    spec = {"mid": 0.30, "best": 0.55, "unfinished": None}
    prefix = {"mid": "final/", "best": "val/best/", "unfinished": "val/best/"}  # mid: logged with the earlier names
    ids = {}
    for name, final in spec.items():
        run = client.create_run(exp_id, run_name=name, tags={"bridge.tracker": "bridge.yolo"})
        rid = ids[name] = run.info.run_id
        client.log_param(rid, "model", f"{name}.yaml")
        client.log_param(rid, "model.parameters", "1234")
        for step in (1, 2, 3):
            client.log_metric(rid, "val/mAP50-95", (final or 0.1) * step / 3, step=step)
            client.log_metric(rid, "train/box_loss", 3.0 - step * 0.5, step=step)
        if final is not None:
            for key, value in {
                f"{prefix[name]}mAP50-95": final,
                f"{prefix[name]}mAP50": final + 0.2,
                f"{prefix[name]}precision": 0.7,
                f"{prefix[name]}recall": 0.6,
                "final/train_time_s" if name == "mid" else "train_time_s": 12.5,
            }.items():
                client.log_metric(rid, key, value, step=3)
        client.set_terminated(rid, "FINISHED" if final is not None else "FAILED")
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "best.pt").write_bytes(b"w" * 2_500_000)
    client.log_artifacts(ids["best"], str(weights), "weights")
    client.create_run(exp_id, run_name="someone-else")  # not a bridge.yolo run
    client.create_run(exp_id, run_name="comparison", tags={"bridge.kind": "comparison"})
    return uri, ids


def test_rows_best_first_with_values_from_the_store(handmade_experiment, tmp_path):
    uri, ids = handmade_experiment
    mlflow.set_tracking_uri(uri)
    try:
        result = compare("handmade")
    finally:
        mlflow.set_tracking_uri("")
    assert [r.name for r in result.rows] == ["best", "mid", "unfinished"]
    best, mid, unfinished = result.rows
    assert best.final["val/best/mAP50-95"] == pytest.approx(0.55)
    assert best.final["val/best/mAP50"] == pytest.approx(0.75)
    assert mid.final["val/best/mAP50-95"] == pytest.approx(0.30) and mid.train_time_s == pytest.approx(12.5)
    assert best.weights_bytes == 2_500_000 and mid.weights_bytes is None
    assert best.train_time_s == pytest.approx(12.5) and best.parameters == 1234 and best.model == "best.yaml"
    assert unfinished.status == "FAILED" and unfinished.final["val/best/mAP50-95"] is None
    assert [s for s, _ in best.curves["val/mAP50-95"]] == [1, 2, 3]
    table = list(csv.DictReader(io.StringIO(result.to_csv())))
    assert [r["run id"] for r in table] == [ids["best"], ids["mid"], ids["unfinished"]]
    assert table[0]["mAP50-95"] == "0.5500" and table[0]["best.pt (MB)"] == "2.50" and table[2]["mAP50-95"] == ""

    png = result.plot(tmp_path / "out" / "cmp.png")
    img = Image.open(png)
    assert img.format == "PNG" and img.size == (1000, 360)  # two panels: val/mAP50-95 and train/box_loss
    for colour in ("C0", "C1", "C2"):  # every run drew its line
        assert _has_colour(png, colour), colour


@pytest.mark.slow
def test_cli_compare_unknown_experiment_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["compare", "no-such-exp", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    mlflow.set_tracking_uri("")
    assert result.exit_code == 1
    assert "no MLflow experiment named 'no-such-exp'" in result.output
