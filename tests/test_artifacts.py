"""The artifact plugin: files copied at call time, uploaded once, verified, listable and downloadable."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from tests.support.client import server_run


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_artifact_copied_at_call_time_uploaded_and_identical_on_the_server(
    mlflow_server, server_client, bridge_connect, tmp_path
):
    conn = bridge_connect(mlflow_server.url)
    name = f"art-{uuid.uuid4().hex[:6]}"
    mlflow.set_experiment(name)
    weights = tmp_path / "best.pt"
    weights.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    expected = _sha256(weights)
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(weights), artifact_path="weights")
        weights.unlink()  # gone right after the call: the journal's copy is what gets uploaded
        mlflow.log_dict({"epochs": 3, "imgsz": 64}, "config/args.json")
        mlflow.log_text("hello", "notes/readme.txt")
        folder = tmp_path / "plots"
        (folder / "sub").mkdir(parents=True)
        (folder / "a.txt").write_text("a")
        (folder / "sub" / "b.txt").write_text("bb")
        mlflow.log_artifacts(str(folder), artifact_path="plots")
    assert conn.flush(60) == 0
    assert list(conn.journal.spool.folder.iterdir()) == [], "spooled copies are removed once delivered"
    remote = server_run(server_client, name)
    got = server_client.download_artifacts(remote.info.run_id, "weights/best.pt", str(tmp_path / "down"))
    assert _sha256(got) == expected
    args = server_client.download_artifacts(remote.info.run_id, "config/args.json", str(tmp_path / "down"))
    assert json.loads(Path(args).read_text()) == {"epochs": 3, "imgsz": 64}
    listed = {f.path for f in server_client.list_artifacts(remote.info.run_id, "plots")}
    assert listed == {"plots/a.txt", "plots/sub"}
    # Through bridge, with the local run id.
    client = MlflowClient()
    assert {f.path for f in client.list_artifacts(run.info.run_id)} >= {"weights", "config", "notes", "plots"}
    local = client.download_artifacts(run.info.run_id, "notes/readme.txt", str(tmp_path / "via-bridge"))
    assert Path(local).read_text() == "hello"


def test_upload_whose_answer_was_lost_is_uploaded_again_whole_without_a_listing(
    flaky_proxy, mlflow_server, server_client, bridge_connect, tmp_path
):
    # A listing shows only sizes, so "did it arrive?" cannot be told from it (issue 8, defect 2): the file is
    # sent again (one request, as the listing was; inbound bytes are free on ngrok) and replaces itself.
    conn = bridge_connect(flaky_proxy.url)
    name = f"art-once-{uuid.uuid4().hex[:6]}"
    mlflow.set_experiment(name)
    with mlflow.start_run():
        mlflow.log_metric("m", 1.0)
        assert conn.flush(30) == 0
        flaky_proxy.set_mode("lost_ack", path="/mlflow-artifacts/", times=1)  # then "pass" by itself
        source = tmp_path / "model.bin"
        source.write_bytes(os.urandom(200_000))
        mlflow.log_artifact(str(source))
    assert conn.flush(60) == 0
    # Else the upload went through a working link and the test would prove nothing.
    assert flaky_proxy.count("/mlflow-artifacts/", method="PUT", mode="lost_ack") == 1
    assert flaky_proxy.count("/mlflow-artifacts/", method="PUT") == 2
    assert flaky_proxy.count("/mlflow-artifacts/artifacts?", method="GET") == 0, "no listing spent on it"
    remote = server_run(server_client, name)
    got = server_client.download_artifacts(remote.info.run_id, "model.bin", str(tmp_path / "down"))
    assert _sha256(got) == _sha256(source)


def test_a_newer_copy_of_the_same_length_is_never_taken_for_the_older_one(
    mlflow_server, server_client, bridge_connect, tmp_path
):
    """Issue 8, defect 2: v1 delivered, v2 of the same size fails once (nothing sent) — the server must end with v2."""
    from tests.support.transport import FaultTransport

    transport = FaultTransport()
    conn = bridge_connect(mlflow_server.url, transport=transport)
    name = f"art-same-size-{uuid.uuid4().hex[:6]}"
    mlflow.set_experiment(name)
    source = tmp_path / "weights.bin"
    with mlflow.start_run():
        source.write_bytes(b"1" * 50_000)
        mlflow.log_artifact(str(source))
        assert conn.flush(30) == 0
        transport.fail("refuse", path="/mlflow-artifacts/", times=1)
        source.write_bytes(b"2" * 50_000)
        mlflow.log_artifact(str(source))
    assert conn.flush(60) == 0
    assert transport.count("/mlflow-artifacts/", method="PUT") == 3, "v1, the refused v2, v2 again"
    got = server_client.download_artifacts(
        server_run(server_client, name).info.run_id, "weights.bin", str(tmp_path / "down")
    )
    assert Path(got).read_bytes() == b"2" * 50_000


def test_refreshes_of_one_file_during_an_outage_go_up_once_as_the_last_version(
    flaky_proxy, server_client, bridge_connect, tmp_path
):
    conn = bridge_connect(flaky_proxy.url)
    name = f"art-refresh-{uuid.uuid4().hex[:6]}"
    mlflow.set_experiment(name)
    with mlflow.start_run():
        mlflow.log_metric("m", 1.0)
        assert conn.flush(30) == 0
        flaky_proxy.set_mode("refuse")  # the tunnel is down while training refreshes its console every 30 s
        for i in range(20):
            mlflow.log_text(f"epoch {i}\n" * (i + 1), "console.log")
        mlflow.log_text("other", "notes.txt")
        flaky_proxy.reset_counts()
        flaky_proxy.set_mode("pass")
    assert conn.flush(60) == 0
    assert flaky_proxy.count("/mlflow-artifacts/artifacts/", method="PUT") == 2, flaky_proxy.lines
    assert list(conn.journal.spool.folder.iterdir()) == [], "superseded copies are removed too"
    remote = server_run(server_client, name).info.run_id
    got = server_client.download_artifacts(remote, "console.log", str(tmp_path / "down"))
    assert Path(got).read_text() == "epoch 19\n" * 20


def test_offline_listing_and_download_come_from_the_spool(bridge_connect, tmp_path):
    from tests.support.mlflow_server import closed_url

    conn = bridge_connect(closed_url())
    mlflow.set_experiment("offline-art")
    with mlflow.start_run() as run:
        mlflow.log_text("spooled", "deep/x.txt")
    client = MlflowClient()
    assert [(f.path, f.is_dir) for f in client.list_artifacts(run.info.run_id)] == [("deep", True)]
    assert [(f.path, f.file_size) for f in client.list_artifacts(run.info.run_id, "deep")] == [("deep/x.txt", 7)]
    path = client.download_artifacts(run.info.run_id, "deep/x.txt", str(tmp_path / "d"))
    assert Path(path).read_text() == "spooled"
    assert conn.status().pending >= 1


def test_a_spooled_copy_changed_on_disk_is_refused_not_uploaded(mlflow_server, server_client, tmp_path):
    from bridge.client.delivery.sender import Sender
    from bridge.client.journal import Journal
    from bridge.client.link import Link

    journal = Journal(tmp_path / "j.sqlite")
    name = f"art-damaged-{uuid.uuid4().hex[:6]}"
    run = journal.add_run(
        experiment_id=journal.add_experiment(name, {}),
        user_id="u",
        start_time=int(time.time() * 1000),
        name="r",
        tags={},
    )
    source = tmp_path / "f.bin"
    source.write_bytes(b"original")
    body = journal.spool_artifact(run, source, "f.bin")
    journal.spool.path(body["spool"]).write_bytes(b"tampered")
    sender = Sender(journal, Link(mlflow_server.url, None))
    sender.deliver_round()
    ((dead, message, reason),) = journal.queue.dead_letters()
    assert dead.key == "f.bin" and "sha256" in message and reason == "spool-file-damaged"
    remote = server_run(server_client, name)
    assert server_client.list_artifacts(remote.info.run_id) == []
