"""Logged models (MLflow 3) through the journal, against a real `mlflow server` (client/models.py).

Each test logs through `bridge.connect()` and then checks the server with a plain MLflow client: the model
with its params, tags and READY status, its artifacts' bytes, its link to the run (by the server's run id),
and that it loads and predicts on the workstation's side.
"""

from __future__ import annotations

import contextlib
import math
import sys

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from bridge.client import journal as J
from bridge.client.journal.kinds import MODEL_KEY_TAG
from tests.support.client import server_run
from tests.support.transport import FaultTransport

torch = pytest.importorskip("torch")


class Double(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return np.asarray(model_input, dtype=float) * 2


def tiny_torch():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


@contextlib.contextmanager
def on_the_workstation(url: str):
    """The fluent API pointed straight at the server (a stock client on the workstation), then back."""
    tracking, registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(tracking)
        mlflow.set_registry_uri(registry)


def server_model(server_client: MlflowClient, experiment: str, *, params: dict, tags: dict):
    """The run and its one logged model on the server, checked: READY, params, tags, run link, files."""
    run = server_run(server_client, experiment)
    models = server_client.search_logged_models([run.info.experiment_id])
    assert len(models) == 1, f"expected one logged model, found {[m.model_id for m in models]}"
    model = models[0]
    assert str(model.status) == "READY"
    assert model.source_run_id == run.info.run_id
    assert {k: model.params.get(k) for k in params} == params
    assert {k: model.tags.get(k) for k in tags} == tags
    outputs = server_client.get_run(run.info.run_id).outputs
    assert [o.model_id for o in outputs.model_outputs] == [model.model_id]
    assert "MLmodel" in {f.path for f in server_client.list_logged_model_artifacts(model.model_id)}
    return run, model


def test_pytorch_log_model_online(mlflow_server, bridge_connect, server_client):
    experiment = "models-torch-online"
    conn = bridge_connect(mlflow_server.url, experiment=experiment)
    module = tiny_torch()
    with mlflow.start_run() as run:
        mlflow.log_param("lr", "0.1")
        info = mlflow.pytorch.log_model(
            module,
            name="net",
            params={"hidden": "3"},
            tags={"kind": "tiny"},
            pip_requirements=[],
            input_example=np.ones((1, 3), dtype=np.float32),
        )
    local_id = info.model_id
    assert mlflow.get_logged_model(local_id).model_id == local_id  # the id MLflow was given stays valid
    assert conn.flush(60) == 0
    server_side, model = server_model(
        server_client, experiment, params={"hidden": "3", "lr": "0.1"}, tags={"kind": "tiny", MODEL_KEY_TAG: local_id}
    )
    assert server_side.info.run_id == conn.journal.ids.run(run.info.run_id).remote_id
    # Reads through bridge answer with local ids.
    seen = mlflow.get_logged_model(local_id)
    assert (seen.model_id, seen.source_run_id, str(seen.status)) == (local_id, run.info.run_id, "READY")
    with on_the_workstation(mlflow_server.url):
        loaded = mlflow.pytorch.load_model(f"models:/{model.model_id}")
    x = torch.ones(1, 3)  # the pt2 export fixed the batch size of the input example
    assert torch.allclose(loaded(x), module(x))


def test_pyfunc_log_model_offline_then_online(mlflow_server, bridge_connect, server_client):
    """Server unreachable while the model is logged (refused), then reachable: delivered whole, READY last."""
    experiment = "models-pyfunc-offline"
    transport = FaultTransport()
    transport.fail("refuse")
    conn = bridge_connect(mlflow_server.url, experiment=experiment, transport=transport, probe_timeout=0.5)
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(
            name="double", python_model=Double(), pip_requirements=[], params={"factor": "2"}
        )
    local = mlflow.get_logged_model(info.model_id)  # offline: from the journal
    assert (local.model_id, local.source_run_id, str(local.status)) == (info.model_id, run.info.run_id, "READY")
    assert local.params["factor"] == "2"
    assert [m.model_id for m in mlflow.search_logged_models(output_format="list")] == [info.model_id]
    assert conn.flush(1) > 0
    transport.clear()
    assert conn.flush(60) == 0
    _, model = server_model(server_client, experiment, params={"factor": "2"}, tags={MODEL_KEY_TAG: info.model_id})
    # READY was sent after the last file: no finalize request precedes an artifact upload of the model.
    sent = [r for r in transport.requests if r.fault is None]
    finalize = max(i for i, r in enumerate(sent) if r.method == "PATCH" and r.path.endswith(model.model_id))
    uploads = [i for i, r in enumerate(sent) if r.method == "PUT" and f"/models/{model.model_id}/" in r.path]
    assert uploads and max(uploads) < finalize
    with on_the_workstation(mlflow_server.url):
        predicted = mlflow.pyfunc.load_model(f"models:/{model.model_id}").predict(np.array([[1.0, 2.0]]))
    assert np.allclose(predicted, [[2.0, 4.0]])


def test_lost_answer_on_the_create_makes_one_model(mlflow_server, bridge_connect, server_client):
    experiment = "models-lost-answer"
    transport = FaultTransport()
    # The search for an earlier copy comes first, then the create: the answers of both are lost.
    transport.fail("lost_answer", path="/api/2.0/mlflow/logged-models", times=2)
    conn = bridge_connect(mlflow_server.url, experiment=experiment, transport=transport)
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="double", python_model=Double(), pip_requirements=[])
    assert conn.flush(60) == 0
    assert any(r.fault == "lost_answer" for r in transport.requests)
    server_model(server_client, experiment, params={}, tags={})  # exactly one model, complete


class _LosesTheAnswerOf(FaultTransport):
    """Real HTTP; the answer to the first request of `method` to exactly `path` is lost (the server applied it)."""

    def __init__(self, method: str, path: str):
        super().__init__()
        self.method, self.path, self.lost = method, path, False

    def _take(self, request):
        if not self.lost and request.method == self.method and request.path == self.path:
            from tests.support.transport import _Fault

            self.lost = True
            return _Fault("lost_answer", None, None, 0, b"")
        return super()._take(request)


def test_h28_a_model_whose_create_answer_was_lost_keeps_its_params_and_files(
    mlflow_server, bridge_connect, server_client
):
    """Soak seed 320003 (models on, a flapping link cut the answer to a logged model's create): the next try found
    the model by its key and sent its params again, taking them for idempotent — MLflow inserts a model's params,
    refused the duplicate (UNIQUE constraint failed), and the create became a dead letter: the model stayed PENDING
    with no files, every op of it a dead letter. A try after a lost answer now sends only the params the model lacks."""
    experiment = "models-h28"
    transport = _LosesTheAnswerOf("POST", "/api/2.0/mlflow/logged-models")
    conn = bridge_connect(mlflow_server.url, experiment=experiment, transport=transport)
    with mlflow.start_run():
        mlflow.log_param("lr", "0.1")  # MLflow copies the run's params to the model too
        mlflow.pyfunc.log_model(name="double", python_model=Double(), pip_requirements=[], params={"epochs": 7})
    assert conn.flush(60) == 0
    assert transport.lost, "the create's answer was lost: this test made its case"
    assert conn.status().dead_letters == 0
    server_model(server_client, experiment, params={"epochs": "7", "lr": "0.1"}, tags={})


def test_tracing_and_other_unsupported_calls_are_refused_by_name(mlflow_server, bridge_connect, capfd):
    bridge_connect(mlflow_server.url, experiment="models-tracing")
    with mlflow.start_span("step") as span:  # MLflow exports spans in the background: it warns, never raises
        span.set_inputs({"x": 1})
    mlflow.flush_trace_async_logging()
    assert "start_trace: bridge does not journal MLflow tracing" in capfd.readouterr().err
    with pytest.raises(MlflowException, match="search_traces: bridge does not journal MLflow tracing"):
        mlflow.search_traces(return_type="list")
    with pytest.raises(MlflowException, match="register_scorer: not supported through bridge's journal"):
        MlflowClient()._tracking_client.store.register_scorer("0", "scorer", "{}")


def test_autolog_model_is_not_silently_missing(mlflow_server, bridge_connect, server_client):
    """Autolog swallows store errors: before models were journaled its model simply never arrived."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    experiment = "models-autolog"
    transport = FaultTransport()
    transport.fail("refuse")
    conn = bridge_connect(mlflow_server.url, experiment=experiment, transport=transport, probe_timeout=0.5)
    mlflow.sklearn.autolog(log_input_examples=False, log_model_signatures=False, log_datasets=False)
    try:
        with mlflow.start_run():
            sklearn.LinearRegression().fit(np.array([[0.0], [1.0], [2.0]]), np.array([0.0, 2.0, 4.0]))
    finally:
        mlflow.sklearn.autolog(disable=True)
    transport.clear()
    assert conn.flush(60) == 0
    _, model = server_model(server_client, experiment, params={"fit_intercept": "True"}, tags={})
    with on_the_workstation(mlflow_server.url):
        predicted = mlflow.pyfunc.load_model(f"models:/{model.model_id}").predict(np.array([[3.0]]))
    assert np.allclose(predicted, [6.0])


# ------------------------------------------------------------------ metrics of a logged model (harness H22)

T0 = 1_700_000_000_000  # explicit timestamps: bridge's and stock MLflow's points compare exactly


def model_metrics(server_client: MlflowClient, experiment: str) -> tuple[list, dict]:
    """(metrics, params) of the one READY logged model in `experiment` on the server, metrics as
    sorted (key, value, step, timestamp) tuples."""
    models = server_client.search_logged_models([server_client.get_experiment_by_name(experiment).experiment_id])
    assert [str(m.status) for m in models] == ["READY"], f"expected one READY model, found {models}"
    return sorted((m.key, m.value, m.step, m.timestamp) for m in models[0].metrics), dict(models[0].params)


def stock(url: str, experiment: str, program) -> None:
    """`program()` through stock MLflow straight to the server: the oracle."""
    with on_the_workstation(url):
        mlflow.set_experiment(experiment)
        program()
        mlflow.end_run()


def server_state(server_client: MlflowClient, experiment: str, run_id: str) -> tuple:
    """(each logged model's status and points, the run's metric histories, its own tag keys) on the server:
    what a program through stock MLflow and the same through bridge must both leave. Values as text, so NaN
    compares equal to NaN."""
    found = server_client.search_logged_models([server_client.get_experiment_by_name(experiment).experiment_id])
    logged = sorted(
        (str(m.status), sorted((p.key, str(p.value), p.step, p.timestamp, p.dataset_name) for p in m.metrics))
        for m in found
    )
    run = server_client.get_run(run_id)
    histories = {
        key: sorted(str((p.step, p.value, p.timestamp)) for p in server_client.get_metric_history(run_id, key))
        for key in run.data.metrics
    }
    return logged, histories, sorted(k for k in run.data.tags if not k.startswith(("mlflow.", "bridge.")))


def test_h22_log_model_while_the_server_is_away_gets_the_runs_metrics_at_its_step(
    mlflow_server, bridge_connect, server_client
):
    """Soak seeds 170013 (pyfunc) and 170066 (pytorch): `log_model` reads the run back to copy its metrics at
    the step to the new model; part of them was on the server, which did not answer, so the read raised and
    MLflow marked the model FAILED (stock MLflow: READY). The copy is now made at delivery."""
    transport = FaultTransport()

    def program(going_away=lambda: None):
        with mlflow.start_run():
            mlflow.log_param("lr", "0.1")
            mlflow.log_metric("loss", 0.5, step=0, timestamp=T0)
            mlflow.log_metric("loss", 0.4, step=1, timestamp=T0 + 1)
            going_away()
            mlflow.log_metric("acc", 0.7, step=0, timestamp=T0 + 2)  # still in the journal
            mlflow.pyfunc.log_model(name="double", python_model=Double(), pip_requirements=[], params={"factor": "2"})

    stock(mlflow_server.url, "h22-stock", program)
    conn = bridge_connect(mlflow_server.url, experiment="h22-bridge", transport=transport, probe_timeout=0.5)

    def going_away():
        assert conn.flush(30) == 0  # `loss` is on the server
        transport.fail("refuse")

    program(going_away)
    transport.clear()
    assert conn.flush(60) == 0
    assert conn.journal.queue.dead_letters() == []
    want = model_metrics(server_client, "h22-stock")
    assert want[0] == [("acc", 0.7, 0, T0 + 2), ("loss", 0.5, 0, T0)]  # the oracle copied step 0 only
    assert model_metrics(server_client, "h22-bridge") == want
    # Copied on the server, at delivery: the run's history was read there.
    assert transport.count("/metrics/get-history", method="GET") >= 1


def test_h22_a_history_the_server_does_not_answer_is_copied_at_delivery_key_by_key(
    mlflow_server, bridge_connect, server_client
):
    """The run was read, then its histories were not: only the keys that could not be read are left to
    delivery, and the model still gets every point of the step exactly once."""
    transport = FaultTransport()

    def program(histories_away=lambda: None):
        with mlflow.start_run():
            mlflow.log_metric("loss", 0.5, step=0, timestamp=T0)
            mlflow.log_metric("acc", 0.6, step=0, timestamp=T0 + 1)
            mlflow.log_metric("acc", 0.8, step=3, timestamp=T0 + 2)
            histories_away()
            try:
                mlflow.pyfunc.log_model(name="double", python_model=Double(), pip_requirements=[])
            finally:
                transport.clear()

    stock(mlflow_server.url, "h22-keys-stock", program)
    conn = bridge_connect(mlflow_server.url, experiment="h22-keys-bridge", transport=transport)

    def histories_away():
        assert conn.flush(30) == 0  # the run and its points are on the server: its reads ask the server
        transport.fail("refuse", path="/metrics/get-history")

    program(histories_away)
    assert conn.flush(60) == 0
    assert conn.journal.queue.dead_letters() == []
    assert model_metrics(server_client, "h22-keys-bridge") == model_metrics(server_client, "h22-keys-stock")
    refused = [r for r in transport.requests if r.fault == "refuse" and "/metrics/get-history" in r.path]
    assert refused, "the histories were never refused: the test did not test the deferral"


def test_h22_log_model_online_gives_the_model_the_runs_metrics_at_its_step(
    mlflow_server, bridge_connect, server_client
):
    """Before: bridge dropped a metric's model_id, so a model logged through it had no metrics at all."""

    def program():
        with mlflow.start_run():
            mlflow.log_metric("loss", 0.5, step=0, timestamp=T0)
            mlflow.log_metric("loss", 0.4, step=1, timestamp=T0 + 1)
            mlflow.pyfunc.log_model(name="double", python_model=Double(), pip_requirements=[], step=1)

    stock(mlflow_server.url, "h22-online-stock", program)
    conn = bridge_connect(mlflow_server.url, experiment="h22-online-bridge")
    program()
    assert conn.flush(60) == 0
    want = model_metrics(server_client, "h22-online-stock")
    assert want[0] == [("loss", 0.4, 1, T0 + 1)]
    assert model_metrics(server_client, "h22-online-bridge") == want


def test_h22_a_metric_logged_for_a_model_created_offline_waits_for_the_model_and_keeps_the_runs_order(
    mlflow_server, bridge_connect, server_client
):
    """`log_metric(model_id=…)` names a model the server does not have yet: the run's delivery waits a round
    for the model's creation (its run comes first in the round), and FINISHED still comes after the point."""
    transport = FaultTransport()
    transport.fail("refuse")
    conn = bridge_connect(mlflow_server.url, experiment="h22-wait", transport=transport, probe_timeout=0.5)
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="double", python_model=Double(), pip_requirements=[])
        mlflow.log_metric("val_acc", 0.9, step=5, timestamp=T0, model_id=info.model_id)
    transport.clear()
    assert conn.flush(60) == 0
    assert conn.journal.queue.dead_letters() == []  # before the wait: buried as "model-not-created"
    models = server_client.search_logged_models([server_client.get_experiment_by_name("h22-wait").experiment_id])
    assert [(m.key, m.value, m.step) for m in models[0].metrics] == [("val_acc", 0.9, 5)]
    remote = conn.journal.ids.run(run.info.run_id).remote_id
    assert [(m.value, m.step) for m in server_client.get_metric_history(remote, "val_acc")] == [(0.9, 5)]
    sent = [r for r in transport.requests if r.fault is None]
    point = next(
        i
        for i, r in enumerate(sent)
        if r.path.endswith("/runs/log-batch") and any(m.get("model_id") for m in (r.json or {}).get("metrics", []))
    )
    finished = next(
        i for i, r in enumerate(sent) if r.path.endswith("/runs/update") and (r.json or {}).get("status") == "FINISHED"
    )
    assert point < finished
    # Offline reads see the point too (read-your-writes).
    assert mlflow.get_run(run.info.run_id).data.metrics["val_acc"] == 0.9


def test_h22_numpy_steps_and_timestamps_of_model_metrics_are_taken_as_numbers(
    mlflow_server, bridge_connect, server_client
):
    """numpy's int64 is no JSON number: the first version of the model-metric journal raised TypeError where
    stock MLflow logs the point (a `log_model(step=epoch)` over `np.arange` would have stopped training)."""

    def program():
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(name="double", python_model=Double(), pip_requirements=[])
            mlflow.log_metric("k", 1.0, step=np.int64(3), timestamp=T0, model_id=info.model_id)
            MlflowClient().log_batch(
                mlflow.active_run().info.run_id,
                metrics=[Metric("k2", np.float32(2.0), np.int64(T0), np.int64(4), model_id=info.model_id)],
            )

    stock(mlflow_server.url, "h22-numpy-stock", program)
    conn = bridge_connect(mlflow_server.url, experiment="h22-numpy-bridge")
    program()
    assert conn.flush(60) == 0
    want = model_metrics(server_client, "h22-numpy-stock")
    assert want[0] == [("k", 1.0, 3, T0), ("k2", 2.0, 4, T0)]
    assert model_metrics(server_client, "h22-numpy-bridge") == want


def test_h22_points_mlflow_links_to_a_model_after_log_model_go_in_one_request(
    mlflow_server, bridge_connect, server_client
):
    """MLflow 3's fluent log_metric names the model logged at the point's step (step 0 when none is given): each
    such point is an op of its own in the journal, and consecutive ones travel in one log-batch."""

    def program():
        with mlflow.start_run():
            mlflow.pyfunc.log_model(name="double", python_model=Double(), pip_requirements=[])
            for i in range(300):
                mlflow.log_metric("loss", float(i), timestamp=T0 + i)  # step 0: linked to the model

    stock(mlflow_server.url, "h22-linked-stock", program)
    transport = FaultTransport()
    conn = bridge_connect(mlflow_server.url, experiment="h22-linked-bridge", transport=transport)
    transport.fail("refuse", path="/runs/log-batch")  # the points pile up in the journal meanwhile
    program()
    transport.clear()
    assert conn.flush(60) == 0
    assert conn.journal.queue.dead_letters() == []
    linked = [
        r
        for r in transport.requests
        if r.fault is None
        and r.path.endswith("/runs/log-batch")
        and any(m.get("model_id") for m in (r.json or {}).get("metrics", []))
    ]
    assert sum(len(r.json["metrics"]) for r in linked) == 300
    assert len(linked) <= 2, f"{len(linked)} requests for 300 points"
    want = model_metrics(server_client, "h22-linked-stock")
    assert len(want[0]) == 300
    assert model_metrics(server_client, "h22-linked-bridge") == want


def test_h22_a_second_point_in_the_same_millisecond_stays_on_the_run(mlflow_server, bridge_connect, server_client):
    """MLflow keeps one model point per key, step and millisecond and refuses a request holding a second (stock
    MLflow's own call raises). A second value against a point this process gave the model raises at the call
    (H24); one against a point the model got elsewhere (here another client's) bridge learns of only at
    delivery. Before: the run's points went to the dead letters with the request. Now the run keeps every point
    and the model the first."""
    transport = FaultTransport()
    conn = bridge_connect(mlflow_server.url, experiment="h22-same-ms", transport=transport)
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="double", python_model=Double(), pip_requirements=[])
        assert conn.flush(30) == 0
        remote = conn.journal.ids.run(run.info.run_id).remote_id
        server_model = server_model_id_of(conn, info.model_id)
        server_client.log_batch(remote, metrics=[Metric("acc", 0.5, T0, 0, model_id=server_model)])  # elsewhere
        mlflow.log_metric("acc", 0.6, timestamp=T0)  # step 0: linked; the model has acc at T0 already: refused
        mlflow.log_metric("acc", 0.7, timestamp=T0 + 1)
        with pytest.raises(MlflowException, match="one point per key") as raised:
            mlflow.log_metric("acc", 0.8, timestamp=T0 + 1)  # a second value this process gave: raised now
        assert raised.value.error_code == "BAD_REQUEST"
    assert conn.flush(60) == 0
    assert conn.journal.queue.dead_letters() == []
    # 0.8 is on neither: MLflow's LogMetric writes the model's point first, so a refused one leaves the run alone
    assert sorted(m.value for m in server_client.get_metric_history(remote, "acc")) == [0.5, 0.6, 0.7]
    model = server_client.get_logged_model(server_model)
    assert sorted((m.value, m.timestamp) for m in model.metrics) == [(0.5, T0), (0.7, T0 + 1)]
    refused = [r for r in transport.requests if r.path.endswith("/runs/log-batch")]
    assert any("0.6" in str(r.json) for r in refused[:-1]), "the collision across requests was not tried"


def server_model_id_of(conn, local_id: str) -> str:
    return conn.journal.ids.entity(J.LOGGED_MODEL, local_id).remote_id


def test_h22_a_model_never_created_leaves_the_run_its_points(mlflow_server, bridge_connect, server_client):
    """The model's creation refused for good (a dead letter): a point logged for it still reaches its run."""
    transport = FaultTransport()
    conn = bridge_connect(mlflow_server.url, experiment="h22-no-model", transport=transport, probe_timeout=0.5)
    with mlflow.start_run() as run:
        mlflow.log_metric("x", 1.0, step=0, timestamp=T0)
        assert conn.flush(30) == 0
        transport.fail(
            "status", path="/logged-models", status=400, body=b'{"error_code":"INVALID_PARAMETER_VALUE","message":"no"}'
        )
        model = mlflow.initialize_logged_model(name="ckpt")
        mlflow.log_metric("val", 0.9, step=7, timestamp=T0, model_id=model.model_id)
    assert conn.flush(30) == 0
    transport.clear()
    assert [d.op.kind for d in conn.journal.queue.dead_letters()] == ["create_logged_model"]
    remote = conn.journal.ids.run(run.info.run_id).remote_id
    assert server_client.get_run(remote).data.metrics == {"x": 1.0, "val": 0.9}


def test_h22_model_reads_show_local_ids_and_the_points_still_waiting(mlflow_server, bridge_connect):
    """`get_logged_model` right after `log_metric(model_id=…)` lists the point (read-your-writes), and its
    metrics name the model and run by the ids this process was given, before and after delivery."""
    transport = FaultTransport()
    conn = bridge_connect(mlflow_server.url, experiment="h22-reads", transport=transport)
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="double", python_model=Double(), pip_requirements=[])
        assert conn.flush(30) == 0
        transport.fail("refuse", path="/runs/log-batch")
        mlflow.log_metric("val", 0.9, step=2, timestamp=T0, model_id=info.model_id)
        seen = mlflow.get_logged_model(info.model_id)
        assert [(m.key, m.value, m.model_id, m.run_id) for m in seen.metrics] == [
            ("val", 0.9, info.model_id, run.info.run_id)
        ]
        transport.clear()
    assert conn.flush(60) == 0
    seen = mlflow.get_logged_model(info.model_id)
    assert [(m.key, m.value, m.model_id, m.run_id) for m in seen.metrics] == [
        ("val", 0.9, info.model_id, run.info.run_id)
    ]


def test_h22_a_stale_copy_of_the_journal_does_not_make_the_step_copy_again(
    mlflow_server, bridge_connect, server_client, tmp_path, monkeypatch
):
    """The step copy reads the server when it is made: made again from an old copy of the journal, it would give
    the model points logged since. It carries a delivery mark like the other writes an old copy must not repeat."""
    from bridge.client.connect import sync
    from tests.test_journal_regressions import _copy_journal

    transport = FaultTransport()
    box = {}

    def program(away=lambda: None, snapshot=lambda: None):
        with mlflow.start_run():
            mlflow.log_metric("acc", 0.5, step=0, timestamp=T0)
            away()
            mlflow.pyfunc.log_model(name="double", python_model=Double(), pip_requirements=[])
            snapshot()
            transport.clear()
            MlflowClient().log_metric(mlflow.active_run().info.run_id, "acc", 0.9, timestamp=T0 + 5, step=0)

    stock(mlflow_server.url, "h22-copy-stock", program)
    conn = bridge_connect(mlflow_server.url, experiment="h22-copy-bridge", transport=transport, probe_timeout=0.5)

    def away():
        assert conn.flush(30) == 0
        transport.fail("refuse")

    program(away, lambda: box.update(copy=_copy_journal(conn.journal.path, tmp_path / "drive")))
    assert conn.flush(60) == 0
    conn.close()
    monkeypatch.setenv("BRIDGE_TOKEN", "test-token")
    assert sync(box["copy"], mlflow_server.url, timeout=60).left == 0
    want = model_metrics(server_client, "h22-copy-stock")
    assert want[0] == [("acc", 0.5, 0, T0)]
    assert model_metrics(server_client, "h22-copy-bridge") == want


class _DropsEveryNthHistoryRead(FaultTransport):
    """A link that loses one metric-history read in `n` (refused) once armed."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.armed, self.reads = n, False, 0

    def _take(self, request):
        fault = super()._take(request)
        if fault is None and self.armed and "/metrics/get-history" in request.path:
            self.reads += 1
            if self.reads % self.n == 0:
                from tests.support.transport import _Fault

                return _Fault("refuse", None, None, 503, b"")
        return fault


def test_h22_the_step_copy_carries_on_over_a_link_that_drops_reads(mlflow_server, bridge_connect, server_client):
    """One history read per metric key: begun again from the first key after every lost request, 120 keys over a
    link losing one read in 10 never finished (the run's FINISHED waiting behind it); it now keeps how far it got."""
    transport = _DropsEveryNthHistoryRead(10)
    conn = bridge_connect(mlflow_server.url, experiment="h22-lossy", transport=transport, probe_timeout=0.5)
    with mlflow.start_run() as run:
        mlflow.log_metrics({f"m{i:03d}": float(i) for i in range(120)}, step=0, timestamp=T0)
        assert conn.flush(30) == 0
        transport.fail("refuse")
        mlflow.pyfunc.log_model(name="double", python_model=Double(), pip_requirements=[])
        transport.clear()
    transport.armed = True
    assert conn.flush(60) == 0
    reads = transport.count("/metrics/get-history")
    assert reads <= 120 + 120 // 10 + 2, f"{reads} history reads for 120 keys: the copy started over"
    remote = conn.journal.ids.run(run.info.run_id).remote_id
    assert server_client.get_run(remote).info.status == "FINISHED"
    assert len(model_metrics(server_client, "h22-lossy")[0]) == 120


def test_h22_the_step_copy_keeps_the_first_of_two_points_in_one_millisecond(
    mlflow_server, bridge_connect, server_client
):
    """Two values of `loss` at step 0 in one millisecond: the copy made at delivery held both and was refused
    whole (a dead letter; the model got no metric at all, `acc` included). Online, the same log_model gives
    the model the first; so does the copy now, and nothing is set aside."""
    transport = FaultTransport()
    conn = bridge_connect(mlflow_server.url, experiment="h22-copy-same-ms", transport=transport, probe_timeout=0.5)
    with mlflow.start_run() as run:
        MlflowClient().log_batch(
            run.info.run_id, metrics=[Metric("loss", 1.0, T0, 0), Metric("loss", 2.0, T0, 0), Metric("acc", 0.5, T0, 0)]
        )
        assert conn.flush(30) == 0
        transport.fail("refuse")
        mlflow.pyfunc.log_model(name="double", python_model=Double(), pip_requirements=[])
        transport.clear()
    assert conn.flush(60) == 0
    assert conn.journal.queue.dead_letters() == []
    found, _ = model_metrics(server_client, "h22-copy-same-ms")
    assert [(k, s, t) for k, _, s, t in found] == [("acc", 0, T0), ("loss", 0, T0)]


def test_h22_a_point_for_a_model_deleted_on_the_server_stays_on_the_run(mlflow_server, bridge_connect, server_client):
    """Refused for a second point in a millisecond (the first from another client), the model's points are read
    — and the model is gone (404): the points go to the run alone, rather than a dead letter naming the missing
    model."""
    conn = bridge_connect(mlflow_server.url, experiment="h22-deleted-model")
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="double", python_model=Double(), pip_requirements=[])
        assert conn.flush(30) == 0
        remote = conn.journal.ids.run(run.info.run_id).remote_id
        server_model = server_model_id_of(conn, info.model_id)
        server_client.log_batch(remote, metrics=[Metric("acc", 0.5, T0, 1, model_id=server_model)])
        server_client.delete_logged_model(server_model)
        mlflow.log_metric("acc", 0.6, step=1, timestamp=T0, model_id=info.model_id)
    assert conn.flush(60) == 0
    assert conn.journal.queue.dead_letters() == []
    assert sorted(m.value for m in server_client.get_metric_history(remote, "acc")) == [0.5, 0.6]


def test_h22_a_model_read_shows_waiting_points_logged_from_another_run(mlflow_server, bridge_connect):
    transport = FaultTransport()
    conn = bridge_connect(mlflow_server.url, experiment="h22-eval-run", transport=transport)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="double", python_model=Double(), pip_requirements=[])
    assert conn.flush(30) == 0
    transport.fail("refuse", path="/runs/log-batch")
    with mlflow.start_run() as evaluation:
        mlflow.log_metric("eval_acc", 0.8, step=0, timestamp=T0, model_id=info.model_id)
        seen = mlflow.get_logged_model(info.model_id)
    assert [(m.key, m.run_id) for m in seen.metrics] == [("eval_acc", evaluation.info.run_id)]
    transport.clear()
    assert conn.flush(60) == 0
    seen = mlflow.get_logged_model(info.model_id)
    assert [(m.key, m.run_id, m.model_id) for m in seen.metrics] == [
        ("eval_acc", evaluation.info.run_id, info.model_id)
    ]


def test_h22_seed_180093_log_model_raises_like_stock_for_two_values_in_one_millisecond(
    mlflow_server, bridge_connect, server_client
):
    """Soak seed 180093: the run held two values of `loss` at step 0 in one millisecond. Stock log_model sends
    both to the model in one log_batch; the server refuses it (one model point per key, step and millisecond),
    log_model raises BAD_REQUEST and the model is FAILED. bridge accepted the batch and the model was READY.
    Where MLflow raises at once, so does bridge now — and the run keeps both points, as there."""
    outcome = {}

    def program(name):
        with mlflow.start_run() as run:
            MlflowClient().log_batch(run.info.run_id, metrics=[Metric("loss", 0.0, T0, 0), Metric("loss", 0.0, T0, 0)])
            MlflowClient().log_batch(run.info.run_id, metrics=[Metric("loss", -1.5, T0, 0)])
            with pytest.raises(MlflowException) as raised:
                mlflow.pyfunc.log_model(name="double", python_model=Double(), pip_requirements=[])
            outcome[name] = (raised.value.error_code, run.info.run_id)

    stock(mlflow_server.url, "h22-180093-stock", lambda: program("stock"))
    conn = bridge_connect(mlflow_server.url, experiment="h22-180093-bridge")
    program("bridge")
    assert conn.flush(60) == 0
    assert outcome["bridge"][0] == outcome["stock"][0] == "BAD_REQUEST"
    for experiment in ("h22-180093-stock", "h22-180093-bridge"):
        found = server_client.search_logged_models([server_client.get_experiment_by_name(experiment).experiment_id])
        assert [(str(m.status), m.metrics) for m in found] == [("FAILED", [])], experiment
    remote = conn.journal.ids.run(outcome["bridge"][1]).remote_id
    history = lambda run: sorted(m.value for m in server_client.get_metric_history(run, "loss"))  # noqa: E731
    assert history(remote) == history(outcome["stock"][1]) == [-1.5, 0.0]


def test_h24_seed_210095_a_later_call_giving_a_model_a_second_value_raises_like_stock(
    mlflow_server, bridge_connect, server_client
):
    """Soak seed 210095: after two `log_model`s at step 0 had copied the run's step-0 points (408 keys at T0) to
    both models, fluent `log_metrics` logged 626 keys at step 0 at the same millisecond with other values.
    MLflow links each point to both models (1,252 points, sent 1,000 + 252); the server refuses the first
    request (a model keeps one point per key, step and millisecond), keeping its run points, and the client
    raises BAD_REQUEST without sending the rest. bridge returned and the run got all 626 points. It now knows
    the points it gave each model and raises at the same request, keeping what stock keeps."""
    outcome = {}

    def program(name):
        with mlflow.start_run() as run:
            mlflow.log_metrics({f"m{i:04d}": 20.0 + i for i in range(408)}, step=0, timestamp=T0)
            mlflow.pyfunc.log_model(name="first", python_model=Double(), pip_requirements=[])
            mlflow.pyfunc.log_model(name="second", python_model=Double(), pip_requirements=[])
            with pytest.raises(MlflowException) as raised:
                mlflow.log_metrics({f"m{i:04d}": -5.0 + i for i in range(626)}, step=0, timestamp=T0)
            mlflow.log_metric("after", 1.0, step=2, timestamp=T0)  # the run carries on after the refused call
            outcome[name] = (raised.value.error_code, run.info.run_id)

    stock(mlflow_server.url, "h22-210095-stock", lambda: program("stock"))
    conn = bridge_connect(mlflow_server.url, experiment="h22-210095-bridge")
    program("bridge")
    assert conn.flush(60) == 0
    assert outcome["bridge"][0] == outcome["stock"][0] == "BAD_REQUEST"
    want = server_state(server_client, "h22-210095-stock", outcome["stock"][1])
    got = server_state(server_client, "h22-210095-bridge", conn.journal.ids.run(outcome["bridge"][1]).remote_id)
    assert len(want[1]) == 501 and len(want[1]["m0000"]) == 2 and "m0500" not in want[1]  # what stock keeps
    assert [len(points) for _, points in want[0]] == [408, 408]
    assert got == want


def test_h24_seed_210095_the_same_value_again_is_not_a_second_value(mlflow_server, bridge_connect, server_client):
    """The other side of seed 210095's fix: logging a point the model already holds again, value and all, is
    accepted by MLflow's server (it keeps one) — bridge must not raise for it either. The value as the server
    compares it: NaN is kept as 0 for a model, inf as the largest float."""
    outcome = {}

    def program(name):
        with mlflow.start_run() as run:
            mlflow.log_metrics({"loss": 0.5, "acc": 0.25, "gap": math.nan, "big": math.inf}, step=0, timestamp=T0)
            mlflow.pyfunc.log_model(name="again", python_model=Double(), pip_requirements=[])
            mlflow.log_metrics({"loss": 0.5, "acc": 0.25}, step=0, timestamp=T0)
            mlflow.log_metric("loss", 0.5, step=0, timestamp=T0)
            mlflow.log_metrics({"gap": 0.0, "big": sys.float_info.max}, step=0, timestamp=T0)
            outcome[name] = run.info.run_id

    stock(mlflow_server.url, "h22-210095-again-stock", lambda: program("stock"))
    conn = bridge_connect(mlflow_server.url, experiment="h22-210095-again-bridge")
    program("bridge")
    assert conn.flush(60) == 0
    assert conn.status().dead_letters == 0
    want = model_metrics(server_client, "h22-210095-again-stock")
    assert [(key, value) for key, value, _, _ in want[0]] == [
        ("acc", 0.25),
        ("big", sys.float_info.max),
        ("gap", 0.0),
        ("loss", 0.5),
    ]
    assert model_metrics(server_client, "h22-210095-again-bridge") == want

    def history(run, key):
        return sorted(str((m.step, m.value)) for m in server_client.get_metric_history(run, key))

    for key in ("loss", "gap"):
        assert history(conn.journal.ids.run(outcome["bridge"]).remote_id, key) == history(outcome["stock"], key), key


def test_h24_what_a_model_refuses_is_refused_at_the_call_as_by_stock(mlflow_server, bridge_connect, server_client):
    """Each way MLflow's server refuses a point for a logged model (a review of H24's fix, every case checked
    against stock MLflow on the same server): which calls raise, and what the run and the model keep.
    A second value through `log_metric` keeps nothing (the model's point is written first); another dataset is
    another point; NaN is kept as 0 but two NaNs in one request are two points; a request of more than 100
    model points is refused for a point the model holds already, even an identical one (the server's
    recovery re-checks 100 entries at a time); async logging logs the refusal instead of raising; a resumed
    run, whose reads name the model by the server's id, still knows what the model holds."""
    train = mlflow.data.from_numpy(np.arange(3.0), name="train")
    evaluation = mlflow.data.from_numpy(np.arange(4.0), name="eval")
    outcome, deliver = {}, {"now": lambda: None}

    def program(side):
        calls = []

        def attempt(label, call):
            try:
                call()
            except MlflowException as exc:
                calls.append((label, exc.error_code))
            else:
                calls.append((label, "ok"))

        with mlflow.start_run() as run:
            run_id = run.info.run_id
            info = mlflow.pyfunc.log_model(
                name="refuses", python_model=Double(), pip_requirements=[]
            )  # step 0: later points link to it
            attempt("first", lambda: mlflow.log_metric("acc", 0.5, timestamp=T0))
            attempt("second value", lambda: mlflow.log_metric("acc", 0.6, timestamp=T0))
            attempt("train", lambda: mlflow.log_metric("d", 0.5, timestamp=T0, dataset=train))
            attempt("same value, other dataset", lambda: mlflow.log_metric("d", 0.5, timestamp=T0, dataset=evaluation))
            attempt("nan", lambda: mlflow.log_metric("gap", math.nan, timestamp=T0))
            attempt("nan again", lambda: mlflow.log_metric("gap", float("nan"), timestamp=T0))
            attempt("zero", lambda: mlflow.log_metric("z", 0.0, timestamp=T0))
            attempt("minus zero", lambda: mlflow.log_metric("z", -0.0, timestamp=T0))
            attempt("float32", lambda: mlflow.log_metric("f", np.float32(0.1), timestamp=T0))
            attempt("float64", lambda: mlflow.log_metric("f", 0.1, timestamp=T0))
            nan = math.nan
            attempt(
                "one nan twice in a request",
                lambda: MlflowClient().log_batch(
                    run_id,
                    metrics=[
                        Metric("twice", nan, T0, 3, model_id=info.model_id),
                        Metric("twice", nan, T0, 3, model_id=info.model_id),
                    ],
                ),
            )
            fifty = {f"a{i:03d}": float(i) for i in range(50)}
            attempt("50 points", lambda: mlflow.log_metrics(fifty, timestamp=T0 + 1))
            attempt("50 again", lambda: mlflow.log_metrics(fifty, timestamp=T0 + 1))
            many = {f"b{i:03d}": float(i) for i in range(150)}
            attempt("150 points", lambda: mlflow.log_metrics(many, timestamp=T0 + 2))
            attempt("150 again", lambda: mlflow.log_metrics(many, timestamp=T0 + 2))
            attempt(
                "150 new and one held",
                lambda: mlflow.log_metrics({**{f"c{i:03d}": float(i) for i in range(150)}, "acc": 0.5}, timestamp=T0),
            )
            attempt("async first", lambda: mlflow.log_metric("s", 0.5, timestamp=T0, synchronous=False))
            # MLflow's async queue sends from a thread pool: without this, stock may land the second value first
            attempt("async first landed", mlflow.flush_async_logging)
            attempt("async second value", lambda: mlflow.log_metric("s", 0.6, timestamp=T0, synchronous=False))
            attempt("async flush", mlflow.flush_async_logging)
            attempt("tag after", lambda: mlflow.set_tag("after", "1"))
        deliver["now"]()  # bridge: the model and the run reach the server, so reads name the server's ids
        with mlflow.start_run(run_id=run_id):
            attempt("resumed, second value", lambda: mlflow.log_metric("acc", 0.7, timestamp=T0))
            attempt("resumed, new point", lambda: mlflow.log_metric("acc", 0.8, timestamp=T0 + 9))
        outcome[side] = (calls, run_id)

    stock(mlflow_server.url, "h24-refuses-stock", lambda: program("stock"))
    conn = bridge_connect(mlflow_server.url, experiment="h24-refuses-bridge")
    deliver["now"] = lambda: conn.flush(60)
    program("bridge")
    assert conn.flush(60) == 0
    assert conn.journal.queue.dead_letters() == []
    want_calls, got_calls = outcome["stock"][0], outcome["bridge"][0]
    assert [label for label, answer in want_calls if answer != "ok"] == [
        "second value",
        "same value, other dataset",
        "float64",
        "one nan twice in a request",
        "150 again",
        "150 new and one held",
        "resumed, second value",
    ]  # what stock MLflow refuses, as this test knows it
    assert got_calls == want_calls
    want = server_state(server_client, "h24-refuses-stock", outcome["stock"][1])
    assert (
        server_state(server_client, "h24-refuses-bridge", conn.journal.ids.run(outcome["bridge"][1]).remote_id) == want
    )


def test_h24_the_model_points_a_run_remembers_are_bounded(monkeypatch):
    """A run that links every point to a model (`set_active_model`, an explicit model_id) must not grow the
    memory of what its models hold without end: the newest points are kept, between half and all of the bound;
    a second value against a forgotten one is left to delivery (docs/journal.md), never a wrong refusal."""
    from bridge.client.plugins import models

    monkeypatch.setattr(models, "MODEL_POINTS_KEPT", 10)
    known: dict = {}
    for i in range(25):
        models.remember_model_points([Metric("loss", float(i), T0 + i, 0, model_id="m-1")], known)
        assert len(known) <= 10
    assert len(known) >= 5
    newest = list(known.items())
    assert newest[-1] == (("m-1", "loss", 0, T0 + 24), 24.0)
    assert models.model_point_clash([Metric("loss", 99.0, T0 + 24, 0, model_id="m-1")], known) is not None
    assert models.model_point_clash([Metric("loss", 99.0, T0, 0, model_id="m-1")], known) is None  # forgotten
    assert models.model_point_clash([Metric("loss", 24.0, T0 + 24, 0, model_id="m-1")], known) is None  # the same


class _RefusedAfterReads(FaultTransport):
    """Refuses everything once `reads` more reads of a run (`runs/get`) have gone through."""

    reads: int | None = None

    def send(self, request):
        if self.reads is not None and "/runs/get" in request.path:
            self.reads -= 1
            if self.reads < 0:
                self.reads = None
                self.fail("refuse")
        return super().send(request)


def test_log_model_on_a_server_run_this_journal_did_not_create_when_the_server_goes_away_during_it(
    mlflow_server, bridge_connect, server_client
):
    """A run resumed from the server (created by another process); the link drops inside `log_model`, after
    its first read of the run and before the read that copies the step's metrics to the model. That read is
    answered empty and the copy made at delivery — it used to raise MLflow's "start_time cannot be None", and
    the model was never logged. Found by the type check of bridge/client."""
    experiment = server_client.create_experiment("resumed-offline")
    remote = server_client.create_run(experiment).info.run_id
    transport = _RefusedAfterReads()
    conn = bridge_connect(mlflow_server.url, experiment="resumed-offline", transport=transport)
    with mlflow.start_run(run_id=remote):  # online: the server's run, resumed
        mlflow.log_metric("loss", 0.5, step=0, timestamp=T0)
        assert conn.flush(30) == 0
        transport.reads = 1
        info = mlflow.pyfunc.log_model(name="double", python_model=Double(), pip_requirements=[])
    assert transport.reads is None, "the link never dropped inside log_model"
    transport.clear()
    assert conn.flush(60) == 0
    assert conn.journal.queue.dead_letters() == []
    model = server_client.get_logged_model(conn.journal.ids.entity(J.LOGGED_MODEL, info.model_id).remote_id)
    assert model.source_run_id == remote
    assert str(model.status) == "READY"
    assert [(m.key, m.value, m.step) for m in model.metrics] == [("loss", 0.5, 0)]
