"""`bridge compare EXPERIMENT --register NAME`: the best run becomes a model version; `champion` moves only up.

Two real sweeps are trained through `bridge.connect()` into a real `bridge serve`. Tiny trainings all score
mAP 0, so the test then gives each run's `val/best/mAP50-95` a chosen later value on the server (a point at a
higher step is MLflow's latest value): that makes "better" and "worse" deterministic while the weights,
the registration and the loading are all real.
"""

from __future__ import annotations

import base64
import os
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.support.yolo import bridge_cli, connect_env, run_bridge_train, sha256

pytestmark = pytest.mark.slow


def _set_final(client: MlflowClient, run_id: str, value: float, step: int) -> None:
    client.log_metric(run_id, "val/best/mAP50-95", value, step=step)


def _register(experiment: str, name: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [*bridge_cli(), "compare", experiment, "--register", name, "--out", str(cwd / "c.png")],
        env={**os.environ, "COLUMNS": "300", **env},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.timeout(900)
def test_the_champion_alias_moves_only_to_a_better_run_and_the_model_predicts(bridge_serve, yolo_dataset, tmp_path):
    import mlflow
    from ultralytics import YOLO

    suffix = uuid.uuid4().hex[:6]
    name = f"detector-{suffix}"
    env = connect_env(bridge_serve, tmp_path / "journal.sqlite")
    sweeps = {label: (f"champ-{label}-{suffix}", model) for label, model in (("a", "yolov8n"), ("b", "yolo11n"))}
    # The two trainings run side by side (two processes on one journal, as two notebooks would): they mostly
    # wait on imports and the server, and one after the other they were the longest part of this test.
    with ThreadPoolExecutor(2) as pool:
        outs = pool.map(
            lambda label: run_bridge_train(
                [sweeps[label][1]], yolo_dataset, tmp_path / label, sweeps[label][0], env=env, epochs=1
            ),
            sweeps,
        )
        for out in outs:
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(bridge_serve.mlflow_url, registry_uri=bridge_serve.mlflow_url)

    def run_of(label: str):
        experiment, _model = sweeps[label]
        exp = client.get_experiment_by_name(experiment)
        (run,) = client.search_runs([exp.experiment_id])
        return run

    run_a, run_b = run_of("a"), run_of("b")
    _set_final(client, run_a.info.run_id, 0.30, 100)
    _set_final(client, run_b.info.run_id, 0.20, 100)

    first = _register(sweeps["a"][0], name, env, tmp_path)
    assert "now the champion" in first.stdout
    assert client.get_model_version_by_alias(name, "champion").version == "1"

    # Worse: registered as v2, the alias stays on v1, and v2 says why.
    second = _register(sweeps["b"][0], name, env, tmp_path)
    assert "champion stays v1" in second.stdout
    v2 = client.get_model_version(name, "2")
    assert v2.run_id == run_b.info.run_id
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert v2.tags["bridge.champion.decision"] == "kept v1"
    assert float(v2.tags["bridge.champion.value"]) == pytest.approx(0.20)
    assert float(v2.tags["bridge.champion.previous_value"]) == pytest.approx(0.30)
    assert v2.tags["bridge.champion.previous_run_id"] == run_a.info.run_id
    assert "0.2000 <= 0.3000" in v2.tags["bridge.champion.reason"]

    # Better: v3 takes the alias.
    _set_final(client, run_b.info.run_id, 0.50, 101)
    third = _register(sweeps["b"][0], name, env, tmp_path)
    assert "now the champion" in third.stdout
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "3" and champion.run_id == run_b.info.run_id
    assert champion.tags["bridge.champion.decision"] == "promoted"
    assert "0.5000 > 0.3000" in champion.tags["bridge.champion.reason"]

    # The champion loads by alias on the workstation and predicts as Ultralytics does with the same best.pt.
    mlflow.set_tracking_uri(bridge_serve.mlflow_url)
    mlflow.set_registry_uri(bridge_serve.mlflow_url)
    try:
        info = mlflow.models.get_model_info(f"models:/{name}@champion")
        assert info.signature is not None and info.signature.inputs.input_names() == ["image"]
        assert {p.name for p in info.signature.params} == {"conf", "imgsz"}
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        local_dir = Path(client.download_artifacts(run_b.info.run_id, "champion_model", dst_path=str(tmp_path / "m")))
        reqs = (local_dir / "requirements.txt").read_text()
        import ultralytics

        assert f"ultralytics=={ultralytics.__version__}" in reqs
        assert (local_dir / "input_example.json").is_file()
        best_local = tmp_path / "b" / "yolo11n" / "weights" / "best.pt"
        packed = next((local_dir / "artifacts").rglob("best.pt"))
        assert sha256(packed.read_bytes()) == sha256(best_local.read_bytes())
        import pandas as pd

        image = sorted((yolo_dataset.parent / "images" / "val").glob("*.png"))[0]
        frame = pd.DataFrame({"image": [base64.b64encode(image.read_bytes()).decode()]})
        got = model.predict(frame, params={"conf": 0.001, "imgsz": 64})
    finally:
        mlflow.set_tracking_uri("")
        mlflow.set_registry_uri("")
    assert list(got.columns) == ["image", "class_id", "class_name", "confidence", "x1", "y1", "x2", "y2"]
    expected = YOLO(str(best_local)).predict(str(image), conf=0.001, imgsz=64, verbose=False)[0]
    assert len(got) == len(expected.boxes)
    if len(got):
        assert set(got["class_name"]) <= {"square", "bar"}
        assert sorted(got["confidence"].round(4)) == sorted(round(float(c), 4) for c in expected.boxes.conf)


def test_register_refuses_a_metric_no_run_has(tmp_path):
    import mlflow

    from bridge.errors import ConfigError
    from bridge.yolo.champion import register_champion

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("empty")
    run = client.create_run(exp, tags={"bridge.tracker": "bridge.yolo"})
    client.set_terminated(run.info.run_id)
    with pytest.raises(ConfigError, match="val/best/nonexistent"):
        register_champion("empty", "m", metric="val/best/nonexistent", tracking_uri=uri)
    assert mlflow.get_tracking_uri() != uri  # the caller's MLflow set-up is left alone
