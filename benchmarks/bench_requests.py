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
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, MlflowServer, clean_env, machine_summary, print_table, scratch_dir, verdict

GOAL_PER_1000 = 2.0
STEP_S = 0.001


def child_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment for a measured child: its own BRIDGE_HOME, no keyring, no inherited MLflow settings."""
    env = {k: v for k, v in clean_env().items() if not k.startswith(("MLFLOW_", "BRIDGE_"))}
    env.update({"PYTHONPATH": str(REPO), "BRIDGE_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true",
                "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring", **extra})
    return env


# ------------------------------------------------------------------------------------------ child side

def _child(client: str, url: str, journal: str, n: int, paced: bool) -> dict:
    import mlflow

    experiment = f"bench-requests-{client}-{time.time_ns()}"
    conn = None
    if client == "bridge":
        import bridge

        conn = bridge.connect(url=url, token="bench-token", experiment=experiment, journal=journal)
    else:
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment(experiment)
        mlflow.config.enable_async_logging(client == "mlflow-async")
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

def _server_points(db: Path, experiment: str) -> int:
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("select count(*) from metrics m join runs r on m.run_uuid = r.run_uuid "
                            "join experiments e on r.experiment_id = e.experiment_id "
                            "where e.name = ? and m.key = 'loss'", (experiment,)).fetchone()[0]
    finally:
        conn.close()


def _measure(name: str, client: str, n: int, paced: bool, proxy, server: MlflowServer, work: Path,
             extra_env: dict[str, str]) -> dict:
    home = work / f"home-{name}"
    home.mkdir()
    proxy.reset_counts()
    cmd = [sys.executable, __file__, "--child", client, "--url", proxy.url, "--journal", str(work / f"{name}.sqlite"),
           "-n", str(n)] + (["--paced"] if paced else [])
    proc = subprocess.run(cmd, env=child_env(home, **extra_env), capture_output=True, text=True, timeout=900,
                          cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    seen = {line: count for (_, line), count in proxy.lines.items()}  # per "METHOD /path"; the child has ended
    others = {line.replace("/api/2.0/mlflow/", ""): count for line, count in sorted(seen.items())
              if "/runs/log-batch" not in line and "/runs/log-metric" not in line}
    result.update(name=name, n=n, total=proxy.count(), others=others,
                  logging=proxy.count("/runs/log-batch") + proxy.count("/runs/log-metric"),
                  stored=_server_points(server.root / "mlflow.db", result["experiment"]))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer points (a smoke run, about 40 s)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--journal", help=argparse.SUPPRESS)
    parser.add_argument("-n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--paced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args.child, args.url, args.journal, args.n, args.paced)), flush=True)
        return 0

    from tests.support.flaky_proxy import FlakyProxy

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
    server = MlflowServer(root=work / "server", args=["--workers", "1"],
                          env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    server.start()
    proxy = None
    try:
        server.wait_healthy(120)
        proxy = FlakyProxy("127.0.0.1", server.port)
        results = [_measure(name, client, n, paced, proxy, server, work, env)
                   for name, client, n, paced, env in variants]
    finally:
        if proxy is not None:
            proxy.close()
        server.stop()

    rows = []
    for r in results:
        rows.append((r["name"], r["n"], f"{r['n'] / r['logging_s']:,.0f}/s", r["total"], r["logging"],
                     f"{1000 * r['total'] / r['n']:.1f}", f"{1000 * r['logging'] / r['n']:.1f}",
                     f"{r['stored']}/{r['n']}"))
    print_table(f"HTTP requests per 1,000 logged points, counted by the proxy — plain mlflow server (SQLite, 1 worker) "
                f"on 127.0.0.1{' [quick]' if args.quick else ''}; {machine_summary()}",
                ["variant", "points", "log rate", "requests", "log requests", "all / 1,000 pts",
                 "log / 1,000 pts", "points on server"], rows)
    for r in results:
        print(f"{r['name']}: requests other than logging: "
              + ", ".join(f"{line} x{count}" for line, count in r["others"].items()))
    ok = True
    for r in results:
        if r["name"].startswith("bridge"):
            per_1000 = 1000 * r["total"] / r["n"]
            good = per_1000 <= GOAL_PER_1000 and r["stored"] == r["n"]
            ok &= good
            anchor = next(x for x in results if x["name"] == "mlflow-sync")
            print(f"{r['name']}: {per_1000:.1f} requests per 1,000 points, all requests counted (goal <= "
                  f"{GOAL_PER_1000:.0f}), {1000 * anchor['total'] / anchor['n'] / per_1000:.0f}x fewer than MLflow "
                  f"sync: {verdict(good)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
