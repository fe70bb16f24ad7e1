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
import os
import statistics
import sys
import time
from pathlib import Path

from _common import (
    child_env,
    client_argument_parser,
    connect_client,
    lean_server_caption,
    percentile,
    print_table,
    report_result,
    run_child,
    scratch_dir,
    server_points,
    start_lean_mlflow_server,
    verdict,
)

GOAL_P50_US = 20.0
GOAL_RATIO_VS_SYNC = 100.0


# ------------------------------------------------------------------------------------------ child side


def _child(variant: str, url: str, journal: str, n: int, warmup: int) -> dict:
    import mlflow

    experiment = f"bench-log-call-{variant}-{os.getpid()}"
    conn = connect_client(variant, url, experiment, journal, async_logging=variant == "mlflow-async")
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
    return {
        "variant": variant,
        "n": n,
        "p50": percentile(timings, 50),
        "p99": percentile(timings, 99),
        "mean": statistics.fmean(timings),
        "over_1ms": sum(t > 1000 for t in timings),
        "left": left,
        "settle_s": settle_s,
        "run_id": run.info.run_id,
        "experiment": experiment,
    }


# ----------------------------------------------------------------------------------------- parent side


def _run_variant(variant: str, url: str, n: int, warmup: int, work: Path) -> dict:
    home = work / f"home-{variant}"
    home.mkdir()
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--url",
        url,
        "--journal",
        str(work / f"{variant}.sqlite"),
        "-n",
        str(n),
        "--warmup",
        str(warmup),
    ]
    return run_child(cmd, child_env(home), variant, timeout_s=600)


def main() -> int:
    parser = client_argument_parser(__doc__.splitlines()[0], "fewer calls (a smoke run, about 40 s)")
    parser.add_argument("-n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        report_result(_child(args.child, args.url, args.journal, args.n, args.warmup))
        return 0

    counts = (
        {"bridge": 5_000, "mlflow-sync": 200, "mlflow-async": 2_000}
        if args.quick
        else {"bridge": 20_000, "mlflow-sync": 1_000, "mlflow-async": 5_000}
    )
    warmup = 50 if args.quick else 200
    work = scratch_dir("log-call")
    server = start_lean_mlflow_server(work / "server")
    try:
        results = {v: _run_variant(v, server.url, n, warmup, work) for v, n in counts.items()}
        stored = {v: server_points(server, r["experiment"]) for v, r in results.items()}
    finally:
        server.stop()

    bridge_p50 = results["bridge"]["p50"]
    rows = [
        (
            v,
            r["n"],
            f"{r['p50']:.1f}",
            f"{r['p99']:.1f}",
            f"{r['mean']:.1f}",
            f"{r['over_1ms'] / r['n']:.2%}",
            f"{r['p50'] / bridge_p50:.0f}x",
            f"{stored[v]}/{r['n']}",
        )
        for v, r in results.items()
    ]
    print_table(
        f"One mlflow.log_metric on the training thread, µs — {lean_server_caption(args.quick)}",
        ["variant", "calls", "p50", "p99", "mean", "calls > 1 ms", "p50 vs bridge", "timed points on server"],
        rows,
    )
    ratio = results["mlflow-sync"]["p50"] / bridge_p50
    ok_p50 = bridge_p50 <= GOAL_P50_US
    ok_ratio = ratio >= GOAL_RATIO_VS_SYNC
    delivered = all(stored[v] == results[v]["n"] for v in results)
    print(
        f"bridge p50 {bridge_p50:.1f} µs (goal <= {GOAL_P50_US:.0f}): {verdict(ok_p50)}; "
        f"MLflow sync p50 / bridge p50 = {ratio:.0f}x (goal >= {GOAL_RATIO_VS_SYNC:.0f}x): {verdict(ok_ratio)}; "
        f"every timed point reached the server: {'yes' if delivered else 'NO'}"
    )
    return 0 if ok_p50 and ok_ratio and delivered else 1


if __name__ == "__main__":
    sys.exit(main())
