"""Named regressions of the file lane and resumable uploads, each from an adversarial review of the change
(findings R1 to R12): what went wrong, reproduced, and now held. Real MLflow behind a real entrance, as in
tests/test_uploads.py; the link's faults come from transports that stand for a tunnel's edge or a flapping link."""

from __future__ import annotations

import builtins
import errno
import json
import threading
import time
import uuid

import pytest

from bridge.client.delivery import sender as sender_module
from bridge.client.delivery.sender import FILES, Sender
from bridge.client.journal.uploads import UploadState
from bridge.client.link import Link, Request, RequestsTransport, Response, Transport
from bridge.client.link import uploads as tus
from bridge.client.options import ClientOptions
from bridge.errors import HttpError, TransportError
from bridge.serve import uploads as server_uploads
from tests.support.uploads import TOKEN, MiB, _deliver, _journal_with_file, _payload


class Script(Transport):
    """Real HTTP; upload parts follow a script: "drop" cuts the link, a number is the edge's answer, "ok" passes."""

    def __init__(self, script: list) -> None:
        self.inner = RequestsTransport()
        self.script = list(script)
        self.patches = 0
        self.patch_bytes = 0

    def send(self, request: Request) -> Response:
        if request.method == "PATCH" and tus.PREFIX in request.url:
            self.patches += 1
            step = self.script.pop(0) if self.script else "ok"
            if step == "drop":
                raise TransportError("connection reset by the flapping link")
            if isinstance(step, int):
                return Response(step, b"<html>error code: %d</html>" % step, {"Content-Type": "text/html"})
            self.patch_bytes += len(request.data)  # type: ignore[arg-type]
        return self.inner.send(request)

    def abort(self) -> None:
        self.inner.abort()


def _options(**changes) -> ClientOptions:
    return ClientOptions.from_env(**{"upload_part_bytes": MiB, "send_interval_s": 0.05, **changes})


def _drain(journal, sender: Sender, timeout: float = 60.0) -> None:
    sender.start()
    deadline = time.monotonic() + timeout
    while journal.queue.backlog().total and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sender.stop()


def test_r1_a_dot_segment_path_is_stored_as_mlflow_would_and_a_refused_file_never_holds_up_another_runs(
    entrance, server_client, bridge_connect, monkeypatch, tmp_path
):
    """`log_artifact(f, "./weights")` looped for ever (the endpoint refused "." with a 400 the client took for a
    link failure) and held every other run's files and end status behind it."""
    import mlflow

    monkeypatch.setenv("BRIDGE_UPLOAD_PART_BYTES", str(MiB))
    conn = bridge_connect(entrance.url, TOKEN)
    mlflow.set_experiment(f"r1-{uuid.uuid4().hex[:8]}")
    dotted, _ = _payload(tmp_path, 3 * MiB, "best.pt")
    with mlflow.start_run() as first:
        mlflow.log_artifact(str(dotted), "./weights")
    refused_run = first.info.run_id
    escape, _ = _payload(tmp_path, 3 * MiB, "escape.pt")
    conn.journal.spool_artifact(refused_run, escape, "../../outside.pt")  # a path the endpoint must refuse
    other, _ = _payload(tmp_path, 3 * MiB, "other.pt")
    with mlflow.start_run() as second:
        mlflow.log_artifact(str(other), "weights")
    assert conn.flush(60) == 0
    (dead,) = conn.journal.queue.dead_letters()
    assert dead.op.key == "../../outside.pt" and dead.reason == "server-refused" and "relative" in dead.error
    first_remote = conn.journal.ids.server_run(refused_run)[0]
    assert [f.path for f in server_client.list_artifacts(first_remote, "weights")] == ["weights/best.pt"]
    second_remote = conn.journal.ids.server_run(second.info.run_id)[0]
    assert server_client.get_run(second_remote).info.status == "FINISHED"


def test_r3_drops_then_one_timeout_make_a_smaller_part_not_a_dead_letter(entrance, tmp_path, monkeypatch):
    """Every failure (drops too) counted towards "timed out at the floor" and the 5xx poison rule: 7 drops and
    one 524 buried a file that was arriving fine."""
    assert entrance.uploads is not None
    entrance.uploads.max_part_bytes = 4 * MiB
    monkeypatch.setattr(sender_module, "compute_backoff_ms", lambda attempts, **kw: 20.0)
    for part in (MiB, 4 * MiB):
        (tmp_path / str(part)).mkdir()
        source, _ = _payload(tmp_path / str(part), 6 * MiB)
        journal, _, _ = _journal_with_file(tmp_path / str(part), source)
        transport = Script(["drop"] * 7 + [524])
        _drain(
            journal, Sender(journal, Link(entrance.url, TOKEN, transport=transport), _options(upload_part_bytes=part))
        )
        assert journal.queue.dead_letters() == [] and journal.queue.backlog().total == 0, part


def test_r4_a_tunnels_404_while_resuming_keeps_the_servers_bytes(entrance, mlflow_server, run_path, tmp_path):
    """ngrok answers 404 while an endpoint is offline: the client took it for "upload gone" and sent it all again."""
    source, _ = _payload(tmp_path, 6 * MiB)
    journal, op, body = _journal_with_file(tmp_path, source)
    link = Link(entrance.url, TOKEN, transport=Script(["ok"] * 4 + ["drop"]))
    with pytest.raises(TransportError):
        _deliver(link, journal, op, body, f"{run_path}/big.pt")
    state = journal.uploads.get(op.id)
    assert state is not None and state.confirmed == 4 * MiB

    class Offline404(Transport):
        def send(self, request: Request) -> Response:
            return Response(404, b"Tunnel abc.ngrok-free.app not found ERR_NGROK_3200", {"Content-Type": "text/html"})

    link.transport = Offline404()
    with pytest.raises(HttpError):
        _deliver(link, journal, op, body, f"{run_path}/big.pt")
    state = journal.uploads.get(op.id)
    assert state is not None and state.location is not None, "the upload's address is kept"
    back = Script([])
    link.transport = back
    _deliver(link, journal, op, body, f"{run_path}/big.pt")
    assert back.patch_bytes == 2 * MiB, "only the rest went"


def test_r4_a_tunnels_404_on_the_uploads_question_does_not_strand_a_file_over_the_edges_limit(
    entrance, run_path, tmp_path
):
    """One 404 of an offline tunnel to OPTIONS made the process take the server for a plain one: a file the edge
    refuses whole then became a dead letter instead of going in parts."""
    source, _ = _payload(tmp_path, 9 * MiB)
    journal, op, body = _journal_with_file(tmp_path, source)

    class Edge(Transport):
        def __init__(self) -> None:
            self.inner, self.first, self.methods = RequestsTransport(), True, []

        def send(self, request: Request) -> Response:
            self.methods.append(request.method)
            if self.first:
                self.first = False
                return Response(404, b"Tunnel not found ERR_NGROK_3200", {"Content-Type": "text/html"})
            if request.method == "PUT":
                return Response(413, b"<html>413</html>", {"Content-Type": "text/html"})
            return self.inner.send(request)

    edge = Edge()
    link = Link(entrance.url, TOKEN, transport=edge)
    _deliver(link, journal, op, body, f"{run_path}/a.pt")
    assert edge.methods[:3] == ["OPTIONS", "PUT", "OPTIONS"] and edge.methods.count("PATCH") == 9


def test_r5_a_stopping_sender_ends_an_upload_between_parts(entrance, tmp_path):
    """`stop()` cut only the request in flight; the lane went on uploading every part, holding the journal."""
    creating = threading.Event()

    class SlowCreate(Script):
        def send(self, request: Request) -> Response:
            if request.method == "POST" and request.url.endswith(tus.PREFIX):  # the upload begins, slowly
                creating.set()
                time.sleep(2)
            return super().send(request)

    source, _ = _payload(tmp_path, 12 * MiB)
    journal, _, _ = _journal_with_file(tmp_path, source)
    transport = SlowCreate([])
    sender = Sender(journal, Link(entrance.url, TOKEN, transport=transport), _options())
    sender.start()
    assert creating.wait(30)
    sender.stop(0.2)
    assert sender.stop(10), "the lane ended at the next part"
    assert transport.patches == 0 and journal.queue.backlog().total == 1


def test_r6_a_flush_wakes_the_file_lane_out_of_its_backoff(entrance, tmp_path, monkeypatch):
    """A flush (the exit flush too) woke only the record lane: a file waited out a 30 s backoff."""
    source, _ = _payload(tmp_path, 3 * MiB)
    journal, _, _ = _journal_with_file(tmp_path, source)
    transport = Script(["drop"])
    monkeypatch.setattr(sender_module, "compute_backoff_ms", lambda attempts, **kw: 30_000.0)
    sender = Sender(journal, Link(entrance.url, TOKEN, transport=transport), _options(flush_retry_s=0.2))
    sender.start()
    deadline = time.monotonic() + 20
    while FILES not in journal.uploads.waits() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert FILES in journal.uploads.waits(), "the lane is in its 30 s backoff"
    assert sender.flush(8) == 0
    assert sender.stop()


def test_r7_a_409_from_something_else_than_the_endpoint_does_not_spin(entrance, run_path, tmp_path):
    source, _ = _payload(tmp_path, 9 * MiB)
    journal, op, body = _journal_with_file(tmp_path, source)
    transport = Script([409] * 10_000)
    with pytest.raises(HttpError):
        _deliver(Link(entrance.url, TOKEN, transport=transport), journal, op, body, f"{run_path}/c.pt")
    assert transport.patches == 1


def test_r8_an_upload_begun_behind_the_entrance_then_delivered_to_a_plain_server_goes_whole(
    mlflow_server, run_path, tmp_path
):
    source, _ = _payload(tmp_path, 9 * MiB)
    journal, op, body = _journal_with_file(tmp_path, source)
    journal.uploads.save(UploadState(op.id, 9 * MiB, MiB, tus.PREFIX + "/" + "A" * 32, 2 * MiB))
    _deliver(Link(mlflow_server.url, None), journal, op, body, f"{run_path}/p.pt")
    assert journal.uploads.get(op.id) is None


def test_r10_a_restart_between_placing_and_saving_it_does_not_loop(entrance, mlflow_server, run_path, tmp_path):
    """The entrance stopped after the staged bytes were deleted but before "placed" was saved: its next PATCH
    opened the missing data file and answered 500 until the poison rule buried a file MLflow already had."""
    source, sha = _payload(tmp_path, 3 * MiB)
    journal, op, body = _journal_with_file(tmp_path, source)
    link = Link(entrance.url, TOKEN)
    target = f"{run_path}/x.pt"
    location = tus.create(link, target, 3 * MiB, sha)
    assert entrance.uploads is not None
    folder = entrance.uploads.folder / location.rsplit("/", 1)[1]
    (folder / "data").unlink()
    info = json.loads((folder / "info.json").read_text())
    (folder / "info.json").write_text(json.dumps({**info, "state": "placing"}))
    entrance.uploads._open.clear()  # the restart
    journal.uploads.save(UploadState(op.id, 3 * MiB, MiB, location, 3 * MiB))
    _deliver(link, journal, op, body, target)  # starts the bytes again from 0 and places them


def test_r11_a_lane_wait_an_earlier_process_wrote_is_cleared_by_the_next_sender(entrance, tmp_path):
    source, _ = _payload(tmp_path, 3 * MiB)
    journal, _, _ = _journal_with_file(tmp_path, source)
    first = Sender(journal, Link(entrance.url, TOKEN, transport=Script(["drop"])), _options())
    first.start()
    deadline = time.monotonic() + 20
    while FILES not in journal.uploads.waits() and time.monotonic() < deadline:
        time.sleep(0.02)
    first.stop(0.1)  # the process dies in its backoff
    assert first.stop(10)
    _drain(journal, Sender(journal, Link(entrance.url, TOKEN), _options()))
    assert journal.uploads.waits() == {}


class _FullDisk:
    def __init__(self, fh, limit: int) -> None:
        self.fh, self.limit = fh, limit

    def write(self, data: bytes) -> int:
        if self.fh.tell() + len(data) > self.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


def test_r1_a_full_staging_disk_is_said_and_the_upload_goes_on_once_there_is_room(entrance, tmp_path, monkeypatch):
    """A write error in staging came back as "the part was cut" (400), retried for ever under a wrong reason."""
    full = [True]

    def staging_open(path, mode="r", *args, **kwargs):
        fh = builtins.open(path, mode, *args, **kwargs)  # noqa: SIM115  # the caller's `with` closes it
        return _FullDisk(fh, 2 * MiB) if full[0] and str(path).endswith("/data") and "+" in mode else fh

    monkeypatch.setattr(server_uploads, "open", staging_open, raising=False)
    monkeypatch.setattr(sender_module, "compute_backoff_ms", lambda attempts, **kw: 50.0)
    source, _ = _payload(tmp_path, 4 * MiB)
    journal, _, _ = _journal_with_file(tmp_path, source)
    sender = Sender(journal, Link(entrance.url, TOKEN), _options())
    sender.start()
    deadline = time.monotonic() + 30
    while FILES not in journal.uploads.waits() and time.monotonic() < deadline:
        time.sleep(0.05)
    wait = journal.uploads.waits()[FILES]
    assert "507" in wait.error and "cannot store the upload" in wait.error, wait.error
    (waiting,) = journal.uploads.files_waiting()
    assert waiting.confirmed == 2 * MiB
    full[0] = False  # room again on the workstation
    assert sender.flush(30) == 0 and journal.queue.dead_letters() == []
    assert sender.stop()
