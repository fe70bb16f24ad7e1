"""Entrance cost: MLflow logging through the entrance and the stand-in tunnel vs straight to MLflow.

    python benchmarks/bench_entrance.py [--quick]

One `bridge serve --tunnel ngrok` (stand-in agent, tests/support/fake_ngrok.py) and one run; the same requests
go three ways, interleaved in rounds so background load hits all alike:
  direct    http://127.0.0.1:<mlflow port>                 (the anchor)
  entrance  http://127.0.0.1:<entrance port> + token       (bridge's proxy alone)
  tunnel    the stand-in edge forwarder + token             (edge → entrance → MLflow: what Colab's requests take)
Workloads: log_batch with 1000 metrics (what bridge's sender sends) and single-metric log-metric calls, each
with 1 client and with 4 concurrent clients (keep-alive sessions, as MLflow's client and the sender use), and
GET /health and a 1000-metric log_batch for an unknown run (MLflow parses it and answers 404 without writing:
the cost of carrying the body), both for information.
With 1 client the paths alternate request by request, and "paired added" is the median of the differences
between neighbouring requests: on a machine shared with other work that is far steadier than a difference of
two p50s. Goals (tunnel vs direct, every logging workload): throughput ratio >= 0.9 and p50 added <= 2 ms
(paired with 1 client, p50 difference with 4).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import requests
from _common import (
    BridgeServe,
    StandInNgrok,
    argument_parser,
    machine_summary,
    percentile,
    print_table,
    scratch_dir,
    tree_cpu_seconds,
    verdict,
    wait_cpu_quiet,
)  # fmt: skip
from mlflow import MlflowClient

GOAL_THROUGHPUT_RATIO = 0.9
GOAL_P50_ADDED_MS = 2.0
METRICS_PER_BATCH = 1000
KEYS_PER_BATCH = 10
PATHS = ("direct", "entrance", "tunnel")
WARMUP_PER_CLIENT = 2  # unmeasured requests per client and path before each workload


@dataclass
class Workload:
    name: str
    endpoint: str
    clients: int
    requests_per_client: int  # 1 client: requests per path; several: per client, round and path
    make_body: object  # callable(step_base) -> bytes, or None for a GET
    steps_per_request: int
    in_goal: bool = True
    expect_status: int = 200


@dataclass
class Samples:
    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    paired_added_s: list[float] = field(default_factory=list)  # 1 client: this path minus direct, per round


class StepCounter:
    """Unique steps, so no two requests ever log the same (key, step, timestamp)."""

    def __init__(self) -> None:
        self._next = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> int:
        with self._lock:
            start, self._next = self._next, self._next + n
            return start


def batch_body(run_id: str):
    def make(step_base: int) -> bytes:
        now = int(time.time() * 1000)
        per_key = METRICS_PER_BATCH // KEYS_PER_BATCH
        metrics = [
            {"key": f"metric_{k}", "value": 0.001 * (step_base + s) + k, "timestamp": now, "step": step_base + s}
            for k in range(KEYS_PER_BATCH) for s in range(per_key)
        ]  # fmt: skip
        return json.dumps({"run_id": run_id, "metrics": metrics}).encode()

    return make


def metric_body(run_id: str):
    def make(step_base: int) -> bytes:
        return json.dumps(
            {"run_id": run_id, "key": "single", "value": step_base * 0.5, "timestamp": int(time.time() * 1000),
             "step": step_base}
        ).encode()  # fmt: skip

    return make


def run_chunk(base_url: str, headers: dict[str, str], work: Workload, steps: StepCounter, sessions: list) -> Samples:
    """`work.clients` threads each sending `requests_per_client` requests; bodies are built before the clock."""
    bodies = [
        [work.make_body(steps.take(work.steps_per_request)) if work.make_body else None
         for _ in range(work.requests_per_client)]
        for _ in range(work.clients)
    ]  # fmt: skip
    samples = Samples()
    lock = threading.Lock()
    start = threading.Barrier(work.clients + 1)
    url = base_url + work.endpoint
    all_headers = {**headers, "Content-Type": "application/json"}

    def client(i: int) -> None:
        session = sessions[i]
        mine: list[float] = []
        errors: list[str] = []
        start.wait()
        for body in bodies[i]:
            t0 = time.perf_counter()
            try:
                if body is None:
                    resp = session.get(url, headers=headers, timeout=60)
                else:
                    resp = session.post(url, data=body, headers=all_headers, timeout=60)
                status = resp.status_code
                resp.content  # noqa: B018 - the whole answer is part of the request's time
            except requests.RequestException as exc:
                errors.append(type(exc).__name__)
                continue
            mine.append(time.perf_counter() - t0)
            if status != work.expect_status:
                errors.append(f"HTTP {status}: {resp.text[:200]}")
        with lock:
            samples.latencies_s.extend(mine)
            samples.errors.extend(errors)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(work.clients)]
    for thread in threads:
        thread.start()
    start.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    samples.wall_s = time.perf_counter() - t0
    samples.requests = work.clients * work.requests_per_client
    return samples


def measure_sequential(
    work: Workload, targets: dict[str, tuple[str, dict]], steps: StepCounter, count: int
) -> dict[str, Samples]:
    """One client: requests alternate between the paths one by one, so each path sees the same load."""
    sessions = {path: [requests.Session()] for path in PATHS}
    single = Workload(
        work.name, work.endpoint, 1, 1, work.make_body, work.steps_per_request, work.in_goal, work.expect_status
    )
    for path in PATHS:  # warm-up: open the keep-alive connections, unmeasured
        for _ in range(WARMUP_PER_CLIENT):
            run_chunk(*targets[path], single, steps, sessions[path])
    totals = {path: Samples() for path in PATHS}
    for i in range(count):
        order = PATHS[i % len(PATHS) :] + PATHS[: i % len(PATHS)]
        this_round: dict[str, list[float]] = {}
        for path in order:
            got = run_chunk(*targets[path], single, steps, sessions[path])
            total = totals[path]
            total.latencies_s += got.latencies_s
            total.wall_s += sum(got.latencies_s)  # one client: busy time is the sum of its request times
            total.requests += got.requests
            total.errors += got.errors
            this_round[path] = got.latencies_s
        if all(len(v) == 1 for v in this_round.values()):
            for path in PATHS[1:]:
                totals[path].paired_added_s.append(this_round[path][0] - this_round["direct"][0])
    for per_path in sessions.values():
        per_path[0].close()
    return totals


def measure_concurrent(
    work: Workload, targets: dict[str, tuple[str, dict]], steps: StepCounter, rounds: int
) -> dict[str, Samples]:
    """Several clients at once on one path at a time; the paths take turns in short rounds."""
    sessions = {path: [requests.Session() for _ in range(work.clients)] for path in PATHS}
    warm = Workload(
        work.name,
        work.endpoint,
        work.clients,
        WARMUP_PER_CLIENT,
        work.make_body,
        work.steps_per_request,
        work.in_goal,
        work.expect_status,
    )
    for path in PATHS:
        run_chunk(*targets[path], warm, steps, sessions[path])
    totals = {path: Samples() for path in PATHS}
    for r in range(rounds):
        order = PATHS[r % len(PATHS) :] + PATHS[: r % len(PATHS)]
        for path in order:
            got = run_chunk(*targets[path], work, steps, sessions[path])
            total = totals[path]
            total.latencies_s += got.latencies_s
            total.wall_s += got.wall_s
            total.requests += got.requests
            total.errors += got.errors
    for per_path in sessions.values():
        for session in per_path:
            session.close()
    return totals


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these process trees."""
    return sum(tree_cpu_seconds(pid) for pid in pids)


def main() -> int:
    args = argument_parser(__doc__.splitlines()[0]).parse_args()
    rounds = 2 if args.quick else 20
    work_dir = scratch_dir("entrance")
    print(f"Machine: {machine_summary()}")

    ngrok = StandInNgrok(work_dir / "fake-ngrok")
    serve = BridgeServe(work_dir / "home", args=["--tunnel", "ngrok"], env_extra=ngrok.env)
    token = serve.token()
    serve.launch()
    try:
        state = serve.wait_ready(lambda s: (st := s.published()) and st["tunnel"]["public_url"] and st)
        tunnel_url = ngrok.local_url(state["tunnel"]["public_url"])
        client = MlflowClient(serve.mlflow_url)
        run_id = client.create_run(client.create_experiment("bench-entrance")).info.run_id
        # Let bridge finish starting in the background before measuring.
        wait_cpu_quiet(serve.proc.pid)
        auth = {"Authorization": f"Bearer {token}"}
        targets = {
            "direct": (serve.mlflow_url, {}),
            "entrance": (serve.entrance_url, auth),
            "tunnel": (tunnel_url, auth),
        }
        batch, single = batch_body(run_id), metric_body(run_id)
        per_key = METRICS_PER_BATCH // KEYS_PER_BATCH
        workloads = [
            Workload("log_batch x1000, 1 client", "/api/2.0/mlflow/runs/log-batch", 1, 6 if args.quick else 120,
                     batch, per_key),
            Workload("log_batch x1000, 4 clients", "/api/2.0/mlflow/runs/log-batch", 4, 1 if args.quick else 2,
                     batch, per_key),
            Workload("log_metric x1, 1 client", "/api/2.0/mlflow/runs/log-metric", 1, 30 if args.quick else 300,
                     single, 1),
            Workload("log_metric x1, 4 clients", "/api/2.0/mlflow/runs/log-metric", 4, 5 if args.quick else 10,
                     single, 1),
            Workload("GET /health (info: proxy cost alone)", "/health", 1, 50 if args.quick else 300, None, 0,
                     in_goal=False),
            # The same ~70 KB body, refused by MLflow before any database write: the cost of carrying it.
            Workload("log_batch x1000, unknown run (info)", "/api/2.0/mlflow/runs/log-batch", 1,
                     20 if args.quick else 150, batch_body("0" * 32), per_key, in_goal=False, expect_status=404),
        ]  # fmt: skip
        rows, cpu_rows, ok, steps = [], [], True, StepCounter()
        # Where the CPU goes, whatever else the machine is doing: the entrance runs inside the bridge process
        # (its MLflow child is a separate process tree), the stand-in edge in the agent process.
        mlflow_pid = serve.state()["mlflow"]["pid"]
        agent_pids = ngrok.agent.agent_pids()
        bridge_only = lambda: cpu_seconds([serve.proc.pid]) - cpu_seconds([mlflow_pid])  # noqa: E731
        probes = (bridge_only, lambda: cpu_seconds(agent_pids), lambda: cpu_seconds([mlflow_pid]))
        # Idle rates (the supervisor's ticks, MLflow's housekeeping), subtracted so only request work remains.
        t0, idle0 = time.perf_counter(), [probe() for probe in probes]
        time.sleep(3.0)
        idle_rate = [(probe() - c) / (time.perf_counter() - t0) for probe, c in zip(probes, idle0, strict=True)]
        for work in workloads:
            t0, before = time.perf_counter(), [probe() for probe in probes]
            if work.clients == 1:
                results = measure_sequential(work, targets, steps, work.requests_per_client)
            else:
                results = measure_concurrent(work, targets, steps, rounds)
            elapsed = time.perf_counter() - t0
            used = [probe() - b - rate * elapsed for probe, b, rate in zip(probes, before, idle_rate, strict=True)]
            sent = {path: r.requests + WARMUP_PER_CLIENT * work.clients for path, r in results.items()}
            cpu_rows.append([
                work.name,
                f"{used[0] / (sent['entrance'] + sent['tunnel']) * 1000:.2f}",
                f"{used[1] / sent['tunnel'] * 1000:.2f}",
                f"{used[2] / sum(sent.values()) * 1000:.2f}",
            ])  # fmt: skip
            errors = {path: r.errors for path, r in results.items() if r.errors}
            if errors:
                raise RuntimeError(f"{work.name}: requests failed: { {p: e[:3] for p, e in errors.items()} }")
            direct = results["direct"]
            direct_tput = direct.requests / direct.wall_s
            direct_p50 = percentile(direct.latencies_s, 50) * 1000
            for path in PATHS:
                res = results[path]
                tput = res.requests / res.wall_s
                p50 = percentile(res.latencies_s, 50) * 1000
                p99 = percentile(res.latencies_s, 99) * 1000
                ratio = tput / direct_tput
                added = p50 - direct_p50
                paired = percentile(res.paired_added_s, 50) * 1000 if res.paired_added_s else None
                mark = ""
                if path == "tunnel":
                    judged = paired if paired is not None else added
                    passed = ratio >= GOAL_THROUGHPUT_RATIO and judged <= GOAL_P50_ADDED_MS
                    if work.in_goal:
                        ok &= passed
                        mark = verdict(passed)
                    else:
                        mark = "info"
                if work.steps_per_request > 1:
                    unit = f"{tput * METRICS_PER_BATCH:,.0f} metrics/s"
                else:
                    unit = f"{tput:,.0f} req/s"
                rows.append([
                    work.name if path == "direct" else "", path, res.requests, unit, f"{ratio:.2f}", f"{p50:.1f}",
                    f"{p99:.1f}", "" if path == "direct" else f"{added:+.1f}",
                    "" if paired is None else f"{paired:+.1f}", mark,
                ])  # fmt: skip
        print_table(
            f"Entrance cost (1 client: paths alternate per request; 4 clients: {rounds} rounds per path; ms)",
            ["workload", "path", "requests", "throughput", "ratio", "p50", "p99", "p50 added", "paired added", "goal"],
            rows,
        )
        print_table(
            "CPU per request, ms (user+system, idle rate subtracted; barely affected by other load)",
            ["workload", "entrance (bridge process)", "stand-in edge (agent)", "MLflow"],
            cpu_rows,
        )
    finally:
        serve.stop()
        ngrok.kill_agents()
    print(f"\nGoals for the tunnel path: throughput ratio >= {GOAL_THROUGHPUT_RATIO} and p50 added <= "
          f"{GOAL_P50_ADDED_MS:.0f} ms in every logging workload: {verdict(ok)}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
