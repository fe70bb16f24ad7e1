"""Delivery after `kill -9` during an outage: points on the server of points acknowledged, bridge vs MLflow async.

A child process creates a run through the test-owned flaky proxy (in front of a local plain `mlflow server`),
logs the first half of its points while the link is up, then the proxy refuses connections and the child logs
the second half, printing an acknowledgement after each `mlflow.log_metric` returned. Right after the last
acknowledgement it is killed with SIGKILL. The link comes back and recovery runs:
  * bridge: `bridge sync --journal …` (the CLI), or a new process calling `bridge.connect()` on the journal;
  * MLflow async: there is nothing to recover with; its points are counted after a settling wait.
The server's SQLite file then says how many points arrived, and whether any arrived twice.

    python benchmarks/bench_kill9.py [--quick]

Goal (issue 3): bridge delivers 100 % of acknowledged points (shown against MLflow async's figure).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, MlflowServer, clean_env, machine_summary, print_table, scratch_dir, venv_script, verdict

PAUSE_S = 0.0005  # between points, as a training loop would; gives MLflow's queue its chance to send


def child_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment for a measured child: its own BRIDGE_HOME, no keyring, no inherited MLflow settings."""
    env = {k: v for k, v in clean_env().items() if not k.startswith(("MLFLOW_", "BRIDGE_"))}
    env.update({"PYTHONPATH": str(REPO), "BRIDGE_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true",
                "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring", **extra})
    return env


# ------------------------------------------------------------------------------------------ child side

def _logger(client: str, url: str, journal: str, experiment: str, before: int, during: int) -> None:
    """Log `before` points, wait for the outage, log `during` more, acknowledging each; then wait to be killed."""
    import mlflow

    if client == "bridge":
        import bridge

        bridge.connect(url=url, token="bench-token", experiment=experiment, journal=journal)
    else:
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment(experiment)
        mlflow.config.enable_async_logging(True)
    mlflow.start_run(run_name=f"kill9-{client}")
    for step in range(before):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        print(f"ACK {step}", flush=True)
        time.sleep(PAUSE_S)
    print("OUTAGE?", flush=True)
    sys.stdin.readline()
    for step in range(before, before + during):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        print(f"ACK {step}", flush=True)  # printed only once log_metric returned: acknowledged
        time.sleep(PAUSE_S)
    print("DONE", flush=True)
    time.sleep(600)


def _recover_with_connect(url: str, journal: str) -> None:
    import bridge

    conn = bridge.connect(url=url, token="bench-token", journal=journal)
    left = conn.flush(120)
    conn.close()
    print(f"LEFT {left}", flush=True)


# ----------------------------------------------------------------------------------------- parent side

def _server_points(db: Path, experiment: str) -> tuple[int, int]:
    """(points, distinct steps) of metric 'loss' in `experiment`, read from the server's SQLite file."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("select count(*), count(distinct m.step) from metrics m "
                            "join runs r on m.run_uuid = r.run_uuid "
                            "join experiments e on r.experiment_id = e.experiment_id "
                            "where e.name = ? and m.key = 'loss'", (experiment,)).fetchone()
    finally:
        conn.close()


def _measure(name: str, client: str, recover: str | None, before: int, during: int, proxy, server: MlflowServer,
             work: Path, settle_s: float) -> dict:
    tag = f"{len(list(work.iterdir()))}"
    home = work / f"home-{tag}"
    home.mkdir()
    journal = work / f"journal-{tag}.sqlite"
    experiment = f"bench-kill9-{client}-{time.time_ns()}"
    env = child_env(home)
    proc = subprocess.Popen([sys.executable, __file__, "--child", client, "--url", proxy.url, "--journal", str(journal),
                             "--experiment", experiment, "--before", str(before), "--during", str(during)],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    acked = 0
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            if line.startswith("ACK "):
                acked = int(line.split()[1]) + 1
            elif line.startswith("OUTAGE?"):
                proxy.set_mode("refuse")
                proc.stdin.write("go\n")
                proc.stdin.flush()
            if acked == before + during or line.startswith("DONE"):
                os.kill(proc.pid, signal.SIGKILL)  # mid-run, mid-outage
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: the logging process is too slow")
        else:
            raise RuntimeError(f"{name}: logging process ended early ({proc.wait()}): {proc.stderr.read()[-3000:]}")
        for line in proc.stdout:  # lines already in the pipe when it died
            if line.startswith("ACK "):
                acked = int(line.split()[1]) + 1
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed = proc.returncode == -signal.SIGKILL
    stranded = _server_points(server.root / "mlflow.db", experiment)[0]  # on the server when it died

    proxy.set_mode("pass")
    started = time.perf_counter()
    note = ""
    if recover == "bridge sync":
        bridge_cli = venv_script("bridge")
        cmd = ([str(bridge_cli)] if bridge_cli else [sys.executable, "-c", "from bridge.cli import main; main()"])
        out = subprocess.run([*cmd, "sync", "--journal", str(journal), "--url", proxy.url, "--timeout", "120"],
                             env={**env, "BRIDGE_TOKEN": "bench-token"}, capture_output=True, text=True, timeout=180,
                             cwd=REPO)
        note = f"exit {out.returncode}"
    elif recover == "connect()":
        out = subprocess.run([sys.executable, __file__, "--recover", "--url", proxy.url, "--journal", str(journal)],
                             env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
        left = [line for line in out.stdout.splitlines() if line.startswith("LEFT ")]
        note = f"{left[-1].lower() if left else 'failed: ' + out.stderr[-300:]}"
    else:
        time.sleep(settle_s)  # nothing to run: give anything still in flight its chance
    recovery_s = time.perf_counter() - started
    stored, distinct = _server_points(server.root / "mlflow.db", experiment)
    return {"name": name, "acked": acked, "killed": killed, "stranded": stranded, "stored": stored,
            "distinct": distinct, "recovery_s": recovery_s, "note": note}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="600 points instead of 2,000 (a smoke run)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--recover", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--journal", help=argparse.SUPPRESS)
    parser.add_argument("--experiment", help=argparse.SUPPRESS)
    parser.add_argument("--before", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--during", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _logger(args.child, args.url, args.journal, args.experiment, args.before, args.during)
        return 0
    if args.recover:
        _recover_with_connect(args.url, args.journal)
        return 0

    from tests.support.flaky_proxy import FlakyProxy

    total = 600 if args.quick else 2_000
    before, during = total // 2, total - total // 2
    variants = [("bridge → bridge sync", "bridge", "bridge sync"), ("bridge → connect()", "bridge", "connect()"),
                ("mlflow-async", "mlflow-async", None)]
    work = scratch_dir("kill9")
    server = MlflowServer(root=work / "server", args=["--workers", "1"],
                          env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    server.start()
    proxy = None
    try:
        server.wait_healthy(120)
        proxy = FlakyProxy("127.0.0.1", server.port)
        results = [_measure(name, client, recover, before, during, proxy, server, work, settle_s=10)
                   for name, client, recover in variants]
    finally:
        if proxy is not None:
            proxy.close()
        server.stop()

    rows = [(r["name"], f"{r['acked']:,}", "yes" if r["killed"] else "NO", f"{r['stranded']:,}", f"{r['stored']:,}",
             f"{r['stored'] / r['acked']:.1%}", f"{r['stored'] - r['distinct']}", f"{r['recovery_s']:.1f}", r["note"])
            for r in results]
    print_table(f"kill -9 during an outage ({before:,} points logged with the link up, {during:,} during the outage) — "
                f"plain mlflow server (SQLite, 1 worker) on 127.0.0.1{' [quick]' if args.quick else ''}; "
                f"{machine_summary()}",
                ["variant", "acknowledged", "killed -9", "on server at kill", "on server after", "delivered",
                 "duplicates", "recovery s", "recovery"], rows)
    anchor = results[-1]
    ok = True
    for r in results[:-1]:
        good = r["killed"] and r["stored"] == r["acked"] == r["distinct"]
        ok &= good
        print(f"{r['name']}: {r['stored']:,} of {r['acked']:,} acknowledged points delivered "
              f"({r['stored'] / r['acked']:.1%}; MLflow async {anchor['stored'] / anchor['acked']:.1%}), "
              f"no duplicates: {'yes' if r['stored'] == r['distinct'] else 'NO'} (goal 100 %): {verdict(good)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
