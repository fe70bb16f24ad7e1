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

from _common import (
    REPO,
    MlflowServer,
    bridge_cli,
    child_env,
    child_process,
    client_argument_parser,
    connect_client,
    lean_server_behind_proxy,
    lean_server_caption,
    print_table,
    scratch_dir,
    server_points,
    server_points_and_steps,
    tell_child,
    verdict,
)

PAUSE_S = 0.0005  # between points, as a training loop would; gives MLflow's queue its chance to send


# ------------------------------------------------------------------------------------------ child side


def _logger(client: str, url: str, journal: str, experiment: str, before: int, during: int) -> None:
    """Log `before` points, wait for the outage, log `during` more, acknowledging each; then wait to be killed."""
    import mlflow

    connect_client(client, url, experiment, journal, async_logging=True)
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


def _measure(
    name: str,
    client: str,
    recover: str | None,
    before: int,
    during: int,
    proxy,
    server: MlflowServer,
    work: Path,
    settle_s: float,
) -> dict:
    tag = f"{len(list(work.iterdir()))}"
    home = work / f"home-{tag}"
    home.mkdir()
    journal = work / f"journal-{tag}.sqlite"
    experiment = f"bench-kill9-{client}-{time.time_ns()}"
    env = child_env(home)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        client,
        "--url",
        proxy.url,
        "--journal",
        str(journal),
        "--experiment",
        experiment,
        "--before",
        str(before),
        "--during",
        str(during),
    ]
    acked = 0
    with child_process(cmd, env, stdin=True) as proc:
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            if line.startswith("ACK "):
                acked = int(line.split()[1]) + 1
            elif line.startswith("OUTAGE?"):
                proxy.set_mode("refuse")
                tell_child(proc, "go")
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
    killed = proc.returncode == -signal.SIGKILL
    stranded = server_points(server, experiment)  # on the server when it died

    proxy.set_mode("pass")
    started = time.perf_counter()
    note = ""
    if recover == "bridge sync":
        out = subprocess.run(
            [*bridge_cli(), "sync", "--journal", str(journal), "--url", proxy.url, "--timeout", "120"],
            env={**env, "BRIDGE_TOKEN": "bench-token"},
            capture_output=True,
            text=True,
            timeout=180,
            cwd=REPO,
        )
        note = f"exit {out.returncode}"
    elif recover == "connect()":
        out = subprocess.run(
            [sys.executable, __file__, "--recover", "--url", proxy.url, "--journal", str(journal)],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            cwd=REPO,
        )
        left = [line for line in out.stdout.splitlines() if line.startswith("LEFT ")]
        note = f"{left[-1].lower() if left else 'failed: ' + out.stderr[-300:]}"
    else:
        time.sleep(settle_s)  # nothing to run: give anything still in flight its chance
    recovery_s = time.perf_counter() - started
    stored, distinct = server_points_and_steps(server, experiment)
    return {
        "name": name,
        "acked": acked,
        "killed": killed,
        "stranded": stranded,
        "stored": stored,
        "distinct": distinct,
        "recovery_s": recovery_s,
        "note": note,
    }


def main() -> int:
    parser = client_argument_parser(__doc__.splitlines()[0], "600 points instead of 2,000 (a smoke run)")
    parser.add_argument("--recover", action="store_true", help=argparse.SUPPRESS)
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

    total = 600 if args.quick else 2_000
    before, during = total // 2, total - total // 2
    variants = [
        ("bridge → bridge sync", "bridge", "bridge sync"),
        ("bridge → connect()", "bridge", "connect()"),
        ("mlflow-async", "mlflow-async", None),
    ]
    work = scratch_dir("kill9")
    with lean_server_behind_proxy(work) as (server, proxy):
        results = [
            _measure(name, client, recover, before, during, proxy, server, work, settle_s=10)
            for name, client, recover in variants
        ]

    rows = [
        (
            r["name"],
            f"{r['acked']:,}",
            "yes" if r["killed"] else "NO",
            f"{r['stranded']:,}",
            f"{r['stored']:,}",
            f"{r['stored'] / r['acked']:.1%}",
            f"{r['stored'] - r['distinct']}",
            f"{r['recovery_s']:.1f}",
            r["note"],
        )
        for r in results
    ]
    print_table(
        f"kill -9 during an outage ({before:,} points logged with the link up, {during:,} during the outage) — "
        f"{lean_server_caption(args.quick)}",
        [
            "variant",
            "acknowledged",
            "killed -9",
            "on server at kill",
            "on server after",
            "delivered",
            "duplicates",
            "recovery s",
            "recovery",
        ],
        rows,
    )
    anchor = results[-1]
    ok = True
    for r in results[:-1]:
        good = r["killed"] and r["stored"] == r["acked"] == r["distinct"]
        ok &= good
        print(
            f"{r['name']}: {r['stored']:,} of {r['acked']:,} acknowledged points delivered "
            f"({r['stored'] / r['acked']:.1%}; MLflow async {anchor['stored'] / anchor['acked']:.1%}), "
            f"no duplicates: {'yes' if r['stored'] == r['distinct'] else 'NO'} (goal 100 %): {verdict(good)}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
