"""Offline Ultralytics set-up for tests: a font-stocked YOLO_CONFIG_DIR, a synthetic dataset, tiny training args.

Ultralytics reads `YOLO_CONFIG_DIR` once, at import, and looks up Arial fonts there before trying to download
them (3 s lost offline) — so the folder is made and exported when this plugin loads, before any test imports it.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest


def _font_file() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


def _make_config_dir() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="yolo-config-"))
    atexit.register(shutil.rmtree, folder, True)
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        shutil.copy(_font_file(), folder / name)
    return folder


if "YOLO_CONFIG_DIR" not in os.environ or not (Path(os.environ["YOLO_CONFIG_DIR"]) / "Arial.ttf").exists():
    os.environ["YOLO_CONFIG_DIR"] = str(_make_config_dir())
os.environ["YOLO_OFFLINE"] = "1"

#: The three model families the issue names, built from YAML (no download).
MODEL_FAMILIES = {"yolov8n": "yolov8", "yolo11n": "yolo11", "yolo26n": "yolo26"}
#: Loss names each family's criterion reports (YOLO26 has l1_loss where the others have dfl_loss).
SWEEP_TAGS = {"team": "vision", "purpose": "test"}
SYNTH = {"n_train": 16, "n_val": 8, "imgsz": 64, "classes": ("square", "bar"), "seed": 7}


def tiny_train_args(project: Path, epochs: int = 2) -> dict:
    """The fastest real training Ultralytics does here: about 3 s of training per model on 2 CPU cores."""
    return {
        "epochs": epochs,
        "imgsz": 64,
        "batch": 4,
        "nbs": 4,
        "workers": 0,
        "device": "cpu",
        "project": str(project),
        "exist_ok": True,
        "plots": True,
        "amp": False,
        "verbose": True,
    }


def count_labels(data_yaml: Path) -> dict[str, dict]:
    """Ground truth for a generated dataset, counted straight from its files (independent of bridge's summary)."""
    root = data_yaml.parent
    out = {}
    for split in ("train", "val"):
        images = sorted((root / "images" / split).glob("*.png"))
        per_class = {0: 0, 1: 0}
        labelled = 0
        for img in images:
            lbl = root / "labels" / split / (img.stem + ".txt")
            lines = [ln for ln in lbl.read_text().splitlines() if ln.strip()] if lbl.exists() else []
            labelled += bool(lines)
            for ln in lines:
                per_class[int(ln.split()[0])] += 1
        out[split] = {
            "images": len(images),
            "labelled": labelled,
            "empty": len(images) - labelled,
            "per_class": per_class,
        }
    return out


@pytest.fixture(scope="session")
def yolo_dataset(tmp_path_factory) -> Path:
    """A generated detection dataset (16 train / 8 val images at 64 px, 2 classes, every 4th image empty)."""
    from bridge.yolo.dataset import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("yolo-data"), **SYNTH)


@dataclass
class TrainedSweep:
    """The outcome of one `bridge train` sweep: where it logged and where Ultralytics wrote its outputs."""

    experiment: str
    project: Path
    data: Path
    read_uri: str  # a plain MLflow URI the test reads the server through
    run_ids: dict[str, str]  # model name -> run id on the server
    output: str

    def save_dir(self, model: str) -> Path:
        return self.project / model


def bridge_cli() -> list[str]:
    """The installed `bridge` console script (so runs record a real source file), else the module entry."""
    script = Path(sys.executable).with_name("bridge")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from bridge.cli import main; main()"]


def run_bridge_train(
    models,
    data: Path,
    project: Path,
    experiment: str,
    *,
    env: dict[str, str],
    epochs: int = 2,
    extra: list[str] = (),
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """`bridge train` as a user runs it, with the tiny training settings; Ultralytics' own MLflow callback armed."""
    cmd = [
        *bridge_cli(),
        "train",
        *[arg for m in models for arg in ("--model", m)],
        "--data",
        str(data),
        "--epochs",
        str(epochs),
        "--imgsz",
        "64",
        "--batch",
        "4",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--project",
        str(project),
        "--experiment",
        experiment,
        "--arg",
        "nbs=4",
        "--arg",
        "amp=false",
        *[arg for k, v in SWEEP_TAGS.items() for arg in ("--tag", f"{k}={v}")],
        *extra,
    ]
    full_env = {**os.environ, "COLUMNS": "200", **env}
    # Ultralytics' MLflow callback stays silent under pytest unless the test name says 'test_mlflow':
    # arm it, so double logging would show if bridge failed to switch it off.
    full_env["PYTEST_CURRENT_TEST"] = full_env.get("PYTEST_CURRENT_TEST", "") + " test_mlflow"
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=Path.cwd())


def sweep_runs(read_uri: str, experiment: str) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(read_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} is not on the server"
    return {
        r.info.run_name: r.info.run_id
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("bridge.tracker") == "bridge.yolo"
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_complete_yolo_run(
    client, run_id: str, *, family: str, save_dir: Path, data_yaml: Path, epochs: int, user_tags: dict[str, str]
) -> None:
    """Everything the issue asks a tracked run to hold, checked against the local training outputs."""
    import csv
    import io
    import socket

    import torch
    import ultralytics

    from bridge.yolo.callbacks import metric_name
    from bridge.yolo.dataset import summarize_dataset

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags

    # params: trainer args + identity + dataset
    assert params["epochs"] == str(epochs) and params["imgsz"] == "64" and params["batch"] == "4"
    assert params["model.family"] == family and params["model.scale"] == "n" and params["model.task"] == "detect"
    assert int(params["model.parameters"]) > 1_000_000 and float(params["model.gflops"]) > 1
    assert params["data.name"] == "data" and params["data.nc"] == "2"
    assert params["data.classes"] == "['square', 'bar']"
    assert params["data.hash"] == summarize_dataset(data_yaml).content_hash
    assert_dataset_inputs(run, data_yaml)

    # metrics: every results.csv column, one point per epoch (steps 1..N), equal to Ultralytics' own numbers
    with open(save_dir / "results.csv") as f:
        local = list(csv.DictReader(f))
    assert [int(float(r["epoch"])) for r in local] == list(range(1, epochs + 1))
    columns = [c for c in local[0] if c not in ("epoch", "time")]
    per_epoch = {metric_name(c) for c in columns} | {"epoch_time_s"}
    final = {
        "val/best/precision",
        "val/best/recall",
        "val/best/mAP50",
        "val/best/mAP50-95",
        "val/best/epoch",
        "train_time_s",
    }
    system = {k for k in run.data.metrics if k.startswith("system/")}  # CPU/RAM averages, at the end at least
    assert "system/cpu_utilization_percentage" in system
    assert set(run.data.metrics) - system == per_epoch | final, "unexpected or missing metric keys (double logging?)"
    assert not any("(" in k or k.startswith("metrics/") for k in run.data.metrics)
    for col in columns:
        history = client.get_metric_history(run_id, metric_name(col))
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), col
        by_step = {m.step: m.value for m in history}
        for row in local:
            assert by_step[int(float(row["epoch"]))] == pytest.approx(float(row[col]), rel=1e-4, abs=1e-6), col
    for key in final:
        assert len(client.get_metric_history(run_id, key)) == 1, key
    loss_names = {c.split("/", 1)[1] for c in columns if c.startswith("train/")}
    assert loss_names == (
        {"box_loss", "cls_loss", "l1_loss"} if family == "yolo26" else {"box_loss", "cls_loss", "dfl_loss"}
    )

    # artifacts: bytes equal to the local files
    def download(path: str) -> bytes:
        local_path = client.download_artifacts(run_id, path, dst_path=str(save_dir.parent / f"dl-{run_id}"))
        return Path(local_path).read_bytes()

    assert sha256(download("weights/best.pt")) == sha256((save_dir / "weights" / "best.pt").read_bytes())
    assert sha256(download("weights/last.pt")) == sha256((save_dir / "weights" / "last.pt").read_bytes())
    assert download("results.csv") == (save_dir / "results.csv").read_bytes()
    assert download("args.yaml") == (save_dir / "args.yaml").read_bytes()
    assert download("data/data.yaml") == data_yaml.read_bytes()
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    local_plots = {f"plots/{p.name}" for p in save_dir.iterdir() if p.suffix in (".png", ".jpg")}
    assert plots == local_plots and "plots/results.png" in plots and "plots/confusion_matrix.png" in plots
    summary = list(csv.DictReader(io.StringIO(download("data/dataset_summary.csv").decode())))
    truth = count_labels(data_yaml)
    assert [r["split"] for r in summary] == ["train", "val"]
    for row in summary:
        t = truth[row["split"]]
        assert int(row["images"]) == t["images"]
        assert int(row["labelled_images"]) == t["labelled"] and int(row["empty_images"]) == t["empty"] > 0
        assert int(row["instances/square"]) == t["per_class"][0] and int(row["instances/bar"]) == t["per_class"][1]
        assert 0 < float(row["box_width_min"]) <= float(row["box_width_mean"]) <= float(row["box_width_max"]) <= 1
    console = download("console.log").decode()
    assert "\r" not in console and "\x1b" not in console
    for epoch in range(1, epochs + 1):
        assert sum(f"{epoch}/{epochs}" in line and "100%" in line for line in console.splitlines()) == 1, console

    # tags: metadata and the user's own
    assert tags["time.start"] <= tags["time.end"]
    assert tags["host"] == socket.gethostname() and tags["platform"] == "local"
    assert tags["version.ultralytics"] == ultralytics.__version__ and tags["version.torch"] == torch.__version__
    assert tags["gpu.name"] == "none" and tags["version.cuda"]
    assert tags["source.kind"] == "script" and tags["source.file"]
    assert tags["mlflow.source.name"] == "bridge train" and tags["mlflow.source.type"] == "LOCAL"  # not `bridge`
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path.cwd())
    if head.returncode == 0:
        assert tags["git.commit"] == head.stdout.strip() and tags["git.dirty"] in ("true", "false")
    for key, value in user_tags.items():
        assert tags[key] == value


def assert_dataset_inputs(run, data_yaml: Path) -> None:
    """The run's dataset inputs: `<data>/train` and `<data>/val`, once each, digest the content hash's head."""
    import json

    from bridge.yolo.dataset import DIGEST_CHARS, summarize_dataset

    content_hash = summarize_dataset(data_yaml).content_hash
    assert run.data.params["data.hash"] == content_hash
    seen = sorted(
        (d.dataset.name, d.dataset.digest, d.dataset.source_type, {t.key: t.value for t in d.tags})
        for d in run.inputs.dataset_inputs
    )
    digest = content_hash[:DIGEST_CHARS]
    name = data_yaml.stem
    assert seen == [
        (f"{name}/train", digest, "local", {"mlflow.data.context": "training"}),
        (f"{name}/val", digest, "local", {"mlflow.data.context": "validation"}),
    ], seen
    truth = count_labels(data_yaml)
    for d in run.inputs.dataset_inputs:
        split = d.dataset.name.rsplit("/", 1)[1]
        assert json.loads(d.dataset.source) == {"uri": str(data_yaml.parent.resolve() / "images" / split)}
        assert json.loads(d.dataset.profile)["images"] == truth[split]["images"]


def connect_env(serve, journal: Path) -> dict[str, str]:
    """What a user sets to reach `bridge serve` with bridge.connect(): its entrance URL and token, a journal."""
    return {
        "BRIDGE_URL": serve.entrance_url,
        "BRIDGE_TOKEN": serve.token(),
        "BRIDGE_JOURNAL": str(journal),
        "MLFLOW_TRACKING_URI": "",
    }


@pytest.fixture(scope="session")
def bridge_sweep(bridge_serve, yolo_dataset, tmp_path_factory) -> TrainedSweep:
    """yolov8n, yolo11n and yolo26n trained by `bridge train` through bridge.connect() into a real `bridge serve`."""
    from ultralytics.utils import SETTINGS

    assert SETTINGS["mlflow"] is True, "Ultralytics' MLflow callback must be on for 'nothing twice' to mean anything"
    root = tmp_path_factory.mktemp("bridge-sweep")
    env = connect_env(bridge_serve, root / "journal.sqlite")
    out = run_bridge_train(list(MODEL_FAMILIES), yolo_dataset, root / "runs", "yolo-e2e", env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # The UI port of `bridge serve` is plain MLflow on 127.0.0.1: the test reads what arrived there.
    return TrainedSweep(
        experiment="yolo-e2e",
        project=root / "runs",
        data=yolo_dataset,
        read_uri=bridge_serve.mlflow_url,
        run_ids=sweep_runs(bridge_serve.mlflow_url, "yolo-e2e"),
        output=out.stdout + out.stderr,
    )
