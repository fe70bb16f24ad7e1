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
from tests.support.mlflow_server import closed_url


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
        reap_stale_runs(closed_url(), timeout_s=60)


def test_mlflow_error_answer_is_a_clear_error(mlflow_server):
    with pytest.raises(ServeError, match=r"heartbeats.*404"):
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


def test_a_silent_empty_twin_of_a_run_is_deleted_not_killed(mlflow_server):
    """A `runs/create` applied after the client's retry had created the run again leaves an empty run with the
    same run key that never beats (harness H11's residue: one landing after the run's end, or beside a run that
    never ends). The reaper deletes it, tagged with the run it duplicates; the run itself is left alone."""
    client = MlflowClient(tracking_uri=mlflow_server.url)
    exp_id = client.create_experiment(f"reaper-twin-{uuid.uuid4().hex}")
    now = time.time()
    key = uuid.uuid4().hex
    tags = {config.RUN_KEY_TAG: key, config.HEARTBEAT_TAG: str(now - 1000)}
    twin = client.create_run(exp_id, tags=tags).info.run_id
    live = client.create_run(exp_id, tags={**tags, config.HEARTBEAT_TAG: str(now - 5)}).info.run_id
    client.log_param(live, "lr", "0.1")
    # Not twins: an empty silent run alone with its key, and a silent one holding data beside a live twin.
    alone = client.create_run(exp_id, tags={**tags, config.RUN_KEY_TAG: uuid.uuid4().hex}).info.run_id
    other_key = uuid.uuid4().hex
    with_data = client.create_run(exp_id, tags={**tags, config.RUN_KEY_TAG: other_key}).info.run_id
    client.log_metric(with_data, "loss", 0.5)
    client.create_run(exp_id, tags={**tags, config.RUN_KEY_TAG: other_key, config.HEARTBEAT_TAG: str(now)})

    reaped = reap_stale_runs(mlflow_server.url, timeout_s=300, now=now)

    gone = client.get_run(twin)
    assert gone.info.lifecycle_stage == "deleted" and gone.data.tags[config.DUPLICATE_OF_TAG] == live
    assert twin not in reaped
    assert client.get_run(live).info.status == "RUNNING"
    assert set(reaped) >= {alone, with_data}
    assert client.get_run(alone).info.status == client.get_run(with_data).info.status == "KILLED"


def test_silent_runs_with_one_key_that_cannot_be_told_apart_are_both_killed(mlflow_server):
    """Neither shows it is the run in use (no data, same tags, the same last beat): deleting the one a client
    maps to would turn its later writes into dead letters, so both are marked KILLED like any silent run. A run
    that holds a tag its twin lacks (an artifact's `mlflow.loggedArtifacts`, a user tag) is the one in use."""
    client = MlflowClient(tracking_uri=mlflow_server.url)
    exp_id = client.create_experiment(f"reaper-twins-{uuid.uuid4().hex}")
    tags = {config.RUN_KEY_TAG: uuid.uuid4().hex, config.HEARTBEAT_TAG: str(int(time.time() - 1000))}
    alike = [client.create_run(exp_id, tags=tags).info.run_id for _ in range(2)]
    tags = {**tags, config.RUN_KEY_TAG: uuid.uuid4().hex}
    used = client.create_run(exp_id, tags=tags).info.run_id
    client.set_tag(used, "stage", "train")  # written to: in use, though silent and without metrics or params
    twin = client.create_run(exp_id, tags=tags).info.run_id
    reaped = reap_stale_runs(mlflow_server.url, timeout_s=300)
    assert set(alike) | {used} <= set(reaped)
    assert {client.get_run(r).info.status for r in [*alike, used]} == {"KILLED"}
    gone = client.get_run(twin)
    assert gone.info.lifecycle_stage == "deleted" and gone.data.tags[config.DUPLICATE_OF_TAG] == used


def test_a_twin_beside_a_run_that_beat_later_or_ended_is_deleted(mlflow_server):
    client = MlflowClient(tracking_uri=mlflow_server.url)
    exp_id = client.create_experiment(f"reaper-later-{uuid.uuid4().hex}")
    now = time.time()
    for finish in (False, True):
        tags = {config.RUN_KEY_TAG: uuid.uuid4().hex, config.HEARTBEAT_TAG: str(int(now - 1000))}
        twin = client.create_run(exp_id, tags=tags).info.run_id
        used = client.create_run(exp_id, tags={**tags, config.HEARTBEAT_TAG: str(int(now - 900))}).info.run_id
        if finish:
            client.set_terminated(used, "FINISHED")
        reaped = reap_stale_runs(mlflow_server.url, timeout_s=300, now=now)
        assert twin not in reaped and client.get_run(twin).data.tags[config.DUPLICATE_OF_TAG] == used
        assert client.get_run(used).info.status == ("FINISHED" if finish else "KILLED")
