"""The scale-out path: `bridge serve --backend-store-uri postgresql://…` against the local PostgreSQL."""

from __future__ import annotations

import uuid

import pytest
from mlflow.tracking import MlflowClient

psycopg2 = pytest.importorskip("psycopg2")

pytestmark = pytest.mark.postgres


def _admin_connection():
    errors = []
    for user in ("postgres", "root"):
        try:
            conn = psycopg2.connect(host="127.0.0.1", port=5432, user=user, dbname="test", connect_timeout=5)
        except psycopg2.OperationalError as exc:
            errors.append(f"{user}: {exc}")
            continue
        conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
        return conn, user
    pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is not reachable: {errors}")


@pytest.fixture
def fresh_database():
    """A database of this test's own, dropped afterwards."""
    conn, user = _admin_connection()
    name = f"bridge_test_{uuid.uuid4().hex[:12]}"
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql://{user}@127.0.0.1:5432/{name}"
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


def test_serve_on_postgresql_logs_and_reads_back_a_run(own_bridge_serve, fresh_database, monkeypatch):
    server = own_bridge_serve("--backend-store-uri", fresh_database)
    assert server.state()["mlflow"]["backend_store_uri"] == fresh_database
    token = server.token()
    # The stock MLflow client, through the entrance, with the token as MLFLOW_TRACKING_TOKEN (Bearer).
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
    client = MlflowClient(tracking_uri=server.entrance_url)
    exp_id = client.create_experiment("postgres-backed")
    run_id = client.create_run(exp_id).info.run_id
    client.log_param(run_id, "model", "yolo11n")
    for step in range(5):
        client.log_metric(run_id, "loss", 1.0 / (step + 1), step=step)
    client.set_terminated(run_id, "FINISHED")

    run = client.get_run(run_id)
    assert run.data.params == {"model": "yolo11n"}
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    assert run.info.status == "FINISHED"

    # It really lives in PostgreSQL, not in a SQLite file.
    conn = psycopg2.connect(fresh_database)
    with conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
        assert cur.fetchone() == ("FINISHED",)
    conn.close()
    assert not (server.home / "mlflow.db").exists()
    assert server.stop() == 0
