"""Resume overhead and per-epoch callback cost with system metrics on.

1. Resume: a tiny YOLOv8n training (YAML, generated data, CPU) is killed with SIGKILL in its 3rd epoch, then
   resumed in a new process; timed from the resume call to the start of the first resumed epoch.
   Anchor: Ultralytics' own `YOLO(last.pt).train(resume=True)` without tracking. Bridge:
   `bridge.yolo.train(..., resume=True)` through bridge.connect() into `bridge serve --tunnel none` (finding
   the run, reopening it, the resume tags, the console prefix).
2. Callback cost: training-thread time in bridge.yolo's callbacks per epoch, system metrics sampled every
   second (the worst case; the default logs once a minute) against the same with system metrics off.

    python benchmarks/bench_resume.py [--repeats 2] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine_summary, median, print_table, scratch_dir  # noqa: E402

PER_EPOCH_EVENTS = ("on_train_epoch_end", "on_fit_epoch_end", "on_model_save")

CHILD = r"""
import json, os, signal, sys, time
cfg = json.loads(sys.argv[1])
from ultralytics import YOLO
from ultralytics.utils import SETTINGS
SETTINGS.update(mlflow=False)  # the anchor trains without any tracking; bridge keeps it out anyway
import bridge, bridge.yolo
conn = bridge.connect() if cfg["variant"] == "bridge" else None
args = dict(data=cfg["data"], epochs=cfg["epochs"], imgsz=64, batch=4, nbs=4, workers=0, device="cpu", amp=False,
            plots=False, verbose=False, project=cfg["project"], name="y8", exist_ok=True)
marks = {}

def first_epoch(trainer):
    marks.setdefault("epoch_start", time.perf_counter())

if cfg["phase"] == "kill":
    model = YOLO("yolov8n.yaml")
    if cfg["variant"] == "bridge":
        bridge.yolo.track(model, experiment="bench-resume")

    def die(trainer):
        if trainer.epoch == 2:
            if cfg["variant"] == "bridge":
                model.__dict__["_bridge_tracker"]._worker.drain(60)  # epoch 2 is journaled, as in a real run
            os.kill(os.getpid(), signal.SIGKILL)

    model.add_callback("on_train_batch_end", die)
    model.train(**args)
elif cfg["phase"] == "resume":
    # Every YOLO built from here on gets this callback (Ultralytics copies its default list per model).
    from ultralytics.utils.callbacks.base import default_callbacks
    default_callbacks["on_train_epoch_start"].append(first_epoch)
    t0 = time.perf_counter()
    if cfg["variant"] == "bridge":
        bridge.yolo.train("yolov8n.yaml", experiment="bench-resume", resume=True, **args)
    else:
        YOLO(os.path.join(cfg["project"], "y8", "weights", "last.pt")).train(resume=True, data=args["data"])
    print("RESUME_S", marks["epoch_start"] - t0, flush=True)
else:  # callback cost
    model = YOLO("yolov8n.yaml")
    tracker = bridge.yolo.track(model, experiment="bench-resume-callbacks", system_metrics=cfg["system_metrics"],
                                system_metrics_every_s=1.0)
    spent = {}
    for event, fn in tracker.callbacks.items():
        lst = model.callbacks[event]
        def timed(trainer, fn=fn, event=event):
            t = time.perf_counter()
            try:
                fn(trainer)
            finally:
                spent[event] = spent.get(event, 0.0) + time.perf_counter() - t
        lst[lst.index(fn)] = timed
    args["name"] = "cb"
    model.train(**args)
    per_epoch = sum(spent.get(e, 0.0) for e in %r) / cfg["epochs"]
    print("CALLBACK_MS", per_epoch * 1000, flush=True)
if conn is not None:
    conn.flush(120)
""" % (PER_EPOCH_EVENTS,)  # noqa: UP031 - a source template: its braces are code, so not str.format


def _env(work: Path) -> dict[str, str]:
    import matplotlib

    cfg = work / "yolo-config"
    cfg.mkdir(parents=True, exist_ok=True)
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        shutil.copy(font, cfg / name)
    return {
        "YOLO_CONFIG_DIR": str(cfg),
        "YOLO_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONPATH": str(REPO),
    }


def _child(script: Path, cfg: dict, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), json.dumps(cfg)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )


def _value(out: subprocess.CompletedProcess, key: str) -> float:
    for line in out.stdout.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[1])
    raise RuntimeError(f"no {key} in the child's output:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    opts = parser.parse_args()

    from bridge.serve.child import ServeChild
    from bridge.yolo.dataset import make_synthetic_dataset

    work = scratch_dir("bench-resume")
    env = _env(work)
    data = make_synthetic_dataset(work / "data", n_train=16, n_val=8, imgsz=64)
    script = work / "child.py"
    script.write_text(CHILD)
    server = ServeChild(home=work / "serve", args=["--tunnel", "none"])
    server.start()
    try:
        bridge_env = {
            **env,
            "BRIDGE_URL": server.entrance_url,
            "BRIDGE_TOKEN": server.token(),
            "BRIDGE_JOURNAL": str(work / "journal.sqlite"),
        }
        resume: dict[str, list[float]] = {"ultralytics": [], "bridge": []}
        for i in range(opts.repeats):
            for variant in ("ultralytics", "bridge"):
                project = work / f"{variant}-{i}"
                venv = bridge_env if variant == "bridge" else env
                base = {"variant": variant, "data": str(data), "epochs": opts.epochs, "project": str(project)}
                killed = _child(script, {**base, "phase": "kill"}, venv)
                if killed.returncode != -signal.SIGKILL:
                    raise RuntimeError(f"{variant}: the training was not killed:\n{killed.stderr[-3000:]}")
                resume[variant].append(_value(_child(script, {**base, "phase": "resume"}, venv), "RESUME_S"))
        cost: dict[str, float] = {}
        for label, on in (("system metrics off", False), ("system metrics on (1 s)", True)):
            cfg = {
                "variant": "bridge",
                "phase": "callbacks",
                "data": str(data),
                "epochs": opts.epochs,
                "project": str(work / "cb"),
                "system_metrics": on,
            }
            cost[label] = _value(_child(script, cfg, bridge_env), "CALLBACK_MS")
    finally:
        server.stop()

    print(machine_summary())
    anchor = median(resume["ultralytics"])
    ours = median(resume["bridge"])
    print_table(
        f"resume: train(resume=True) → first resumed epoch starts (median of {opts.repeats})",
        ["variant", "seconds", "runs", "vs anchor"],
        [
            [
                "Ultralytics' own resume, no tracking (anchor)",
                f"{anchor:.2f}",
                " ".join(f"{v:.2f}" for v in resume["ultralytics"]),
                "1.00×",
            ],
            [
                "bridge.yolo.train(resume=True) via bridge.connect()",
                f"{ours:.2f}",
                " ".join(f"{v:.2f}" for v in resume["bridge"]),
                f"{ours / anchor:.2f}× (+{ours - anchor:.2f} s)",
            ],
        ],
    )
    off = cost["system metrics off"]
    print_table(
        "bridge.yolo callback time on the training thread, per epoch",
        ["variant", "ms/epoch", "vs off", "goal ≤ 5 ms"],
        [[k, f"{v:.2f}", f"{v / off:.2f}×" if off else "-", "ok" if v <= 5 else "OVER"] for k, v in cost.items()],
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
