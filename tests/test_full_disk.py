"""A full disk (issue 17, item 4): delivery goes on and frees room, a run still ends, the spool keeps a budget,
one message says it, and logging goes on once there is room — every time.

The disk is emulated where bridge meets the OS (tests/support/full_disk.py): no root, no loop mount.
"""

from __future__ import annotations

import logging
import time
import uuid

import mlflow
import pytest

from bridge.client.delivery.sender import Sender
from bridge.client.journal import Journal
from bridge.client.journal.kinds import ARTIFACT, UPDATE_RUN
from bridge.client.journal.room import HEADROOM_BYTES, RESERVE_BYTES
from bridge.client.link import Link
from bridge.client.options import ClientOptions
from bridge.errors import JournalFullError
from tests.support.client import server_run
from tests.support.full_disk import FullDisk

MiB = 1024 * 1024


def _new_run(journal: Journal, name: str) -> str:
    return journal.add_run(
        experiment_id=journal.add_experiment(name, {}),
        user_id="u",
        start_time=int(time.time() * 1000),
        name="r",
        tags={},
    )


def _log(journal: Journal, run: str, steps: range) -> None:
    for step in steps:
        journal.append_batch(run, [("loss", float(step), 1000 + step, step)])


def test_a_run_end_the_full_disk_has_no_room_for_waits_in_memory_and_is_written_once_there_is_room(
    tmp_path, monkeypatch
):
    journal = Journal(tmp_path / "j" / "j.sqlite")
    disk = FullDisk(monkeypatch, journal.path.parent)
    _log(journal, "r", range(100))
    journal.move_intake()
    _log(journal, "r", range(100, 2000))  # still in the intake
    disk.fill()
    with pytest.raises(JournalFullError) as info:
        _log(journal, "r", range(2000, 2001))
    assert str(journal.path) in str(info.value) and "bytes free" in str(info.value)

    journal.update_run("r", status="FINISHED", end_time=5, name=None)  # end_run() does not raise

    assert journal.queue.backlog().total == 2001, "the points and the end not in SQLite yet still count as waiting"
    journal.sync()  # the disk is still full: nothing is written, nothing lost
    assert journal.queue.backlog().total == 2001
    disk.free_up(MiB)  # room for the rows, not yet enough to log again
    journal.sync()
    ops = journal.queue.pending_ops("r", 10_000)
    assert [op.step for op in ops[:-1]] == list(range(2000)) and ops[-1].kind == UPDATE_RUN, "the end after its points"
    assert journal.queue.backlog().total == 2001
    with pytest.raises(JournalFullError):
        _log(journal, "r2", range(1))
    disk.free_up(RESERVE_BYTES + HEADROOM_BYTES)
    _log(journal, "r2", range(1))  # room again: accepted
    journal.close()


def test_delivering_frees_the_room_the_intake_needs_on_a_full_disk_without_a_reserve(
    mlflow_server, server_client, tmp_path, monkeypatch
):
    """Delivery first moves the intake into SQLite, which needs room: it must free room, not need it."""
    journal = Journal(tmp_path / "j" / "j.sqlite")
    disk = FullDisk(monkeypatch, journal.path.parent)
    name = f"full-{uuid.uuid4().hex[:6]}"
    run = _new_run(journal, name)
    _log(journal, run, range(600))
    journal.move_intake()
    _log(journal, run, range(600, 6000))  # ten times as many points in the intake as SQLite has pages for
    disk.fill()
    assert not journal.room.reserve.exists()
    journal.update_run(run, status="FINISHED", end_time=int(time.time() * 1000), name=None)
    capacity = disk.capacity

    sender = Sender(journal, Link(mlflow_server.url, None), ClientOptions.from_env(send_interval_s=0.05))
    sender.start()
    try:
        deadline = time.monotonic() + 90
        while journal.queue.backlog().total and time.monotonic() < deadline:
            time.sleep(0.1)
        assert journal.queue.backlog().total == 0
    finally:
        assert sender.stop(10)
    assert disk.capacity == capacity, "no room was added"
    remote = server_run(server_client, name)
    history = server_client.get_metric_history(remote.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(6000))
    assert remote.info.status == "FINISHED"
    journal.close()


def test_a_full_disk_ends_runs_says_so_once_and_logging_resumes_every_time_there_is_room(
    bridge_connect, mlflow_server, server_client, tmp_path, monkeypatch, caplog, capfd
):
    folder = tmp_path / "j"
    conn = bridge_connect(mlflow_server.url, journal=folder / "journal.sqlite")
    disk = FullDisk(monkeypatch, folder)
    conn.journal.sync()
    assert conn.journal.room.reserve.exists()
    caplog.set_level(logging.INFO, logger="bridge")
    name = f"full-{uuid.uuid4().hex[:6]}"
    mlflow.set_experiment(name)
    runs = []
    for cycle in range(3):
        run = mlflow.start_run(run_name=f"cycle-{cycle}")
        runs.append((run.info.run_id, cycle))
        for step in range(300):
            mlflow.log_metric("loss", cycle + step / 1000, step=step)
        disk.fill()
        with pytest.raises(JournalFullError) as info:
            mlflow.log_metric("loss", -1.0, step=300)
        assert str(conn.journal.path) in str(info.value) and "Free space" in str(info.value)
        mlflow.end_run()  # on a full disk, and it ends the run
        assert str(conn.journal.path) in (conn.status().disk_full or "")
        assert conn.flush(60) == 0, "delivery went on with the disk full"
        with pytest.raises(JournalFullError):
            mlflow.log_metric("other", 1.0)  # still full: nothing new accepted
        disk.free_up(64 * MiB)
        deadline = time.monotonic() + 10
        while conn.journal.room.full and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not conn.journal.room.full and conn.journal.room.reserve.exists(), "room again: the reserve is back"
        assert conn.status().disk_full is None

    for local_id, cycle in runs:
        remote_id = conn.journal.ids.server_run(local_id)[0] or local_id
        remote = server_client.get_run(remote_id)
        assert remote.info.status == "FINISHED"
        history = server_client.get_metric_history(remote_id, "loss")
        assert sorted(m.step for m in history) == list(range(300)), cycle
    said = [r for r in caplog.records if "is full" in r.getMessage()]
    assert len(said) == 3, [r.getMessage() for r in said]  # once per time the disk filled
    assert all(str(conn.journal.path) in r.getMessage() for r in said)
    assert not [r for r in caplog.records if r.exc_info], "no tracebacks from the background threads"
    assert "Traceback" not in capfd.readouterr().err


def test_the_spool_keeps_its_budget_older_copies_of_a_path_make_room_first(tmp_path, monkeypatch):
    monkeypatch.setenv("BRIDGE_SPOOL_LIMIT", str(250_000))
    journal = Journal(tmp_path / "j" / "j.sqlite")
    assert journal.spool_limit_bytes == 250_000
    source = tmp_path / "last.pt"
    for version in range(3):
        source.write_bytes(bytes([version]) * 100_000)
        journal.spool_artifact("r", source, "last.pt")
    (kept,) = [op for op in journal.queue.pending_ops("r", 10) if op.kind == ARTIFACT]
    assert journal.spool.path(kept.json()["spool"]).read_bytes() == bytes([2]) * 100_000, "the newest is kept"
    assert journal.spool.bytes == 100_000

    big = tmp_path / "best.pt"
    big.write_bytes(b"b" * 200_000)
    with pytest.raises(JournalFullError) as info:
        journal.spool_artifact("r", big, "best.pt")
    assert "BRIDGE_SPOOL_LIMIT" in str(info.value) and str(big) in str(info.value)

    journal.update_run("r", status="FINISHED", end_time=1, name=None)
    other = tmp_path / "other.bin"
    other.write_bytes(b"o" * 100_000)
    journal.spool_artifact("r", other, "other.bin")
    source.write_bytes(b"3" * 100_000)
    with pytest.raises(JournalFullError):  # the copy logged before the end must reach the server: never dropped
        journal.spool_artifact("r", source, "last.pt")
    copies = [op.json()["spool"] for op in journal.queue.pending_ops("r", 10) if op.kind == ARTIFACT]
    assert [journal.spool.path(c).read_bytes()[:1] for c in copies] == [b"\x02", b"o"], "nothing accepted was lost"
    journal.close()


def test_a_file_the_disk_has_no_room_for_is_refused_at_log_time(tmp_path, monkeypatch):
    journal = Journal(tmp_path / "j" / "j.sqlite")
    disk = FullDisk(monkeypatch, journal.path.parent)
    disk.fill()
    disk.free_up(RESERVE_BYTES)
    source = tmp_path / "w.pt"
    source.write_bytes(b"w" * 100_000)
    with pytest.raises(JournalFullError, match="bytes free"):
        journal.spool_artifact("r", source, "w.pt")
    assert journal.spool.bytes == 0 and journal.queue.pending_ops("r", 10) == []
    journal.close()


def test_a_disk_out_of_inodes_counts_as_full(tmp_path, monkeypatch):
    from bridge.client.journal import room

    class _Stat:
        f_bavail, f_frsize, f_files, f_favail = 1000, 4096, 100, 0

    monkeypatch.setattr(room.os, "statvfs", lambda folder: _Stat())
    assert room.free_bytes(tmp_path) == 0
    _Stat.f_files = 0  # a filesystem without an inode count (btrfs) says nothing by it
    assert room.free_bytes(tmp_path) == 4096 * 1000


def test_a_journal_opens_and_delivers_on_a_full_disk(mlflow_server, server_client, tmp_path, monkeypatch):
    """After a crash on a full disk, `bridge sync` (or the next connect()) must still open the journal."""
    path = tmp_path / "j" / "j.sqlite"
    journal = Journal(path)
    disk = FullDisk(monkeypatch, path.parent)
    name = f"full-open-{uuid.uuid4().hex[:6]}"
    run = _new_run(journal, name)
    _log(journal, run, range(500))
    journal.sync()
    assert journal.room.reserve.exists()
    journal.database.close()  # the process dies; its intake was moved by the sync
    disk.fill()

    for _ in range(400):  # each opening adds a lineage row: until one needs a page the full disk has not
        reopened = Journal(path)
        if reopened.room.full:
            break
        reopened.database.close()
    assert reopened.room.full and not reopened.room.reserve.exists(), "the reserve made room to open it"
    sender = Sender(reopened, Link(mlflow_server.url, None), ClientOptions.from_env(send_interval_s=0.05))
    sender.start()
    try:
        deadline = time.monotonic() + 60
        while reopened.queue.backlog().total and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        assert sender.stop(10)
    remote = server_run(server_client, name)
    assert len(server_client.get_metric_history(remote.info.run_id, "loss")) == 500
    reopened.close()
