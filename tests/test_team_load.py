"""The team set-up under load (CI-sized): `bridge serve` on PostgreSQL with 4 MLflow workers and S3-compatible
artifacts (moto's server), 20 training clients at once through the stand-in cloudflared and the entrance, a
browser-like reader polling the runs table, and one client that vanishes mid-run.

Everything is read back from the server side: metric points and params from PostgreSQL, artifacts from the
bucket, run status from both. The full-size run with the stock-MLflow anchor is benchmarks/bench_team_load.py.
"""

from __future__ import annotations

import time

import pytest
import requests

from tests.support.team_load import (
    METRIC_KEYS,
    Plan,
    S3Server,
    delivered,
    expected_points,
    fresh_database,
    prime_database,
    run_load,
    summary,
)

pytestmark = pytest.mark.postgres

CLIENTS = 20
PLAN = Plan(epochs=10, epoch_s=0.5, params=40, artifact_bytes=512 * 1024, upload_epochs=(5, 10))
SILENT = Plan(epochs=10, epoch_s=0.5, params=40, upload_epochs=(), silent_after=2)
HEARTBEAT_TIMEOUT_S = 20


@pytest.mark.timeout(420)
def test_twenty_trainings_at_once_on_postgres_four_workers_and_s3(own_bridge_serve, fake_cloudflared, tmp_path):
    s3 = S3Server(tmp_path / "moto.log")
    s3.start()
    try:
        s3.create_bucket("mlflow")
        with fresh_database() as database:
            prime_database(database)  # MLflow's migrations are not what this measures, nor part of its deadline
            server = own_bridge_serve(
                "--tunnel", "cloudflared", "--backend-store-uri", database, "--workers", "4",
                "--artifacts-destination", "s3://mlflow/bridge", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S),
                env_extra={**fake_cloudflared.env, **s3.env},
            )  # fmt: skip
            token = server.token()
            public = fake_cloudflared.local_url(server.state()["tunnel"]["public_url"])
            created = requests.post(
                public + "/api/2.0/mlflow/experiments/create",
                json={"name": "team-load"},
                auth=("bridge", token),
                timeout=30,
            )
            assert created.status_code == 200, created.text
            experiment_id = created.json()["experiment_id"]

            report = run_load(public, token, experiment_id, CLIENTS, PLAN, silent=SILENT, timeout_s=240)
            print(summary(report))

            assert report.errors == []
            assert len(report.clients) == CLIENTS + 1 and all(c.run_id for c in report.clients)
            found = delivered(database, s3, "s3://mlflow/bridge", report)
            live = [c for c in report.clients if c.name != "client-silent"]
            for client in live:
                run = found[client.run_id]
                assert run["points"] == expected_points(PLAN) == PLAN.epochs * len(METRIC_KEYS), client.name
                assert run["params"] == PLAN.params and run["status"] == "FINISHED", (client.name, run)
                assert run["artifacts"] == client.uploaded and len(client.uploaded) == 3, (client.name, run)
            # The reaper marks the vanished client's run KILLED once its heartbeat is older than the timeout,
            # and no live run, however slow its requests were under this load.
            silent = next(c for c in report.clients if c.name == "client-silent")
            assert found[silent.run_id]["points"] == expected_points(SILENT)
            deadline = time.monotonic() + HEARTBEAT_TIMEOUT_S * 3
            while delivered(database, s3, "s3://mlflow/bridge", report)[silent.run_id]["status"] != "KILLED":
                assert time.monotonic() < deadline, "the silent run was never reaped"
                time.sleep(0.5)
            statuses = {
                c.name: s["status"]
                for c in report.clients
                for s in [delivered(database, s3, "s3://mlflow/bridge", report)[c.run_id]]
            }
            assert {name: s for name, s in statuses.items() if s != "FINISHED"} == {"client-silent": "KILLED"}
            events = " ".join(e["event"] for e in server.state()["events"])
            assert "marked 1 run(s) KILLED" in events and silent.run_id in events
            usage = server.state()["usage"]
            assert usage["requests"] >= report.requests  # every request came through the tunnel, and was counted
            assert server.stop() == 0
    finally:
        s3.stop()
