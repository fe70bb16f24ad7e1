"""A Colab runtime dies mid-training with its journal on Google Drive; a new runtime restores from what Drive
kept — each file as it was at its own moment — and the resumed YOLO run holds everything once (issue 18).

Runtime 1 trains through `bridge.yolo.train` with its journal asked to live on a folder the mount table
(`BRIDGE_MOUNTS_FILE`) calls Google Drive, so the journal runs on local disk and keeps its replica there. The
server cannot be reached: everything waits in the journal. Once epoch 2 is journaled and in the replica, Drive
is taken to have caught up with the folder; the training goes on into epoch 3 (system metrics, replica
snapshots every 0.1 s) while a copier takes each file of the journal folder again at its own random moments;
then the test kills runtime 1 with SIGKILL. The Drive folder a new runtime finds is that copy (the journal
folder torn file by file, the save directory as the kill left it), at the same path, with a fresh local disk.
Runtime 2 resumes the training against a real MLflow server; the server must hold one FINISHED run with every
epoch's metrics once per step, its params, and the weights byte-equal to the local ones.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from bridge.yolo.callbacks import metric_name
from tests.support.mlflow_server import closed_url
from tests.support.torn import JOURNAL, DriveCopier, holdings, write_copy
from tests.support.yolo import tiny_train_args

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
KILL_IN_EPOCH = 3  # counted from 1: epochs 1 and 2 are journaled before the kill

SCRIPT = r"""
import json, os, sys, time
import bridge, bridge.yolo
from ultralytics import YOLO

cfg = json.loads(sys.argv[1])
conn = bridge.connect(cfg["url"], token=None, journal=cfg["journal"], probe_timeout=2, flush_at_exit=0)
print("LOCAL", conn.journal.path, "REPLICA", conn.journal_path, flush=True)
model = YOLO("yolov8n.yaml")
if cfg["kill_in_epoch"]:
    batches = [0]

    def window(trainer):  # epoch 2 is journaled and in the replica: say so, then go on slowly until killed
        if trainer.epoch + 1 != cfg["kill_in_epoch"]:
            return
        batches[0] += 1
        if batches[0] == 1:
            tracker = model.__dict__["_bridge_tracker"]
            deadline = time.monotonic() + 60
            while not (tracker._sampler and tracker._sampler.logged) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert tracker._worker.drain(60)
            assert conn.replica is not None and conn.replica.snapshot_now(), "the journal runs with a replica"
            with open(cfg["marker"], "w") as f:
                f.write("journaled")
            print("WINDOW", flush=True)
        time.sleep(0.4 if batches[0] < 3 else 120)  # the test kills this process meanwhile

    model.add_callback("on_train_batch_end", window)
tracker = bridge.yolo.train(model, data=cfg["data"], experiment=cfg["experiment"], resume=cfg["resume"],
                            system_metrics_every_s=0.5, **cfg["args"])
print("RUN", tracker.run_id, flush=True)
left = conn.flush(120)
print("LEFT", left, "DEAD", conn.status().dead_letters, flush=True)
"""


def _env(tmp_path: Path, home: str, mounts: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "MLFLOW_REGISTRY", "BRIDGE_"))}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "BRIDGE_HOME": str(tmp_path / home),  # the runtime's local disk
            "BRIDGE_MOUNTS_FILE": str(mounts),
            "BRIDGE_REPLICA_EVERY_S": "0.1",
            "BRIDGE_SEND_INTERVAL_S": "0.05",
            "BRIDGE_DURABLE_EVERY_S": "0.1",
        }
    )
    return env


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", [1, 2])
def test_a_runtime_lost_mid_training_resumes_from_a_torn_drive_copy_with_everything_once(
    seed, mlflow_server, yolo_dataset, tmp_path
):
    rng = random.Random(seed)
    drive = tmp_path / "content-drive"  # stands for /content/drive: the same path in both runtimes
    mounts = tmp_path / "mounts"
    mounts.write_text(f"overlay / overlay rw 0 0\ndrive {drive} fuse.drive rw,nosuid,nodev 0 0\n")
    journal_dir = drive / "bridge"
    journal = journal_dir / JOURNAL
    project = drive / "runs"
    save_dir = project / "y8"
    script = tmp_path / "train_on_colab.py"
    script.write_text(SCRIPT)
    marker = tmp_path / "epoch-2-journaled"
    experiment = f"runtime-loss-{seed}-{uuid.uuid4().hex[:6]}"
    cfg = {
        "data": str(yolo_dataset),
        "experiment": experiment,
        "journal": str(journal),
        "marker": str(marker),
        "args": {**tiny_train_args(project, epochs=EPOCHS), "name": "y8", "plots": False},
    }

    # Runtime 1: offline, killed in epoch 3 while Drive uploads the journal folder file by file.
    first = subprocess.Popen(
        [
            sys.executable,
            str(script),
            json.dumps({**cfg, "url": closed_url(), "resume": False, "kill_in_epoch": KILL_IN_EPOCH}),
        ],
        env=_env(tmp_path, "runtime1", mounts),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    copier = DriveCopier(journal_dir, rng, tick_s=0.02, window_s=1.5)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), "runtime 1 never journaled epoch 2"
        copier.start()
        time.sleep(rng.uniform(0.3, 1.5))  # the training goes on; Drive uploads at its own pace
    finally:
        first.send_signal(signal.SIGKILL)
        out_first = first.communicate(timeout=60)[0]
    torn = copier.stop()
    print(f"seed {seed}: tear {sorted(torn.kinds)} over {copier.ticks} ticks; taken at {torn.taken_at}")
    assert first.returncode == -signal.SIGKILL, out_first[-3000:]
    finished = [line for line in out_first.splitlines() if line.startswith("RUN ")]
    assert "WINDOW" in out_first and not finished, out_first[-3000:]
    assert "network filesystem (fuse.drive)" in out_first, out_first[-3000:]
    assert not (journal_dir / (JOURNAL + "-wal")).exists(), "SQLite never ran on Drive"
    assert copier.ticks > 5
    with open(save_dir / "results.csv") as f:
        assert [int(float(r["epoch"])) for r in csv.DictReader(f)] == list(range(1, KILL_IN_EPOCH))

    # What the new runtime finds on Drive: the torn journal folder, the save directory as it was at the kill.
    dead = tmp_path / "dead-runtime-drive"
    drive.rename(dead)
    write_copy(torn, journal_dir)
    shutil.copytree(dead / "runs", project)
    held = holdings(journal)  # what the whole parts of the copy hold: all of it must arrive
    assert held.points and held.params, "the copy holds what runtime 1 journaled"

    # Runtime 2: a fresh local disk, the server up; the same call with resume=True.
    second = subprocess.run(
        [
            sys.executable,
            str(script),
            json.dumps({**cfg, "url": mlflow_server.url, "resume": True, "kill_in_epoch": 0}),
        ],
        env=_env(tmp_path, "runtime2", mounts),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = second.stdout + second.stderr
    context = f"seed {seed}, tear {sorted(torn.kinds)}:\n{out[-4000:]}"
    assert second.returncode == 0, context
    assert "(restored from there)" in out, context
    assert "LEFT 0 DEAD 0" in out, context

    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, context
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, ([(r.info.run_name, r.info.status) for r in runs], context)
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "FINISHED", context
    tags = run.data.tags
    assert tags["bridge.resume.count"] == "1" and tags["bridge.resume.1.from_epoch"] == str(KILL_IN_EPOCH)
    assert run.data.params["epochs"] == str(EPOCHS) and run.data.params["batch"] == "4", run.data.params

    with open(save_dir / "results.csv") as f:
        local = list(csv.DictReader(f))
    assert [int(float(r["epoch"])) for r in local] == list(range(1, EPOCHS + 1))
    for col in (c for c in local[0] if c not in ("epoch", "time")):
        history = client.get_metric_history(run.info.run_id, metric_name(col))
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), (col, history, context)
        by_step = {m.step: m.value for m in history}
        for row in local:
            assert by_step[int(float(row["epoch"]))] == pytest.approx(float(row[col]), rel=1e-4, abs=1e-6), col
    on_server = {
        (run.info.run_name, m.step, m.value)
        for key in run.data.metrics
        for m in client.get_metric_history(run.info.run_id, key)
    }
    assert {name for name, _step, _value in held.points} == {run.info.run_name}
    assert held.points <= on_server, (sorted(held.points - on_server)[:20], context)
    assert {key for _name, key in held.params} <= set(run.data.params), context
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    steps = [m.step for m in cpu]
    assert len(steps) >= 2 and len(set(steps)) == len(steps), (steps, context)

    weights = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "weights")}
    assert {"best.pt", "last.pt"} <= weights, weights
    dl = tmp_path / "dl"
    for name in weights:
        remote = Path(client.download_artifacts(run.info.run_id, f"weights/{name}", dst_path=str(dl)))
        assert _sha(remote) == _sha(save_dir / "weights" / name), name
