"""Logged models (MLflow 3) through the journal, against a real `mlflow server` (client/models.py).

Each test logs through `bridge.connect()` and then checks the server with a plain MLflow client: the model
with its params, tags and READY status, its artifacts' bytes, its link to the run (by the server's run id),
and that it loads and predicts on the workstation's side.
"""

from __future__ import annotations

import contextlib

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from bridge.client.models import MODEL_KEY_TAG
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
        info = mlflow.pytorch.log_model(module, name="net", params={"hidden": "3"}, tags={"kind": "tiny"},
                                        input_example=np.ones((1, 3), dtype=np.float32))
    local_id = info.model_id
    assert mlflow.get_logged_model(local_id).model_id == local_id  # the id MLflow was given stays valid
    assert conn.flush(60) == 0
    server_side, model = server_model(server_client, experiment, params={"hidden": "3", "lr": "0.1"},
                                      tags={"kind": "tiny", MODEL_KEY_TAG: local_id})
    assert server_side.info.run_id == conn.journal.run(run.info.run_id).remote_id
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
        info = mlflow.pyfunc.log_model(name="double", python_model=Double(), params={"factor": "2"})
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
        mlflow.pyfunc.log_model(name="double", python_model=Double())
    assert conn.flush(60) == 0
    assert any(r.fault == "lost_answer" for r in transport.requests)
    server_model(server_client, experiment, params={}, tags={})  # exactly one model, complete


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
