"""A journal asked to live on a network filesystem runs locally and keeps a replica there that restores whole,
from a copy taken at any moment (issue 18)."""

from __future__ import annotations

import hashlib
import random
import shutil
import sqlite3
import threading

from bridge.client.journal import Journal, replica
from bridge.client.journal.replica import Replica, local_journal_for, network_filesystem

MOUNTS = """overlay / overlay rw,relatime 0 0
/dev/sda1 /home ext4 rw,relatime 0 0
drive /content/drive fuse.drive rw,nosuid,nodev,relatime,user_id=0,group_id=0 0 0
server:/export /mnt/team nfs4 rw,relatime 0 0
//nas/share /mnt/my\\040share cifs rw 0 0
"""


def test_network_filesystems_are_recognized_from_the_mount_table(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    assert network_filesystem(tmp_path / "x" / "j.sqlite", mounts) is None
    assert network_filesystem("/content/drive/MyDrive/bridge/j.sqlite", mounts) == "fuse.drive"
    assert network_filesystem("/mnt/team/j.sqlite", mounts) == "nfs4"
    assert network_filesystem("/mnt/my share/j.sqlite", mounts) == "cifs"
    assert network_filesystem("/home/u/j.sqlite", mounts) is None
    empty = tmp_path / "none"
    empty.write_text("")
    assert network_filesystem("/content/drive/MyDrive/j.sqlite", empty) == "fuse.drive", "Colab's Drive by its path"


def test_local_journal_for_is_one_per_path(tmp_path):
    a = local_journal_for("/content/drive/MyDrive/a/journal.sqlite", tmp_path)
    b = local_journal_for("/content/drive/MyDrive/b/journal.sqlite", tmp_path)
    assert a != b and a.name == b.name == "journal.sqlite" and tmp_path in a.parents


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_snapshot_restores_everything_in_a_new_runtime(tmp_path):
    local = tmp_path / "local" / "j.sqlite"
    target = tmp_path / "drive" / "j.sqlite"
    journal = Journal(local)
    journal.append_batch("r", [("loss", float(s), s, s) for s in range(500)], params=[("lr", "0.1")])
    source = tmp_path / "w.bin"
    source.write_bytes(random.Random(1).randbytes(50_000))
    body = journal.spool_artifact("r", source, "weights/w.bin")
    journal.append_batch("r", [("loss", 500.0, 500, 500)])  # still in the intake file
    stats = Replica(local, target).snapshot()
    assert stats.bytes_written > 50_000
    assert not (tmp_path / "drive" / "j.sqlite-wal").exists(), "the replica is one file, no WAL"
    journal.close()
    fresh = tmp_path / "runtime2" / "j.sqlite"
    assert Replica(fresh, target).restore()
    restored = Journal(fresh)
    assert restored.repair_report is None
    ops = restored.queue.pending_ops("r", 10_000)
    assert sorted(op.step for op in ops if op.kind == "metric") == list(range(501))
    assert [op.key for op in ops if op.kind == "param"] == ["lr"]
    assert _sha(restored.spool.path(body["spool"])) == body["sha256"]
    restored.close()
    assert not Replica(fresh, target).restore(), "a journal already here is never overwritten"


def test_a_copy_of_the_replica_folder_taken_at_any_moment_restores_whole(tmp_path):
    local = tmp_path / "local" / "j.sqlite"
    target = tmp_path / "drive" / "j.sqlite"
    journal = Journal(local)
    keeper = Replica(local, target)
    keeper.snapshot()
    stop = threading.Event()

    def client() -> None:
        step = 0
        while not stop.is_set():
            journal.append_batch("r", [("loss", float(step), step, step)])
            if step % 50 == 0:
                journal.append_batch("r", params=[(f"p{step}", "1")])
            step += 1

    def snapshots() -> None:
        while not stop.is_set():
            journal.sync()
            keeper.snapshot()

    threads = [threading.Thread(target=client), threading.Thread(target=snapshots)]
    for t in threads:
        t.start()
    rng = random.Random(18)
    copies = []
    try:
        for n in range(20):
            copy = tmp_path / f"copy{n}"
            copy.mkdir()
            # Each file of the folder at its own moment, as Drive uploads it.
            for path in sorted(target.parent.glob("j.sqlite*")):
                if path.is_file() and rng.random() < 0.9:
                    shutil.copyfile(path, copy / path.name)
                stop.wait(rng.uniform(0, 0.01))
            copies.append(copy)
    finally:
        stop.set()
        for t in threads:
            t.join()
    journal.close()
    restored_any = 0
    for copy in copies:
        if not (copy / "j.sqlite").exists():
            continue
        with sqlite3.connect(f"file:{copy / 'j.sqlite'}?mode=ro", uri=True) as conn:
            assert conn.execute("pragma quick_check").fetchone() == ("ok",), copy
        fresh = tmp_path / f"restored-{copy.name}" / "j.sqlite"
        assert Replica(fresh, copy / "j.sqlite").restore()
        restored = Journal(fresh)
        assert restored.repair_report is None, copy
        steps = [op.step for op in restored.queue.pending_ops("r", 1_000_000) if op.kind == "metric"]
        assert sorted(set(steps)) == list(range(len(set(steps)))), "a prefix, no hole"
        restored.close()
        restored_any += bool(steps)
    assert restored_any >= 10
    assert replica.NETWORK_TYPES


def test_a_journal_on_drive_runs_locally_and_a_new_runtime_delivers_it_from_the_replica(
    tmp_path, monkeypatch, mlflow_server
):
    import time
    import uuid

    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from bridge.cli import app
    from bridge.client.connect import open_journal
    from tests.support.client import server_run

    drive = tmp_path / "content-drive"
    mounts = tmp_path / "mounts"
    mounts.write_text(f"overlay / overlay rw 0 0\ndrive {drive} fuse.drive rw 0 0\n")
    monkeypatch.setattr(replica, "MOUNTS_FILE", mounts)
    monkeypatch.setenv("BRIDGE_HOME", str(tmp_path / "runtime1"))
    path = drive / "bridge" / "journal.sqlite"
    journal, keeper = open_journal(path)
    assert keeper is not None and journal.path != path and (tmp_path / "runtime1") in journal.path.parents
    name = f"replica-{uuid.uuid4().hex[:6]}"
    experiment = journal.add_experiment(name, {})
    run = journal.add_run(experiment_id=experiment, user_id="u", start_time=int(time.time() * 1000), name="r", tags={})
    journal.append_batch(run, [("loss", float(s), 1_700_000_000_000 + s, s) for s in range(300)], params=[("a", "1")])
    source = tmp_path / "w.bin"
    source.write_bytes(b"w" * 10_000)
    journal.spool_artifact(run, source, "w.bin")
    journal.append_batch(run, [("loss", 300.0, 1_700_000_000_300, 300)])
    assert keeper.stop() and keeper.snapshots == 1
    journal.close()  # the runtime dies; only the Drive folder is left
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.startswith("j")) == []
    assert not (path.parent / "journal.sqlite-wal").exists(), "SQLite never ran on the mount"
    monkeypatch.setenv("BRIDGE_HOME", str(tmp_path / "runtime2"))
    result = CliRunner().invoke(
        app, ["sync", "--journal", str(path), "--url", mlflow_server.url], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "restored from there" in result.output
    client = MlflowClient(mlflow_server.url)
    remote = server_run(client, name)
    assert len(client.get_metric_history(remote.info.run_id, "loss")) == 301
    assert remote.data.params == {"a": "1"}
    assert [f.path for f in client.list_artifacts(remote.info.run_id)] == ["w.bin"]


def test_bridge_mounts_file_names_the_mount_table_at_every_call(tmp_path, monkeypatch):
    """A child process (tests/test_runtime_loss.py) is pointed at a mount table of its own by the environment."""
    mounts = tmp_path / "mounts"
    mounts.write_text(f"overlay / overlay rw 0 0\ndrive {tmp_path / 'drive'} fuse.drive rw 0 0\n")
    target = tmp_path / "drive" / "j.sqlite"
    monkeypatch.delenv(replica.MOUNTS_FILE_ENV, raising=False)
    assert network_filesystem(target) is None
    monkeypatch.setenv(replica.MOUNTS_FILE_ENV, str(mounts))
    assert network_filesystem(target) == "fuse.drive"
    empty = tmp_path / "empty"
    empty.write_text("")
    assert network_filesystem(target, empty) is None, "an explicit table wins over the environment"
