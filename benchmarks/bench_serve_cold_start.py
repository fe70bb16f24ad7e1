"""Cold start: `bridge serve` to a healthy, authenticated public URL vs stock `mlflow server` to /health.

    python benchmarks/bench_serve_cold_start.py [--quick] [--repeat 3]

bridge: `bridge serve --tunnel ngrok` with the stand-in ngrok agent (tests/support/fake_ngrok.py), timed from
launch until its signed record is published and an authenticated GET /health through the tunnel's edge
forwarder answers 200. Anchor, measured in the same run: `mlflow server --backend-store-uri sqlite:///…`
exactly as a user starts it (stock defaults), timed from launch until GET /health answers 200.
Also shown, not part of the goal: MLflow started the lean way bridge starts it (`--workers 1`, job execution
off), so bridge's own overhead (CLI, readiness check, entrance, tunnel, signed record) is visible.
Each repetition starts each from a fresh data folder (new SQLite database), rotating which goes first.
Goal: bridge <= MLflow + 2 s (medians).
"""

from __future__ import annotations

import datetime
import re
import time

from _common import (
    BridgeServe,
    MlflowServer,
    StandInNgrok,
    argument_parser,
    http_status,
    machine_summary,
    median,
    print_table,
    scratch_dir,
    verdict,
)  # fmt: skip

GOAL_EXTRA_S = 2.0
#: Milestones in bridge's own INFO log, to show where its start-up time goes.
MILESTONES = (
    ("MLflow launched", re.compile(r"Starting MLflow on")),
    ("MLflow healthy", re.compile(r"MLflow is healthy")),
    ("entrance up", re.compile(r"Entrance listening")),
    ("record published", re.compile(r"Published the record")),
)
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


LEAN_ARGS = ["--workers", "1"]
LEAN_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def time_mlflow(root, lean: bool = False) -> float:
    server = MlflowServer(root, args=LEAN_ARGS if lean else [], env=LEAN_ENV if lean else {})
    server.start()
    try:
        return server.wait_healthy()
    finally:
        server.stop()


def time_bridge(root) -> tuple[float, dict[str, float]]:
    """Seconds to an authenticated 200 on /health through the tunnel, and when each milestone was logged."""
    ngrok = StandInNgrok(root / "fake-ngrok")
    serve = BridgeServe(root / "home", args=["--tunnel", "ngrok"], env_extra={**ngrok.env, "BRIDGE_LOG_LEVEL": "INFO"})
    token = serve.token()  # created before the clock starts: the everyday case is a restart with a token
    launched_wall = time.time()
    serve.launch()

    def healthy_through_tunnel(s: BridgeServe) -> bool:
        state = s.published()
        public_url = state and state["tunnel"]["public_url"]
        if not public_url:
            return False
        local = ngrok.local_url(public_url)
        return http_status(local + "/health", timeout_s=2.0, auth=("bridge", token)) == 200

    try:
        serve.wait_ready(healthy_through_tunnel)
        elapsed = time.perf_counter() - serve.started_at
        log = (serve.home / "serve-output.log").read_text(errors="replace")
    finally:
        serve.stop()
        ngrok.kill_agents()
    return elapsed, _milestones(log, launched_wall)


def _milestones(log: str, launched_wall: float) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in log.splitlines():
        stamp = _STAMP.match(line)
        if not stamp:
            continue
        for name, pattern in MILESTONES:
            if name not in found and pattern.search(line):
                when = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                found[name] = when - launched_wall
    return found


def main() -> int:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="measured repetitions of each (default 3)")
    args = parser.parse_args()
    repeat = 1 if args.quick else max(1, args.repeat)
    work = scratch_dir("cold-start")
    print(f"Machine: {machine_summary()}")

    if not args.quick:  # one unmeasured round of each, so both find the same warm file cache
        time_mlflow(work / "warmup-mlflow")
        time_mlflow(work / "warmup-lean", lean=True)
        time_bridge(work / "warmup-bridge")

    times: dict[str, list[float]] = {"bridge": [], "mlflow": [], "lean": []}
    milestones: list[dict[str, float]] = []
    kinds = list(times)
    for i in range(repeat):
        for which in kinds[i % 3 :] + kinds[: i % 3]:
            if which == "bridge":
                seconds, marks = time_bridge(work / f"bridge-{i}")
                milestones.append(marks)
            else:
                seconds = time_mlflow(work / f"{which}-{i}", lean=which == "lean")
            times[which].append(seconds)
        done = ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items())
        print(f"  repetition {i + 1}/{repeat}: {done}", flush=True)

    b, m, lean = (median(times[k]) for k in ("bridge", "mlflow", "lean"))
    runs = {k: " ".join(f"{x:.2f}" for x in v) for k, v in times.items()}
    print_table(
        f"Cold start, median of {repeat} (seconds from launch)",
        ["what", "median s", "runs", "vs anchor"],
        [
            ["anchor: mlflow server --backend-store-uri sqlite:///… (stock) to /health 200", f"{m:.2f}",
             runs["mlflow"], "1.00"],
            ["bridge serve --tunnel ngrok to authenticated public /health 200 + record", f"{b:.2f}", runs["bridge"],
             f"{b / m:.2f} ({b - m:+.2f} s)"],
            ["(info) mlflow server --workers 1, job execution off, to /health 200", f"{lean:.2f}", runs["lean"],
             f"{lean / m:.2f} ({lean - m:+.2f} s)"],
        ],
    )  # fmt: skip
    print_table(
        "Where bridge's start-up goes (median seconds after launch, from its INFO log)",
        ["milestone", "s"],
        [[name, f"{median([mk[name] for mk in milestones if name in mk]):.2f}"]
         for name, _ in MILESTONES if any(name in mk for mk in milestones)]
        + [["healthy through the tunnel", f"{b:.2f}"]],
    )  # fmt: skip
    print(f"\nbridge's own overhead over the same lean MLflow: {b - lean:+.2f} s")
    ok = b <= m + GOAL_EXTRA_S
    print(f"\nbridge - mlflow = {b - m:+.2f} s (goal <= +{GOAL_EXTRA_S:.1f} s): {verdict(ok)}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
