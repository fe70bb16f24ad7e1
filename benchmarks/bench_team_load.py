"""The team set-up under load: bridge serve vs stock `mlflow server`, same PostgreSQL, workers and S3 artifacts.

    python benchmarks/bench_team_load.py [--quick] [--clients 20] [--epochs 50]

Each side gets a fresh PostgreSQL database (127.0.0.1:5432) and its own prefix in one bucket of moto's
S3-compatible server (`moto_server`, from `moto[server]`: MinIO is not installable here), and 4 MLflow workers:
  bridge   `bridge serve --tunnel cloudflared --backend-store-uri postgresql://… --workers 4
           --artifacts-destination s3://mlflow/bridge --heartbeat-timeout 30`, clients through the stand-in
           cloudflared edge (tests/support/fake_cloudflared.py) and the entrance, with the token
  stock    `mlflow server --backend-store-uri postgresql://… --workers 4 --artifacts-destination s3://mlflow/stock`,
           clients straight to it (no login, no tunnel): the anchor
Load (tests/support/team_load.py): `--clients` client processes at once, each one YOLO-like run: 40 params, one
log_batch per epoch (14 metrics + the heartbeat tag) every second for `--epochs` epochs, weights/last.pt and
weights/best.pt (1 MB each) and results.csv uploaded at half time and at the end, FINISHED; plus one client that
goes silent after 5 epochs (never FINISHED), and a reader polling the UI's runs/search every second.
Reported per side: errors (goal 0), points and artifacts delivered (goal 100 %, read back from PostgreSQL and the
bucket), p50/p99 of log_batch, requests/s, peak RSS of the server processes (bridge: bridge serve + MLflow + its
workers, the stand-in edge excluded; stock: mlflow server + workers), and the reaper: the silent run KILLED,
no live run KILLED.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from _common import BridgeServe, MlflowServer, argument_parser, machine_summary, mib, print_table, scratch_dir, verdict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.team_load import (  # noqa: E402
    METRIC_KEYS,
    Plan,
    S3Server,
    delivered,
    expected_points,
    fresh_database,
    prime_database,
    run_load,
    summary,
)  # fmt: skip
from tests.support.tunnel import make_fake_cloudflared  # noqa: E402

HEARTBEAT_TIMEOUT_S = 30


@dataclass
class PostgresMlflowServer(MlflowServer):
    """Stock `mlflow server` on a PostgreSQL database instead of the SQLite file."""

    database: str = ""

    @property
    def backend_store_uri(self) -> str:
        return self.database


def check(found: dict, report, plan: Plan, silent: Plan) -> dict:
    live = [c for c in report.clients if c.name != "client-silent"]
    points = sum(found[c.run_id]["points"] for c in live if c.run_id)
    want_points = len(live) * expected_points(plan)
    arts = sum(
        1
        for c in live
        if c.run_id
        for path, size in c.uploaded.items()
        if found[c.run_id]["artifacts"].get(path) == size
    )
    want_arts = len(live) * 3
    killed_live = [c.name for c in live if c.run_id and found[c.run_id]["status"] == "KILLED"]
    unfinished = [c.name for c in live if c.run_id and found[c.run_id]["status"] != "FINISHED"]
    silent_run = next((c for c in report.clients if c.name == "client-silent"), None)
    silent_status = found.get(silent_run.run_id, {}).get("status") if silent_run and silent_run.run_id else None
    return {
        "points": points,
        "want_points": want_points,
        "artifacts": arts,
        "want_artifacts": want_arts,
        "killed_live": killed_live,
        "unfinished": unfinished,
        "silent_status": silent_status,
    }


def main() -> int:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=50)
    args = parser.parse_args()
    epochs = 10 if args.quick else args.epochs
    plan = Plan(epochs=epochs, epoch_s=1.0, params=40, artifact_bytes=1024 * 1024, upload_epochs=(epochs // 2, epochs))
    silent = Plan(epochs=epochs, epoch_s=1.0, params=40, upload_epochs=(), silent_after=5)
    work = scratch_dir("team-load")
    s3 = S3Server(work / "moto.log")
    s3.start()
    s3.create_bucket("mlflow")
    rows, verdicts = [], []
    try:
        for side in ("bridge", "stock"):
            with fresh_database(f"bench_{side}") as database:
                prime_database(database)
                prefix = f"s3://mlflow/{side}"
                if side == "bridge":
                    agent = make_fake_cloudflared(work / "cloudflared")
                    server = BridgeServe(home=work / "bridge-home", args=[
                        "--tunnel", "cloudflared", "--backend-store-uri", database, "--workers", "4",
                        "--artifacts-destination", prefix, "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S)],
                        env_extra={**agent.env, **s3.env})  # fmt: skip
                    server.start()
                    token = server.token()
                    base = agent.local_url(server.state()["tunnel"]["public_url"])
                    rss_pids = [server.proc.pid]
                else:
                    server = PostgresMlflowServer(
                        work / "stock",
                        database=database,
                        args=["--workers", "4", "--artifacts-destination", prefix],
                        env=s3.env,
                    )
                    server.start()
                    server.wait_healthy()
                    token, base, rss_pids = None, server.url, [server.proc.pid]
                try:
                    created = requests.post(
                        base + "/api/2.0/mlflow/experiments/create",
                        json={"name": "team-load"},
                        auth=("bridge", token) if token else None,
                        timeout=60,
                    )
                    created.raise_for_status()
                    exp = created.json()["experiment_id"]
                    report = run_load(
                        base,
                        token,
                        exp,
                        args.clients,
                        plan,
                        silent=silent,
                        rss_pids=rss_pids,
                        rss_exclude=("fake_cloudflared",),
                        timeout_s=epochs * 10 + 300,
                    )
                    if side == "bridge":  # the reaper gets its timeout and a round to mark the silent run
                        deadline = time.monotonic() + HEARTBEAT_TIMEOUT_S * 2
                        while time.monotonic() < deadline:
                            if (
                                check(delivered(database, s3, prefix, report), report, plan, silent)["silent_status"]
                                == "KILLED"
                            ):
                                break
                            time.sleep(1)
                    result = check(delivered(database, s3, prefix, report), report, plan, silent)
                finally:
                    server.stop()
            stats = summary(report)
            errors = report.errors
            for e in errors[:5]:
                print(f"{side} error: {e}")
            reaper = (
                f"silent run {result['silent_status']}, live KILLED: {len(result['killed_live'])}"
                if side == "bridge"
                else f"no reaper: silent run {result['silent_status']}"
            )
            rows.append(
                (
                    side,
                    len(errors),
                    f"{result['points']}/{result['want_points']}",
                    f"{result['artifacts']}/{result['want_artifacts']}",
                    f"{stats['p50_ms']:.0f} ms",
                    f"{stats['p99_ms']:.0f} ms",
                    f"{stats['reader_p50_ms']:.0f} ms",
                    f"{stats['req_per_s']:.1f}",
                    mib(report.peak_rss_bytes),
                    reaper,
                )
            )
            ok = (
                not errors
                and result["points"] == result["want_points"]
                and result["artifacts"] == result["want_artifacts"]
                and not result["unfinished"]
            )
            if side == "bridge":
                ok = ok and not result["killed_live"] and result["silent_status"] == "KILLED"
            verdicts.append((side, ok))
    finally:
        s3.stop()
    print(f"\n{machine_summary()}")
    print(
        f"{args.clients} clients + 1 silent, {epochs} epochs x {len(METRIC_KEYS)} metrics each, 1 s per epoch, "
        f"3 uploads (2 x 1 MB + results.csv) per client, a UI reader every 1 s; PostgreSQL, 4 workers, moto S3"
    )
    print_table(
        "Team load: bridge serve (through the stand-in tunnel and the entrance) vs stock mlflow server",
        [
            "server",
            "errors",
            "points",
            "artifacts",
            "log_batch p50",
            "p99",
            "runs/search p50",
            "req/s",
            "peak RSS",
            "reaper",
        ],
        rows,
    )
    ok = dict(verdicts).get("bridge", False)
    print(f"goal (bridge): 0 errors, 100 % delivered, silent run KILLED and no live run: {verdict(ok)}")
    print(f"stock mlflow (the anchor, information): 0 errors and 100 % delivered: {dict(verdicts).get('stock')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
