"""The supervised `mlflow server` child: lean start, real readiness, restart on death, clean stop."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from bridge.errors import ConfigError, MlflowStartError
from bridge.serve.mlflow_process import (
    MlflowOptions,
    MlflowProcess,
    enable_wal,
    port_is_free,
    redact_uri,
    sqlite_database_path,
)  # fmt: skip
from tests.support.mlflow_server import free_port


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _journal_mode(path) -> str:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA journal_mode").fetchone()[0]


@pytest.mark.integration  # starts a process of its own
def test_lean_mlflow_starts_healthy_serves_artifacts_and_stops_without_orphans(bridge_home):
    proc = MlflowProcess(MlflowOptions(port=free_port()))
    proc.start()
    try:
        assert proc.healthy()
        tree = _tree(proc.pid)
        # 1 worker, no job runner, and MLflow's CLI replaced by its uvicorn: one process, not stock MLflow's ~15.
        assert len(tree) == 1, [p.cmdline()[:4] for p in tree]
        assert "uvicorn" in tree[0].cmdline()
        assert not any("huey" in " ".join(p.cmdline()) for p in tree)
        assert "--gunicorn-opts" not in proc.command()
        # The embedded default: SQLite and artifacts under BRIDGE_HOME, artifacts proxied by the server.
        # The file was created in WAL mode before MLflow built its schema in it.
        assert _journal_mode(bridge_home / "mlflow.db") == "wal"
        exp = requests.post(proc.url + "/api/2.0/mlflow/experiments/create", json={"name": "lean"}, timeout=10)
        assert exp.status_code == 200
        run = requests.post(
            proc.url + "/api/2.0/mlflow/runs/create", json={"experiment_id": exp.json()["experiment_id"]}, timeout=10
        ).json()["run"]["info"]
        put = requests.put(
            f"{proc.url}/api/2.0/mlflow-artifacts/artifacts/{run['experiment_id']}/{run['run_id']}/artifacts/hello.txt",
            data=b"hello",
            timeout=10,
        )
        assert put.status_code == 200
        assert next(iter((bridge_home / "artifacts").rglob("hello.txt"))).read_bytes() == b"hello"
        with sqlite3.connect(bridge_home / "mlflow.db") as conn:
            assert conn.execute("select count(*) from experiments where name = 'lean'").fetchone() == (1,)
        assert (bridge_home / "logs" / "mlflow.log").stat().st_size > 0
    finally:
        tree = _tree(proc.pid)
        proc.stop()
    _gone, alive = psutil.wait_procs(tree, timeout=5)
    assert alive == []
    assert port_is_free("127.0.0.1", proc.options.port)


class _WithoutExecHook(MlflowProcess):
    """MLflow as a future version without the private name would run: `_main` finds nothing to replace."""

    def command(self) -> list[str]:
        launcher = "import sys, bridge.serve.mlflow_process as m; m.EXEC_HOOK = '_gone'; m._main(sys.argv[1:])"
        return [sys.executable, "-c", launcher, *super().command()[3:]]


def test_existing_sqlite_store_goes_wal_and_two_process_fallback_works(bridge_home, tmp_path, mlflow_server):
    # An existing store in MLflow's own (rollback-journal) mode: a consistent copy of the shared server's.
    exp = requests.post(
        mlflow_server.url + "/api/2.0/mlflow/experiments/create", json={"name": "before-wal"}, timeout=10
    ).json()["experiment_id"]
    db = tmp_path / "existing.db"
    source = sqlite_database_path(mlflow_server.backend_store_uri)
    with sqlite3.connect(source) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    assert _journal_mode(db) == "delete"
    proc = _WithoutExecHook(MlflowOptions(port=free_port(), backend_store_uri=f"sqlite:///{db}"))
    proc.start()
    try:
        assert _journal_mode(db) == "wal"
        got = requests.get(proc.url + "/api/2.0/mlflow/experiments/get", params={"experiment_id": exp}, timeout=10)
        assert got.status_code == 200 and got.json()["experiment"]["name"] == "before-wal"
        created = requests.post(proc.url + "/api/2.0/mlflow/experiments/create", json={"name": "after-wal"}, timeout=10)
        assert created.status_code == 200
        # No private name to replace: MLflow's plain layout, the CLI waiting on its uvicorn child.
        tree = _tree(proc.pid)
        assert len(tree) == 2, [p.cmdline()[:4] for p in tree]
        assert "uvicorn" in " ".join(tree[1].cmdline())
    finally:
        tree = _tree(proc.pid)
        proc.stop()
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert alive == []


def test_sqlite_paths_and_wal_switch(tmp_path):
    assert sqlite_database_path("sqlite:////abs/mlflow.db") == Path("/abs/mlflow.db")
    assert str(sqlite_database_path("sqlite:///rel.db?timeout=5")) == "rel.db"
    for uri in ("sqlite://", "sqlite:///:memory:", "postgresql://u@h/db", "bogus://x"):
        assert sqlite_database_path(uri) is None
    fresh = tmp_path / "fresh.db"
    assert enable_wal(fresh) and _journal_mode(fresh) == "wal"  # created, and the mode persists in the file
    assert enable_wal(tmp_path / "no-such-dir" / "x.db") is False
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 200)
    assert enable_wal(junk) is False
    assert junk.read_bytes().startswith(b"this is not")  # left for MLflow to refuse in its own words


def test_scale_out_options_pass_through_unchanged(bridge_home):
    opts = MlflowOptions(
        port=free_port(),
        backend_store_uri="postgresql://u:pw@db.example/mlflow",
        artifacts_destination="s3://bucket/mlflow",
        workers=4,
    )
    proc = MlflowProcess(opts)
    cmd = proc.command()
    assert cmd[cmd.index("--artifacts-destination") + 1] == "s3://bucket/mlflow"
    assert cmd[cmd.index("--workers") + 1] == "4"
    assert "--serve-artifacts" in cmd
    env = proc.environment()
    assert env["MLFLOW_BACKEND_STORE_URI"] == "postgresql://u:pw@db.example/mlflow"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    # The password stays off the command line, where `ps` would show it.
    assert not any("pw@" in part for part in cmd)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"workers": 0}, "--workers"), ({"port": 70000}, "port"), ({"backend_store_uri": "file:///tmp/x"}, "sqlite")],
)
def test_bad_options_are_refused_with_a_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MlflowOptions(**kwargs)


def test_redact_uri_hides_passwords_only():
    assert redact_uri("postgresql://user:s3cret@host:5432/db") == "postgresql://user:***@host:5432/db"
    assert redact_uri("postgresql://user@host/db") == "postgresql://user@host/db"
    assert redact_uri("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    # libpq also takes the password as a query parameter
    assert (
        redact_uri("postgresql://u@h/db?password=s3cret&sslmode=require")
        == "postgresql://u@h/db?password=***&sslmode=require"
    )
    assert "s3cret" not in redact_uri("postgresql://u:s3cret@h/db?sslpassword=s3cret")


@pytest.mark.integration  # starts a process of its own
def test_start_failure_raises_with_mlflow_log_lines_and_no_leftovers(bridge_home):
    port = free_port()
    proc = MlflowProcess(MlflowOptions(port=port, backend_store_uri="bogus://bridge:s3cretpw@nowhere/x"))
    started = time.monotonic()
    with pytest.raises(MlflowStartError) as info:
        proc.start()
    message = str(info.value)
    assert time.monotonic() - started < 30  # the exit is noticed at once, not waited out
    assert "exited with code 1" in message
    assert "Last lines of" in message
    # MLflow's own words about the failure, not only ours; its echo of the URI has the password masked.
    assert "unsupported URI" in message
    assert "s3cretpw" not in message
    assert port_is_free("127.0.0.1", port)


@pytest.mark.integration  # starts a process of its own
def test_start_deadline_shows_why_mlflow_is_not_ready(bridge_home):
    port = free_port()
    # MLflow keeps retrying an unreachable database, so this is the deadline path. (20 s leaves a loaded
    # machine time to import MLflow and log its first refused connection: about 4 s on an idle one.)
    proc = MlflowProcess(
        MlflowOptions(port=port, backend_store_uri="postgresql://bridge:s3cretpw@127.0.0.1:1/nodb", start_timeout_s=20)
    )
    with pytest.raises(MlflowStartError) as info:
        proc.start()
    message = str(info.value)
    assert "did not become healthy within 20 s" in message
    assert "Connection refused" in message
    assert "s3cretpw" not in message
    assert port_is_free("127.0.0.1", port)
    assert proc.alive() is False


def test_port_in_use_is_refused_before_starting(bridge_home):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(MlflowStartError, match=f"port {port}"):
            MlflowProcess(MlflowOptions(port=port)).start()


@pytest.mark.integration  # starts a process of its own
def test_watch_restarts_mlflow_after_kill_9_and_reports_it(bridge_home):
    proc = MlflowProcess(MlflowOptions(port=free_port()))
    proc.start()
    stop = threading.Event()
    events: list[str] = []
    watcher = threading.Thread(target=proc.watch, args=(stop, events.append), daemon=True)
    watcher.start()
    try:
        old_tree = _tree(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)

        def restarted_and_reported() -> bool:  # watch() counts the restart first, then reports it
            return proc.status.restarts >= 1 and any("restarted" in e for e in events)

        deadline = time.monotonic() + 60
        while not restarted_and_reported() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.status.restarts == 1, events
        assert proc.pid != old_tree[0].pid
        assert proc.healthy()
        assert any("exited with code -9" in e for e in events)
        assert any("restarted" in e for e in events)
        # The old group (the orphaned uvicorn included) is gone.
        _, alive = psutil.wait_procs(old_tree, timeout=5)
        assert alive == []
    finally:
        stop.set()
        proc.stop()
        watcher.join(10)
    assert not watcher.is_alive()


@pytest.mark.integration  # starts a process of its own
def test_watch_restarts_mlflow_that_stops_answering(bridge_home):
    proc = MlflowProcess(
        MlflowOptions(port=free_port(), health_interval_s=0.5, health_failures=2, health_timeout_s=1.0, stop_grace_s=3)
    )
    proc.start()
    stop = threading.Event()
    events: list[str] = []
    watcher = threading.Thread(target=proc.watch, args=(stop, events.append), daemon=True)
    watcher.start()
    try:
        hung_pid = proc.pid
        os.kill(hung_pid, signal.SIGSTOP)  # alive, holding its port, answering nothing
        deadline = time.monotonic() + 60
        while proc.status.restarts < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.status.restarts == 1, events
        assert any("stopped answering /health" in e for e in events)
        assert proc.pid != hung_pid
        assert not psutil.pid_exists(hung_pid)
        assert proc.healthy()
    finally:
        stop.set()
        proc.stop()
        watcher.join(10)
