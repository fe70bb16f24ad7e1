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
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, MlflowServer, clean_env, machine_summary, print_table, scratch_dir, verdict

GOAL_POINTS_PER_S = 20_000


def child_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment for a measured child: its own BRIDGE_HOME, no keyring, no inherited MLflow settings."""
    env = {k: v for k, v in clean_env().items() if not k.startswith(("MLFLOW_", "BRIDGE_"))}
    env.update({"PYTHONPATH": str(REPO), "BRIDGE_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true",
                "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring", **extra})
    return env


# ------------------------------------------------------------------------------------------ child side

def _child(client: str, url: str, journal: str, n: int, timeout_s: float) -> dict:
    import mlflow

    experiment = f"bench-drain-{client}-{time.time_ns()}"
    conn = None
    if client == "bridge":
        import bridge

        conn = bridge.connect(url=url, token="bench-token", experiment=experiment, journal=journal)
    else:
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment(experiment)
        mlflow.config.enable_async_logging(True)
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

def _server_points(db: Path, experiment: str) -> int:
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("select count(*) from metrics m join runs r on m.run_uuid = r.run_uuid "
                            "join experiments e on r.experiment_id = e.experiment_id "
                            "where e.name = ? and m.key = 'loss'", (experiment,)).fetchone()[0]
    finally:
        conn.close()


def _server_ceiling(proxy, n: int) -> dict:
    """Raw sequential `log-batch` requests of 1,000 points through the same proxy: what the server can take."""
    import requests

    api = proxy.url + "/api/2.0/mlflow"
    experiment = f"bench-drain-ceiling-{time.time_ns()}"
    with requests.Session() as http:
        experiment_id = http.post(api + "/experiments/create", json={"name": experiment}, timeout=60).json()[
            "experiment_id"]
        run_id = http.post(api + "/runs/create", json={"experiment_id": experiment_id}, timeout=60).json()["run"][
            "info"]["run_id"]
        now = int(time.time() * 1000)
        started = time.perf_counter()
        for first in range(0, n, 1000):
            metrics = [{"key": "loss", "value": 1.0 / (step + 1), "timestamp": now, "step": step}
                       for step in range(first, min(n, first + 1000))]
            http.post(api + "/runs/log-batch", json={"run_id": run_id, "metrics": metrics},
                      timeout=120).raise_for_status()
        took = time.perf_counter() - started
    return {"name": "server ceiling (raw log-batch)", "n": n, "logging_s": 0.0, "drain_s": took, "left": 0,
            "experiment": experiment}


def _expect(proc: subprocess.Popen, word: str) -> None:
    for line in proc.stdout:
        if line.startswith(word):
            return
    raise RuntimeError(f"child ended before {word}: {proc.stderr.read()[-3000:]}")


def _measure(name: str, client: str, n: int, proxy, server: MlflowServer, work: Path, extra_env: dict,
             timeout_s: float) -> dict:
    home = work / f"home-{len(list(work.iterdir()))}"
    home.mkdir()
    cmd = [sys.executable, __file__, "--child", client, "--url", proxy.url,
           "--journal", str(work / f"{home.name}.sqlite"), "-n", str(n), "--timeout", str(timeout_s)]
    proc = subprocess.Popen(cmd, env=child_env(home, **extra_env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        _expect(proc, "READY")
        proxy.set_mode("refuse")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        _expect(proc, "LOGGED")
        proxy.set_mode("pass")
        proc.stdin.write("drain\n")
        proc.stdin.flush()
        for line in proc.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
                break
        else:
            raise RuntimeError(f"{name} child ended without a result: {proc.stderr.read()[-3000:]}")
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proxy.set_mode("pass")
    result.update(name=name, n=n, stored=_server_points(server.root / "mlflow.db", result["experiment"]))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000-point backlog (a smoke run)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--journal", help=argparse.SUPPRESS)
    parser.add_argument("-n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args.child, args.url, args.journal, args.n, args.timeout)), flush=True)
        return 0

    from tests.support.flaky_proxy import FlakyProxy

    big, small = (20_000, 500) if args.quick else (100_000, 2_000)
    variants = [
        ("bridge", "bridge", big, {}),
        ("mlflow-async buffered 1s", "mlflow-async", big, {"MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "1"}),
        ("mlflow-async (stock)", "mlflow-async", small, {}),
    ]
    work = scratch_dir("drain")
    server = MlflowServer(root=work / "server", args=["--workers", "1"],
                          env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    server.start()
    proxy = None
    try:
        server.wait_healthy(120)
        proxy = FlakyProxy("127.0.0.1", server.port)
        results = [_measure(name, client, n, proxy, server, work, env, timeout_s=300)
                   for name, client, n, env in variants]
        ceiling = _server_ceiling(proxy, big)
        ceiling["stored"] = _server_points(server.root / "mlflow.db", ceiling["experiment"])
        results.append(ceiling)
    finally:
        if proxy is not None:
            proxy.close()
        server.stop()

    rate = {r["name"]: r["stored"] / r["drain_s"] for r in results}
    bridge_rate = rate["bridge"]
    rows = [(r["name"], f"{r['n']:,}", f"{r['logging_s']:.1f}", f"{r['drain_s']:.2f}", f"{rate[r['name']]:,.0f}",
             f"{bridge_rate / rate[r['name']]:.1f}x" if rate[r["name"]] else "-", f"{r['stored']:,}/{r['n']:,}")
            for r in results]
    print_table(f"Drain after an outage (proxy refused while the backlog was logged) — plain mlflow server (SQLite, "
                f"1 worker) on 127.0.0.1{' [quick]' if args.quick else ''}; {machine_summary()}",
                ["variant", "backlog", "logging s", "drain s", "points/s", "bridge faster by", "points on server"],
                rows)
    bridge = results[0]
    ok = bridge_rate >= GOAL_POINTS_PER_S and bridge["stored"] == bridge["n"]
    print(f"bridge drained {bridge['stored']:,} of {bridge['n']:,} at {bridge_rate:,.0f} points/s "
          f"(goal >= {GOAL_POINTS_PER_S:,}), {bridge_rate / rate[ceiling['name']]:.0%} of what the server took "
          f"from raw sequential 1,000-point log-batch requests: {verdict(ok)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
