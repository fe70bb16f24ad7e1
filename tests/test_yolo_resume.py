"""A training killed with SIGKILL mid-epoch resumes, in a new process, into the same MLflow run.

The first process trains 5 epochs and kills itself (SIGKILL, no clean-up of any kind) two batches into
epoch 3, once epoch 2 is journaled; the disk keeps only what Colab would keep on Drive: the journal and the
save directory. A second process runs the same call with `resume=True`. The server must then hold one run,
epochs 1..5 once each for every metric, FINISHED, the resume tags, and best.pt byte-equal to the local one.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from mlflow import MlflowClient

from bridge.yolo.callbacks import metric_name
from tests.support.yolo import assert_dataset_inputs, connect_env, sha256, tiny_train_args

pytestmark = pytest.mark.slow

EPOCHS = 5
KILL_IN_EPOCH = 3  # counted from 1, as Ultralytics prints it

SCRIPT = r"""
import json, os, signal, sys, time
import bridge, bridge.yolo
from ultralytics import YOLO

cfg = json.loads(sys.argv[1])
conn = bridge.connect()
model = "yolov8n.yaml"
if cfg["kill_in_epoch"]:
    model = YOLO("yolov8n.yaml")
    batches = [0]

    def die(trainer):  # kill -9 ourselves mid-epoch, once the previous epoch is in the journal
        if trainer.epoch + 1 == cfg["kill_in_epoch"]:
            batches[0] += 1
            if batches[0] == 2:
                tracker = model.__dict__["_bridge_tracker"]
                # One system-metrics average journaled first: a kill loses what was sampled since the last one,
                # and a fast machine can reach this batch before the first (logged 1 s after the sampler starts).
                deadline = time.monotonic() + 60
                while not (tracker._sampler and tracker._sampler.logged) and time.monotonic() < deadline:
                    time.sleep(0.05)
                tracker._worker.drain(60)
                print("KILLING", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    model.add_callback("on_train_batch_end", die)
if cfg.get("hold_until"):  # each epoch starts only once the test has seen what it waits for (a file)
    from ultralytics.utils.callbacks.base import default_callbacks  # the callbacks every new YOLO() starts with

    def hold(trainer):
        deadline = time.monotonic() + 60
        while not os.path.exists(cfg["hold_until"]) and time.monotonic() < deadline:
            time.sleep(0.05)

    default_callbacks["on_train_epoch_start"].append(hold)
tracker = bridge.yolo.train(model, data=cfg["data"], experiment=cfg["experiment"], resume=cfg["resume"],
                            system_metrics_every_s=1.0, **cfg["args"])
print("RUN", tracker.run_id, flush=True)
left = conn.flush(120)
print("LEFT", left, flush=True)
"""


def _run(script: Path, cfg: dict, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), json.dumps(cfg)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=420,
        cwd=cwd,
    )


def _train_kill_resume(
    tmp_path: Path,
    yolo_dataset: Path,
    env_first: dict,
    env_second: dict,
    between=lambda: None,
    hold_until: Path | None = None,
) -> tuple[str, Path, subprocess.CompletedProcess]:
    experiment = f"resume-{uuid.uuid4().hex[:8]}"
    project = tmp_path / "drive" / "runs"  # stands for a Google Drive folder: kept across runtimes
    script = tmp_path / "train_on_colab.py"
    script.write_text(SCRIPT)
    args = {**tiny_train_args(project, epochs=EPOCHS), "name": "y8", "plots": False}
    cfg = {"data": str(yolo_dataset), "experiment": experiment, "args": args}
    first = _run(script, {**cfg, "resume": False, "kill_in_epoch": KILL_IN_EPOCH}, env_first, tmp_path)
    assert first.returncode == -signal.SIGKILL, first.stdout[-3000:] + first.stderr[-3000:]
    assert "KILLING" in first.stdout
    save_dir = project / "y8"
    with open(save_dir / "results.csv") as f:
        assert [int(float(r["epoch"])) for r in csv.DictReader(f)] == list(range(1, KILL_IN_EPOCH))
    between()
    second = _run(
        script,
        {**cfg, "resume": True, "kill_in_epoch": 0, "hold_until": hold_until and str(hold_until)},
        env_second,
        tmp_path,
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "LEFT 0" in second.stdout, second.stdout[-2000:]
    return experiment, save_dir, second


def _assert_one_resumed_run(read_uri: str, experiment: str, save_dir: Path, data_yaml: Path) -> None:
    client = MlflowClient(read_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None and exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [(r.info.run_name, r.info.status) for r in runs]
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["bridge.resume.count"] == "1"
    assert tags["bridge.resume.1.from_epoch"] == str(KILL_IN_EPOCH)
    assert tags["bridge.resume.1.epochs_lost"] == "1"
    assert tags["bridge.resume.1.previous_status"] in ("RUNNING", "KILLED")
    assert tags["bridge.resume.1.interrupted_after"] <= tags["bridge.resume.1.at"]
    assert tags["bridge.yolo.run_key"] == str(save_dir.resolve())
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"].endswith("train_on_colab.py")
    assert_dataset_inputs(run, data_yaml)  # logged by both processes, held once

    with open(save_dir / "results.csv") as f:
        local = list(csv.DictReader(f))
    assert [int(float(r["epoch"])) for r in local] == list(range(1, EPOCHS + 1))
    for col in (c for c in local[0] if c not in ("epoch", "time")):
        history = client.get_metric_history(run.info.run_id, metric_name(col))
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), (col, history)
        by_step = {m.step: m.value for m in history}
        for row in local:
            assert by_step[int(float(row["epoch"]))] == pytest.approx(float(row[col]), rel=1e-4, abs=1e-6), col
    # System metrics from both processes, the step being the second of the run: no step twice.
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    steps = sorted(m.step for m in cpu)
    assert len(steps) >= 2 and len(set(steps)) == len(steps), steps
    assert all(0 <= m.value <= 100 for m in cpu)
    resumed_ms = datetime.fromisoformat(tags["bridge.resume.1.at"]).timestamp() * 1000
    assert any(m.timestamp < resumed_ms for m in cpu) and any(m.timestamp > resumed_ms for m in cpu)

    dl = save_dir.parent / "dl"
    best = Path(client.download_artifacts(run.info.run_id, "weights/best.pt", dst_path=str(dl)))
    assert sha256(best.read_bytes()) == sha256((save_dir / "weights" / "best.pt").read_bytes())
    console = Path(client.download_artifacts(run.info.run_id, "console.log", dst_path=str(dl))).read_text()
    assert "---- bridge: resumed" in console
    before, _, after = console.partition("---- bridge: resumed")
    assert "1/5" in before and "5/5" in after, console[-2000:]


@pytest.mark.timeout(900)
def test_a_killed_training_resumes_into_the_same_run(bridge_serve, yolo_dataset, tmp_path):
    env = connect_env(bridge_serve, tmp_path / "drive" / "journal.sqlite")
    experiment, save_dir, _second = _train_kill_resume(tmp_path, yolo_dataset, env, env)
    _assert_one_resumed_run(bridge_serve.mlflow_url, experiment, save_dir, yolo_dataset)


@pytest.mark.timeout(900)
def test_resume_delivers_what_the_first_runtime_logged_while_the_server_was_unreachable(
    bridge_serve, yolo_dataset, tmp_path, make_flaky_proxy
):
    entrance = urlsplit(bridge_serve.entrance_url)
    proxy = make_flaky_proxy(entrance.hostname, entrance.port)
    proxy.set_mode("refuse")
    env = {**connect_env(bridge_serve, tmp_path / "drive" / "journal.sqlite"), "BRIDGE_URL": proxy.url}
    experiment, save_dir, _ = _train_kill_resume(
        tmp_path, yolo_dataset, env, env, between=lambda: proxy.set_mode("pass")
    )
    _assert_one_resumed_run(bridge_serve.mlflow_url, experiment, save_dir, yolo_dataset)


def test_resume_without_last_pt_starts_fresh_with_a_note(tmp_path, yolo_dataset, capfd):
    import mlflow

    import bridge.yolo

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        tracker = bridge.yolo.train(
            "yolov8n.yaml",
            data=yolo_dataset,
            experiment="fresh",
            resume=True,
            system_metrics=False,
            name="y8",
            **{**tiny_train_args(tmp_path / "runs", epochs=1), "plots": False},
        )
        assert "nothing to resume" in capfd.readouterr().err
        assert tracker.save_dir == tmp_path / "runs" / "y8"
        run = MlflowClient().get_run(tracker.run_id)
        assert run.info.status == "FINISHED" and "bridge.resume.count" not in run.data.tags
        # Finished now: resuming again trains nothing and names the same run.
        again = bridge.yolo.train(
            "yolov8n.yaml",
            data=yolo_dataset,
            experiment="fresh",
            resume=True,
            name="y8",
            **tiny_train_args(tmp_path / "runs", epochs=1),
        )
        assert "already finished" in capfd.readouterr().err
        assert again.run_id == tracker.run_id
        assert len(MlflowClient().search_runs([run.info.experiment_id])) == 1
    finally:
        mlflow.set_tracking_uri("")


def test_resume_needs_a_name():
    import bridge.yolo
    from bridge.errors import ConfigError

    with pytest.raises(ConfigError, match="name="):
        bridge.yolo.train("yolov8n.yaml", data="x.yaml", resume=True, project="/tmp/p")


@pytest.mark.timeout(900)
def test_a_run_reaped_after_the_kill_is_revived_by_the_resume_and_kept_alive(own_bridge_serve, yolo_dataset, tmp_path):
    """The server marks the dead runtime's run KILLED (no heartbeat); the resume makes it RUNNING again and its
    heartbeats keep it so until it ends FINISHED — the reaper never takes a resumed training."""
    import threading
    import time

    serve = own_bridge_serve("--heartbeat-timeout", "10", name="reaper")  # see test_yolo_e2e: not less than 10
    env = {**connect_env(serve, tmp_path / "drive" / "journal.sqlite"), "BRIDGE_HEARTBEAT_S": "0.5"}
    client = MlflowClient(serve.mlflow_url)
    seen: list[str] = []
    stop = threading.Event()
    seen_running = tmp_path / "seen-running"  # the resumed training's epochs wait for it: RUNNING is seen

    def only_run():
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        return runs[0] if len(runs) == 1 else None

    def reaped_then_watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not ((run := only_run()) and run.info.status == "KILLED"):
            time.sleep(0.5)
        assert run is not None and run.info.status == "KILLED", "the reaper never marked the dead run"

        def watch() -> None:
            while not stop.is_set():
                seen.append(client.get_run(run.info.run_id).info.status)
                if seen[-1] == "RUNNING":
                    seen_running.touch()
                stop.wait(0.5)

        threading.Thread(target=watch, daemon=True).start()

    try:
        experiment, save_dir, _ = _train_kill_resume(
            tmp_path, yolo_dataset, env, env, between=reaped_then_watch, hold_until=seen_running
        )
    finally:
        stop.set()
    revived = seen[seen.index("RUNNING") :] if "RUNNING" in seen else []
    assert revived and "KILLED" not in revived, seen
    run = client.get_run(only_run().info.run_id)
    assert run.data.tags["bridge.resume.1.previous_status"] == "KILLED"
    _assert_one_resumed_run(serve.mlflow_url, experiment, save_dir, yolo_dataset)
