"""Training-thread time spent in bridge.yolo's callbacks per epoch, against Ultralytics' built-in MLflow callback.

Both variants train the same tiny YOLOv8n (from YAML, generated dataset, CPU) into the same tracking server;
only the callback functions are timed (each wrapped), so Ultralytics' own work is excluded. For bridge the
console tee's writes (progress bars, log lines) are counted too, since they also run on the training thread.

    python benchmarks/bench_yolo_callbacks.py [--epochs 5] [--backend plain|bridge|both]

`plain`: a local `mlflow server` over HTTP; `bridge`: `bridge serve --tunnel none` reached via bridge.connect().
Each variant runs in its own process (the built-in callback calls mlflow.autolog(), a global switch), through
a counting proxy: the HTTP requests each variant sent are printed too (ngrok's free plan allows 20,000 a month).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PER_EPOCH_EVENTS = ("on_train_epoch_start", "on_train_epoch_end", "on_fit_epoch_end", "on_model_save")


def _prepare_env(work: Path) -> dict[str, str]:
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
        "MLFLOW_EXPERIMENT_NAME": "bench-yolo-callbacks",
        "PYTHONPATH": str(REPO),
    }


class Timings:
    """Seconds spent per event, the final_eval call of on_fit_epoch_end counted apart."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.per_event: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.per_epoch_calls: dict[int, float] = defaultdict(float)  # epoch -> seconds in per-epoch events

    def wrap(self, event: str, fn):
        def timed(trainer):
            t0 = time.perf_counter()
            try:
                return fn(trainer)
            finally:
                self.calls[event] += 1
                key = event
                if event == "on_fit_epoch_end" and self.calls[event] > self.epochs:
                    key = "final_eval"
                elapsed = time.perf_counter() - t0
                self.per_event[key] += elapsed
                if key in PER_EPOCH_EVENTS:
                    self.per_epoch_calls[getattr(trainer, "epoch", -1) + 1] += elapsed

        return timed


def _child(variant: str, tracking: str, data: str, epochs: int, project: str) -> dict:
    """Train once with one variant's callbacks timed; print the timings as JSON."""
    import mlflow

    if tracking.startswith("bridge:"):
        import bridge

        url, token = tracking[len("bridge:") :].split("|", 1)
        conn = bridge.connect(url=url, token=token)
    else:
        conn = None
        mlflow.set_tracking_uri(tracking)
    from ultralytics import YOLO

    timings = Timings(epochs)
    tee_time = [0.0]
    model = YOLO("yolov8n.yaml")
    if variant == "bridge":
        import bridge.yolo
        from bridge.yolo import console as console_mod

        tracker = bridge.yolo.track(model, experiment="bench-yolo-callbacks", run_name="bridge")
        for event, fn in tracker.callbacks.items():
            lst = model.callbacks[event]
            lst[lst.index(fn)] = timings.wrap(event, fn)
        original_write = console_mod.ConsoleLog.write

        def timed_write(self, text):
            t0 = time.perf_counter()
            try:
                return original_write(self, text)
            finally:
                tee_time[0] += time.perf_counter() - t0

        console_mod.ConsoleLog.write = timed_write
    else:
        from ultralytics.utils import SETTINGS
        from ultralytics.utils.callbacks import mlflow as builtin

        assert SETTINGS["mlflow"], "Ultralytics' MLflow integration is switched off in its settings"
        os.environ["MLFLOW_RUN"] = "builtin"
        for event, fn in list(builtin.callbacks.items()):
            builtin.callbacks[event] = timings.wrap(event, fn)
    t0 = time.perf_counter()
    model.train(
        data=data,
        epochs=epochs,
        imgsz=64,
        batch=4,
        nbs=4,
        workers=0,
        device="cpu",
        project=project,
        name=variant,
        exist_ok=True,
        plots=True,
        verbose=True,
    )
    wall = time.perf_counter() - t0
    # A variant that failed to track would time nothing: refuse to report it.
    if variant == "bridge":
        if tracker.run_id is None or tracker.report.failures:
            raise SystemExit(f"bridge.yolo did not track: failures {sorted(tracker.report.failures)}")
    elif not getattr(model.trainer, "_mlflow_active", False):
        raise SystemExit("Ultralytics' MLflow callback did not track (see its warnings above)")
    if conn is not None:
        left = conn.flush(120)
        if left:
            raise SystemExit(f"{left} journal entries were not delivered")
    per_epoch = sum(v for k, v in timings.per_event.items() if k in PER_EPOCH_EVENTS)
    once = sum(v for k, v in timings.per_event.items() if k not in PER_EPOCH_EVENTS)
    return {
        "variant": variant,
        "epochs": epochs,
        "wall_s": wall,
        "per_epoch_ms": 1000 * (per_epoch + tee_time[0]) / epochs,
        "callbacks_per_epoch_ms": 1000 * per_epoch / epochs,
        "tee_per_epoch_ms": 1000 * tee_time[0] / epochs,
        "once_ms": 1000 * once,
        "events_ms": {k: 1000 * v for k, v in timings.per_event.items()},
        "by_epoch_ms": {e: round(1000 * v, 3) for e, v in sorted(timings.per_epoch_calls.items())},
    }


def _run_variant(variant: str, tracking: str, data: Path, epochs: int, work: Path, env: dict) -> dict:
    env = {k: v.replace("{variant}", variant) for k, v in env.items()}  # one journal per variant
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            variant,
            "--tracking",
            tracking,
            "--data",
            str(data),
            "--epochs",
            str(epochs),
            "--project",
            str(work / "runs"),
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    raise RuntimeError(f"{variant} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def _plain_server(work: Path, env: dict):
    sys.path.insert(0, str(REPO))
    from tests.support.mlflow_server import PlainMlflowServer, free_port

    root = work / "mlflow"
    root.mkdir()
    server = PlainMlflowServer(root=root, port=free_port(), backend_store_uri=f"sqlite:///{root / 'mlflow.db'}")
    server.start()
    return server


def _bridge_server(work: Path):
    sys.path.insert(0, str(REPO))
    from bridge.serve.child import ServeChild

    server = ServeChild(home=work / "bridge-home", args=["--tunnel", "none"])
    server.start()
    return server


def _requests_by_endpoint(proxy) -> Counter[str]:
    """What went through the counting proxy, by method and path (artifact paths folded into one)."""
    seen: Counter[str] = Counter()
    for (_, line), n in proxy.lines.items():
        method, _, path = line.partition(" ")
        if "/mlflow-artifacts/" in path:
            path = "artifacts"
        seen[f"{method} {path.replace('/api/2.0/mlflow/', '').replace('/ajax-api/2.0/mlflow/', '')}"] += n
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--backend", choices=("plain", "bridge", "both"), default="both")
    parser.add_argument("--child")
    parser.add_argument("--tracking")
    parser.add_argument("--data")
    parser.add_argument("--project")
    args = parser.parse_args()
    if args.child:
        result = _child(args.child, args.tracking, args.data, args.epochs, args.project)
        print("BENCH " + json.dumps(result), flush=True)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-yolo-"))
    env = _prepare_env(work)
    os.environ.update(env)
    sys.path.insert(0, str(REPO))
    from bridge.yolo.dataset import make_synthetic_dataset

    data = make_synthetic_dataset(work / "data", n_train=16, n_val=8, imgsz=64, seed=1)
    backends = ["plain", "bridge"] if args.backend == "both" else [args.backend]
    print(f"bench_yolo_callbacks: yolov8n.yaml, {args.epochs} epochs, imgsz 64, 16 train / 8 val images, CPU")
    try:
        for backend in backends:
            from tests.support.flaky_proxy import FlakyProxy

            if backend == "plain":
                server = _plain_server(work, env)
                proxy = FlakyProxy("127.0.0.1", server.port)
                tracking = proxy.url
            else:
                server = _bridge_server(work)
                proxy = FlakyProxy("127.0.0.1", server.entrance_port)
                tracking = f"bridge:{proxy.url}|{server.token()}"
                env = {**env, "BRIDGE_JOURNAL": str(work / "journal-{variant}.sqlite")}
            results, sent = {}, {}
            try:
                for v in ("builtin", "bridge"):
                    proxy.reset_counts()
                    results[v] = _run_variant(v, tracking, data, args.epochs, work, env)
                    sent[v] = _requests_by_endpoint(proxy)
            finally:
                proxy.close()
                server.stop()
            b, u = results["bridge"], results["builtin"]
            print(f"\n[{backend}] training-thread time in tracking callbacks, per epoch (ms/epoch):")
            print(f"  ultralytics built-in mlflow : {u['per_epoch_ms']:8.3f}   once per run: {u['once_ms']:8.1f} ms")
            print(
                f"  bridge.yolo                 : {b['per_epoch_ms']:8.3f}   once per run: {b['once_ms']:8.1f} ms"
                f"   (callbacks {b['callbacks_per_epoch_ms']:.3f} + console tee {b['tee_per_epoch_ms']:.3f})"
            )
            ratio = b["per_epoch_ms"] / u["per_epoch_ms"] if u["per_epoch_ms"] else float("inf")
            print(
                f"  ratio bridge / built-in     : {ratio:8.3f}   goal: <= 5 ms/epoch and < 1.0 -> "
                f"{'OK' if b['per_epoch_ms'] <= 5 and ratio < 1 else 'MISSED'}"
            )
            print(
                f"  events (ms, whole run): builtin {json.dumps({k: round(v, 2) for k, v in u['events_ms'].items()})}"
            )
            print(
                f"                          bridge  {json.dumps({k: round(v, 2) for k, v in b['events_ms'].items()})}"
            )
            print(f"  callbacks per epoch (ms): builtin {u['by_epoch_ms']}")
            print(f"                            bridge  {b['by_epoch_ms']}")
            for v, label in (("builtin", "built-in"), ("bridge", "bridge  ")):
                total = sum(sent[v].values())
                top = ", ".join(f"{k} x{n}" for k, n in sent[v].most_common(6))
                print(
                    f"  HTTP requests, {label}: {total:5d} ({total / args.epochs:.1f} per epoch, "
                    f"{results[v]['wall_s']:.0f} s of training): {top}"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
