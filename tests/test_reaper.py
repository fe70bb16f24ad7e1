"""The reaper: runs whose client stopped sending heartbeats become KILLED; nothing else is touched."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest
from mlflow.tracking import MlflowClient

from bridge import config
from bridge.errors import ServeError
from bridge.serve import reaper
from bridge.serve.reaper import KILLED_REASON_TAG, reap_stale_runs
from tests.support.mlflow_server import free_port


def test_stale_run_is_killed_fresh_and_untagged_runs_are_left_alone(mlflow_server):
    client = MlflowClient(tracking_uri=mlflow_server.url)
    exp_id = client.create_experiment(f"reaper-{uuid.uuid4().hex}")
    now = time.time()
    stale_beat = now - 1000.5
    stale = client.create_run(exp_id, tags={config.HEARTBEAT_TAG: str(stale_beat)}).info.run_id
    fresh = client.create_run(exp_id, tags={config.HEARTBEAT_TAG: str(now - 5)}).info.run_id
    untagged = client.create_run(exp_id).info.run_id
    garbled = client.create_run(exp_id, tags={config.HEARTBEAT_TAG: "not-a-number"}).info.run_id
    finished = client.create_run(exp_id, tags={config.HEARTBEAT_TAG: str(stale_beat)}).info.run_id
    client.set_terminated(finished, "FINISHED")

    reaped = reap_stale_runs(mlflow_server.url, timeout_s=300, now=now)

    assert stale in reaped
    assert not {fresh, untagged, garbled, finished} & set(reaped)
    run = client.get_run(stale)
    assert run.info.status == "KILLED"
    assert run.info.end_time == int(stale_beat * 1000)
    assert run.data.tags[KILLED_REASON_TAG] == "no heartbeat for 1000 s; marked KILLED by bridge serve"
    for run_id in (fresh, untagged, garbled):
        assert client.get_run(run_id).info.status == "RUNNING"
    assert client.get_run(finished).info.status == "FINISHED"

    # A second round finds nothing new: the killed run is no longer RUNNING.
    assert stale not in reap_stale_runs(mlflow_server.url, timeout_s=300, now=now)

    # The client comes back after all and finishes its run: MLflow accepts it, and that status wins.
    client.set_terminated(stale, "FINISHED")
    assert client.get_run(stale).info.status == "FINISHED"


def test_deleted_experiments_are_skipped(mlflow_server):
    client = MlflowClient(tracking_uri=mlflow_server.url)
    exp_id = client.create_experiment(f"reaper-deleted-{uuid.uuid4().hex}")
    run_id = client.create_run(exp_id, tags={config.HEARTBEAT_TAG: str(time.time() - 9999)}).info.run_id
    client.delete_experiment(exp_id)
    assert run_id not in reap_stale_runs(mlflow_server.url, timeout_s=60)


def test_every_page_of_experiments_and_runs_is_reaped(mlflow_server, monkeypatch):
    # Pages of 2: several pages of experiments and of runs, and runs turning KILLED while being paged through.
    monkeypatch.setattr(reaper, "_PAGE", 2)
    client = MlflowClient(tracking_uri=mlflow_server.url)
    beat = str(time.time() - 5000)
    stale = []
    for _ in range(3):
        exp_id = client.create_experiment(f"reaper-pages-{uuid.uuid4().hex}")
        stale += [client.create_run(exp_id, tags={config.HEARTBEAT_TAG: beat}).info.run_id for _ in range(5)]
    reaped = reap_stale_runs(mlflow_server.url, timeout_s=60)
    assert set(stale) <= set(reaped)
    assert {client.get_run(run_id).info.status for run_id in stale} == {"KILLED"}


def test_unreachable_server_and_bad_timeout_are_clear_errors():
    with pytest.raises(ValueError, match="positive"):
        reap_stale_runs("http://127.0.0.1:1", timeout_s=0)
    with pytest.raises(ServeError, match="heartbeats"):
        reap_stale_runs(f"http://127.0.0.1:{free_port()}", timeout_s=60)


def test_mlflow_error_answer_is_a_clear_error(mlflow_server):
    with pytest.raises(ServeError, match="heartbeats.*404"):
        reap_stale_runs(mlflow_server.url + "/no-such-prefix", timeout_s=60)


def test_bridge_serve_process_never_imports_mlflow(mlflow_server):
    # Everything `bridge serve` loads in its own process, and a reaper round: MLflow's client (~190 MiB,
    # ~3 s of CPU) must stay out. MLflow itself runs only in the child process.
    script = (
        "import sys\n"
        "import bridge.cli, bridge.cli.serve\n"
        "import bridge.serve.supervisor, bridge.serve.entrance, bridge.serve.mlflow_process\n"
        "import bridge.serve.reaper, bridge.serve.tunnel, bridge.serve.publisher\n"
        f"bridge.serve.reaper.reap_stale_runs({mlflow_server.url!r}, timeout_s=60)\n"
        "print(sorted(m for m in sys.modules if m == 'mlflow' or m.startswith('mlflow.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
