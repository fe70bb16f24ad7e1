"""The tracking-store plugin: MLflow's own APIs write through the journal and read with local ids."""

from __future__ import annotations

import math
import time
import uuid

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from bridge.client.plugins.store import JournalStore
from tests.support.client import server_run


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_fluent_api_delivers_exactly_the_points_logged(mlflow_server, server_client, bridge_connect):
    conn = bridge_connect(mlflow_server.url)
    experiment = _name("fluent")
    mlflow.set_experiment(experiment)
    assert isinstance(mlflow.tracking._tracking_service.utils._get_store(), JournalStore)
    with mlflow.start_run(run_name="r1") as run:
        local_id = run.info.run_id
        mlflow.log_param("lr", 0.01)
        mlflow.log_params({"epochs": 3, "model": "yolo11n"})
        for step in range(250):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.log_metrics({"map50": 0.25, "map": 0.125}, step=7)
        mlflow.set_tag("stage", "02")
        mlflow.set_tags({"a": "1", "b": "2"})
    assert conn.flush(30) == 0
    remote = server_run(server_client, experiment)
    assert remote.info.run_id != local_id and remote.data.tags["bridge.run_key"] == local_id
    assert remote.info.status == "FINISHED" and remote.info.run_name == "r1"
    assert remote.data.params == {"lr": "0.01", "epochs": "3", "model": "yolo11n"}
    assert {k: remote.data.tags[k] for k in ("stage", "a", "b")} == {"stage": "02", "a": "1", "b": "2"}
    history = server_client.get_metric_history(remote.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / (s + 1)) for s in range(250)]
    assert remote.data.metrics["map50"] == 0.25 and remote.data.metrics["map"] == 0.125
    # Reads through bridge answer with the local id.
    assert mlflow.get_run(local_id).data.params["model"] == "yolo11n"
    assert mlflow.get_run(local_id).info.run_id == local_id
    found = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert [r.info.run_id for r in found] == [local_id]


def test_mlflow_client_api_and_original_timestamps(mlflow_server, server_client, bridge_connect):
    conn = bridge_connect(mlflow_server.url)
    client = MlflowClient()
    experiment_id = client.create_experiment(_name("client"))
    start = int(time.time() * 1000) - 3_600_000  # an hour ago: the server must keep it
    run = client.create_run(experiment_id, start_time=start, tags={"who": "test"})
    stamps = [start + 1000 * i for i in range(5)]
    client.log_batch(
        run.info.run_id,
        metrics=[Metric("acc", i / 10, stamps[i], i) for i in range(5)],
        params=[Param("p", "1")],
        tags=[RunTag("k", "v")],
    )
    client.log_metric(run.info.run_id, "single", 3.5, timestamp=stamps[0], step=9)
    client.set_terminated(run.info.run_id, "FAILED", end_time=start + 60_000)
    assert conn.flush(30) == 0
    name = client.get_experiment(experiment_id).name
    remote = server_run(server_client, name)
    assert remote.info.start_time == start and remote.info.end_time == start + 60_000
    assert remote.info.status == "FAILED"
    assert [(m.timestamp, m.value) for m in server_client.get_metric_history(remote.info.run_id, "acc")] == [
        (stamps[i], i / 10) for i in range(5)
    ]
    (single,) = server_client.get_metric_history(remote.info.run_id, "single")
    assert (single.timestamp, single.step, single.value) == (stamps[0], 9, 3.5)
    # The local experiment id keeps working after the server mapped it.
    assert client.get_experiment(experiment_id).name == name
    assert client.get_run(run.info.run_id).info.status == "FAILED"


def test_offline_start_then_server_up_delivers_everything_once(flaky_proxy, server_client, bridge_connect):
    flaky_proxy.set_mode("refuse")  # the server's port is closed: connection refused, as with a stopped server
    conn = bridge_connect(flaky_proxy.url)
    assert conn.status().online is False
    experiment = _name("offline")
    mlflow.set_experiment(experiment)
    started = int(time.time() * 1000)
    with mlflow.start_run() as run:
        mlflow.log_param("batch", 16)
        for step in range(120):
            mlflow.log_metric("loss", 2.0 - step / 100, step=step)
        mlflow.set_tag("phase", "offline")
        # Offline reads answer from the journal, with the local id.
        seen = mlflow.get_run(run.info.run_id)
        assert seen.data.params == {"batch": "16"} and seen.data.metrics["loss"] == pytest.approx(2.0 - 1.19)
        assert seen.info.run_id == run.info.run_id
    assert conn.flush(0.5) > 0
    status = conn.status()
    assert status.pending >= 123 and status.online is False and status.oldest_undelivered_s is not None
    flaky_proxy.set_mode("pass")  # the server is back
    assert conn.flush(60) == 0
    client = server_client
    remote = server_run(client, experiment)
    assert remote.info.status == "FINISHED"
    assert started - 1000 <= remote.info.start_time <= started + 5000, "the original start time, not delivery time"
    history = client.get_metric_history(remote.info.run_id, "loss")
    assert len(history) == 120 and sorted(m.step for m in history) == list(range(120))
    assert remote.data.params == {"batch": "16"} and remote.data.tags["phase"] == "offline"
    assert all(m.timestamp <= remote.info.end_time for m in history)


def test_same_experiment_name_from_two_journals_is_one_experiment(flaky_proxy, server_client, bridge_connect, tmp_path):
    flaky_proxy.set_mode("refuse")  # the server's port is closed
    name = _name("shared")
    for i in range(2):  # two "processes" (journals) both create the experiment while offline
        conn = bridge_connect(flaky_proxy.url, journal=tmp_path / f"j{i}.sqlite")
        mlflow.set_experiment(name)
        with mlflow.start_run():
            mlflow.log_metric("x", float(i))
        mlflow.tracking.fluent._active_experiment_id = None
        conn.close()  # the process ends; its journal stays behind
    assert server_client.get_experiment_by_name(name) is None  # nothing got through while offline
    flaky_proxy.set_mode("pass")  # the server is back
    from bridge.client.connect import sync

    for i in range(2):
        assert sync(tmp_path / f"j{i}.sqlite", flaky_proxy.url, timeout=60).left == 0
    client = server_client
    experiments = [e for e in client.search_experiments() if e.name == name]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id])
    assert sorted(r.data.metrics["x"] for r in runs) == [0.0, 1.0]


def test_bad_values_raise_at_the_call_as_mlflow_would_and_the_rest_arrives(
    mlflow_server, server_client, bridge_connect
):
    # Issue 8, defect 8: what the server would refuse is refused at the call, never accepted and dropped later.
    conn = bridge_connect(mlflow_server.url)
    experiment = _name("bad")
    mlflow.set_experiment(experiment)
    client = MlflowClient()
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        mlflow.log_param("lr", "0.1")
        mlflow.log_metric("good", 1.0, step=0)
        with pytest.raises(MlflowException, match="Changing param values is not allowed") as changed:
            mlflow.log_param("lr", "0.2")  # conflicting value
        assert changed.value.error_code == "INVALID_PARAMETER_VALUE"
        with pytest.raises(MlflowException, match="Names may only contain"):
            client.log_batch(run_id, metrics=[Metric("bad name!?*", 1.0, 1, 0)])
        with pytest.raises(MlflowException, match="exceeds the maximum length of 250"):
            mlflow.log_param("k" * 300, "v")  # over MLflow's 250-char key limit
        mlflow.log_param("huge", "x" * 10_000)  # MLflow truncates long values to 6000 chars
        mlflow.log_metric("nan", math.nan, step=1)
        mlflow.log_metric("inf", math.inf, step=1)
        for step in range(1, 50):
            mlflow.log_metric("good", 1.0 + step, step=step)
    assert conn.flush(30) == 0
    remote = server_run(server_client, experiment)
    assert remote.info.status == "FINISHED"
    assert remote.data.params == {"lr": "0.1", "huge": "x" * 6000}
    assert len(server_client.get_metric_history(remote.info.run_id, "good")) == 50
    assert math.isnan(remote.data.metrics["nan"])
    assert remote.data.metrics["inf"] > 1e300  # MLflow's SQL store stores +inf as the largest float
    assert conn.journal.queue.dead_letters() == [] and conn.status().dead_letters == 0


def test_dataset_inputs_are_journaled_and_delivered(mlflow_server, server_client, bridge_connect):
    import numpy as np

    conn = bridge_connect(mlflow_server.url)
    name = _name("inputs")
    mlflow.set_experiment(name)
    dataset = mlflow.data.from_numpy(np.arange(12, dtype=np.float32).reshape(4, 3), name="tiny")
    with mlflow.start_run():
        mlflow.log_input(dataset, context="train")
    assert conn.flush(30) == 0
    remote = server_client.get_run(server_run(server_client, name).info.run_id)
    (logged,) = remote.inputs.dataset_inputs
    assert logged.dataset.name == "tiny" and logged.dataset.digest == dataset.digest
    assert [t.value for t in logged.tags if t.key == "mlflow.data.context"] == ["train"]


def test_reads_from_several_threads_each_use_their_own_http_session(fixed_status_server, bridge_connect, monkeypatch):
    import threading

    fixed_status_server.status = 200
    conn = bridge_connect(fixed_status_server.url)
    store = mlflow.tracking._tracking_service.utils._get_store()
    assert isinstance(store, JournalStore)
    seen: list[tuple[int, object]] = []
    transport = conn.link.transport
    real = transport._session

    def spy():
        session = real()
        seen.append((threading.get_ident(), session))
        return session

    monkeypatch.setattr(transport, "_session", spy)

    def read_twice():
        store.search_experiments()
        store.search_experiments()

    together = threading.Barrier(2)  # both alive at once: thread ids are not reused

    def worker_reads():
        together.wait(10)
        read_twice()
        together.wait(10)

    read_twice()
    workers = [threading.Thread(target=worker_reads) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    by_thread: dict[int, set[int]] = {}
    for ident, session in seen:
        by_thread.setdefault(ident, set()).add(id(session))
    assert len(by_thread) == 3 and all(len(ids) == 1 for ids in by_thread.values()), "one session per thread"
    assert len(set().union(*by_thread.values())) == 3, "and no session shared between threads"
