"""The session's trained sweep (`bridge_sweep`: yolov8n, yolo11n and yolo26n by `bridge train` through
bridge.connect() into a real `bridge serve`), read back: each run complete, and `bridge compare` on it.

Every test of the sweep lives here, so a parallel run trains it once: tests/conftest.py keeps this module
on one xdist worker.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from bridge.cli import app
from bridge.yolo.compare import compare
from tests.support.yolo import MODEL_FAMILIES, SWEEP_TAGS, assert_complete_yolo_run, bridge_cli, connect_env
from tests.test_yolo_compare import _has_colour

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", list(MODEL_FAMILIES))
def test_run_on_the_server_is_complete(bridge_sweep, name):
    assert_complete_yolo_run(
        MlflowClient(bridge_sweep.read_uri),
        bridge_sweep.run_ids[name],
        family=MODEL_FAMILIES[name],
        save_dir=bridge_sweep.save_dir(name),
        data_yaml=bridge_sweep.data,
        epochs=2,
        user_tags={**SWEEP_TAGS, "sweep.models": "yolov8n,yolo11n,yolo26n"},
    )


def test_sweep_made_one_finished_run_per_model(bridge_sweep):
    client = MlflowClient(bridge_sweep.read_uri)
    exp = client.get_experiment_by_name(bridge_sweep.experiment)
    runs = [r for r in client.search_runs([exp.experiment_id]) if "bridge.kind" not in r.data.tags]
    assert sorted(r.info.run_name for r in runs) == sorted(MODEL_FAMILIES)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert "bridge compare yolo-e2e" in bridge_sweep.output


def test_compare_through_connect_reads_the_server_and_logs_a_summary(bridge_sweep, bridge_serve, tmp_path):
    env = {**os.environ, **connect_env(bridge_serve, tmp_path / "journal.sqlite"), "COLUMNS": "220"}
    out = subprocess.run(
        [*bridge_cli(), "compare", bridge_sweep.experiment, "--out", str(tmp_path / "c.png"), "--log"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for name in MODEL_FAMILIES:
        assert f" {name} " in out.stdout
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = MlflowClient(bridge_sweep.read_uri)
    exp = client.get_experiment_by_name(bridge_sweep.experiment)
    summaries = client.search_runs([exp.experiment_id], "tags.`bridge.kind` = 'comparison'")
    (mine,) = [r for r in summaries if "c.png" in {a.path for a in client.list_artifacts(r.info.run_id)}]
    assert {a.path for a in client.list_artifacts(mine.info.run_id)} == {"c.png", "comparison.csv"}
    assert mine.info.status == "FINISHED"


def test_cli_compare_on_a_real_sweep_logs_a_summary_run(bridge_sweep, tmp_path):
    out_png = tmp_path / "cmp.png"
    runner = CliRunner()
    try:
        result = runner.invoke(
            app,
            [
                "compare",
                bridge_sweep.experiment,
                "--out",
                str(out_png),
                "--log",
                "--tracking-uri",
                bridge_sweep.read_uri,
            ],
            env={"COLUMNS": "220"},
        )
    finally:
        mlflow.set_tracking_uri("")
    assert result.exit_code == 0, result.output
    client = MlflowClient(bridge_sweep.read_uri)
    for name, run_id in bridge_sweep.run_ids.items():
        run = client.get_run(run_id)
        line = next(ln for ln in result.output.splitlines() if f" {name} " in ln)
        assert f"{run.data.metrics['val/best/mAP50-95']:.4f}" in line
        size = (bridge_sweep.save_dir(name) / "weights" / "best.pt").stat().st_size
        assert f"{size / 1e6:.2f}" in line
    img = Image.open(out_png)
    assert img.format == "PNG" and img.size == (1500, 720)  # mAP + box/cls/dfl/l1 losses: 5 panels in 2 rows
    for colour in ("C0", "C1", "C2"):
        assert _has_colour(out_png, colour), colour

    exp = client.get_experiment_by_name(bridge_sweep.experiment)
    summaries = client.search_runs([exp.experiment_id], "tags.`bridge.kind` = 'comparison'")
    (mine,) = [r for r in summaries if "cmp.png" in {a.path for a in client.list_artifacts(r.info.run_id)}]
    assert mine.info.status == "FINISHED"
    sid = mine.info.run_id
    assert {a.path for a in client.list_artifacts(sid)} == {"cmp.png", "comparison.csv"}
    table = list(
        csv.DictReader(io.StringIO(Path(client.download_artifacts(sid, "comparison.csv", str(tmp_path))).read_text()))
    )
    assert sorted(r["run id"] for r in table) == sorted(bridge_sweep.run_ids.values())
    assert {r["run"] for r in table} == set(MODEL_FAMILIES)
    # a second comparison leaves the summary run out
    mlflow.set_tracking_uri(bridge_sweep.read_uri)
    try:
        assert len(compare(bridge_sweep.experiment).rows) == 3
    finally:
        mlflow.set_tracking_uri("")
