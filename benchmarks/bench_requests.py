"""HTTP requests per 1,000 logged metric points: bridge vs stock MLflow sync and async.

Every variant logs through the test-owned flaky proxy (tests/support/flaky_proxy.py, `pass` mode) in front of
the same local plain `mlflow server`; the proxy counts each HTTP request exactly. Everything a run costs is
counted — connect's probe, experiment and run creation, the points, the run's end, heartbeats — from the first
request to the process's exit. Each variant runs in its own process.

    python benchmarks/bench_requests.py [--quick]

Rates: `paced` logs one point per 1 ms step (a fast training loop), `burst` as fast as the loop can call.
Goal (issue 3): bridge <= 2 requests per 1,000 points.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import (
    MlflowServer,
    child_env,
    client_argument_parser,
    connect_client,
    lean_server_behind_proxy,
    lean_server_caption,
    print_table,
    report_result,
    run_child,
    scratch_dir,
    server_points,
    verdict,
)

GOAL_PER_1000 = 2.0
STEP_S = 0.001


# ------------------------------------------------------------------------------------------ child side


def _child(client: str, url: str, journal: str, n: int, paced: bool) -> dict:
    import mlflow

    experiment = f"bench-requests-{client}-{time.time_ns()}"
    conn = connect_client(client, url, experiment, journal, async_logging=client == "mlflow-async")
    started = time.perf_counter()
    with mlflow.start_run(run_name=client):
        for step in range(n):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
            if paced:
                delay = started + (step + 1) * STEP_S - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
        logging_s = time.perf_counter() - started
    left = None
    if conn is not None:
        left = conn.flush(120)
        conn.close()
    elif client == "mlflow-async":
        mlflow.flush_async_logging()
    return {"logging_s": logging_s, "left": left, "experiment": experiment}


# ----------------------------------------------------------------------------------------- parent side


def _measure(
    name: str, client: str, n: int, paced: bool, proxy, server: MlflowServer, work: Path, extra_env: dict[str, str]
) -> dict:
    home = work / f"home-{name}"
    home.mkdir()
    proxy.reset_counts()
    cmd = [
        sys.executable,
        __file__,
        "--child",
        client,
        "--url",
        proxy.url,
        "--journal",
        str(work / f"{name}.sqlite"),
        "-n",
        str(n),
    ] + (["--paced"] if paced else [])
    result = run_child(cmd, child_env(home, **extra_env), name, timeout_s=900)
    seen = {line: count for (_, line), count in proxy.lines.items()}  # per "METHOD /path"; the child has ended
    others = {
        line.replace("/api/2.0/mlflow/", ""): count
        for line, count in sorted(seen.items())
        if "/runs/log-batch" not in line and "/runs/log-metric" not in line
    }
    result.update(
        name=name,
        n=n,
        total=proxy.count(),
        others=others,
        logging=proxy.count("/runs/log-batch") + proxy.count("/runs/log-metric"),
        stored=server_points(server, result["experiment"]),
    )
    return result


def main() -> int:
    parser = client_argument_parser(__doc__.splitlines()[0], "fewer points (a smoke run, about 40 s)")
    parser.add_argument("-n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--paced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        report_result(_child(args.child, args.url, args.journal, args.n, args.paced))
        return 0

    big, small = (2_000, 300) if args.quick else (10_000, 1_000)
    # (name, client, points, paced, extra environment). MLflow sends one request per point in both stock
    # modes, so fewer points show the same rate; `MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS` is MLflow's own
    # (opt-in) coalescing, measured as well so the anchor is MLflow at its best.
    variants = [
        ("bridge paced", "bridge", big, True, {}),
        ("bridge burst", "bridge", big, False, {}),
        ("mlflow-sync", "mlflow-sync", small, False, {}),
        ("mlflow-async", "mlflow-async", small, False, {}),
        ("mlflow-async buffered 1s", "mlflow-async", big, True, {"MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "1"}),
    ]
    work = scratch_dir("requests")
    with lean_server_behind_proxy(work) as (server, proxy):
        results = [
            _measure(name, client, n, paced, proxy, server, work, env) for name, client, n, paced, env in variants
        ]

    rows = []
    for r in results:
        rows.append(
            (
                r["name"],
                r["n"],
                f"{r['n'] / r['logging_s']:,.0f}/s",
                r["total"],
                r["logging"],
                f"{1000 * r['total'] / r['n']:.1f}",
                f"{1000 * r['logging'] / r['n']:.1f}",
                f"{r['stored']}/{r['n']}",
            )
        )
    print_table(
        f"HTTP requests per 1,000 logged points, counted by the proxy — {lean_server_caption(args.quick)}",
        [
            "variant",
            "points",
            "log rate",
            "requests",
            "log requests",
            "all / 1,000 pts",
            "log / 1,000 pts",
            "points on server",
        ],
        rows,
    )
    for r in results:
        print(
            f"{r['name']}: requests other than logging: "
            + ", ".join(f"{line} x{count}" for line, count in r["others"].items())
        )
    ok = True
    for r in results:
        if r["name"].startswith("bridge"):
            per_1000 = 1000 * r["total"] / r["n"]
            good = per_1000 <= GOAL_PER_1000 and r["stored"] == r["n"]
            ok &= good
            anchor = next(x for x in results if x["name"] == "mlflow-sync")
            print(
                f"{r['name']}: {per_1000:.1f} requests per 1,000 points, all requests counted (goal <= "
                f"{GOAL_PER_1000:.0f}), {1000 * anchor['total'] / anchor['n'] / per_1000:.0f}x fewer than MLflow "
                f"sync: {verdict(good)}"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
