"""bridge.yolo's callbacks on their own: names, console capture, failures, runs the caller owns.

The full content of a run per model family is checked end to end, through `bridge serve`, in test_yolo_e2e.py.
"""

from __future__ import annotations

import logging

import mlflow
import pytest
from mlflow import MlflowClient

from bridge.yolo.callbacks import best_name, legacy_name, metric_name, metric_value, model_identity
from bridge.yolo.console import ConsoleCapture, ConsoleLog
from tests.support.yolo import tiny_train_args


def test_metric_names_are_stable_and_mlflow_safe():
    assert metric_name("metrics/mAP50-95(B)") == "val/mAP50-95"
    assert metric_name("metrics/precision(B)") == "val/precision"
    assert metric_name("metrics/mAP50(M)") == "val/mAP50_mask"
    assert metric_name("metrics/recall(P)") == "val/recall_pose"
    assert metric_name("metrics/accuracy_top1") == "val/accuracy_top1"
    assert metric_name("train/l1_loss") == "train/l1_loss"
    assert metric_name("lr/pg0") == "lr_pg0"  # not a chart section before train and val
    assert best_name("metrics/mAP50-95(B)") == "val/best/mAP50-95" and best_name("fitness") == "val/best/fitness"
    assert legacy_name("val/best/mAP50-95") == "final/mAP50-95" and legacy_name("val/best/epoch") == "final/best_epoch"
    assert legacy_name("train_time_s") == "final/train_time_s" and legacy_name("lr_pg2") == "lr/pg2"
    assert legacy_name("val/mAP50") is None
    assert metric_value({"final/mAP50": 0.5}, "val/best/mAP50") == 0.5 and metric_value({}, "val/best/mAP50") is None
    assert metric_value({"val/best/mAP50": 0.7, "final/mAP50": 0.5}, "val/best/mAP50") == 0.7
    assert metric_name("odd(key)%") == "odd_key__"


@pytest.mark.parametrize(
    "name, family, scale",
    [
        ("yolov8n.yaml", "yolov8", "n"),
        ("yolo11s.pt", "yolo11", "s"),
        ("/x/yolo26m.yaml", "yolo26", "m"),
        ("yolov10x", "yolov10", "x"),
        ("yolo11n-seg.pt", "yolo11", "n"),
    ],
)
def test_model_family_and_scale_from_name(name, family, scale):
    ident = model_identity(name)
    assert (ident["model.family"], ident["model.scale"]) == (family, scale)


def test_model_identity_falls_back_to_the_name():
    assert model_identity("rtdetr-l.yaml", "l") == {"model.family": "rtdetr-l", "model.scale": "l"}


def test_console_log_collapses_progress_redraws():
    log = ConsoleLog()
    for chunk in [
        "Epoch 1/2\n",
        "\r\x1b[K  1/2 10%",
        "\r\x1b[K  1/2 50%",
        "\r\x1b[K  1/2 100%",
        "\n",
        "val all 0.5\r\n",
        "\x1b[1mbold\x1b[0m line\n",
        "partial",
    ]:
        log.write(chunk)
    assert log.text() == "Epoch 1/2\n  1/2 100%\nval all 0.5\nbold line\npartial"


def test_console_log_keeps_head_and_tail_when_bounded():
    log = ConsoleLog(max_lines=300)
    for i in range(1000):
        log.write(f"line {i}\n")
    lines = log.text().splitlines()
    assert lines[0] == "line 0" and lines[199] == "line 199" and lines[-1] == "line 999"
    assert lines[200] == "[... 700 lines dropped ...]" and len(lines) == 301


def test_console_capture_tees_and_restores(capsys):
    import sys

    logger = logging.getLogger("ultralytics")
    capture = ConsoleCapture()
    before = sys.stdout
    capture.start()
    print("hello\rworld")
    capture.stop()
    assert sys.stdout is before
    assert capture.log.text() == "world\n"
    assert "hello\rworld" in capsys.readouterr().out
    assert all(getattr(h, "stream", None) is not None for h in logger.handlers)


@pytest.mark.slow
def test_unusable_store_is_reported_once_and_training_finishes(yolo_dataset, tmp_path, caplog, monkeypatch):
    import bridge.yolo

    monkeypatch.chdir(tmp_path)

    mlflow.set_tracking_uri("nope://nowhere")  # MLflow has no store for this scheme: every call fails
    try:
        with caplog.at_level(logging.WARNING, logger="bridge.yolo"):
            tracker = bridge.yolo.train(
                "yolov8n.yaml", data=yolo_dataset, experiment="x", name="broken", **tiny_train_args(tmp_path, epochs=1)
            )
    finally:
        mlflow.set_tracking_uri("")
    assert (tracker.save_dir / "weights" / "best.pt").exists()
    assert tracker.run_id is None and tracker.report.failures == {"on_pretrain_routine_end"}
    warnings = [r for r in caplog.records if r.name == "bridge.yolo.callbacks"]
    assert len(warnings) == 1 and "on_pretrain_routine_end failed" in warnings[0].getMessage()


@pytest.mark.slow
def test_training_that_raises_ends_its_run_failed_with_what_it_logged(yolo_dataset, tmp_path, monkeypatch):
    from ultralytics import YOLO

    import bridge.yolo

    monkeypatch.chdir(tmp_path)  # a SQLite store keeps artifacts in ./mlruns

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    model = YOLO("yolov8n.yaml")
    tracker = bridge.yolo.track(model, experiment="failing", console=True)

    def explode(trainer):
        if trainer.epoch == 1:
            raise RuntimeError("boom in epoch 2")

    model.add_callback("on_train_epoch_end", explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            model.train(data=str(yolo_dataset), name="failing", **tiny_train_args(tmp_path, epochs=3))
    finally:
        tracker.detach()
        mlflow.set_tracking_uri("")
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.tags["bridge.status"] == "FAILED"
    assert [m.step for m in client.get_metric_history(tracker.run_id, "val/mAP50-95")] == [1]
    assert not any(k.startswith("val/best/") for k in run.data.metrics)
    assert "time.end" in run.data.tags
    assert "console.log" in {a.path for a in client.list_artifacts(tracker.run_id)}
    import sys

    assert type(sys.stdout).__name__ != "_Tee"  # the console capture was removed


@pytest.mark.slow
def test_an_active_run_of_the_caller_is_used_and_left_open(yolo_dataset, tmp_path, monkeypatch):
    import bridge.yolo

    monkeypatch.chdir(tmp_path)  # a SQLite store keeps artifacts in ./mlruns

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_name="mine") as mine:
            tracker = bridge.yolo.train(
                "yolov8n.yaml", data=yolo_dataset, name="inner", **tiny_train_args(tmp_path, epochs=1)
            )
            assert tracker.run_id == mine.info.run_id
            assert mlflow.active_run().info.run_id == mine.info.run_id
            assert MlflowClient(uri).get_run(mine.info.run_id).info.status == "RUNNING"
            mlflow.log_metric("mine", 1.0)
    finally:
        mlflow.set_tracking_uri("")
    run = MlflowClient(uri).get_run(mine.info.run_id)
    assert run.info.status == "FINISHED" and "val/mAP50-95" in run.data.metrics and "mine" in run.data.metrics
    assert len(MlflowClient(uri).search_runs([run.info.experiment_id])) == 1


def test_tracking_a_model_again_replaces_the_first_tracker():
    from ultralytics import YOLO

    import bridge.yolo

    model = YOLO("yolov8n.yaml")
    before = {event: len(fns) for event, fns in model.callbacks.items()}
    first = bridge.yolo.track(model)
    second = bridge.yolo.track(model)
    ours = [fn for fns in model.callbacks.values() for fn in fns if fn.__name__.startswith("bridge_")]
    assert len(ours) == 7 and all(fn in second.callbacks.values() for fn in ours)
    assert not any(fn in first.callbacks.values() for fn in ours)
    second.detach()
    assert {event: len(fns) for event, fns in model.callbacks.items()} == before


def test_an_earlier_experiment_gets_the_learning_view_and_a_changed_view_is_kept(tmp_path):
    from mlflow import MlflowClient

    from bridge import ui
    from bridge.yolo.callbacks import LEARNING_VIEW, learning_view_link, mark_training_experiment

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    view_tag = ui.SHARED_VIEW_TAG_PREFIX + LEARNING_VIEW
    old = client.create_experiment("made-by-an-earlier-bridge", artifact_location=str(tmp_path / "a"))
    assert "viewStateShareKey" not in learning_view_link("http://h:1", client.get_experiment(old))
    mark_training_experiment(client, old)
    tags = client.get_experiment(old).tags
    assert tags[ui.EXPERIMENT_KIND_TAG] == ui.MODEL_TRAINING_KIND and "Learning curves" in tags[view_tag]
    assert learning_view_link("http://h:1", client.get_experiment(old)).endswith(
        f"&compareRunsMode=CHART&viewStateShareKey={LEARNING_VIEW}"
    )
    client.set_experiment_tag(old, view_tag, '{"name": "mine"}')  # the user's own changes to the view
    mark_training_experiment(client, old)
    assert client.get_experiment(old).tags[view_tag] == '{"name": "mine"}'
