"""The model registry through the journal, against a real `mlflow server` (client/registry.py).

Registry writes return at once (offline too) and reach the server after the run or logged model they name,
with the server's ids: the version's run_id is the server's run, its source resolves there, the alias is set,
and `models:/NAME@alias` loads on the workstation with a stock MLflow client.
"""

from __future__ import annotations

import time

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from bridge.client.journal.kinds import VERSION_KEY_TAG
from tests.support.client import server_run
from tests.support.transport import FaultTransport
from tests.test_models import Double, on_the_workstation


@pytest.fixture
def workstation(mlflow_server) -> MlflowClient:
    """A stock MLflow client on the workstation: tracking and registry straight to the server."""
    return MlflowClient(mlflow_server.url, registry_uri=mlflow_server.url)


def assert_registered(
    workstation: MlflowClient, mlflow_server, experiment: str, name: str, version: str, alias: str = "champion"
) -> None:
    run = server_run(workstation, experiment)
    mv = workstation.get_model_version_by_alias(name, alias)
    assert mv.version == version
    assert mv.run_id == run.info.run_id  # the server's run id, never the journal's local one
    assert "bridge-artifacts" not in mv.source
    assert VERSION_KEY_TAG in mv.tags
    assert len(workstation.search_model_versions(f"name = '{name}'")) == 1
    with on_the_workstation(mlflow_server.url):
        predicted = mlflow.pyfunc.load_model(f"models:/{name}@{alias}").predict(np.array([[1.0, 2.0]]))
    assert np.allclose(predicted, [[2.0, 4.0]])


def test_log_model_registered_online_loads_by_alias_on_the_workstation(mlflow_server, bridge_connect, workstation):
    experiment, name = "registry-online", "reg-online"
    conn = bridge_connect(mlflow_server.url, experiment=experiment)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="double", python_model=Double(), pip_requirements=[], registered_model_name=name
        )
    assert info.registered_model_version == "1"  # the number the server gives it
    client = MlflowClient()
    client.set_registered_model_alias(name, "champion", info.registered_model_version)
    client.set_model_version_tag(name, info.registered_model_version, "stage", "candidate")
    mv = client.get_model_version(name, info.registered_model_version)  # read-your-writes, delivered or not
    assert (mv.version, mv.tags.get("stage")) == ("1", "candidate")
    assert conn.flush(60) == 0
    assert_registered(workstation, mlflow_server, experiment, name, "1")
    assert workstation.get_model_version(name, "1").tags["stage"] == "candidate"
    # The logged model's list of versions names the server's version; reads through bridge answer local ids.
    server_model = workstation.search_logged_models([server_run(workstation, experiment).info.experiment_id])[0]
    assert '"version": "1"' in server_model.tags["mlflow.modelVersions"]
    seen = client.get_model_version_by_alias(name, "champion")
    assert seen.source == f"models:/{info.model_id}"
    assert seen.run_id == mlflow.last_active_run().info.run_id


def test_registry_offline_returns_at_once_then_is_delivered(mlflow_server, bridge_connect, workstation):
    experiment, name = "registry-offline", "reg-offline"
    transport = FaultTransport()
    transport.fail("refuse")
    conn = bridge_connect(mlflow_server.url, experiment=experiment, transport=transport, probe_timeout=0.5)
    client = MlflowClient()
    started = time.monotonic()
    client.create_registered_model(name)  # before the model exists: its version must still wait for it
    registry_s = time.monotonic() - started
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="double", python_model=Double(), pip_requirements=[])
    started = time.monotonic()
    mv = mlflow.register_model(f"models:/{info.model_id}", name)
    client.set_registered_model_alias(name, "champion", mv.version)
    assert client.get_model_version_by_alias(name, "champion").version == mv.version  # from the journal
    registry_s += time.monotonic() - started
    assert registry_s < 5, f"registry calls took {registry_s:.1f} s offline"
    with pytest.raises(MlflowException, match="search_registered_models"):
        client.search_registered_models()  # not known locally: a clear error naming the call, at once
    # Loads here by alias while offline (from the spool), and again once delivered (through the server).
    assert np.allclose(mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(np.array([[1.0]])), [[2.0]])
    assert conn.flush(1) > 0
    transport.clear()
    assert conn.flush(60) == 0
    assert not conn.journal.queue.dead_letters()
    assert_registered(workstation, mlflow_server, experiment, name, mv.version)
    assert np.allclose(mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(np.array([[1.0]])), [[2.0]])


def test_run_artifact_source_is_translated(mlflow_server, bridge_connect, workstation, tmp_path):
    """A model saved as plain run artifacts and registered by `runs:/<local run>/…` (defect 6, registry half)."""
    experiment, name = "registry-run-source", "reg-run-source"
    transport = FaultTransport()
    conn = bridge_connect(mlflow_server.url, experiment=experiment, transport=transport)
    saved = tmp_path / "saved"
    mlflow.pyfunc.save_model(saved, python_model=Double(), pip_requirements=[])
    transport.fail("refuse", path="/mlflow-artifacts/")  # the files wait in the spool: the version waits for them
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(saved), "exported")
        mv = mlflow.register_model(f"runs:/{run.info.run_id}/exported", name)
        MlflowClient().set_registered_model_alias(name, "champion", mv.version)
    assert mv.run_id == run.info.run_id
    time.sleep(1)
    assert conn.flush(1) > 0
    transport.clear()
    assert conn.flush(60) == 0
    server_side = server_run(workstation, experiment)
    stored = workstation.get_model_version(name, mv.version)
    assert stored.run_id == server_side.info.run_id
    assert stored.source.startswith("mlflow-artifacts:") and stored.source.endswith("/exported")
    assert_registered(workstation, mlflow_server, experiment, name, mv.version)


_LOG_WHILE_UNREACHABLE = """
import faulthandler, sys
faulthandler.dump_traceback_later(200, file=sys.stderr)
import mlflow, numpy as np
import bridge
from tests.test_models import Double

bridge.connect({url!r}, "test-token", journal={journal!r}, experiment={experiment!r}, probe_timeout=0.5,
               flush_at_exit=0.5)
with mlflow.start_run():
    info = mlflow.pyfunc.log_model(name="double", python_model=Double(), pip_requirements=[],
                                   registered_model_name={name!r})
mlflow.MlflowClient().set_registered_model_alias({name!r}, "champion", info.registered_model_version)
print("VERSION", info.registered_model_version)
"""

_SYNC = """
import sys
from bridge.client.connect import sync
report = sync({journal!r}, {url!r}, timeout=120)
print("LEFT", report.left, "DEAD", sum(report.dead.values()))
"""


def test_a_journal_left_offline_is_delivered_by_bridge_sync(mlflow_server, workstation, tmp_path):
    """Logged and registered while the server's port was closed, in one process; delivered by `sync()` in another
    (which never imported the model and registry stores: their operation kinds load on demand)."""
    import os
    import subprocess
    import sys

    from tests.support.mlflow_server import closed_url

    experiment, name, journal = "registry-sync", "reg-sync", str(tmp_path / "journal.sqlite")
    env = {
        **os.environ,
        "BRIDGE_TOKEN": "test-token",
        "BRIDGE_SEND_INTERVAL_S": "0.05",
        "BRIDGE_HTTP_TIMEOUT_S": "5",
        "PYTHONPATH": os.getcwd(),
    }
    closed = closed_url()
    try:
        logged = subprocess.run(
            [
                sys.executable,
                "-c",
                _LOG_WHILE_UNREACHABLE.format(url=closed, journal=journal, experiment=experiment, name=name),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    except subprocess.TimeoutExpired as exc:  # the child dumped its threads' stacks at 200 s: show where it hung
        raise AssertionError(f"the logging process hung:\n{(exc.stderr or b'')[-6000:]!s}") from None
    assert logged.returncode == 0, logged.stderr[-3000:]
    version = logged.stdout.split("VERSION", 1)[1].split()[0]
    synced = subprocess.run(
        [sys.executable, "-c", _SYNC.format(journal=journal, url=mlflow_server.url)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert synced.returncode == 0, synced.stderr[-3000:]
    assert "LEFT 0 DEAD 0" in synced.stdout, synced.stdout + synced.stderr[-3000:]
    assert_registered(workstation, mlflow_server, experiment, name, version)
