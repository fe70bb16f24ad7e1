"""Delivery marks (bridge/client/delivery/marks.py): a stale copy of a journal never undoes newer writes on the server,
and a copy that goes on logging (a new Colab runtime resumed from a Drive snapshot) keeps every new write.

The found-by-chance version of the first promise is test_journal_regressions.py::test_h2_…; the differential
harness checks it under random programs with `copy_journal` on.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid

import mlflow
import pytest
from mlflow import MlflowClient

from bridge.client.delivery.marks import MARK_TAG_PREFIX
from bridge.client.journal import Journal
from tests.support.client import server_run
from tests.support.transport import FaultTransport
from tests.test_journal_regressions import _copy_journal

pytestmark = pytest.mark.timeout(120)


def _name(what: str) -> str:
    return f"marks-{what}-{uuid.uuid4().hex[:8]}"


def _download(server_url: str, run_id: str, path: str) -> str:
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=server_url)
    with open(local) as fh:
        return fh.read()


def test_a_resumed_copy_keeps_its_new_writes_and_skips_only_what_the_original_delivered(
    bridge_connect, mlflow_server, tmp_path
):
    # The original runtime logs offline; Drive holds a snapshot of its journal from then.
    transport = FaultTransport()
    conn = bridge_connect(mlflow_server.url, transport=transport)
    experiment = _name("resume")
    transport.fail("refuse")
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment(experiment)).info.run_id
    client.set_tag(run_id, "stage", "old")
    client.log_text(run_id, "v1", "notes.txt")
    snapshot = _copy_journal(conn.journal.path, tmp_path / "drive")
    # The original comes back online, delivers, logs newer values and dies without ending the run.
    transport.clear()
    client.set_tag(run_id, "stage", "newer")
    client.log_text(run_id, "v2", "notes.txt")
    assert conn.flush(30) == 0
    conn.close()

    # A new runtime opens the snapshot (a new lineage) and resumes into the same run. Its own row ids collide
    # with the ones the original used after the snapshot: only the lineage tells them apart.
    copy = bridge_connect(mlflow_server.url, journal=snapshot)
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tag("resumed", "yes")
        mlflow.log_text("v3", "later.txt")
    assert copy.flush(30) == 0

    server = MlflowClient(mlflow_server.url)
    runs = server.search_runs([server.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["stage"] == "newer"  # the snapshot's "old" was delivered already: not again
    assert run.data.tags["resumed"] == "yes"
    assert run.info.status == "FINISHED"
    assert _download(mlflow_server.url, run.info.run_id, "notes.txt") == "v2"
    assert _download(mlflow_server.url, run.info.run_id, "later.txt") == "v3"
    # Two lineages delivered to it: the original's and the resumed copy's, each with its own mark per lane
    # (records, and files: `….files`).
    marks = [k[len(MARK_TAG_PREFIX) :] for k in run.data.tags if k.startswith(MARK_TAG_PREFIX)]
    assert len(marks) == 4 and len({m.split(".")[0] for m in marks}) == 2
    assert len([m for m in marks if m.endswith(".files")]) == 2


def test_a_stale_copy_does_not_bring_back_an_older_status_or_artifact(
    bridge_connect, mlflow_server, tmp_path, monkeypatch
):
    from bridge.client.connect import sync

    transport = FaultTransport()
    conn = bridge_connect(mlflow_server.url, transport=transport)
    experiment = _name("status")
    client = MlflowClient()
    experiment_id = client.create_experiment(experiment)
    run_id = client.create_run(experiment_id).info.run_id
    assert conn.flush(30) == 0
    transport.fail("refuse")
    client.log_text(run_id, "first", "report.txt")
    client.set_terminated(run_id, "FAILED")
    client.set_experiment_tag(experiment_id, "owner", "old")
    stale = _copy_journal(conn.journal.path, tmp_path / "copy")
    transport.clear()
    # Then: the run is resumed and finished, the report rewritten, the experiment tag changed and removed.
    client.update_run(run_id, status="RUNNING")
    client.log_text(run_id, "final", "report.txt")
    client.set_terminated(run_id, "FINISHED")
    client.set_experiment_tag(experiment_id, "owner", "new")
    client.delete_experiment_tag(experiment_id, "owner")
    assert conn.flush(30) == 0
    conn.close()

    monkeypatch.setenv("BRIDGE_TOKEN", "test-token")
    assert sync(stale, mlflow_server.url, timeout=30).left == 0
    server = MlflowClient(mlflow_server.url)
    run = server_run(server, experiment)
    assert run.info.status == "FINISHED"
    assert _download(mlflow_server.url, run.info.run_id, "report.txt") == "final"
    assert "owner" not in server.get_experiment_by_name(experiment).tags


def test_a_mark_whose_payment_timed_out_is_paid_before_flush_returns(
    bridge_connect, mlflow_server, tmp_path, monkeypatch
):
    """Found under load (the test above failed once in a full suite on a 2-core machine at load 10-18): the request
    paying the ended run's mark timed out as the flush ended; the flush, which waited for marks only while the link
    answered, returned with the mark owed, close() did not pay it either, and a stale copy brought FAILED back."""
    from bridge.client.connect import sync

    transport = FaultTransport()
    conn = bridge_connect(mlflow_server.url, transport=transport)
    experiment = _name("timed-out-mark")
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment(experiment)).info.run_id
    assert conn.flush(30) == 0
    transport.fail("refuse")
    client.set_terminated(run_id, "FAILED")
    stale = _copy_journal(conn.journal.path, tmp_path / "copy")
    client.update_run(run_id, status="RUNNING")
    client.set_terminated(run_id, "FINISHED")
    # Back online, everything goes in one round; the request paying the ended run's mark, last, times out, and so
    # does the flush's first retry of it.
    transport.clear()
    transport.fail("timeout", path="runs/log-batch", times=2)
    assert conn.flush(30) == 0
    conn.close()

    monkeypatch.setenv("BRIDGE_TOKEN", "test-token")
    assert sync(stale, mlflow_server.url, timeout=30).left == 0
    assert server_run(MlflowClient(mlflow_server.url), experiment).info.status == "FINISHED"
    paid = [r.fault for r in transport.requests if r.path.endswith("/runs/log-batch")]
    assert paid == ["timeout", "timeout", None]  # the original paid the mark, on the flush's second retry


@pytest.mark.parametrize("way", ["delivered", "refused"])
def test_a_row_is_never_seen_done_without_its_mark_owed(bridge_connect, mlflow_server, monkeypatch, way):
    """A flush returns once nothing is left and no mark is owed. The sender completed a row, then owed its mark:
    a flush looking in between saw neither, returned, and the process could end with the mark never owed (a
    stale copy then brings the row's older neighbour back). Every row reaching done or dead is owed first."""
    transport = FaultTransport()
    conn = bridge_connect(mlflow_server.url, transport=transport)
    client = MlflowClient()
    experiment_id = client.create_experiment(_name("owed-first"))
    run_id = client.create_run(experiment_id).info.run_id
    assert conn.flush(30) == 0
    queue, book = conn.journal.queue, conn.journal.book
    seen: list[tuple[str, bool]] = []  # (what, whether every row leaving the backlog had its mark owed or paid)

    def owed_or_paid(ids) -> bool:
        marks = {uid: n for marks in book.owed_marks().values() for uid, n in marks.items()}
        server_tags = MlflowClient(mlflow_server.url).get_run(conn.server_run_id(run_id)).data.tags
        held = [int(v) for k, v in server_tags.items() if k.startswith(MARK_TAG_PREFIX)]
        return all((marks and max(marks.values()) >= i) or (held and max(held) >= i) for i in ids)

    for name in ("complete", "bury"):
        original = getattr(queue, name)

        def wrapped(ids, *args, _original=original, _name=name, **kwargs):
            result = _original(ids, *args, **kwargs)
            try:
                seen.append((_name, owed_or_paid(ids)))
            except Exception as exc:  # the sender would swallow it: keep it for the assertion
                seen.append((f"{_name}: {exc!r}", False))
            return result

        monkeypatch.setattr(queue, name, wrapped)
    if way == "refused":  # the server refuses the run's tag: a dead letter owes its mark as a delivery does
        refusal = b'{"error_code": "INVALID_PARAMETER_VALUE", "message": "no such tag here"}'
        transport.fail("status", path="runs/log-batch", status=400, body=refusal, times=2)
        client.set_tag(run_id, "stage", "x")
    client.set_terminated(run_id, "FINISHED")
    assert conn.flush(30) == 0
    # Empty: the flush returned while the sender was still inside the completion (it saw the row done and no
    # mark owed, the window itself).
    assert seen, "flush returned between a row's completion and its mark being owed"
    assert all(ok for _, ok in seen), seen
    assert (way == "refused") == any(what == "bury" for what, _ in seen)


def test_a_live_runs_mark_rides_in_its_heartbeat_not_in_a_request_of_its_own(
    bridge_connect, mlflow_server, monkeypatch
):
    monkeypatch.setenv("BRIDGE_HEARTBEAT_S", "1")
    transport = FaultTransport()
    conn = bridge_connect(mlflow_server.url, transport=transport)
    mlflow.set_experiment(_name("live"))
    with mlflow.start_run():
        mlflow.log_text("x", "a.txt")  # a single upload: its mark is owed after it
        deadline = time.monotonic() + 30
        while conn.journal.queue.backlog().total and time.monotonic() < deadline:
            time.sleep(0.05)
        assert conn.journal.queue.backlog().total == 0
        # From the upload on (its mark can ride in the very next request already, on a slow machine).
        uploaded = 1 + max(
            i for i, r in enumerate(transport.requests) if r.method == "PUT" and "/mlflow-artifacts/" in r.path
        )
        # The next heartbeat (1 s) carries the mark: a log_batch of two tags, and no set-tag of its own.
        deadline = time.monotonic() + 10
        carried = []
        while not carried and time.monotonic() < deadline:
            carried = [
                r
                for r in transport.requests[uploaded:]
                if r.fault is None
                and r.path.endswith("/runs/log-batch")
                and any(t["key"].startswith(MARK_TAG_PREFIX) for t in r.json["tags"])
            ]
            time.sleep(0.05)
        assert carried, [r.path for r in transport.requests[uploaded:]]
        assert {t["key"].split(".")[1] for t in carried[0].json["tags"]} == {"heartbeat", "delivered"}
        assert not [r for r in transport.requests[uploaded:] if r.path.endswith("/runs/set-tag")]
        marks_only = [
            r
            for r in transport.requests[uploaded:]
            if r.path.endswith("/runs/log-batch") and all(t["key"].startswith(MARK_TAG_PREFIX) for t in r.json["tags"])
        ]
        assert marks_only == []


_OLD_OPS = """create table ops (
    id integer primary key, run text not null, kind text not null, key text, value, ts integer, step integer,
    body text, state integer not null default 0, attempts integer not null default 0, error text, reason text,
    created real not null)"""


def test_a_journal_of_an_older_bridge_is_migrated_and_row_ids_are_never_reused(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute(_OLD_OPS)
    db.execute("insert into ops(id, run, kind, key, body, created) values(41, 'r', 'tag', 'k', null, 0)")
    db.execute("insert into ops(id, run, kind, key, value, created) values(42, 'r', 'tag', 'k2', 'v', 0)")
    db.commit()
    db.close()

    journal = Journal(path)
    try:
        ops = journal.queue.pending_ops("r", 10)
        assert [(op.id, op.key, op.epoch) for op in ops] == [(41, "k", None), (42, "k2", None)]
        journal.queue.complete([41, 42])  # everything delivered: the table is empty
        journal.append_batch("r", tags=[("k3", "v3")])
        (op,) = journal.queue.pending_ops("r", 10)
        assert op.id == 43 and op.epoch == journal.epoch  # not 1 again, as before the migration
        assert journal.book.epoch_uid(op.epoch) is not None
    finally:
        journal.close()
    # Reopened: a lineage of its own; the schema is not rebuilt again.
    again = Journal(path)
    try:
        assert again.epoch != journal.epoch
        with sqlite3.connect(path) as db:
            (sql,) = db.execute("select sql from sqlite_master where name='ops'").fetchone()
        assert "autoincrement" in sql.lower()
        assert json.dumps([op.id for op in again.queue.pending_ops("r", 10)]) == "[43]"
    finally:
        again.close()


def test_a_mark_not_sent_before_the_sender_stopped_is_sent_by_the_next_one(bridge_connect, mlflow_server):
    """A notebook cell re-running connect() stops the sender, perhaps between delivering a row and sending its
    mark (harness H12: an experiment tag came back from a copy 1 time in 8). The owed mark stays in the journal
    until it is on the server; the next sender sends it."""
    import sqlite3

    transport = FaultTransport()
    conn = bridge_connect(mlflow_server.url, transport=transport)
    experiment = _name("owed")
    experiment_id = MlflowClient().create_experiment(experiment, tags={"t0": "x"})
    assert conn.flush(30) == 0
    transport.fail("refuse", path="experiments/set-experiment-tag")  # the mark's request, not the delete's
    MlflowClient().delete_experiment_tag(experiment_id, "t0")
    deadline = time.monotonic() + 30
    server = MlflowClient(mlflow_server.url)
    while "t0" in server.get_experiment_by_name(experiment).tags and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "t0" not in server.get_experiment_by_name(experiment).tags
    conn.close()
    with sqlite3.connect(conn.journal.path) as db:
        owed = db.execute("select scope from owed_marks").fetchall()
    assert owed == [(f"experiment:{experiment_id}",)]
    assert not [k for k in server.get_experiment_by_name(experiment).tags if k.startswith(MARK_TAG_PREFIX)]

    transport.clear()
    again = bridge_connect(mlflow_server.url, transport=transport)
    assert again.flush(30) == 0
    deadline = time.monotonic() + 30
    marks = []
    while not marks and time.monotonic() < deadline:
        marks = [k for k in server.get_experiment_by_name(experiment).tags if k.startswith(MARK_TAG_PREFIX)]
        time.sleep(0.05)
    assert len(marks) == 1
    with sqlite3.connect(again.journal.path) as db:
        assert db.execute("select count(*) from owed_marks").fetchone() == (0,)


_REFUSED = b'{"error_code": "INVALID_PARAMETER_VALUE", "message": "refused by the test"}'


def test_a_dead_letter_retried_after_its_mark_moved_past_it_is_sent(bridge_connect, mlflow_server):
    """A dead letter counts as done for the marks; `bridge queue --retry` must still send it, not take it for a
    row a copy delivered (review finding)."""
    transport = FaultTransport()
    conn = bridge_connect(mlflow_server.url, transport=transport)
    experiment = _name("retry")
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment(experiment)).info.run_id
    assert conn.flush(30) == 0
    transport.fail("status", path="runs/log-batch", status=400, body=_REFUSED)
    client.set_tag(run_id, "t", "1")
    assert conn.flush(30) == 0 and [d.op.key for d in conn.journal.queue.dead_letters()] == ["t"]
    transport.clear()
    client.set_tag(run_id, "u", "2")  # its batch carries the lineage's mark, past the dead letter
    client.set_terminated(run_id)
    assert conn.flush(30) == 0
    assert conn.journal.queue.retry_dead() == 1
    assert conn.flush(30) == 0
    tags = server_run(MlflowClient(mlflow_server.url), experiment).data.tags
    assert (tags.get("t"), tags.get("u")) == ("1", "2")


def test_marks_the_server_refuses_to_read_never_stop_delivery(bridge_connect, mlflow_server):
    """An experiment tag sent to an id the server refuses (here a name passed for an id): reading its marks is
    refused too. The op goes out and becomes a dead letter; everything after it is delivered (review finding:
    the whole journal stopped)."""
    conn = bridge_connect(mlflow_server.url)
    MlflowClient().set_experiment_tag("not-an-id", "k", "v")
    experiment = _name("after")
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment(experiment)).info.run_id
    client.set_tag(run_id, "after", "yes")
    assert conn.flush(30) == 0
    assert [d.op.kind for d in conn.journal.queue.dead_letters()] == ["set_experiment_tag"]
    assert server_run(MlflowClient(mlflow_server.url), experiment).data.tags["after"] == "yes"


def test_an_owed_mark_stays_below_a_row_still_waiting(tmp_path):
    """A batch split by a pause can deliver rows 1 and 3 of a run while row 2 waits: the mark sent is 1, not 3
    (review finding: row 2 was later skipped as delivered)."""
    journal = Journal(tmp_path / "j.sqlite")
    try:
        journal.append_batch("r", tags=[("a", "1"), ("b", "2"), ("a", "3")])
        first, waiting, third = journal.queue.pending_ops("r", 10)
        uid = journal.book.epoch_uid(first.epoch)
        journal.queue.complete([first.id, third.id])
        journal.book.owe_marks({("run:r", uid): third.id})
        assert journal.book.owed_marks() == {"run:r": {uid: first.id}}
        journal.queue.complete([waiting.id])
        assert journal.book.owed_marks() == {"run:r": {uid: third.id}}
        journal.book.marks_sent("run:r", {uid: third.id})
        assert journal.book.owed_marks() == {}
    finally:
        journal.close()


def test_marks_are_per_local_id_so_two_names_of_one_run_do_not_cover_each_other():
    from bridge.client.delivery.marks import mark_tags, parse_marks

    tags = mark_tags(("run", "serverid"), {"u1": 50}) + mark_tags(("run", "localkey"), {"u1": 7})
    pairs = [(t["key"], t["value"]) for t in tags]
    assert parse_marks(("run", "localkey"), pairs) == {"u1": 7}
    assert parse_marks(("run", "serverid"), pairs) == {"u1": 50}


def test_a_spooled_file_of_a_run_on_the_server_downloads_offline(link_offline_run):
    """MLflow asks whether a path is a folder before downloading it: for a file still in the spool the answer
    comes from the spool, so an offline read of it works (review finding)."""
    _conn, _transport, run_id = link_offline_run
    MlflowClient().log_dict(run_id, {"lr": 0.1}, "cfg.json")
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/cfg.json") == {"lr": 0.1}


@pytest.fixture
def link_offline_run(bridge_connect, mlflow_server):
    transport = FaultTransport()
    conn = bridge_connect(mlflow_server.url, transport=transport)
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment(_name("spooled"))).info.run_id
    assert conn.flush(30) == 0
    transport.fail("refuse")
    return conn, transport, run_id
