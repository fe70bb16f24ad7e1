"""Drain of a backlog built during an outage: points per second once the link is back, bridge vs MLflow async.

Each variant runs in its own process and logs through the test-owned flaky proxy in front of a local plain
`mlflow server`. The run is created while the link is up; then the proxy refuses connections, the process
logs the backlog with `mlflow.log_metric` (one call per point), the proxy passes again, and the process times
the drain: bridge `Connection.flush()`, MLflow `mlflow.flush_async_logging()`. Points on the server are
counted from its SQLite file afterwards.

Stock MLflow async sends one request per point (its queue merges only with the opt-in
MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS), so it drains a smaller backlog in bounded time; the buffered
variant drains the full backlog. MLflow's retry settings are left at their defaults here. A last row sends the
same number of points as raw sequential 1,000-point `log-batch` requests through the same proxy: the server's
own ceiling, which no client can beat.

    python benchmarks/bench_drain.py [--quick]

Goal (issue 3): bridge drains >= 20,000 points/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import (
    MlflowServer,
    child_env,
    child_process,
    client_argument_parser,
    connect_client,
    expect_line,
    lean_server_behind_proxy,
    lean_server_caption,
    print_table,
    read_result,
    report_result,
    scratch_dir,
    server_points,
    tell_child,
    verdict,
)

GOAL_POINTS_PER_S = 20_000


# ------------------------------------------------------------------------------------------ child side


def _child(client: str, url: str, journal: str, n: int, timeout_s: float) -> dict:
    import mlflow

    experiment = f"bench-drain-{client}-{time.time_ns()}"
    conn = connect_client(client, url, experiment, journal, async_logging=True)
    mlflow.start_run(run_name=client)
    if conn is not None:
        conn.flush(30)  # the run exists on the server before the outage, as for MLflow
    print("READY", flush=True)
    sys.stdin.readline()  # the parent has made the link refuse connections
    started = time.perf_counter()
    for step in range(n):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    logging_s = time.perf_counter() - started
    print("LOGGED", flush=True)
    sys.stdin.readline()  # the link passes again
    started = time.perf_counter()
    left = None
    if conn is not None:
        left = conn.flush(timeout_s)
    else:
        mlflow.flush_async_logging()
    drain_s = time.perf_counter() - started
    mlflow.end_run()
    if conn is not None:
        conn.flush(30)
        conn.close()
    return {"logging_s": logging_s, "drain_s": drain_s, "left": left, "experiment": experiment}


# ----------------------------------------------------------------------------------------- parent side


def _server_ceiling(proxy, n: int) -> dict:
    """Raw sequential `log-batch` requests of 1,000 points through the same proxy: what the server can take."""
    import requests

    api = proxy.url + "/api/2.0/mlflow"
    experiment = f"bench-drain-ceiling-{time.time_ns()}"
    with requests.Session() as http:
        experiment_id = http.post(api + "/experiments/create", json={"name": experiment}, timeout=60).json()[
            "experiment_id"
        ]
        run_id = http.post(api + "/runs/create", json={"experiment_id": experiment_id}, timeout=60).json()["run"][
            "info"
        ]["run_id"]
        now = int(time.time() * 1000)
        started = time.perf_counter()
        for first in range(0, n, 1000):
            metrics = [
                {"key": "loss", "value": 1.0 / (step + 1), "timestamp": now, "step": step}
                for step in range(first, min(n, first + 1000))
            ]
            http.post(
                api + "/runs/log-batch", json={"run_id": run_id, "metrics": metrics}, timeout=120
            ).raise_for_status()
        took = time.perf_counter() - started
    return {
        "name": "server ceiling (raw log-batch)",
        "n": n,
        "logging_s": 0.0,
        "drain_s": took,
        "left": 0,
        "experiment": experiment,
    }


def _measure(
    name: str, client: str, n: int, proxy, server: MlflowServer, work: Path, extra_env: dict, timeout_s: float
) -> dict:
    home = work / f"home-{len(list(work.iterdir()))}"
    home.mkdir()
    cmd = [
        sys.executable,
        __file__,
        "--child",
        client,
        "--url",
        proxy.url,
        "--journal",
        str(work / f"{home.name}.sqlite"),
        "-n",
        str(n),
        "--timeout",
        str(timeout_s),
    ]
    try:
        with child_process(cmd, child_env(home, **extra_env), stdin=True) as proc:
            expect_line(proc, "READY")
            proxy.set_mode("refuse")
            tell_child(proc, "go")
            expect_line(proc, "LOGGED")
            proxy.set_mode("pass")
            tell_child(proc, "drain")
            result = read_result(proc, name)
            proc.wait(timeout=120)
    finally:
        proxy.set_mode("pass")
    result.update(name=name, n=n, stored=server_points(server, result["experiment"]))
    return result


def main() -> int:
    parser = client_argument_parser(__doc__.splitlines()[0], "20,000-point backlog (a smoke run)")
    parser.add_argument("-n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        report_result(_child(args.child, args.url, args.journal, args.n, args.timeout))
        return 0

    big, small = (20_000, 500) if args.quick else (100_000, 2_000)
    variants = [
        ("bridge", "bridge", big, {}),
        ("mlflow-async buffered 1s", "mlflow-async", big, {"MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "1"}),
        ("mlflow-async (stock)", "mlflow-async", small, {}),
    ]
    work = scratch_dir("drain")
    with lean_server_behind_proxy(work) as (server, proxy):
        results = [
            _measure(name, client, n, proxy, server, work, env, timeout_s=300) for name, client, n, env in variants
        ]
        ceiling = _server_ceiling(proxy, big)
        ceiling["stored"] = server_points(server, ceiling["experiment"])
        results.append(ceiling)

    rate = {r["name"]: r["stored"] / r["drain_s"] for r in results}
    bridge_rate = rate["bridge"]
    rows = [
        (
            r["name"],
            f"{r['n']:,}",
            f"{r['logging_s']:.1f}",
            f"{r['drain_s']:.2f}",
            f"{rate[r['name']]:,.0f}",
            f"{bridge_rate / rate[r['name']]:.1f}x" if rate[r["name"]] else "-",
            f"{r['stored']:,}/{r['n']:,}",
        )
        for r in results
    ]
    print_table(
        f"Drain after an outage (proxy refused while the backlog was logged) — {lean_server_caption(args.quick)}",
        ["variant", "backlog", "logging s", "drain s", "points/s", "bridge faster by", "points on server"],
        rows,
    )
    bridge = results[0]
    ok = bridge_rate >= GOAL_POINTS_PER_S and bridge["stored"] == bridge["n"]
    print(
        f"bridge drained {bridge['stored']:,} of {bridge['n']:,} at {bridge_rate:,.0f} points/s "
        f"(goal >= {GOAL_POINTS_PER_S:,}), {bridge_rate / rate[ceiling['name']]:.0%} of what the server took "
        f"from raw sequential 1,000-point log-batch requests: {verdict(ok)}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
