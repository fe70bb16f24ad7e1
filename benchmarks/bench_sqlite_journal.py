"""MLflow's SQLite in WAL mode (what `bridge serve` sets) vs MLflow's own rollback journal: log_metric and log_batch.

    python benchmarks/bench_sqlite_journal.py [--quick] [--calls 200] [--batches 40]

Two lean `mlflow server`s side by side (`--workers 1`, job execution off, as bridge runs it), each on its own
fresh SQLite file: one left as MLflow creates it (rollback journal), one switched to WAL first by
`bridge.serve.mlflow_process.enable_wal` (before MLflow builds its schema in it, as `bridge serve` does).
The requests alternate between the two, so background load hits both alike: `MlflowClient.log_metric`
(one metric) and raw 1000-metric `runs/log-batch` requests (what bridge's sender sends; a backlog drains at
the rate MLflow takes these). Shown, not judged: the anchor is the rollback-journal server.
"""

from __future__ import annotations

import json
import sqlite3
import time

import requests
from _common import MlflowServer, argument_parser, machine_summary, percentile, print_table, scratch_dir
from mlflow import MlflowClient

from bridge.serve.mlflow_process import enable_wal

METRICS_PER_BATCH = 1000
WARMUP = 5


def main() -> int:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="log_metric calls per server (default 200)")
    parser.add_argument("--batches", type=int, default=40, help="1000-metric log_batch requests per server")
    args = parser.parse_args()
    calls, batches = (40, 8) if args.quick else (args.calls, args.batches)
    work = scratch_dir("sqlite-journal")
    print(f"Machine: {machine_summary()}")

    lean = {"args": ["--workers", "1"], "env": {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}}
    servers = {"rollback": MlflowServer(work / "rollback", **lean), "wal": MlflowServer(work / "wal", **lean)}
    (work / "wal").mkdir(parents=True)
    if not enable_wal(work / "wal" / "mlflow.db"):
        raise RuntimeError("could not switch the WAL server's database to WAL")
    for server in servers.values():
        server.start()
    metric_s: dict[str, list[float]] = {name: [] for name in servers}
    batch_s: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for server in servers.values():
            server.wait_healthy()
        modes = {}
        for name, server in servers.items():
            with sqlite3.connect(server.root / "mlflow.db") as conn:
                modes[name] = conn.execute("PRAGMA journal_mode").fetchone()[0]
        print(f"  journal modes after MLflow's own schema set-up: {modes}", flush=True)
        clients = {name: MlflowClient(server.url) for name, server in servers.items()}
        sessions = {name: requests.Session() for name in servers}
        runs = {name: c.create_run(c.create_experiment("bench-journal")).info.run_id for name, c in clients.items()}
        for name, client in clients.items():
            for i in range(WARMUP):
                client.log_metric(runs[name], "warmup", float(i), step=i)

        for i in range(calls):
            for name in ("rollback", "wal") if i % 2 == 0 else ("wal", "rollback"):
                t0 = time.perf_counter()
                clients[name].log_metric(runs[name], "loss", 1.0 / (i + 1), step=i)
                metric_s[name].append(time.perf_counter() - t0)

        for b in range(-1, batches):  # batch -1 is an unmeasured warm-up
            now = int(time.time() * 1000)
            for name in ("rollback", "wal") if b % 2 == 0 else ("wal", "rollback"):
                body = json.dumps({"run_id": runs[name], "metrics": [
                    {"key": f"m{k % 10}", "value": float(k), "timestamp": now, "step": (b + 1) * 1000 + k}
                    for k in range(METRICS_PER_BATCH)]})  # fmt: skip
                t0 = time.perf_counter()
                resp = sessions[name].post(
                    servers[name].url + "/api/2.0/mlflow/runs/log-batch",
                    data=body,
                    headers={"Content-Type": "application/json"},
                    timeout=60,
                )
                elapsed = time.perf_counter() - t0
                resp.raise_for_status()
                if b >= 0:
                    batch_s[name].append(elapsed)
        for name, client in clients.items():
            got = len(client.get_metric_history(runs[name], "loss"))
            if got != calls:
                raise RuntimeError(f"{name}: {got} of {calls} log_metric calls stored")
    finally:
        for server in servers.values():
            server.stop()

    def row(name: str, label: str) -> list[str]:
        m, b = metric_s[name], batch_s[name]
        return [label, f"{percentile(m, 50) * 1000:.1f}", f"{percentile(m, 99) * 1000:.1f}",
                f"{percentile(b, 50) * 1000:.1f}", f"{percentile(b, 99) * 1000:.1f}",
                f"{METRICS_PER_BATCH / percentile(b, 50):,.0f}"]  # fmt: skip

    ratio = [
        "ratio WAL / rollback",
        "",
        "",
        "",
        "",
        "",
    ]
    ratio[1] = f"{percentile(metric_s['wal'], 50) / percentile(metric_s['rollback'], 50):.2f}"
    ratio[3] = f"{percentile(batch_s['wal'], 50) / percentile(batch_s['rollback'], 50):.2f}"
    print_table(
        f"MLflow on SQLite: {calls} log_metric calls and {batches} x {METRICS_PER_BATCH}-metric log_batch per server, "
        "alternating",
        ["journal", "log_metric p50 ms", "p99 ms", "log_batch p50 ms", "p99 ms", "metrics/s at p50"],
        [row("rollback", "rollback journal (MLflow's own)"), row("wal", "WAL (bridge serve)"), ratio],
    )
    print(f"Machine after: {machine_summary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
