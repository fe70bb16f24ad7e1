"""Training-loop slowdown during a link outage: bridge vs stock MLflow sync, against the same loop not logging.

A simulated training loop (steps of fixed pure-Python work, ~10 ms each, calibrated at start; one
`mlflow.log_metric` per step) runs in its own process and logs through the test-owned flaky proxy in front of
a local plain `mlflow server`. Shortly after the loop starts, the proxy goes into `refuse` (port closed) or
`blackhole` (accepts, never answers) for the outage's length, then back to `pass`. The loop's wall time is
compared with the same loop without logging (run three times, interleaved with the bridge runs; the fastest is
the anchor, the stricter choice). Afterwards the server's copy is counted: bridge must deliver every point.

The wall clock of a shared machine moves with other processes' load, so the verdict uses the loop's time less
its *OS wait*: the time the loop's thread was ready to run but the OS ran other processes (from
/proc/self/task/<tid>/schedstat). Waiting for the GIL (bridge's sender) or for the network (MLflow sync) is not
OS wait and stays in the figure. Other processes also slow the loop while it runs (a shared core, caches), so
when even the no-logging anchors spread by more than the goal, the verdict falls back to what logging itself
took: the time inside the log calls (GIL waits included) plus the background threads' CPU time (/proc), per
anchor loop — and says so. Every figure is printed either way.

Pure-Python steps hold the GIL, so bridge's background sender competes with them directly; a real training
step (mostly native code) is the easier case. 10 ms steps are 5-20x shorter than a YOLO step on a GPU.

MLflow sync is bounded here: MLFLOW_HTTP_REQUEST_MAX_RETRIES=2, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1,
MLFLOW_HTTP_REQUEST_TIMEOUT=5 (stock: 7 retries, factor 2, 120 s — one call then blocks for minutes), and the
loop catches the exceptions MLflow raises after its retries, counting those points as lost.

    python benchmarks/bench_outage.py [--quick] [--mode refuse|blackhole|both]

Goal (issue 3): bridge's loop slowdown <= 5 %.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
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
    verdict,
)

GOAL_SLOWDOWN = 0.05
STEP_S = 0.01
SYNC_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}


def work(k: int) -> int:
    """One training step's compute: fixed work (not fixed time), so anything competing for the CPU shows."""
    total = 0
    for i in range(k):
        total += i * i
    return total


def calibrate(step_s: float) -> int:
    """The `k` for which work(k) takes about `step_s` on this machine now."""
    k = 1000
    while True:
        took = min(_timed(work, k) for _ in range(5))  # the fastest try: least disturbed by other processes
        if took > step_s / 4:
            return max(1, int(k * step_s / took))
        k *= 2


def _timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------------ child side


def _process_cpu_s() -> float:
    """CPU seconds of this whole process (every thread)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _main_thread_waiting_s() -> float:
    """Seconds the main thread was runnable but waiting for a CPU (/proc schedstat): time the OS gave to other
    processes. A wait for the GIL is not in it (that thread sleeps on a lock, it does not queue for a CPU)."""
    fields = Path(f"/proc/self/task/{os.getpid()}/schedstat").read_text().split()
    return int(fields[1]) / 1e9


def _background_cpu_s() -> float:
    """CPU seconds of every thread but the main one (bridge's sender, MLflow's workers), from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        if int(task.name) == os.getpid():
            continue
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _child(client: str, url: str, journal: str, steps: int, k: int, drain_s: float) -> dict:
    import mlflow

    experiment = f"bench-outage-{client}-{time.time_ns()}"
    conn = None
    if client != "none":  # "none": the same loop without logging (the anchor)
        conn = connect_client(client, url, experiment, journal)
        mlflow.start_run(run_name=client)
        if conn is not None:
            conn.flush(30)  # the run exists on the server before the link breaks, as for MLflow
    failed = 0
    worst = 0.0
    in_calls = 0.0
    print("START", flush=True)
    cpu_started = _process_cpu_s()
    background_started = _background_cpu_s()
    waiting_started = _main_thread_waiting_s()
    started = time.perf_counter()
    for step in range(steps):
        work(k)
        if client != "none":
            t0 = time.perf_counter()
            try:
                mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
            except Exception:  # what MLflow raises once its retries are spent; a training loop would go on
                failed += 1
            took = time.perf_counter() - t0
            in_calls += took
            worst = max(worst, took)
    loop_s = time.perf_counter() - started
    cpu_s = _process_cpu_s() - cpu_started
    background_s = _background_cpu_s() - background_started
    os_wait_s = _main_thread_waiting_s() - waiting_started
    print(f"LOOP {loop_s}", flush=True)
    left = None
    if client != "none":
        try:
            mlflow.end_run()
        except Exception:
            pass
    if conn is not None:
        left = conn.flush(drain_s)
    flushed_at = time.monotonic()  # CLOCK_MONOTONIC is machine-wide: the parent compares it with the outage's end
    if conn is not None:
        conn.close()
    return {
        "loop_s": loop_s,
        "cpu_s": cpu_s,
        "in_calls_s": in_calls,
        "background_s": background_s,
        "own_s": loop_s - os_wait_s,
        "os_wait_s": os_wait_s,
        "flushed_at": flushed_at,
        "failed": failed,
        "worst_call_s": worst,
        "left": left,
        "experiment": experiment,
    }


# ----------------------------------------------------------------------------------------- parent side


def _measure(
    client: str,
    mode: str | None,
    steps: int,
    k: int,
    outage: tuple[float, float],
    proxy,
    server: MlflowServer,
    work_dir: Path,
) -> dict:
    """Run one loop; with `mode`, the proxy is broken from outage[0] to outage[0]+outage[1] s after START."""
    name = f"{client}-{mode or 'no-outage'}-{time.time_ns()}"
    home = work_dir / f"home-{name}"
    home.mkdir()
    extra = SYNC_BOUNDS if client == "mlflow-sync" else {}
    drain_s = outage[0] + outage[1] + 180
    cmd = [
        sys.executable,
        __file__,
        "--child",
        client,
        "--url",
        proxy.url,
        "--journal",
        str(work_dir / f"{name}.sqlite"),
        "--steps",
        str(steps),
        "-k",
        str(k),
        "--drain",
        str(drain_s),
    ]
    timer = None
    outage_seen = {"start": None, "end": None}
    try:
        with child_process(cmd, child_env(home, **extra)) as proc:
            expect_line(proc, "START")
            if mode is not None:

                def outage_timeline() -> None:
                    time.sleep(outage[0])
                    proxy.set_mode(mode)
                    outage_seen["start"] = time.monotonic()
                    time.sleep(outage[1])
                    proxy.set_mode("pass")
                    outage_seen["end"] = time.monotonic()

                timer = threading.Thread(target=outage_timeline, daemon=True)
                timer.start()
            result = read_result(proc, client)
            proc.wait(timeout=60)
    finally:
        if timer is not None:
            timer.join()
        proxy.set_mode("pass")
    caught_up = None
    if client == "bridge" and outage_seen["end"] is not None and result["left"] == 0:
        caught_up = max(0.0, result["flushed_at"] - outage_seen["end"])
    result.update(
        client=client,
        mode=mode,
        steps=steps,
        caught_up_s=caught_up,
        stored=server_points(server, result["experiment"]) if client != "none" else None,
    )
    return result


def main() -> int:
    parser = client_argument_parser(__doc__.splitlines()[0], "3 s loop, 5 s outage (a smoke run)")
    parser.add_argument("--mode", choices=("refuse", "blackhole", "both"), default="both")
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("-k", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--drain", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        report_result(_child(args.child, args.url, args.journal, args.steps, args.k, args.drain))
        return 0

    loop_s, outage = (3.0, (1.0, 5.0)) if args.quick else (10.0, (2.0, 30.0))
    modes = ["refuse", "blackhole"] if args.mode == "both" else [args.mode]
    k = calibrate(STEP_S)
    steps = int(loop_s / STEP_S)
    work_dir = scratch_dir("outage")
    with lean_server_behind_proxy(work_dir) as (server, proxy):
        # Anchors interleaved with the bridge runs, so a change in the machine's load shows as their spread.
        baselines = [_measure("none", None, steps, k, outage, proxy, server, work_dir)]
        runs = []
        for mode in modes:
            runs.append(_measure("bridge", mode, steps, k, outage, proxy, server, work_dir))
            baselines.append(_measure("none", None, steps, k, outage, proxy, server, work_dir))
        for mode in modes:
            runs.append(_measure("mlflow-sync", mode, steps, k, outage, proxy, server, work_dir))

    anchor = min(b["loop_s"] for b in baselines)
    own_anchor = min(b["own_s"] for b in baselines)
    spread = max(b["loop_s"] for b in baselines) / anchor - 1
    own_spread = max(b["own_s"] for b in baselines) / own_anchor - 1
    rows = [
        (
            f"no logging #{i + 1}",
            "-",
            f"{b['loop_s']:.2f}",
            f"{b['loop_s'] / anchor - 1:+.1%}",
            f"{b['os_wait_s']:.2f}",
            f"{b['own_s'] / own_anchor - 1:+.1%}",
            "-",
            "-",
            "-",
            "-",
            "-",
            "-",
        )
        for i, b in enumerate(baselines)
    ]
    for r in runs:
        rows.append(
            (
                r["client"],
                r["mode"],
                f"{r['loop_s']:.2f}",
                f"{r['loop_s'] / anchor - 1:+.1%}",
                f"{r['os_wait_s']:.2f}",
                f"{r['own_s'] / own_anchor - 1:+.1%}",
                f"{r['in_calls_s']:.3f}",
                f"{r['background_s']:.3f}",
                f"{r['worst_call_s'] * 1000:,.1f}",
                f"{r['failed']}",
                f"{r['stored']}/{steps}",
                "-" if r["caught_up_s"] is None else f"{r['caught_up_s']:.1f}",
            )
        )
    print_table(
        f"{steps:,}-step loop ({STEP_S * 1000:.0f} ms pure-Python steps, 1 log_metric each), "
        f"{outage[1]:.0f} s outage from t={outage[0]:.0f} s — {lean_server_caption(args.quick)}",
        [
            "client",
            "outage",
            "loop s",
            "slowdown",
            "OS wait s",
            "slowdown excl. OS wait",
            "in log calls s",
            "background CPU s",
            "slowest call ms",
            "calls raised",
            "points on server",
            "all delivered s after link back",
        ],
        rows,
    )
    print(
        f"anchor: the fastest no-logging loop, {anchor:.2f} s ({anchor / steps * 1000:.1f} ms per step), "
        f"{own_anchor:.2f} s excluding OS wait; the anchors spread {spread:.1%} on the wall clock, "
        f"{own_spread:.1%} excluding OS wait. OS wait: time the loop's thread was ready but the OS ran other "
        "processes (/proc schedstat); waiting for the GIL or the network is not in it and counts as slowdown."
    )
    print("MLflow sync bounded by " + ", ".join(f"{k}={v}" for k, v in SYNC_BOUNDS.items()))
    ok = True
    for r in runs:
        if r["client"] != "bridge":
            continue
        slowdown = r["own_s"] / own_anchor - 1
        attributable = (r["in_calls_s"] + r["background_s"]) / own_anchor
        sync = next(x for x in runs if x["client"] == "mlflow-sync" and x["mode"] == r["mode"])
        delivered = r["stored"] == steps
        if own_spread <= GOAL_SLOWDOWN:  # the anchors agree closely enough to resolve the goal
            good = slowdown <= GOAL_SLOWDOWN and delivered
            basis = f"slowdown {slowdown:+.1%} excluding OS wait ({r['loop_s'] / anchor - 1:+.1%} on the wall clock)"
        else:  # the machine moves even the no-logging loop by more than the goal: judge what logging itself took
            good = attributable <= GOAL_SLOWDOWN and delivered
            basis = (
                f"logging itself took {attributable:+.1%} of the loop ({r['in_calls_s']:.2f} s inside the calls + "
                f"{r['background_s']:.2f} s background CPU); the loop's slowdown, {slowdown:+.1%} excluding OS "
                f"wait, is not conclusive: the no-logging anchors alone spread {own_spread:.0%}"
            )
        ok &= good
        print(
            f"{r['mode']}: bridge {basis} (goal <= {GOAL_SLOWDOWN:.0%}); every point delivered: "
            f"{'yes' if delivered else 'NO'}; MLflow sync {sync['own_s'] / own_anchor - 1:+.0%} and "
            f"{steps - sync['stored']} points lost: {verdict(good)}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
