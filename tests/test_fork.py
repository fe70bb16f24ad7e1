"""A forked child (a DataLoader worker, a DDP child) that logs: no inherited lock deadlocks it, and the runs it
creates keep beating while it lives (issue 8, defect 11)."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import uuid

import mlflow
from mlflow import MlflowClient

from bridge import config
from tests.support.client import server_run


def _log_in_child(run_id: str, done) -> None:
    client = MlflowClient()  # the inherited bridge+ tracking URI: the same journal
    client.log_metric(run_id, "from_child", 1.0, step=1)
    client.log_param(run_id, "child_param", "1")
    done.set()


def test_a_child_forked_while_the_journal_locks_are_held_can_still_log(bridge_connect, mlflow_server):
    conn = bridge_connect(mlflow_server.url)
    mlflow.set_experiment(f"fork-locks-{uuid.uuid4().hex[:8]}")
    journal = conn.journal
    with mlflow.start_run() as run:
        mlflow.log_metric("from_parent", 1.0)
        # The parent's journal-sync thread holds these at the moment of fork(): the worst case.
        held = threading.Event()
        release = threading.Event()

        def hold() -> None:
            with journal.database._lock, journal._move_lock, journal.spool._lock, conn.link.transport._lock:
                held.set()
                release.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        assert held.wait(10)
        try:
            ctx = multiprocessing.get_context("fork")
            done = ctx.Event()
            child = ctx.Process(target=_log_in_child, args=(run.info.run_id, done))
            child.start()
            child.join(60)
            assert not child.is_alive(), "the child deadlocked on a lock it inherited held"
            assert child.exitcode == 0 and done.is_set()
        finally:
            release.set()
            holder.join()
    assert conn.flush(60) == 0
    remote = server_run(MlflowClient(mlflow_server.url), mlflow.get_experiment(run.info.experiment_id).name)
    assert remote.data.metrics == {"from_parent": 1.0, "from_child": 1.0}
    assert remote.data.params == {"child_param": "1"}


def _train_in_child(experiment_id: str, ready, stop) -> None:
    with mlflow.start_run(experiment_id=experiment_id, run_name="child-run"):
        mlflow.log_metric("m", 1.0)
        ready.set()
        stop.wait(60)


def test_a_run_created_by_a_live_child_keeps_beating(bridge_connect, mlflow_server, monkeypatch):
    monkeypatch.setenv("BRIDGE_HEARTBEAT_S", "1")
    conn = bridge_connect(mlflow_server.url)
    name = f"fork-beat-{uuid.uuid4().hex[:8]}"
    experiment_id = mlflow.create_experiment(name)
    ctx = multiprocessing.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_train_in_child, args=(experiment_id, ready, stop))
    child.start()
    try:
        assert ready.wait(60)
        client = MlflowClient(mlflow_server.url)

        def beat() -> int | None:
            conn.flush(10)
            exp = client.get_experiment_by_name(name)
            runs = client.search_runs([exp.experiment_id]) if exp else []
            tag = runs[0].data.tags.get(config.HEARTBEAT_TAG) if runs else None
            return int(tag) if tag else None

        deadline = time.monotonic() + 60
        first = None
        while first is None and time.monotonic() < deadline:
            first = beat()
        assert first is not None, "the child's run reached the server"
        # The parent's sender keeps the child's run beating while the child lives.
        while time.monotonic() < deadline and (beat() or 0) < first + 3:
            conn.sender.wait_rounds(1, 5)
        assert (beat() or 0) >= first + 3, "the child's run kept beating"
    finally:
        stop.set()
        child.join(60)


def test_a_child_forked_during_a_create_does_not_wait_for_it(tmp_path):
    """A stopping sender waits for a create in flight (H21's grace); a child forked while its parent's sender
    was creating has no such create, and its own stop must not wait for one."""
    from bridge.client.delivery.heartbeat import Heartbeats
    from bridge.client.delivery.operations import Operations
    from bridge.client.journal import Journal
    from bridge.client.link import Link

    journal = Journal(tmp_path / "journal.sqlite")
    link = Link("http://127.0.0.1:9", "t")
    operations = Operations(link, journal, Heartbeats(link, journal, 60.0))
    with operations.creating():
        pid = os.fork()
        if pid == 0:  # the child: no create of its own is in flight
            os._exit(0 if operations.wait_for_creates(0.0) else 1)
        assert not operations.wait_for_creates(0.0)  # the parent's is
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    journal.close()
