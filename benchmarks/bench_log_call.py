"""Training-thread cost of one `mlflow.log_metric`: bridge (after connect) vs stock MLflow sync and async.

All three log into the same local plain `mlflow server` (SQLite, --workers 1) on 127.0.0.1. Each variant runs in
its own process (MLflow's tracking URI and async switch are process-global); every call is timed on its own with
perf_counter_ns and the p50/p99 are taken over the timed calls, after a warm-up. Background threads (bridge's
sender, MLflow's async workers) run as they would in training, so their GIL use is part of the figure.

    python benchmarks/bench_log_call.py [--quick]

Goal (issue 3): bridge p50 <= 20 us and >= 100x below MLflow sync.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, MlflowServer, clean_env, machine_summary, percentile, print_table, scratch_dir, verdict

GOAL_P50_US = 20.0
GOAL_RATIO_VS_SYNC = 100.0


def child_env(home: Path) -> dict[str, str]:
    """A clean environment for a measured child: its own BRIDGE_HOME, no keyring, no inherited MLflow settings."""
    env = {k: v for k, v in clean_env().items() if not k.startswith(("MLFLOW_", "BRIDGE_"))}
    env.update({"PYTHONPATH": str(REPO), "BRIDGE_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true",
                "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring"})
    return env


# ------------------------------------------------------------------------------------------ child side

def _child(variant: str, url: str, journal: str, n: int, warmup: int) -> dict:
    import mlflow

    experiment = f"bench-log-call-{variant}-{os.getpid()}"
    conn = None
    if variant == "bridge":
        import bridge

        conn = bridge.connect(url=url, token="bench-token", experiment=experiment, journal=journal)
    else:
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment(experiment)
        mlflow.config.enable_async_logging(variant == "mlflow-async")
    run = mlflow.start_run(run_name=variant)
    for step in range(warmup):
        mlflow.log_metric("warmup", 1.0 / (step + 1), step=step)
    timings: list[float] = []
    clock = time.perf_counter_ns
    for step in range(n):
        t0 = clock()
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        timings.append((clock() - t0) / 1000)
    left = None
    started = time.monotonic()
    if conn is not None:
        left = conn.flush(120)
    elif variant == "mlflow-async":
        mlflow.flush_async_logging()
    settle_s = time.monotonic() - started
    mlflow.end_run()
    if conn is not None:
        left = conn.flush(60)
        conn.close()
    return {"variant": variant, "n": n, "p50": percentile(timings, 50), "p99": percentile(timings, 99),
            "mean": statistics.fmean(timings), "over_1ms": sum(t > 1000 for t in timings), "left": left,
            "settle_s": settle_s, "run_id": run.info.run_id, "experiment": experiment}


# ----------------------------------------------------------------------------------------- parent side

def _run_variant(variant: str, url: str, n: int, warmup: int, work: Path) -> dict:
    home = work / f"home-{variant}"
    home.mkdir()
    cmd = [sys.executable, __file__, "--child", variant, "--url", url, "--journal", str(work / f"{variant}.sqlite"),
           "-n", str(n), "--warmup", str(warmup)]
    proc = subprocess.run(cmd, env=child_env(home), capture_output=True, text=True, timeout=600, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{variant} child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _server_points(db: Path, experiment: str) -> int:
    """Points of metric 'loss' the server stored for `experiment`, read from its SQLite file."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("select count(*) from metrics m join runs r on m.run_uuid = r.run_uuid "
                            "join experiments e on r.experiment_id = e.experiment_id "
                            "where e.name = ? and m.key = 'loss'", (experiment,)).fetchone()[0]
    finally:
        conn.close()


def start_server(work: Path) -> MlflowServer:
    """The anchor: a local plain `mlflow server` (SQLite, one worker, no job execution) on 127.0.0.1."""
    server = MlflowServer(root=work / "server", args=["--workers", "1"],
                          env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    server.start()
    try:
        server.wait_healthy(120)
    except Exception:
        server.stop()
        raise
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (a smoke run, about 40 s)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--journal", help=argparse.SUPPRESS)
    parser.add_argument("-n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args.child, args.url, args.journal, args.n, args.warmup)), flush=True)
        return 0

    counts = ({"bridge": 5_000, "mlflow-sync": 200, "mlflow-async": 2_000} if args.quick
              else {"bridge": 20_000, "mlflow-sync": 1_000, "mlflow-async": 5_000})
    warmup = 50 if args.quick else 200
    work = scratch_dir("log-call")
    server = start_server(work)
    try:
        results = {v: _run_variant(v, server.url, n, warmup, work) for v, n in counts.items()}
        stored = {v: _server_points(server.root / "mlflow.db", r["experiment"]) for v, r in results.items()}
    finally:
        server.stop()

    bridge_p50 = results["bridge"]["p50"]
    rows = [(v, r["n"], f"{r['p50']:.1f}", f"{r['p99']:.1f}", f"{r['mean']:.1f}", f"{r['over_1ms'] / r['n']:.2%}",
             f"{r['p50'] / bridge_p50:.0f}x", f"{stored[v]}/{r['n']}") for v, r in results.items()]
    print_table(f"One mlflow.log_metric on the training thread, µs — plain mlflow server (SQLite, 1 worker) on "
                f"127.0.0.1{' [quick]' if args.quick else ''}; {machine_summary()}",
                ["variant", "calls", "p50", "p99", "mean", "calls > 1 ms", "p50 vs bridge", "timed points on server"],
                rows)
    ratio = results["mlflow-sync"]["p50"] / bridge_p50
    ok_p50 = bridge_p50 <= GOAL_P50_US
    ok_ratio = ratio >= GOAL_RATIO_VS_SYNC
    delivered = all(stored[v] == results[v]["n"] for v in results)
    print(f"bridge p50 {bridge_p50:.1f} µs (goal <= {GOAL_P50_US:.0f}): {verdict(ok_p50)}; "
          f"MLflow sync p50 / bridge p50 = {ratio:.0f}x (goal >= {GOAL_RATIO_VS_SYNC:.0f}x): {verdict(ok_ratio)}; "
          f"every timed point reached the server: {'yes' if delivered else 'NO'}")
    return 0 if ok_p50 and ok_ratio and delivered else 1


if __name__ == "__main__":
    sys.exit(main())
