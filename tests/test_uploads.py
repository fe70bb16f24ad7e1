"""Resumable uploads: the entrance's tus endpoint (bridge/serve/uploads.py), the client's half
(bridge/client/link/uploads.py, bridge/client/delivery/files.py), and the file lane of the sender.

Every test runs a real MLflow server behind a real entrance (in this process, so its limits can be small) and
checks what MLflow holds: bytes and sha256, never a mock's word.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from bridge.client.delivery import files
from bridge.client.journal.uploads import UploadState
from bridge.client.link import Link, Request, RequestsTransport, Response, Transport
from bridge.client.link import uploads as tus
from bridge.errors import HttpError, TransportError, UndeliverableError
from bridge.serve import uploads as server_uploads
from tests.support.uploads import TOKEN, MiB, _deliver, _in_mlflow, _journal_with_file, _payload


class CountingTransport(Transport):
    """Real HTTP, counting requests by method; `refuse_over` plays an edge that refuses bodies over that size."""

    def __init__(self, refuse_over: int | None = None) -> None:
        self.inner = RequestsTransport()
        self.methods: list[str] = []
        self.refused = 0
        self.refuse_over = refuse_over

    def send(self, request: Request) -> Response:
        self.methods.append(request.method)
        size = len(request.data) if request.data is not None and hasattr(request.data, "__len__") else 0
        if self.refuse_over is not None and size > self.refuse_over:
            self.refused += 1
            return Response(413, b"<html>413 Request Entity Too Large</html>", {"Content-Type": "text/html"})
        return self.inner.send(request)


# --------------------------------------------------------------------------------------------- the protocol


def test_a_file_in_parts_lands_whole_once_and_its_staging_is_gone(entrance, mlflow_server, run_path, tmp_path):
    source, sha = _payload(tmp_path, 5 * MiB + 123)
    journal, op, body = _journal_with_file(tmp_path, source)
    transport = CountingTransport()
    link = Link(entrance.url, TOKEN, transport=transport)
    target = f"{run_path}/weights/best.pt"
    _deliver(link, journal, op, body, target)
    assert hashlib.sha256(_in_mlflow(mlflow_server, target) or b"").hexdigest() == sha
    assert transport.methods.count("PATCH") == 6, "5 MiB + 123 bytes in 1 MiB parts"
    assert transport.methods.count("POST") == 1 and "PUT" not in transport.methods
    assert link.upload_bytes_sent == source.stat().st_size
    assert entrance.uploads is not None and entrance.uploads.placed == 1
    assert not list(entrance.uploads.folder.glob("*/data")), "the staged bytes are deleted once placed"


def test_the_staged_file_is_fsynced_once_when_complete_not_per_part(
    entrance, mlflow_server, run_path, tmp_path, monkeypatch
):
    """An fsync per part held each part's answer (seconds each while other processes wrote to the disk); the
    offset a HEAD answers is what the file holds, so one fsync before the check and placing is enough."""
    synced: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name.startswith(str(entrance.uploads.folder)):
            synced.append((name, os.fstat(fd).st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    source, sha = _payload(tmp_path, 3 * MiB + 5)
    journal, op, body = _journal_with_file(tmp_path, source)
    target = f"{run_path}/weights/last.pt"
    _deliver(Link(entrance.url, TOKEN), journal, op, body, target)
    assert hashlib.sha256(_in_mlflow(mlflow_server, target) or b"").hexdigest() == sha
    assert [size for name, size in synced if name.endswith("/data")] == [3 * MiB + 5], "once, the whole file"


def test_a_cut_part_keeps_its_bytes_and_the_next_try_sends_only_the_rest(entrance, mlflow_server, run_path, tmp_path):
    source, sha = _payload(tmp_path, 3 * MiB)
    journal, op, body = _journal_with_file(tmp_path, source)
    link = Link(entrance.url, TOKEN)
    target = f"{run_path}/last.pt"
    location = tus.create(link, target, source.stat().st_size, sha)
    # A part cut by the link after 300 KiB: raw HTTP, so the body really stops half-way.
    host, port = urlsplit(entrance.url).hostname, urlsplit(entrance.url).port
    with socket.create_connection((host, port)) as sock:
        head = (
            f"PATCH {location} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nTus-Resumable: 1.0.0\r\n"
            f"Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\nContent-Length: {MiB}\r\n\r\n"
        )
        sock.sendall(head.encode() + source.read_bytes()[: 300 * 1024])
        deadline = time.monotonic() + 20  # until the server has read what was sent, then the link drops
        while tus.offset(link, location).offset < 300 * 1024 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert tus.offset(link, location).offset == 300 * 1024, "every byte read before the cut is kept"
    journal.uploads.save(UploadState(op.id, source.stat().st_size, MiB, location=location))
    _deliver(link, journal, op, body, target)
    assert hashlib.sha256(_in_mlflow(mlflow_server, target) or b"").hexdigest() == sha
    assert link.upload_bytes_sent == 3 * MiB - 300 * 1024, "only the rest went again"


def test_a_file_that_arrives_changed_is_refused_whole_and_never_placed(entrance, mlflow_server, run_path, tmp_path):
    source, _ = _payload(tmp_path, 2 * MiB)
    link = Link(entrance.url, TOKEN)
    target = f"{run_path}/damaged.pt"
    location = tus.create(link, target, 2 * MiB, "0" * 64)
    tus.send_part(link, location, source, 0, MiB)
    with pytest.raises(HttpError) as refused:
        tus.send_part(link, location, source, MiB, MiB)
    assert refused.value.status == 460 and "sha256" in refused.value.message
    assert _in_mlflow(mlflow_server, target) is None
    assert tus.offset(link, location).state == tus.FAILED


def test_a_spooled_copy_changed_on_disk_is_a_dead_letter_after_the_servers_check_not_sent_again(
    entrance, mlflow_server, tmp_path
):
    """An upload in parts is not read whole by the client first (the server checks every upload's sha256); a copy
    that changed in the spool is found when the server refuses it, and is not sent again."""
    from bridge.client.delivery.sender import Sender
    from bridge.client.options import ClientOptions

    source, _ = _payload(tmp_path, 3 * MiB)
    journal, _, body = _journal_with_file(tmp_path, source)
    spooled = journal.spool.path(body["spool"])
    spooled.write_bytes(os.urandom(3 * MiB))  # the same size, other bytes
    transport = CountingTransport()
    options = ClientOptions.from_env(upload_part_bytes=MiB)
    Sender(journal, Link(entrance.url, TOKEN, transport=transport), options).deliver_round()
    ((dead, message, reason),) = journal.queue.dead_letters()
    assert dead.key == source.name and reason == "spool-file-damaged" and "sha256" in message
    assert transport.methods.count("PATCH") == 3, "sent once, refused by the server's check, not sent again"
    assert entrance.uploads is not None and entrance.uploads.placed == 0


def test_the_endpoint_refuses_what_it_must(entrance, run_path, tmp_path):
    base, auth = entrance.url + tus.PREFIX, {"Authorization": f"Bearer {TOKEN}", **tus.TUS}
    assert requests.options(base, timeout=10).status_code == 401, "no token, no upload"
    options = requests.options(base, headers=auth, timeout=10)
    assert options.status_code == 204 and options.headers["Tus-Version"] == "1.0.0"
    assert int(options.headers["Bridge-Max-Part"]) == MiB
    link = Link(entrance.url, TOKEN)
    with pytest.raises(HttpError) as bad_path:
        tus.create(link, f"{run_path}/../../escape.bin", 10, "a" * 64)
    assert bad_path.value.status == 400
    location = tus.create(link, f"{run_path}/x.bin", 4 * MiB, "a" * 64)
    part = {**auth, "Content-Type": "application/offset+octet-stream"}
    too_big = requests.patch(
        entrance.url + location, data=b"x" * (MiB + 1), headers={**part, "Upload-Offset": "0"}, timeout=10
    )
    assert too_big.status_code == 413
    wrong_offset = requests.patch(
        entrance.url + location, data=b"x", headers={**part, "Upload-Offset": "7"}, timeout=10
    )
    assert wrong_offset.status_code == 409 and wrong_offset.headers["Upload-Offset"] == "0"
    wrong_type = requests.patch(entrance.url + location, data=b"x", headers={**auth, "Upload-Offset": "0"}, timeout=10)
    assert wrong_type.status_code == 415
    unknown = requests.head(entrance.url + tus.PREFIX + "/" + "A" * 32, headers=auth, timeout=10)
    assert unknown.status_code == 404
    gone = requests.delete(entrance.url + location, headers=auth, timeout=10)
    assert gone.status_code == 204
    assert requests.head(entrance.url + location, headers=auth, timeout=10).status_code == 404


def test_uploads_nobody_touched_are_deleted_after_the_expiry(tmp_path):
    now = [time.time()]

    async def place(file: Path, path: str) -> None:
        raise AssertionError("nothing is placed here")

    uploads = server_uploads.Uploads(tmp_path, place, expire_s=3600, clock=lambda: now[0])
    old, fresh = tmp_path / ("o" * 32), tmp_path / ("f" * 32)
    for folder in (old, fresh):
        folder.mkdir()
        (folder / "data").write_bytes(b"x" * 10)
    os.utime(old / "data", (now[0] - 7200, now[0] - 7200))
    os.utime(old, (now[0] - 7200, now[0] - 7200))
    assert uploads._sweep() == 1
    assert not old.exists() and fresh.exists()


def test_a_tus_client_of_its_own_uploads_through_the_entrance(entrance, mlflow_server, run_path, tmp_path):
    """The server speaks tus 1.0.0 as tus's own Python client (tuspy) does."""
    tusclient = pytest.importorskip("tusclient.client")
    source, sha = _payload(tmp_path, 2 * MiB + 5)
    target = f"{run_path}/by-tuspy.bin"
    client = tusclient.TusClient(entrance.url + tus.PREFIX, headers={"Authorization": f"Bearer {TOKEN}"})
    uploader = client.uploader(str(source), chunk_size=MiB, metadata={"path": target, "sha256": sha})
    uploader.upload()
    assert hashlib.sha256(_in_mlflow(mlflow_server, target) or b"").hexdigest() == sha


# ------------------------------------------------------------------------------------------ the client side


def test_the_edge_refusing_big_bodies_makes_the_parts_smaller(entrance, mlflow_server, run_path, tmp_path):
    source, sha = _payload(tmp_path, 9 * MiB)
    journal, op, body = _journal_with_file(tmp_path, source)
    # An entrance taking up to 4 MiB, behind an "edge" that refuses bodies over 1 MiB (as Cloudflare's 100 MB).
    assert entrance.uploads is not None
    entrance.uploads.max_part_bytes = 4 * MiB
    transport = CountingTransport(refuse_over=MiB)
    link = Link(entrance.url, TOKEN, transport=transport)
    target = f"{run_path}/shrunk.pt"
    _deliver(link, journal, op, body, target, part_bytes=4 * MiB)
    assert hashlib.sha256(_in_mlflow(mlflow_server, target) or b"").hexdigest() == sha
    assert transport.refused == 2, "4 MiB refused, 2 MiB refused, then 1 MiB parts"
    assert link.upload_bytes_sent == 9 * MiB, "a refused part costs no bytes: the edge refuses it on its headers"


def test_a_link_refusing_even_the_smallest_parts_makes_a_dead_letter_not_a_loop(entrance, run_path, tmp_path):
    source, _ = _payload(tmp_path, 3 * MiB)
    journal, op, body = _journal_with_file(tmp_path, source)
    assert entrance.uploads is not None
    entrance.uploads.max_part_bytes = 4 * MiB
    transport = CountingTransport(refuse_over=512 * 1024)
    link = Link(entrance.url, TOKEN, transport=transport)
    with pytest.raises(UndeliverableError) as dead:
        _deliver(link, journal, op, body, f"{run_path}/never.pt", part_bytes=2 * MiB)
    assert dead.value.reason == files.FILE_REFUSED_BY_LINK and "413" in dead.value.message
    assert transport.refused == 2, "2 MiB, then the 1 MiB floor: then it stops"


def test_a_plain_mlflow_server_gets_one_put(mlflow_server, run_path, tmp_path):
    source, sha = _payload(tmp_path, 9 * MiB)
    journal, op, body = _journal_with_file(tmp_path, source)
    transport = CountingTransport()
    link = Link(mlflow_server.url, None, transport=transport)
    target = f"{run_path}/plain.pt"
    _deliver(link, journal, op, body, target)
    assert transport.methods == ["OPTIONS", "PUT"]
    assert hashlib.sha256(_in_mlflow(mlflow_server, target) or b"").hexdigest() == sha


# ------------------------------------------------------------------------------------------------ the lane


class HeldUploads(Transport):
    """Real HTTP; every upload part waits until `release` is set (a link too slow for the file)."""

    def __init__(self) -> None:
        self.inner = RequestsTransport()
        self.release = threading.Event()
        self.held = threading.Event()

    def send(self, request: Request) -> Response:
        if request.method == "PATCH":
            self.held.set()
            assert self.release.wait(60)
        return self.inner.send(request)

    def abort(self) -> None:
        self.release.set()
        self.inner.abort()


def test_records_flow_while_a_file_uploads_and_the_run_ends_after_it(
    entrance, mlflow_server, server_client, bridge_connect, monkeypatch, tmp_path
):
    import mlflow

    monkeypatch.setenv("BRIDGE_UPLOAD_PART_BYTES", str(MiB))
    transport = HeldUploads()
    conn = bridge_connect(entrance.url, TOKEN, transport=transport)
    name = f"lane-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment(name)
    source, sha = _payload(tmp_path, 3 * MiB, "best.pt")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(source), "weights")
        assert transport.held.wait(30), "the upload began"
        for step in range(20):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    remote = conn.journal.ids.server_run(run.info.run_id)[0]
    assert remote is not None
    deadline = time.monotonic() + 30
    while len(server_client.get_metric_history(remote, "loss")) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(server_client.get_metric_history(remote, "loss")) == 20, "every point arrived while the file waits"
    assert server_client.get_run(remote).info.status == "RUNNING", "the end waits for the file"
    transport.release.set()
    assert conn.flush(60) == 0
    assert server_client.get_run(remote).info.status == "FINISHED"
    got = server_client.download_artifacts(remote, "weights/best.pt", str(tmp_path / "down"))
    assert hashlib.sha256(Path(got).read_bytes()).hexdigest() == sha


def test_a_flush_waiting_for_an_upload_leaves_the_idle_record_lane_at_its_pace(
    entrance, bridge_connect, monkeypatch, tmp_path
):
    """`conn.flush()` woke the record lane after each of its rounds while a file uploaded: with nothing else to
    send, ~10,000 empty rounds a second (a core busy for the whole upload, 2.6 CPU s for a 500 MB file)."""
    import mlflow

    monkeypatch.setenv("BRIDGE_UPLOAD_PART_BYTES", str(MiB))
    transport = HeldUploads()
    conn = bridge_connect(entrance.url, TOKEN, transport=transport)
    mlflow.set_experiment(f"flush-pace-{uuid.uuid4().hex[:8]}")
    source, _ = _payload(tmp_path, 3 * MiB, "best.pt")
    mlflow.start_run()
    mlflow.log_artifact(str(source), "weights")
    assert transport.held.wait(30), "the upload began"
    rounds, started = conn.sender.rounds, time.monotonic()
    assert conn.flush(2.0) == 1, "the file is still on its way"
    # The lane's own pace (a round per send interval) plus a wake a second from the flush.
    paced = (time.monotonic() - started) * (1 / conn.sender.send_interval_s + 1)
    assert conn.sender.rounds - rounds <= 1.5 * paced + 5
    transport.release.set()
    mlflow.end_run()
    assert conn.flush(60) == 0


def test_a_logged_file_starts_at_once_not_after_the_lanes_interval(
    entrance, mlflow_server, server_client, bridge_connect, monkeypatch, tmp_path
):
    """The file lane looked for new files once per send interval (0.5 s by default): a file waited for it."""
    import mlflow

    conn = bridge_connect(entrance.url, TOKEN)
    mlflow.set_experiment(f"wake-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run() as run:
        assert conn.flush(30) == 0
        remote = conn.journal.ids.server_run(run.info.run_id)[0]
        assert remote is not None
        conn.sender.send_interval_s = 60.0  # from here on the lanes look only when woken
        for name in ("first.pt", "second.pt"):  # the second finds the lane in its wait after the first
            source, _ = _payload(tmp_path, 3 * MiB, name)
            logged = time.monotonic()
            mlflow.log_artifact(str(source))
            while name not in {f.path for f in server_client.list_artifacts(remote)}:
                assert time.monotonic() - logged < 20, f"{name} waited for the lane's 60 s interval"
                time.sleep(0.05)


class CutAfterParts(Transport):
    """Real HTTP until `parts` upload parts have gone; then every part is cut (a link that dropped for good)."""

    def __init__(self, parts: int) -> None:
        self.inner = RequestsTransport()
        self.parts = parts

    def send(self, request: Request) -> Response:
        if request.method == "PATCH":
            if self.parts <= 0:
                raise TransportError(f"connection reset while sending {request.path}")
            self.parts -= 1
        return self.inner.send(request)


def test_bridge_queue_says_why_a_file_waits_and_how_much_of_it_arrived(entrance, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from bridge.cli import app
    from bridge.client.delivery.sender import FILES, Sender
    from bridge.client.options import ClientOptions

    source, _ = _payload(tmp_path, 3 * MiB)
    journal, _, _ = _journal_with_file(tmp_path, source)
    link = Link(entrance.url, TOKEN, transport=CutAfterParts(1))
    sender = Sender(journal, link, ClientOptions.from_env(upload_part_bytes=MiB, send_interval_s=0.05))
    sender.start()
    deadline = time.monotonic() + 30
    while FILES not in journal.uploads.waits() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sender.stop()
    (waiting,) = journal.uploads.files_waiting()
    assert (waiting.confirmed, waiting.size) == (MiB, 3 * MiB)
    journal.close()
    monkeypatch.setenv("COLUMNS", "80")
    shown = CliRunner().invoke(app, ["queue", "--journal", str(tmp_path / "journal.sqlite")])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())
    assert "Files wait: connection reset while sending" in text
    assert "1.0 MiB / 3.0 MiB 33%" in text
    assert "weights.pt" in text


def test_a_superseded_version_still_waiting_is_not_sent_and_its_upload_is_dropped(
    entrance, mlflow_server, server_client, tmp_path
):
    from bridge.client.delivery.sender import FILES, Sender
    from bridge.client.options import ClientOptions

    v1, _ = _payload(tmp_path, 3 * MiB, "v1.bin")
    journal, op, _ = _journal_with_file(tmp_path, v1)
    options = ClientOptions.from_env(upload_part_bytes=MiB, send_interval_s=0.05)
    first = Sender(journal, Link(entrance.url, TOKEN, transport=CutAfterParts(1)), options)
    first.start()
    deadline = time.monotonic() + 30
    while FILES not in journal.uploads.waits() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.stop()
    begun = journal.uploads.get(op.id)
    assert begun is not None and begun.location is not None and begun.confirmed == MiB
    v2 = tmp_path / "v2.bin"
    v2.write_bytes(os.urandom(2 * MiB))
    journal.spool_artifact(op.run, v2, "v1.bin")  # the same path again, newer
    link = Link(entrance.url, TOKEN)
    Sender(journal, link, options).deliver_round()
    assert journal.queue.backlog().total == 0
    remote = journal.ids.server_run(op.run)[0]
    got = server_client.download_artifacts(remote, "v1.bin", str(tmp_path / "down"))
    assert Path(got).read_bytes() == v2.read_bytes(), "the newer version won"
    assert link.upload_bytes_sent == 2 * MiB, "not one byte more of the older version"
    with pytest.raises(HttpError) as gone:
        tus.offset(link, begun.location)
    assert gone.value.status == 404, "the older version's upload was dropped on the server"
    journal.close()


def test_files_over_the_edges_body_limit_arrive_through_the_quick_tunnel(
    own_bridge_serve, fake_cloudflared, bridge_connect, tmp_path
):
    """The road a Colab runtime takes: `bridge serve --tunnel cloudflared`, whose edge refuses big bodies (413).

    The stand-in's limit is set to 4 MB here so that a 12 MiB file meets it (Cloudflare's is 100 MB); the file
    lane learns it once."""
    import mlflow
    from mlflow import MlflowClient

    server = own_bridge_serve(
        "--tunnel", "cloudflared", env_extra={**fake_cloudflared.env, "FAKE_CLOUDFLARED_MAX_BODY": str(4 * 10**6)}
    )  # fmt: skip
    public = fake_cloudflared.local_url(server.state()["tunnel"]["public_url"])
    conn = bridge_connect(public, server.token())
    name = f"edge-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment(name)
    best, best_sha = _payload(tmp_path, 12 * MiB, "best.pt")
    last, last_sha = _payload(tmp_path, 9 * MiB, "last.pt")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(best), "weights")
        mlflow.log_artifact(str(last), "weights")
        for step in range(10):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    assert conn.flush(120) == 0, conn.status()
    assert conn.status().dead_letters == 0
    # requests sends a body whole before it reads the answer, so a refused part costs its bytes: best.pt went as
    # 12 MiB (413), 6 MiB (413), then 3 MiB parts; last.pt started at the 3 MiB the link was found to take.
    assert conn.link.upload_bytes_sent == (12 + 6 + 12 + 9) * MiB
    client = MlflowClient(server.mlflow_url)
    remote = conn.journal.ids.server_run(run.info.run_id)[0]
    assert remote is not None and client.get_run(remote).info.status == "FINISHED"
    assert len(client.get_metric_history(remote, "loss")) == 10
    for name, sha in (("best.pt", best_sha), ("last.pt", last_sha)):
        got = client.download_artifacts(remote, f"weights/{name}", str(tmp_path / "down"))
        assert hashlib.sha256(Path(got).read_bytes()).hexdigest() == sha, name


class UploadsDown(Transport):
    """Real HTTP once `offline` is cleared; uploads keep failing while `uploads_down` (a link too poor for them)."""

    def __init__(self) -> None:
        self.inner = RequestsTransport()
        self.offline = True
        self.uploads_down = True

    def send(self, request: Request) -> Response:
        if self.offline:
            raise TransportError("offline")
        if self.uploads_down and tus.PREFIX in request.url and request.method in ("PATCH", "POST"):
            raise TransportError("the upload's link dropped")
        return self.inner.send(request)

    def abort(self) -> None:
        self.inner.abort()


def test_a_stale_copy_taken_while_a_file_waits_undoes_nothing_and_still_delivers_the_file(
    entrance, server_client, bridge_connect, monkeypatch, tmp_path
):
    """Records overtake a waiting file. The runtime dies during the upload; the Drive copy taken before the newer
    tag is delivered later: it must neither bring the older tag back nor skip the file (marks per lane)."""
    import mlflow

    from bridge.client.connect import sync
    from tests.test_journal_regressions import _copy_journal

    monkeypatch.setenv("BRIDGE_UPLOAD_PART_BYTES", str(MiB))
    transport = UploadsDown()
    conn = bridge_connect(entrance.url, TOKEN, transport=transport)
    mlflow.set_experiment(f"stale-{uuid.uuid4().hex[:8]}")
    best, sha = _payload(tmp_path, 3 * MiB, "best.pt")
    run = mlflow.start_run()
    mlflow.log_artifact(str(best), "weights")
    mlflow.set_tag("stage", "old")
    snapshot = _copy_journal(conn.journal.path, tmp_path / "drive")  # Drive's copy, taken now
    transport.offline = False  # the link is back; the weights still cannot go
    mlflow.set_tag("stage", "newer")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        remote = conn.journal.ids.server_run(run.info.run_id)[0]
        if remote and server_client.get_run(remote).data.tags.get("stage") == "newer":
            break
        time.sleep(0.05)
    assert remote is not None and server_client.get_run(remote).data.tags.get("stage") == "newer"
    conn.close()  # the runtime dies while the weights upload
    monkeypatch.setenv("BRIDGE_TOKEN", TOKEN)
    report = sync(snapshot, entrance.url, timeout=60)
    assert report.left == 0
    assert server_client.get_run(remote).data.tags["stage"] == "newer", "the copy undid a write done after it"
    got = server_client.download_artifacts(remote, "weights/best.pt", str(tmp_path / "down"))
    assert hashlib.sha256(Path(got).read_bytes()).hexdigest() == sha, "the copy delivered the file"
    mlflow.end_run()


def test_a_logged_models_big_file_goes_in_parts_and_ready_comes_after_it(
    entrance, mlflow_server, server_client, bridge_connect, monkeypatch, tmp_path
):
    import mlflow

    from tests.support.transport import FaultTransport

    class Holder(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    monkeypatch.setenv("BRIDGE_UPLOAD_PART_BYTES", str(MiB))
    transport = FaultTransport()
    conn = bridge_connect(entrance.url, TOKEN, transport=transport)
    mlflow.set_experiment(f"model-parts-{uuid.uuid4().hex[:8]}")
    weights, sha = _payload(tmp_path, 9 * MiB + 7, "weights.bin")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="holder", python_model=Holder(), artifacts={"weights": str(weights)}, pip_requirements=[]
        )
    assert conn.flush(120) == 0, conn.status()
    remote_id = conn.journal.ids.entity("logged_model", info.model_id).remote_id
    model = server_client.get_logged_model(remote_id)
    assert str(model.status) == "READY"
    downloaded = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{model.artifact_location}/artifacts/weights.bin",
        dst_path=str(tmp_path / "down"),
        tracking_uri=mlflow_server.url,
    )
    assert hashlib.sha256(Path(downloaded).read_bytes()).hexdigest() == sha
    sent = [r for r in transport.requests if r.fault is None]
    parts = [i for i, r in enumerate(sent) if r.method == "PATCH" and r.path.startswith(tus.PREFIX)]
    finalize = [i for i, r in enumerate(sent) if r.method == "PATCH" and r.path.endswith(remote_id)]
    assert len(parts) == 10 and finalize and max(parts) < min(finalize), "READY only once the file is whole"


class SlowEdge(CountingTransport):
    """Real HTTP, but the edge answers 524 (the origin took over 100 s) for upload parts over `slow_over` bytes."""

    def __init__(self, slow_over: int) -> None:
        super().__init__()
        self.slow_over = slow_over

    def send(self, request: Request) -> Response:
        size = len(request.data) if request.method == "PATCH" and hasattr(request.data, "__len__") else 0
        if size > self.slow_over:
            self.methods.append(request.method)
            self.refused += 1
            return Response(524, b"<html>error code: 524</html>", {"Content-Type": "text/html"})
        return super().send(request)


def test_timeouts_at_the_edge_make_the_parts_smaller_then_a_dead_letter_at_the_floor(
    entrance, mlflow_server, run_path, tmp_path
):
    source, sha = _payload(tmp_path, 9 * MiB)
    journal, op, body = _journal_with_file(tmp_path, source)
    assert entrance.uploads is not None
    entrance.uploads.max_part_bytes = 4 * MiB
    link = Link(entrance.url, TOKEN, transport=SlowEdge(slow_over=MiB))
    target = f"{run_path}/slow.pt"
    tries = 0
    while True:  # what the file lane does: try, back off, try again
        tries += 1
        try:
            _deliver(link, journal, op, body, target, part_bytes=4 * MiB)
            break
        except HttpError as exc:
            assert exc.status == 524 and tries < 5
    assert tries == 3, "4 MiB timed out, 2 MiB timed out, then 1 MiB parts"
    assert hashlib.sha256(_in_mlflow(mlflow_server, target) or b"").hexdigest() == sha

    journal2, op2, body2 = _journal_with_file(tmp_path / "second", _payload(tmp_path, 3 * MiB, "never.pt")[0])
    always_slow = Link(entrance.url, TOKEN, transport=SlowEdge(slow_over=0))
    with pytest.raises(UndeliverableError) as dead:
        for _ in range(files.SLOW_TRIES_AT_FLOOR + 1):
            with contextlib.suppress(HttpError):
                _deliver(always_slow, journal2, op2, body2, f"{run_path}/never.pt", part_bytes=MiB)
    assert dead.value.reason == files.FILE_REFUSED_BY_LINK and "524" in dead.value.message


def test_a_local_artifact_destination_takes_finished_uploads_by_a_move_and_nothing_leaves_it(tmp_path):
    from bridge.serve import entrance as entrance_module
    from bridge.serve.supervisor import _local_folder

    assert _local_folder("/data/artifacts") == Path("/data/artifacts")
    assert _local_folder("file:///data/artifacts") == Path("/data/artifacts")
    assert _local_folder("s3://bucket/bridge") is None
    root = tmp_path / "artifacts"
    staged = tmp_path / "staged"
    staged.write_bytes(b"weights")
    entrance_module._move_into(staged, root, "1/abc/artifacts/weights/best.pt")
    assert (root / "1/abc/artifacts/weights/best.pt").read_bytes() == b"weights" and not staged.exists()
    staged.write_bytes(b"escape")
    with pytest.raises(server_uploads.PlaceError):
        entrance_module._move_into(staged, root, "../outside.pt")
    assert staged.exists() and not (tmp_path / "outside.pt").exists()


# ------------------------------------------------------------------------------------ head start (sha256 later)


def _staged(entrance) -> int:
    """Bytes the entrance holds of uploads still receiving (their staging files)."""
    return sum(p.stat().st_size for p in entrance.uploads.folder.glob("*/data") if p.is_file())


def _hold_copy_at(monkeypatch, at: int, until: callable) -> list[int]:
    """Hold every copy into the spool once it has written `at` bytes, until `until()` (at most 20 s); returns what
    `until`'s caller needs to know: the staged bytes seen when the copy went on."""
    from bridge.client.journal.spool import SpoolProgress

    seen: list[int] = []
    real = SpoolProgress.wrote

    def wrote(self, total: int) -> None:
        real(self, total)
        if total == at:
            deadline = time.monotonic() + 20
            while not until() and time.monotonic() < deadline:
                time.sleep(0.01)
            seen.append(until())

    monkeypatch.setattr(SpoolProgress, "wrote", wrote)
    return seen


def test_an_upload_begun_without_its_sha256_takes_it_on_a_part_and_is_placed_only_with_it(
    entrance, mlflow_server, run_path, tmp_path
):
    source, sha = _payload(tmp_path, 2 * MiB + 7)
    data = source.read_bytes()
    link = Link(entrance.url, TOKEN)
    assert tus.max_part(link) == MiB and tus.takes_sha256_later(link)
    target = f"{run_path}/later.bin"
    location = tus.create(link, target, len(data), None)
    assert tus.send_part(link, location, source, 0, MiB, last=False).offset == MiB  # no sha256 needed yet
    assert tus.send_part(link, location, source, MiB, MiB, sha256=sha, last=False).offset == 2 * MiB  # taken here
    assert tus.send_part(link, location, source, 2 * MiB, 7).state == tus.PLACED  # known: the last part needs none
    assert hashlib.sha256(_in_mlflow(mlflow_server, target) or b"").hexdigest() == sha

    # Never announced: the part that would complete the file is refused before its bytes are read.
    short, short_sha = _payload(tmp_path, MiB + 7, "short.bin")
    unannounced = tus.create(link, f"{run_path}/short.bin", MiB + 7, None)
    tus.send_part(link, unannounced, short, 0, MiB, last=False)
    with pytest.raises(HttpError) as refused:
        tus.send_part(link, unannounced, short, MiB, 7)
    assert refused.value.status == 400 and tus.SHA256_HEADER in refused.value.message
    with pytest.raises(HttpError) as malformed:
        tus.send_part(link, unannounced, short, MiB, 7, sha256="not-a-sha256")
    assert malformed.value.status == 400
    assert tus.offset(link, unannounced).offset == MiB
    assert _in_mlflow(mlflow_server, f"{run_path}/short.bin") is None
    assert tus.send_part(link, unannounced, short, MiB, 7, sha256=short_sha).state == tus.PLACED

    # Begun with one sha256, a part naming another: the upload is gone (460), never placed.
    other = tus.create(link, f"{run_path}/other.bin", len(data), sha)
    with pytest.raises(HttpError) as differs:
        tus.send_part(link, other, source, 0, MiB, sha256="b" * 64)
    assert differs.value.status == 460 and "b" * 64 in differs.value.message
    assert tus.offset(link, other).state == tus.FAILED
    assert _in_mlflow(mlflow_server, f"{run_path}/other.bin") is None


def test_a_big_files_first_parts_reach_the_server_while_log_artifact_still_copies_it(
    entrance, mlflow_server, server_client, bridge_connect, monkeypatch, tmp_path
):
    """The head start: the copy into the spool is held at its 4th MiB until the entrance holds a part of the file,
    which only a part sent during the copy can give it; then the row finishes the upload with the sha256, and
    no byte goes twice."""
    import mlflow

    source, sha = _payload(tmp_path, 6 * MiB + 5)
    seen = _hold_copy_at(monkeypatch, 4 * MiB, lambda: _staged(entrance) >= MiB)
    conn = bridge_connect(entrance.url, TOKEN)
    conn.sender.operations.upload_part_bytes = MiB
    mlflow.set_experiment(f"head-start-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run() as run:
        assert conn.flush(30) == 0  # the run is on the server: its path is known
        mlflow.log_artifact(str(source))
        assert seen == [True], "no part of the file reached the server while it was being copied"
        assert conn.flush(60) == 0
    _, root = conn.journal.ids.server_run(run.info.run_id)
    assert hashlib.sha256(_in_mlflow(mlflow_server, Link.artifact_path(root, source.name)) or b"").hexdigest() == sha
    assert conn.link.upload_bytes_sent == source.stat().st_size, "the head start's parts were sent again"
    assert entrance.uploads.placed == 1 and not list(entrance.uploads.folder.glob("*/data"))


class CountedCuts(CutAfterParts):
    def __init__(self, parts: int) -> None:
        super().__init__(parts)
        self.cuts = 0

    def send(self, request: Request) -> Response:
        try:
            return super().send(request)
        except TransportError:
            self.cuts += 1
            raise


def test_a_head_start_cut_by_the_link_hands_what_arrived_to_the_row(
    entrance, mlflow_server, run_path, tmp_path, monkeypatch
):
    """The link drops after the head start's first part (the copy held until then): the row's upload goes on from
    the byte the server holds."""
    from bridge.client.journal import Journal
    from bridge.client.journal.spool import SpoolProgress

    source, sha = _payload(tmp_path, 4 * MiB + 1)
    journal = Journal(tmp_path / "journal.sqlite")
    run = journal.add_run(experiment_id=journal.add_experiment("e", {}), user_id="u", start_time=1, name="r", tags={})
    progress = SpoolProgress(source.name, source.stat().st_size)
    transport = CountedCuts(1)
    seen = _hold_copy_at(monkeypatch, 3 * MiB, lambda: transport.cuts > 0)
    cut = Link(entrance.url, TOKEN, transport=transport)
    assert tus.max_part(cut) == MiB
    target = f"{run_path}/{source.name}"
    got: list[int] = []
    lane = threading.Thread(target=lambda: got.append(files.head_start(cut, journal, progress, target, part_bytes=MiB)))
    lane.start()
    body = journal.spool_artifact(run, source, source.name, progress=progress)
    lane.join(30)
    assert seen == [True] and got == [MiB], "the first part arrived, the second was cut"
    (op,) = journal.queue.pending_ops(run, 10, files=True)
    state = journal.uploads.get(op.id)
    assert state is not None and state.location is not None and state.confirmed == MiB
    link = Link(entrance.url, TOKEN)
    _deliver(link, journal, op, body, target)
    assert hashlib.sha256(_in_mlflow(mlflow_server, target) or b"").hexdigest() == sha
    assert link.upload_bytes_sent == source.stat().st_size - MiB, "the row sent only what the server lacked"


@pytest.mark.parametrize("ending", ["the call failed", "the copy came out another size"])
def test_a_head_start_no_row_takes_is_dropped_on_the_server(entrance, run_path, tmp_path, ending):
    from bridge.client.journal import Journal
    from bridge.client.journal.spool import SpoolProgress

    journal = Journal(tmp_path / "journal.sqlite")
    size = 3 * MiB
    progress = SpoolProgress("f.bin", size)
    progress.name = "copy-in-progress"
    journal.spool.path(progress.name).write_bytes(os.urandom(2 * MiB))
    link = Link(entrance.url, TOKEN)
    assert tus.max_part(link) == MiB
    got: list[int] = []
    lane = threading.Thread(
        target=lambda: got.append(files.head_start(link, journal, progress, f"{run_path}/f.bin", part_bytes=MiB))
    )
    lane.start()
    progress.wrote(2 * MiB)
    deadline = time.monotonic() + 20
    while _staged(entrance) < 2 * MiB and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _staged(entrance) == 2 * MiB, "the head start sent the two parts the copy held"
    if ending == "the call failed":
        progress.end(None)
    else:  # a row, but for a copy of 2 MiB + 1: the upload was begun for 3 MiB
        progress.wrote(2 * MiB + 1)
        progress.end(journal.append("r", "artifact", {"spool": progress.name, "path": "f.bin"}))
    lane.join(30)
    assert got == [0]
    assert not list(entrance.uploads.folder.iterdir()), "the upload no row takes was left on the server"
    assert not journal.uploads.all()
