"""The journal: durable appends, explicit row states, size limit, damage detection and repair."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import sqlite3
import threading

import pytest

from bridge.client.journal import (
    ARTIFACT,
    DEAD,
    IN_FLIGHT,
    METRIC,
    PARAM,
    PENDING,
    TAG,
    Journal,
    decode_value,
    journal_path,
)
from bridge.errors import JournalCorruptError, JournalError, JournalFullError


def _states(journal: Journal) -> dict[int, int]:
    with journal.database.db(write=False) as conn:
        return dict(conn.execute("select state, count(*) from ops group by state").fetchall())


def test_pragmas_wal_and_normal_sync(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    with journal.database.db(write=False) as conn:
        assert conn.execute("pragma journal_mode").fetchone()[0] == "wal"
        assert conn.execute("pragma synchronous").fetchone()[0] == 1  # NORMAL: see the module docstring


def test_path_resolution_argument_then_env_then_data_folder(tmp_path, monkeypatch, bridge_home):
    assert journal_path() == bridge_home / "journal.sqlite"
    monkeypatch.setenv("BRIDGE_JOURNAL", str(tmp_path / "env.sqlite"))
    assert journal_path() == tmp_path / "env.sqlite"
    assert journal_path(tmp_path / "arg.sqlite") == tmp_path / "arg.sqlite"


def test_appends_keep_order_values_and_original_timestamps(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    journal.append_batch("run1", [("loss", 0.5, 1111, 0)])
    journal.append_batch(
        "run1", [("loss", math.nan, 2222, 1), ("acc", math.inf, 3333, 1)], [("lr", "0.1")], [("t", "v")]
    )
    journal.move_intake()  # what the sender does at the start of each round
    ops = journal.queue.pending_ops("run1", 100)
    # Points come through the intake, so they may follow params/tags; among themselves they keep their order.
    assert sorted((o.kind, o.key) for o in ops if o.kind != METRIC) == [(PARAM, "lr"), (TAG, "t")]
    ops = [o for o in ops if o.kind == METRIC]
    assert [(o.kind, o.key) for o in ops] == [(METRIC, "loss"), (METRIC, "loss"), (METRIC, "acc")]
    assert [o.ts for o in ops] == [1111, 2222, 3333]
    assert decode_value(ops[0].value) == 0.5
    assert math.isnan(decode_value(ops[1].value))  # SQLite would turn a bare NaN into NULL
    assert decode_value(ops[2].value) == math.inf
    assert journal.queue.backlog().pending == {"run1": 5}


def test_row_states_claim_complete_release_bury(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    journal.append_batch("r", [("m", float(i), i, i) for i in range(4)])
    journal.move_intake()
    ids = [op.id for op in journal.queue.pending_ops("r", 10)]
    assert journal.queue.claim(ids[:3])
    assert not journal.queue.claim(ids[:1]), "a row already in flight must not be claimed twice"
    assert _states(journal) == {PENDING: 1, IN_FLIGHT: 3}
    journal.queue.complete(ids[:1])
    journal.queue.bury(ids[1:2], "INVALID_PARAMETER_VALUE: nope", reason="server-refused")
    journal.queue.release(ids[1:3])  # only the row still in flight goes back
    assert _states(journal) == {PENDING: 2, DEAD: 1}
    ((dead, message, reason),) = journal.queue.dead_letters()
    assert dead.id == ids[1] and message == "INVALID_PARAMETER_VALUE: nope" and reason == "server-refused"
    assert [op.attempts for op in journal.queue.pending_ops("r", 10)] == [1, 0]


def test_in_flight_rows_return_to_pending_at_start_up(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    journal.append_batch("r", [("m", 1.0, 1, 0), ("m", 2.0, 2, 1)])
    journal.move_intake()
    assert journal.queue.claim([op.id for op in journal.queue.pending_ops("r", 10)])
    journal.close()
    reopened = Journal(tmp_path / "j.sqlite")
    assert reopened.queue.reset_in_flight() == 2
    ops = reopened.queue.pending_ops("r", 10)
    assert len(ops) == 2 and all(op.attempts == 1 for op in ops), "attempts>0 makes the sender check the server"


def test_full_journal_refuses_clearly_and_keeps_everything_accepted(tmp_path):
    journal = Journal(tmp_path / "j.sqlite", limit_bytes=200_000)
    accepted = 0
    with pytest.raises(JournalFullError, match="full") as info:
        for step in range(100_000):
            journal.append_batch("r", [("loss", float(step), 1000 + step, step)])
            accepted += 1
    assert "BRIDGE_JOURNAL_LIMIT" in str(info.value)
    assert 100 < accepted < 100_000
    journal.move_intake()
    ops = journal.queue.pending_ops("r", 200_000)
    assert len(ops) == accepted
    assert [decode_value(op.value) for op in ops] == [float(i) for i in range(accepted)]
    # Delivering frees space: the journal accepts again.
    journal.queue.complete([op.id for op in ops])
    journal.append_batch("r", [("loss", -1.0, 1, 0)])


def test_spool_copies_now_and_records_size_and_sha256(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    source = tmp_path / "weights.bin"
    data = bytes(range(256)) * 4096
    source.write_bytes(data)
    body = journal.spool_artifact("r", source, "weights/best.bin")
    source.unlink()
    spooled = journal.spool.path(body["spool"])
    assert spooled.read_bytes() == data
    assert body["size"] == len(data) and body["sha256"] == hashlib.sha256(data).hexdigest()
    (op,) = journal.queue.pending_ops("r", 10)
    assert op.kind == ARTIFACT and op.key == "weights/best.bin"
    assert journal.measure_bytes() >= len(data), "spooled files count against the journal limit"


def test_garbage_file_is_detected_and_refused_without_repair(tmp_path):
    path = tmp_path / "j.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(JournalCorruptError, match="damaged"):
        Journal(path, repair=False)


def test_garbage_file_is_moved_aside_and_reported(tmp_path):
    path = tmp_path / "j.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    journal = Journal(path)
    report = journal.repair_report
    assert report is not None and report.rows_recovered == 0
    assert report.damaged_file.exists() and report.damaged_file.read_bytes().startswith(b"this is not")
    journal.append_batch("r", [("m", 1.0, 1, 0)])  # a fresh journal works
    assert journal.queue.backlog().total == 1


def test_damaged_pages_intact_rows_recovered_rest_reported(tmp_path):
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    for chunk in range(20):
        journal.append_batch("r", [("loss", float(i), i, i) for i in range(chunk * 500, chunk * 500 + 500)])
    journal.database.checkpoint()
    journal.close()
    with sqlite3.connect(path) as conn:
        conn.execute("pragma wal_checkpoint(TRUNCATE)")
    raw = bytearray(path.read_bytes())
    page = 4096
    middle = len(raw) // page // 2
    raw[middle * page : (middle + 3) * page] = b"\xff" * (3 * page)  # three pages of the ops table overwritten
    path.write_bytes(bytes(raw))

    with pytest.raises(JournalCorruptError):
        Journal(path, repair=False)
    repaired = Journal(path)
    report = repaired.repair_report
    assert report is not None
    total = repaired.queue.backlog().total
    assert 5_000 < total < 10_000, "rows on intact pages survive, rows on damaged pages are gone"
    assert report.rows_recovered >= total
    assert "recovered" in str(report) and str(report.damaged_file) in str(report)
    values = sorted(decode_value(op.value) for op in repaired.queue.pending_ops("r", 20_000))
    assert len(set(values)) == len(values), "no row recovered twice"


def test_intake_points_reach_sqlite_in_order_and_once(tmp_path, monkeypatch):
    from bridge.client.journal import intake

    monkeypatch.setattr(intake, "ROTATE_BYTES", 2_000)  # rotate often
    journal = Journal(tmp_path / "j.sqlite")
    expected = []
    for step in range(3_000):
        journal.append_batch("r", [("loss", step / 7, 1_000 + step, step)])
        expected.append(step)
        if step % 97 == 0:
            journal.move_intake()
    journal.move_intake()
    ops = journal.queue.pending_ops("r", 10_000)
    assert [op.step for op in ops] == expected
    assert [decode_value(op.value) for op in ops] == [s / 7 for s in expected]
    assert journal._intake.size < 4_000, "the intake file was emptied as it was moved"


def test_intake_left_by_an_ended_process_is_replayed_once(tmp_path, caplog):
    path = tmp_path / "j.sqlite"
    first = Journal(path)
    first.append_batch("r", [("m", float(i), i, i) for i in range(50)])
    first.move_intake()  # 50 already in SQLite …
    for i in range(50, 120):
        first.append_batch("r", [("m", float(i), i, i)])  # … 70 only in the intake file
    intake_file = first._intake.path
    with open(intake_file, "ab") as fh:
        fh.write(b"\x01\x02torn")  # what a machine crash could leave at the end
    assert Journal(path).queue.backlog().total == 50, "a live process's intake is not touched"
    first._intake.close()  # the process dies: its lock is released, nothing else happens

    second = Journal(path)
    steps = [op.step for op in second.queue.pending_ops("r", 1000)]
    assert steps == list(range(120))
    assert not intake_file.exists()
    assert "not a whole record" in caplog.text
    assert Journal(path).queue.backlog().total == 120, "replayed exactly once"


def _spool_files(journal: Journal) -> list[str]:
    return sorted(p.name for p in journal.spool.folder.iterdir())


def test_a_spooled_copy_is_removed_when_its_row_cannot_be_journaled(tmp_path, monkeypatch):
    journal = Journal(tmp_path / "j.sqlite")
    source = tmp_path / "weights.bin"
    source.write_bytes(b"w" * 100_000)
    used = journal.measure_bytes()

    def refuse(*args, **kwargs):
        raise JournalFullError("journal full (simulated)")

    monkeypatch.setattr(journal, "append", refuse)
    with pytest.raises(JournalFullError):
        journal.spool_artifact("r", source, "weights.bin")
    assert _spool_files(journal) == []
    assert journal.measure_bytes() == used, "nothing left counting against the limit"


def test_spool_files_no_row_refers_to_are_removed_and_dead_artifacts_free_theirs(tmp_path):
    import fcntl

    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    source = tmp_path / "a.bin"
    source.write_bytes(b"a" * 10_000)
    kept = journal.spool_artifact("r", source, "kept.bin")["spool"]
    refused = journal.spool_artifact("r", source, "refused.bin")["spool"]
    assert _spool_files(journal) == sorted([kept, refused])
    (refused_op,) = [op for op in journal.queue.pending_ops("r", 10) if op.key == "refused.bin"]
    journal.queue.bury([refused_op.id], "INVALID_PARAMETER_VALUE: nope", reason="server-refused")
    assert _spool_files(journal) == [kept], "a dead letter's copy is never uploaded: it goes at once"
    (journal.spool.folder / ("0" * 32)).write_bytes(b"x" * 5_000)  # killed between the copy and its row
    busy = journal.spool.folder / ("1" * 32)  # being spooled by a live process right now
    busy_fd = os.open(busy, os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(busy_fd, fcntl.LOCK_EX)
    journal.close()
    try:
        reopened = Journal(path)
        assert _spool_files(reopened) == sorted([kept, busy.name])
    finally:
        os.close(busy_fd)
    assert _spool_files(Journal(path)) == [kept]


class _OsWithShortWrites:
    """The `os` module as intake.py sees it, except that `write` misbehaves as the test scripts."""

    def __init__(self, script):
        self._script = list(script)

    def write(self, fd, data):
        step = self._script.pop(0) if self._script else "ok"
        if step == "half":
            return os.write(fd, bytes(data[: len(data) // 2]))
        if step == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    def __getattr__(self, name):
        return getattr(os, name)


def test_a_short_intake_write_is_completed_not_torn(tmp_path, monkeypatch):
    from bridge.client.journal import intake

    journal = Journal(tmp_path / "j.sqlite")
    journal.append_batch("r", [("m", 0.0, 1000, 0)])
    monkeypatch.setattr(intake, "os", _OsWithShortWrites(["half"]))
    for step in range(1, 50):
        journal.append_batch("r", [("m", float(step), 1000 + step, step)])
    journal.move_intake()
    assert [op.step for op in journal.queue.pending_ops("r", 100)] == list(range(50))


def test_a_failed_intake_write_raises_and_leaves_nothing_torn(tmp_path, monkeypatch):
    from bridge.client.journal import intake

    journal = Journal(tmp_path / "j.sqlite")
    journal.append_batch("r", [("m", 0.0, 1000, 0)])
    monkeypatch.setattr(intake, "os", _OsWithShortWrites(["half", "enospc"]))
    with pytest.raises(JournalFullError, match="full"):
        journal.append_batch("r", [("m", -1.0, 999, 99)])  # refused loudly, not half-kept
    for step in range(1, 30):
        journal.append_batch("r", [("m", float(step), 1000 + step, step)])
    journal.move_intake()
    assert [op.step for op in journal.queue.pending_ops("r", 100)] == list(range(30))


def test_damage_in_the_middle_of_an_intake_is_skipped_and_later_points_kept(tmp_path, caplog):
    from bridge.client.journal import intake

    path = tmp_path / "j.sqlite"
    first = Journal(path)
    for step in range(60):
        first.append_batch("r", [("m", float(step), 1000 + step, step)])
    intake_file = first._intake.path
    record = len(intake.encode("r", "m", 0.0, 1000, 0))
    raw = bytearray(intake_file.read_bytes())
    raw[20 * record + 10] ^= 0xFF  # one flipped byte in record 20
    intake_file.write_bytes(bytes(raw))
    first._intake.close()  # the process ends

    second = Journal(path)
    steps = [op.step for op in second.queue.pending_ops("r", 1000)]
    assert steps == [s for s in range(60) if s != 20]
    assert "damaged" in caplog.text


def test_a_failed_commit_is_rolled_back_and_the_connection_stays_usable(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    with journal.database.db() as conn:
        conn.execute("create table parent(id integer primary key)")
        conn.execute(
            "create table child(id integer primary key, parent integer "
            "references parent(id) deferrable initially deferred)"
        )
    with journal.database.db(write=False) as conn:
        pass
    conn.execute("pragma foreign_keys=on")  # a deferred violation makes COMMIT itself fail
    with pytest.raises(JournalError), journal.database.db() as conn:
        conn.execute("insert into child values(1, 42)")
    assert not conn.in_transaction
    journal.append_batch("r", [], [("p", "1")])  # this thread's connection still works
    assert journal.queue.backlog().pending == {"r": 1}


def _open_fds(path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(path))
    return count


def test_connections_of_ended_threads_are_closed(tmp_path):
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    journal.append_batch("r", [], [("p", "0")])
    before = _open_fds(path)
    for i in range(30):  # a thread pool's short-lived workers, each logging once
        worker = threading.Thread(target=journal.append_batch, args=("r", [], [(f"p{i}", "1")]))
        worker.start()
        worker.join()
    assert journal.queue.backlog().pending == {"r": 31}
    assert _open_fds(path) <= before + 3, "one worker's connection (db, wal, shm) at most"


def test_an_experiment_name_another_process_added_meanwhile_is_refused_not_a_crash(tmp_path):
    """Two processes on one journal both looked, found no experiment of the name, and both add it."""
    from bridge.errors import ExperimentExistsError

    first, second = Journal(tmp_path / "j.sqlite"), Journal(tmp_path / "j.sqlite")
    assert second.ids.experiment_by_name("shared") is None  # the look before the other process adds it
    local_id = first.add_experiment("shared", {})
    with pytest.raises(ExperimentExistsError) as caught:
        second.add_experiment("shared", {"t": "v"})
    assert caught.value.local_id == local_id
    with second.database.db(write=False) as conn:
        assert conn.execute("select count(*) from experiments").fetchone()[0] == 1
        assert conn.execute("select count(*) from ops").fetchone()[0] == 1, "one create journaled"


def test_switching_a_new_journal_to_wal_from_several_connections_at_once_waits_its_turn(tmp_path):
    """Switching a new file to WAL needs an exclusive lock; SQLite answers "database is locked" at once, without
    waiting, to all but one of several connections asking together — four processes `connect()`ing at once on a
    new journal crashed so. (Without the wait about 1 in 20 of these rounds fails.)"""
    from bridge.client.journal.database import _set_wal

    failures = []
    for attempt in range(60):
        path = tmp_path / f"j{attempt}.sqlite"
        barrier = threading.Barrier(8)

        def switch(path=path, barrier=barrier):
            conn = sqlite3.connect(path, isolation_level=None, timeout=30)
            try:
                barrier.wait()
                _set_wal(conn)
                assert conn.execute("pragma journal_mode").fetchone()[0] == "wal"
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
            finally:
                conn.close()

        threads = [threading.Thread(target=switch) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
