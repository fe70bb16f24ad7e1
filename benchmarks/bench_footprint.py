"""Footprint and latency: bridge's embedded default vs a stock `mlflow server --backend-store-uri sqlite:///…`.

    python benchmarks/bench_footprint.py [--quick] [--calls 200]

bridge: `bridge serve --tunnel none` (its MLflow child and the entrance, which runs inside the bridge process).
Anchor, measured in the same run: `mlflow server --backend-store-uri sqlite:///…` with MLflow's own defaults,
as a user starts it (4 uvicorn workers, the job runner and its huey consumers). Both run side by side; for each:
total RSS and process count of the whole process tree once start-up has settled (and again after the calls),
and the latency of `MlflowClient.log_metric` straight to the local MLflow port (the calls alternate between
the two servers, so both see the same background load).
Goals: bridge <= 600 MB RSS and log_metric p50 <= 10 ms (stock: ~3 GB and ~52 ms).
"""

from __future__ import annotations

import time

import psutil
from _common import (
    BridgeServe,
    MlflowServer,
    argument_parser,
    machine_summary,
    mib,
    percentile,
    print_table,
    scratch_dir,
    tree_memory,
    verdict,
    wait_memory_settled,
)  # fmt: skip
from mlflow import MlflowClient

GOAL_RSS_BYTES = 600 * 10**6
GOAL_P50_MS = 10.0
WARMUP_CALLS = 10


def main() -> int:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="log_metric calls per server (default 200)")
    args = parser.parse_args()
    calls = 50 if args.quick else args.calls
    work = scratch_dir("footprint")
    print(f"Machine: {machine_summary()}")

    bridge = BridgeServe(work / "bridge-home", args=["--tunnel", "none"])
    stock = MlflowServer(work / "stock")
    bridge.launch()
    stock.start()
    try:
        bridge.wait_ready()
        stock_start_s = stock.wait_healthy()
        print(f"  both up (stock /health after {stock_start_s:.1f} s); waiting for memory to settle…", flush=True)
        idle = {
            "bridge": wait_memory_settled(bridge.proc.pid, quiet_s=5.0, timeout_s=90.0),
            "stock": wait_memory_settled(stock.proc.pid, quiet_s=5.0, timeout_s=90.0),
        }

        clients = {"bridge": MlflowClient(bridge.mlflow_url), "stock": MlflowClient(stock.url)}
        runs = {}
        for name, client in clients.items():
            runs[name] = client.create_run(client.create_experiment("bench-footprint")).info.run_id
            for i in range(WARMUP_CALLS):
                client.log_metric(runs[name], "warmup", float(i), step=i)
        latencies: dict[str, list[float]] = {"bridge": [], "stock": []}
        for i in range(calls):
            order = ("bridge", "stock") if i % 2 == 0 else ("stock", "bridge")
            for name in order:
                t0 = time.perf_counter()
                clients[name].log_metric(runs[name], "loss", 1.0 / (i + 1), step=i)
                latencies[name].append(time.perf_counter() - t0)
        loaded = {"bridge": tree_memory(bridge.proc.pid), "stock": tree_memory(stock.proc.pid)}
        own_rss = psutil.Process(bridge.proc.pid).memory_info().rss  # entrance, supervisor, reaper
        for name, client in clients.items():  # every call arrived
            got = len(client.get_metric_history(runs[name], "loss"))
            if got != calls:
                raise RuntimeError(f"{name}: {got} of {calls} log_metric calls stored")
    finally:
        bridge.stop()
        stock.stop()

    p50 = {name: percentile(values, 50) * 1000 for name, values in latencies.items()}
    p99 = {name: percentile(values, 99) * 1000 for name, values in latencies.items()}
    rss_ok = idle["bridge"][0] <= GOAL_RSS_BYTES and loaded["bridge"][0] <= GOAL_RSS_BYTES
    p50_ok = p50["bridge"] <= GOAL_P50_MS
    print_table(
        f"Footprint and log_metric latency ({calls} calls each, alternating; RSS summed over the process tree)",
        ["server", "processes", "RSS idle", "RSS after calls", "log_metric p50 ms", "p99 ms", "mean ms"],
        [
            ["stock mlflow server (defaults)", idle["stock"][1], mib(idle["stock"][0]), mib(loaded["stock"][0]),
             f"{p50['stock']:.1f}", f"{p99['stock']:.1f}", f"{sum(latencies['stock']) / calls * 1000:.1f}"],
            ["bridge serve --tunnel none", idle["bridge"][1], mib(idle["bridge"][0]), mib(loaded["bridge"][0]),
             f"{p50['bridge']:.1f}", f"{p99['bridge']:.1f}", f"{sum(latencies['bridge']) / calls * 1000:.1f}"],
            ["ratio bridge/stock", f"{idle['bridge'][1] / idle['stock'][1]:.2f}",
             f"{idle['bridge'][0] / idle['stock'][0]:.2f}", f"{loaded['bridge'][0] / loaded['stock'][0]:.2f}",
             f"{p50['bridge'] / p50['stock']:.2f}", f"{p99['bridge'] / p99['stock']:.2f}",
             f"{sum(latencies['bridge']) / sum(latencies['stock']):.2f}"],
        ],
    )  # fmt: skip
    print(
        f"\nbridge's tree after the calls: bridge process (entrance, supervisor, reaper) {mib(own_rss)}, "
        f"MLflow child {mib(loaded['bridge'][0] - own_rss)}"
    )
    print(
        f"bridge RSS {mib(max(idle['bridge'][0], loaded['bridge'][0]))} (goal <= {GOAL_RSS_BYTES / 1e6:.0f} MB): "
        f"{verdict(rss_ok)}"
    )
    print(f"bridge log_metric p50 {p50['bridge']:.1f} ms (goal <= {GOAL_P50_MS:.0f} ms): {verdict(p50_ok)}")
    return 0 if rss_ok and p50_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
