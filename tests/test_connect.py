"""`bridge.connect()`: probe, offline mode, wiring, token handling, and crash safety across processes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from bridge.client.plugins.store import JournalStore
from tests.support.client import server_run

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "MLFLOW_REGISTRY"))}
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(REPO)}, **extra)
    return env


def test_online_connect_wires_mlflow_and_sends_the_token_as_bearer(fixed_status_server, bridge_connect, capsys):
    fixed_status_server.status = 200
    conn = bridge_connect(fixed_status_server.url, token="s3cret-token-value")
    assert os.environ["MLFLOW_TRACKING_URI"] == "bridge+" + fixed_status_server.url
    assert mlflow.get_tracking_uri() == "bridge+" + fixed_status_server.url
    assert isinstance(mlflow.tracking._tracking_service.utils._get_store(), JournalStore)
    err = capsys.readouterr().err
    assert f"logging to {fixed_status_server.url}" in err and "s3cret" not in err
    method, path, auth = fixed_status_server.seen[0]
    assert (method, auth) == ("GET", "Bearer s3cret-token-value")
    assert "s3cret" not in path
    assert conn.status().online is True and "s3cret" not in repr(conn) + repr(conn.status())


def test_offline_connect_succeeds_at_once_and_says_so(bridge_connect, capsys, tmp_path):
    from tests.support.mlflow_server import closed_url

    url = closed_url()
    began = time.monotonic()
    conn = bridge_connect(url)
    assert time.monotonic() - began < 5
    assert "offline mode: logging to journal" in capsys.readouterr().err
    mlflow.set_experiment("offline-only")
    with mlflow.start_run():
        mlflow.log_metric("x", 1.0)
    status = conn.status()
    assert status.online is False and status.pending >= 4 and status.last_error
    assert conn.flush(0.2) == status.pending


def test_explicit_arguments_work_without_discovery_records(mlflow_server, server_client, bridge_connect):
    conn = bridge_connect(mlflow_server.url, token=None, experiment=f"noauth-{uuid.uuid4().hex[:6]}")
    with mlflow.start_run():
        mlflow.log_metric("m", 2.0)
    assert conn.flush(30) == 0
    assert server_run(
        server_client, mlflow.get_experiment(mlflow.tracking.fluent._get_experiment_id()).name
    ).data.metrics == {"m": 2.0}


def test_through_the_bridge_serve_entrance_with_the_right_token(bridge_serve, bridge_connect):
    token = bridge_serve.token()
    name = f"entrance-{uuid.uuid4().hex[:6]}"
    conn = bridge_connect(bridge_serve.entrance_url, token=token, experiment=name)
    assert conn.status().online is True
    with mlflow.start_run():
        for step in range(30):
            mlflow.log_metric("loss", step / 10, step=step)
        mlflow.log_param("p", "1")
    assert conn.flush(30) == 0
    client = MlflowClient(bridge_serve.mlflow_url)
    remote = server_run(client, name)
    assert len(client.get_metric_history(remote.info.run_id, "loss")) == 30 and remote.data.params == {"p": "1"}


def test_wrong_token_pauses_delivery_and_keeps_everything(bridge_serve, bridge_connect, monkeypatch):
    monkeypatch.setenv("BRIDGE_TOKEN_RETRY_MIN_S", "0.05")  # two refused rounds, without the 5 s floor
    conn = bridge_connect(bridge_serve.entrance_url, token="wrong-" + uuid.uuid4().hex)
    status = conn.status()
    assert status.token_rejected is True and status.online is not True
    assert "token rejected" in (status.last_error or "")
    mlflow.set_experiment("never-delivered")
    with mlflow.start_run():
        mlflow.log_metric("kept", 1.0)
    assert conn.sender.wait_rounds(2, 30), "the sender tried (and was refused) after the run was logged"
    status = conn.status()
    assert status.token_rejected and status.pending >= 4 and status.dead_letters == 0


def test_token_rejected_by_a_401_entrance(fixed_status_server, bridge_connect, monkeypatch):
    # The 5 s floor between retries of a refused token is not what this test is about: two rounds, quickly.
    monkeypatch.setenv("BRIDGE_TOKEN_RETRY_MIN_S", "0.05")
    conn = bridge_connect(fixed_status_server.url, token="bad-token")
    conn.journal.add_experiment("x", {})
    assert conn.sender.wait_rounds(2, 30), "the sender tried (and was refused) after the entry was journaled"
    status = conn.status()
    assert status.token_rejected and status.pending == 1 and status.dead_letters == 0


_LOGGER = textwrap.dedent("""
    import sys, bridge, mlflow
    bridge.connect(sys.argv[1], token=None, journal=sys.argv[2], experiment=sys.argv[3], flush_at_exit=0)
    mlflow.start_run()
    step = 0
    while True:
        mlflow.log_metric("loss", float(step), step=step)
        sys.stdout.write(f"{step}\\n"); sys.stdout.flush()   # acknowledged: the call returned
        step += 1
""")


def test_kill_9_during_an_outage_then_bridge_sync_delivers_every_acknowledged_point(own_mlflow_server, tmp_path):
    own_mlflow_server.stop()
    journal = tmp_path / "crash.sqlite"
    name = f"crash-{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOGGER, own_mlflow_server.url, str(journal), name],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=_env(),
        text=True,
    )
    acknowledged = -1
    try:
        deadline = time.monotonic() + 60
        while acknowledged < 1500 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acknowledged = int(line)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # Lines written before the kill but not yet read are acknowledged too.
    rest = proc.stdout.read().split()
    acknowledged = int(rest[-1]) if rest else acknowledged
    assert acknowledged >= 1500

    own_mlflow_server.start()
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from bridge.cli import main; main()",
            "sync",
            "--journal",
            str(journal),
            "--url",
            own_mlflow_server.url,
            "--timeout",
            "120",
        ],
        env=_env(COLUMNS="200"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    client = MlflowClient(own_mlflow_server.url)
    remote = server_run(client, name)
    steps = sorted(m.step for m in client.get_metric_history(remote.info.run_id, "loss"))
    assert steps[: acknowledged + 1] == list(range(acknowledged + 1)), "every acknowledged point arrived"
    assert len(steps) == len(set(steps)), "and none twice"


_PLAIN = textwrap.dedent("""
    import mlflow
    mlflow.set_experiment(__import__("sys").argv[1])
    with mlflow.start_run():
        for step in range(100):
            mlflow.log_metric("acc", step / 100, step=step)
""")


def test_plain_mlflow_code_in_a_child_process_goes_through_the_journal(mlflow_server, server_client, tmp_path):
    """Only MLFLOW_TRACKING_URI=bridge+… is inherited: the child builds its own connection, delivers at exit."""
    name = f"child-{uuid.uuid4().hex[:6]}"
    journal = tmp_path / "child.sqlite"
    out = subprocess.run(
        [sys.executable, "-c", _PLAIN, name],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(
            MLFLOW_TRACKING_URI="bridge+" + mlflow_server.url,
            BRIDGE_JOURNAL=str(journal),
            BRIDGE_SEND_INTERVAL_S="0.05",
        ),
    )
    assert out.returncode == 0, out.stderr
    assert journal.exists()
    remote = server_run(server_client, name)
    assert len(server_client.get_metric_history(remote.info.run_id, "acc")) == 100
    assert remote.info.status == "FINISHED"


# Imports bridge and MLflow once, then forks `processes` fresh processes per repetition that wait for a barrier
# file and connect together on one default journal (a fresh BRIDGE_HOME each time), as two trainings on a 2-GPU
# workstation or two notebooks on one Drive journal would. Forked, not started: 20 repetitions of 4 interpreter
# starts would cost minutes of imports; what races is connect() itself.
_CONNECT_TOGETHER = textwrap.dedent("""
    import json, os, sys, time, traceback
    import bridge, mlflow
    url, root, repetitions, processes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    def child(name, barrier, index):
        while not os.path.exists(barrier):
            time.sleep(0.0005)
        conn = bridge.connect(url, token=None, experiment=name)
        with mlflow.start_run(run_name=f"p{index}"):
            mlflow.log_param("index", index)
            for step in range(5):
                mlflow.log_metric("loss", index + step / 10, step=step)
        left = conn.flush(120)
        conn.close()
        return left

    for rep in range(repetitions):
        home = os.path.join(root, f"rep{rep}")
        os.makedirs(home)
        os.environ["BRIDGE_HOME"] = home
        name = f"together-{rep}-{os.getpid()}"
        barrier = os.path.join(home, "go")
        pids = []
        for index in range(processes):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = 0 if child(name, barrier, index) == 0 else 2
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush(); sys.stderr.flush()
                    os._exit(code)
            pids.append(pid)
        open(barrier, "w").close()
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        print(json.dumps({"name": name, "codes": codes, "journal": os.path.join(home, "journal.sqlite")}), flush=True)
""")


@pytest.mark.slow
def test_four_processes_connecting_at_once_share_one_experiment_20_times(mlflow_server, server_client, tmp_path):
    repetitions, processes = 20, 4
    out = subprocess.run(
        [sys.executable, "-c", _CONNECT_TOGETHER, mlflow_server.url, str(tmp_path), str(repetitions), str(processes)],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(BRIDGE_SEND_INTERVAL_S="0.05", BRIDGE_EXIT_FLUSH_S="0"),
    )
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(results) == repetitions, out.stderr[-3000:]
    crashed = [r for r in results if r["codes"] != [0] * processes]
    assert not crashed, (
        f"{len(crashed)} of {repetitions} repetitions had a failed process: {crashed}\n{out.stderr[-3000:]}"
    )
    for result in results:
        experiment = server_client.get_experiment_by_name(result["name"])
        assert experiment is not None, result
        runs = server_client.search_runs([experiment.experiment_id], run_view_type=3)
        assert sorted(r.data.params["index"] for r in runs) == [str(i) for i in range(processes)], result
        for run in runs:
            index = int(run.data.params["index"])
            history = server_client.get_metric_history(run.info.run_id, "loss")
            assert sorted((m.step, m.value) for m in history) == [(s, index + s / 10) for s in range(5)], result
            assert run.info.status == "FINISHED"
        with sqlite3.connect(result["journal"]) as journal:
            assert journal.execute("select count(*) from experiments").fetchone()[0] == 1, "one row, shared"


def test_full_journal_raises_from_mlflow_and_keeps_what_was_accepted(bridge_connect):
    from bridge.errors import JournalFullError
    from tests.support.mlflow_server import closed_url

    conn = bridge_connect(closed_url(), journal_limit=150_000)
    mlflow.set_experiment("full")
    run = mlflow.start_run()
    accepted = 0
    try:
        for step in range(100_000):
            mlflow.log_metric("m", float(step), step=step)
            accepted += 1
    except JournalFullError as exc:
        assert "is full" in str(exc) and "BRIDGE_JOURNAL_LIMIT" in str(exc)
    else:
        raise AssertionError("the journal never filled up")
    points = conn.journal.queue.undelivered(run.info.run_id, ("metric",))
    assert len(points) == accepted > 100
    assert [op.step for op in points] == list(range(accepted))
    mlflow.end_run()  # a full journal still ends the run: its end is never refused for the limit
    (end,) = conn.journal.queue.undelivered(run.info.run_id, ("update_run",))
    assert end.json()["status"] == "FINISHED" and end.id > points[-1].id, "after its last point"


@pytest.mark.parametrize("looks_missed", [1, 2], ids=["seen-by-create", "seen-by-the-insert"])
def test_set_experiment_joins_one_another_process_added_since_it_looked(bridge_connect, monkeypatch, looks_missed):
    """connect(experiment=…) in two processes at once: the one that loses the race joins the other's experiment
    (MLflow's set_experiment, answered "already exists", would leave the Default experiment active)."""
    from bridge.client.journal import Journal
    from tests.support.mlflow_server import closed_url

    conn = bridge_connect(closed_url())
    other = Journal(conn.journal.path)  # the other process, on the same journal
    look = conn.journal.ids.experiment_by_name
    looks, raced = [], []

    def a_look_the_other_process_races(name):
        looks.append(name)
        if len(looks) <= looks_missed:  # this look finds nothing; the other process adds it right after
            if len(looks) == looks_missed:
                raced.append(other.add_experiment(name, {}))
            return None
        return look(name)

    monkeypatch.setattr(conn.journal.ids, "experiment_by_name", a_look_the_other_process_races)
    experiment = mlflow.set_experiment("raced")
    assert raced and experiment.experiment_id == raced[0]
    with mlflow.start_run() as run:
        mlflow.log_metric("m", 1.0)
    assert conn.journal.ids.run(run.info.run_id).experiment_id == raced[0]
    assert [e.name for e in conn.journal.ids.experiments()] == ["raced"], "one experiment row, shared"
    other.close()


def test_creating_an_experiment_the_journal_has_still_raises_as_mlflow_would(bridge_connect):
    from tests.support.mlflow_server import closed_url

    bridge_connect(closed_url())
    mlflow.create_experiment("twice")
    with pytest.raises(mlflow.exceptions.MlflowException, match="already exists"):
        mlflow.create_experiment("twice")


def test_direct_mlflow_calls_get_the_token_from_the_auth_plugin(fixed_status_server, bridge_connect):
    import requests
    from mlflow.tracking.request_auth.registry import fetch_auth

    fixed_status_server.status = 200
    bridge_connect(fixed_status_server.url, token="abc-token-123456")
    assert os.environ["MLFLOW_TRACKING_AUTH"] == "bridge"
    assert mlflow.get_registry_uri() == "bridge+" + fixed_status_server.url  # the journaled registry (registry.py)
    auth = fetch_auth("bridge")
    request = auth(requests.Request("GET", fixed_status_server.url).prepare())
    assert request.headers["Authorization"] == "Bearer abc-token-123456"
    assert "abc-token" not in repr(auth)


def test_connect_without_arguments_uses_discovery(mlflow_server, bridge_connect, monkeypatch, capsys):
    monkeypatch.setenv("BRIDGE_URL", mlflow_server.url)
    monkeypatch.setenv("BRIDGE_TOKEN", "env-token-value-123")
    conn = bridge_connect(None, token=None)
    assert conn.url == mlflow_server.url and conn.link.token == "env-token-value-123"
    assert conn.status().online is True
    assert "(from BRIDGE_URL)" in capsys.readouterr().err


def test_connect_on_a_damaged_journal_repairs_it_and_reports(bridge_connect, tmp_path, capsys):
    from tests.support.mlflow_server import closed_url

    journal = tmp_path / "damaged.sqlite"
    journal.write_bytes(b"\x00garbage" * 512)
    conn = bridge_connect(closed_url(), journal=journal)
    err = capsys.readouterr().err
    assert "journal was damaged" in err and "damaged file was kept as" in err
    assert conn.journal.repair_report.damaged_file.exists()
    mlflow.set_experiment("after-repair")
    with mlflow.start_run():
        mlflow.log_metric("m", 1.0)
    assert conn.status().pending >= 3


def test_the_token_goes_only_to_the_connected_server_never_to_another_mlflow(
    make_status_server, bridge_connect, monkeypatch
):
    import requests
    from mlflow.tracking.request_auth.registry import fetch_auth

    bridge_server, other = make_status_server(200), make_status_server(200)
    conn = bridge_connect(bridge_server.url, token="only-for-bridge-123456")
    MlflowClient(other.url).search_experiments()  # MLFLOW_TRACKING_AUTH is process-wide…
    assert other.seen, "the other server was asked"
    assert [auth for _, _, auth in other.seen] == [None] * len(other.seen)  # …but the token stays home
    # The registry, which connect() points at the bridge server, still carries it.
    MlflowClient(other.url, registry_uri=bridge_server.url).search_registered_models()
    assert bridge_server.seen[-1][2] == "Bearer only-for-bridge-123456"
    assert [auth for _, _, auth in other.seen] == [None] * len(other.seen)

    # Without a connection there is no token at all, even with one in the environment.
    monkeypatch.setenv("BRIDGE_TOKEN", "env-token-never-sent-123")
    conn.close()
    request = fetch_auth("bridge")(requests.Request("GET", other.url + "/api/2.0/mlflow/x").prepare())
    assert "Authorization" not in request.headers


_EXIT_WITHOUT_END_RUN = textwrap.dedent("""
    import sys
    import mlflow   # imported first: MLflow's own end-run exit hook runs after bridge's
    import bridge
    bridge.connect(sys.argv[1], token=None, journal=sys.argv[2], experiment=sys.argv[3], flush_at_exit=60)
    mlflow.start_run()
    mlflow.log_metric("m", 3.0)
    mlflow.log_param("p", "x")
""")


def test_a_run_left_open_at_exit_ends_finished_through_the_same_journal(
    mlflow_server, server_client, tmp_path, bridge_home
):
    name = f"exit-{uuid.uuid4().hex[:6]}"
    journal = tmp_path / "exit.sqlite"
    out = subprocess.run(
        [sys.executable, "-c", _EXIT_WITHOUT_END_RUN, mlflow_server.url, str(journal), name],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(BRIDGE_SEND_INTERVAL_S="0.05"),
    )
    assert out.returncode == 0, out.stderr
    assert "not delivered yet" not in out.stderr, out.stderr
    remote = server_run(server_client, name)
    assert remote.info.status == "FINISHED"
    assert remote.data.metrics == {"m": 3.0} and remote.data.params == {"p": "x"}
    assert not (bridge_home / "journal.sqlite").exists(), "nothing went to the default journal"


def test_journal_arguments_are_exported_and_calls_after_exit_stay_in_that_journal(
    bridge_connect, tmp_path, monkeypatch, capsys
):
    from bridge.client import connect as connect_module
    from tests.support.mlflow_server import closed_url

    monkeypatch.setattr(connect_module, "_closed_at_exit", None, raising=False)
    journal = tmp_path / "mine.sqlite"
    conn = bridge_connect(closed_url(), journal=journal, journal_limit=50_000_000, flush_at_exit=0)
    assert os.environ["BRIDGE_JOURNAL"] == str(journal) and os.environ["BRIDGE_JOURNAL_LIMIT"] == "50000000"
    conn._at_exit()  # the interpreter is exiting …
    late = connect_module.connection_for(conn.tracking_uri)  # … and an exit hook still logs something
    assert late is not conn and late.journal.path == journal
    assert late.journal.limit_bytes == 50_000_000
    assert "kept in journal" in capsys.readouterr().err
    late.close()


def test_an_explicit_url_is_pinned_and_never_replaced_by_rediscovery(
    make_status_server, bridge_connect, monkeypatch, tmp_path
):
    from bridge.record import make_record
    from tests.support.mlflow_server import closed_url

    token = "pinned-token-" + uuid.uuid4().hex
    trap = make_status_server(200)
    record = tmp_path / "endpoint.json"
    record.write_text(make_record(trap.url, token=token, instance="x", mlflow_version="3", ttl_s=600).to_json())
    monkeypatch.setenv("BRIDGE_DISCOVERY", f"file:{record}")
    monkeypatch.setattr("bridge.client.link.REDISCOVER_AFTER_S", 0.1)
    dead = closed_url()
    conn = bridge_connect(dead, token=token)
    conn.journal.add_experiment("pinned", {})
    deadline = time.monotonic() + 60
    while conn.link.failures < 5 and time.monotonic() < deadline:
        conn.flush(0.1)
    assert conn.link.failures >= 5, "the sender kept failing on the pinned URL"
    assert conn.url == dead and trap.seen == []


def test_every_request_skips_ngroks_browser_warning(bridge_connect, mlflow_server):
    """ngrok's free domains answer browser-like clients with an interstitial page unless told not to."""
    from mlflow.tracking.request_header.registry import resolve_request_headers

    from tests.support.transport import FaultTransport

    transport = FaultTransport()
    conn = bridge_connect(mlflow_server.url, transport=transport)
    mlflow.set_experiment(f"ngrok-header-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run():
        mlflow.log_metric("m", 1.0)
    assert conn.flush(30) == 0
    assert transport.requests, "the sender made requests"
    assert all(r.headers.get("ngrok-skip-browser-warning") == "1" for r in transport.requests)
    # MLflow's own requests (registry, model loading) carry it too while connected.
    assert resolve_request_headers().get("ngrok-skip-browser-warning") == "1"


def test_a_run_on_the_server_is_announced_with_the_id_and_link_the_ui_knows(bridge_connect, mlflow_server, capsys):
    """The id MLflow gives the notebook is the journal's own; once the run exists on the server, its server id
    and UI link are printed (the link on a line of its own), and either id finds the run (issue 19)."""
    from bridge import config
    from bridge.ui import ui_link

    conn = bridge_connect(mlflow_server.url, experiment="ids-announced")
    with mlflow.start_run(run_name="matchable") as run:
        mlflow.log_metric("loss", 1.0)
    local = run.info.run_id
    assert conn.flush(30) == 0
    server_id = conn.server_run_id(local)
    assert server_id and server_id != local
    client = MlflowClient(mlflow_server.url)
    found = client.get_run(server_id)
    assert found.info.run_name == "matchable" and found.data.tags[config.RUN_KEY_TAG] == local
    (by_key,) = client.search_runs([found.info.experiment_id], filter_string=f"tags.`{config.RUN_KEY_TAG}` = '{local}'")
    assert by_key.info.run_id == server_id
    err = capsys.readouterr().err
    assert f"bridge: run 'matchable' is on the server as {server_id} (here {local}):" in err
    assert f"\n  {ui_link(conn.url, found.info.experiment_id, server_id)}\n" in err
    assert err.count(server_id) == 2, "announced once"
