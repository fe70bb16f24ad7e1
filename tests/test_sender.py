"""The sender: batching, failure classification, exactly-once under lost answers, heartbeats, re-discovery."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid

import pytest

from bridge import config
from bridge.client.delivery.heartbeat import REVIVE_CHECK_EVERY_BEATS, Heartbeats
from bridge.client.delivery.operations import Operations
from bridge.client.delivery.sender import Sender
from bridge.client.journal import Journal
from bridge.client.journal.intake import try_lock
from bridge.client.link import Link, Verdict, classify_failure
from bridge.client.options import ClientOptions
from bridge.errors import HttpError, TokenRejectedError, TransportError
from tests.support.client import server_run
from tests.support.transport import FaultTransport


def _sender(
    journal: Journal, url: str, token: str | None = None, *, transport=None, http_timeout_s: float = 20.0, **options
) -> Sender:
    """A sender over a real `Link` (real HTTP unless `transport` is given) with `options` over the defaults."""
    link = Link(url, token, transport=transport, http_timeout_s=http_timeout_s)
    return Sender(journal, link, ClientOptions(**options))


@pytest.mark.parametrize(
    "failure, verdict",
    [
        (TransportError("ConnectionError"), Verdict.RETRY),
        (HttpError(503, None, "Service Unavailable"), Verdict.RETRY),
        (HttpError(500, "INTERNAL_ERROR", "db locked"), Verdict.RETRY),
        (HttpError(429, None, "slow down"), Verdict.RETRY),
        (HttpError(404, None, "ERR_NGROK_3200 endpoint offline"), Verdict.RETRY),
        (TokenRejectedError(401, None, "unauthorized"), Verdict.TOKEN),
        (HttpError(403, None, "forbidden"), Verdict.TOKEN),
        (HttpError(400, "INVALID_PARAMETER_VALUE", "Changing param values is not allowed"), Verdict.REJECT),
        (HttpError(404, "RESOURCE_DOES_NOT_EXIST", "run not found"), Verdict.REJECT),
    ],
)
def test_failure_classification(failure, verdict):
    assert classify_failure(failure) is verdict


def _journal_run(tmp_path, name: str, *, journal: Journal | None = None) -> tuple[Journal, str]:
    journal = journal or Journal(tmp_path / "j.sqlite")
    experiment = journal.add_experiment(name, {})
    run = journal.add_run(
        experiment_id=experiment, user_id="tester", start_time=int(time.time() * 1000) - 5000, name="run", tags={}
    )
    return journal, run


def _deliver(sender: Sender, rounds: int = 50) -> None:
    for _ in range(rounds):
        try:
            sender.deliver_round()
        except Exception:  # _Pause: the test's proxy is failing on purpose
            time.sleep(0.05)
        if sender.journal.queue.backlog().total == 0:
            return
    raise AssertionError(f"not delivered: {sender.journal.queue.backlog()}; last error {sender.link.last_error}")


def test_batches_stay_within_two_requests_per_thousand_points(tmp_path, flaky_proxy, server_client):
    name = f"batch-{uuid.uuid4().hex[:8]}"
    journal, run = _journal_run(tmp_path, name)
    base = int(time.time() * 1000)
    for step in range(10_000):
        journal.append_batch(run, [("loss", step / 10_000, base + step, step)])
    journal.append_batch(run, [], [(f"p{i}", str(i)) for i in range(150)], [(f"t{i}", "x") for i in range(150)])
    sender = _sender(journal, flaky_proxy.url)
    flaky_proxy.reset_counts()
    _deliver(sender)
    batches = flaky_proxy.count("/runs/log-batch")
    assert batches <= 13, batches  # 10 × 1000 metrics, then params/tags in MLflow's 100-per-request limit
    assert flaky_proxy.count() <= 20  # + experiment lookup/create and run create
    remote = server_run(server_client, name)
    assert len(server_client.get_metric_history(remote.info.run_id, "loss")) == 10_000
    assert len(remote.data.params) == 150 and sum(k.startswith("t") for k in remote.data.tags) == 150


def test_lost_answers_never_duplicate_points_or_runs(tmp_path, flaky_proxy, server_client):
    name = f"lostack-{uuid.uuid4().hex[:8]}"
    journal, run = _journal_run(tmp_path, name)
    base = int(time.time() * 1000)
    journal.append_batch(run, [("loss", float(s), base + s, s) for s in range(500)], [("lr", "0.1")], [("k", "v")])
    sender = _sender(journal, flaky_proxy.url)
    # Every request reaches the server, and every answer is lost, for a while: experiment and run
    # creation and the first batch are all applied without the sender knowing.
    flaky_proxy.set_mode("lost_ack")
    for _ in range(4):
        with pytest.raises(Exception):  # noqa: B017 - the round pauses (the sender's private _Pause)
            sender.deliver_round()
    assert flaky_proxy.count(mode="lost_ack") >= 4
    flaky_proxy.set_mode("pass")
    _deliver(sender)
    remote = server_run(server_client, name)  # exactly one run: the run key found the first one
    assert remote.data.tags[config.RUN_KEY_TAG] == run
    history = server_client.get_metric_history(remote.info.run_id, "loss")
    assert len(history) == 500 and sorted(m.step for m in history) == list(range(500))
    assert remote.data.params == {"lr": "0.1"}
    assert [e.name for e in server_client.search_experiments() if e.name == name] == [name]

    # The same batch sent again after it was applied (an answer lost after the commit) adds nothing.
    journal.append_batch(run, [("loss", float(s), base + s, s) for s in range(500)], [("lr", "0.1")])
    _deliver(sender)
    assert len(server_client.get_metric_history(remote.info.run_id, "loss")) == 500
    assert journal.queue.dead_letters() == []


@pytest.mark.parametrize(
    "mode, options",
    [
        ("refuse", {}),
        ("http_5xx", {"status": 503}),
        ("reset", {"at": "request"}),
        ("reset", {"at": "response"}),
    ],
)
def test_link_failures_are_retried_until_delivered_exactly(tmp_path, flaky_proxy, server_client, mode, options):
    name = f"{mode}-{uuid.uuid4().hex[:8]}"
    journal, run = _journal_run(tmp_path, name)
    base = int(time.time() * 1000)
    journal.append_batch(run, [("m", float(s), base + s, s) for s in range(1500)])
    sender = _sender(journal, flaky_proxy.url, send_interval_s=0.05)
    flaky_proxy.set_mode(mode, **options)
    sender.start()
    try:
        # The sender's first failed round, however long a loaded machine takes to get to it.
        _wait_for(lambda: sender.link.online is False and sender.link.last_error, 30, f"the sender to meet {mode}")
        assert sender.flush(0.1) > 0 and sender.link.online is False
        assert sender.link.last_error
        flaky_proxy.set_mode("pass")
        assert sender.flush(60) == 0
    finally:
        sender.stop()
    remote = server_run(server_client, name)
    history = server_client.get_metric_history(remote.info.run_id, "m")
    assert len(history) == 1500 and len({m.step for m in history}) == 1500


def test_heartbeat_tag_is_set_while_the_run_is_live(tmp_path, mlflow_server, server_client):
    name = f"heartbeat-{uuid.uuid4().hex[:8]}"
    journal, run = _journal_run(tmp_path, name)
    sender = _sender(journal, mlflow_server.url, heartbeat_s=0.2, send_interval_s=0.05)
    sender.watch_run(run)
    sender.start()
    try:
        assert sender.flush(30) == 0
        deadline = time.time() + 30
        while time.time() < deadline:
            tags = server_run(server_client, name).data.tags
            if config.HEARTBEAT_TAG in tags:
                break
            time.sleep(0.1)
        beat = int(server_run(server_client, name).data.tags[config.HEARTBEAT_TAG])
        assert abs(beat - time.time()) < 10
    finally:
        sender.stop()


def test_a_live_run_is_created_with_a_heartbeat_before_the_first_heartbeat_round(
    tmp_path, mlflow_server, server_client
):
    # A process killed before its first heartbeat round must still leave a tag the reaper can judge.
    name = f"born-beating-{uuid.uuid4().hex[:8]}"
    journal, run = _journal_run(tmp_path, name)
    sender = _sender(journal, mlflow_server.url, heartbeat_s=3600, send_interval_s=0.05)
    sender.watch_run(run)
    sender.start()
    try:
        assert sender.flush(30) == 0
    finally:
        sender.stop()
    beat = int(server_run(server_client, name).data.tags[config.HEARTBEAT_TAG])
    assert abs(beat - time.time()) < 30


def test_a_live_run_that_keeps_logging_sends_its_heartbeat_inside_its_batches(tmp_path, flaky_proxy, server_client):
    # Every request counts against ngrok's free plan: a run that logs needs no heartbeat requests of its own.
    name = f"beat-in-batch-{uuid.uuid4().hex[:8]}"
    journal, run = _journal_run(tmp_path, name)
    # A 2 s period against a point every 0.1 s: only a second with no point at all would need a beat request.
    sender = _sender(journal, flaky_proxy.url, heartbeat_s=2.0, send_interval_s=0.05)
    sender.watch_run(run)
    started = int(time.time())
    sender.start()
    try:
        for step in range(60):  # 6 s of training
            journal.append_batch(run, [("loss", 1.0 / (step + 1), int(time.time() * 1000), step)])
            time.sleep(0.1)
        assert sender.flush(30) == 0
    finally:
        sender.stop()
    remote = server_run(server_client, name)
    assert len(server_client.get_metric_history(remote.info.run_id, "loss")) == 60
    assert flaky_proxy.count("/runs/set-tag") == 0, flaky_proxy.lines
    assert int(remote.data.tags[config.HEARTBEAT_TAG]) >= started + 3, "batches after the first carried the beat"


def test_the_server_status_of_a_live_run_is_read_every_tenth_beat_and_after_a_gap(
    tmp_path, mlflow_server, server_client
):
    name = f"beat-reads-{uuid.uuid4().hex[:8]}"
    journal, run = _journal_run(tmp_path, name)
    transport = FaultTransport()
    sender = _sender(journal, mlflow_server.url, transport=transport, heartbeat_s=60)
    beats = sender.heartbeats
    sender.watch_run(run)
    _deliver(sender)  # creates the run, born with a beat
    remote = server_run(server_client, name).info.run_id
    transport.requests.clear()
    for _ in range(REVIVE_CHECK_EVERY_BEATS - 1):
        beats.delivered(run, remote)
    assert transport.count("/runs/get") == 0
    beats.delivered(run, remote)
    assert transport.count("/runs/get") == 1
    # A gap in the beats (an outage, a stalled thread) is what the reaper acts on: the next beat looks at once.
    server_client.set_terminated(remote, "KILLED")
    beats._beats[run] -= 3 * beats.heartbeat_s
    beats.beat_round()
    assert transport.count("/runs/set-tag") == 1 and transport.count("/runs/get") == 2
    assert server_client.get_run(remote).info.status == "RUNNING"
    journal.close()


def test_a_refused_heartbeat_waits_a_period_and_does_not_stop_the_other_runs_beats(
    tmp_path, mlflow_server, server_client
):
    # A live run deleted on the server (from the UI): MLflow refuses its heartbeat with a 400 and the link stays
    # online. Retried every round (each second) that one run would use up ngrok's monthly requests in hours.
    journal = Journal(tmp_path / "j.sqlite")
    name = f"deleted-live-{uuid.uuid4().hex[:8]}"
    experiment = journal.add_experiment(name, {})
    runs = [
        journal.add_run(
            experiment_id=experiment, user_id="tester", start_time=int(time.time() * 1000), name=f"run{i}", tags={}
        )
        for i in range(2)
    ]
    transport = FaultTransport()
    sender = _sender(journal, mlflow_server.url, transport=transport, heartbeat_s=60)
    beats = sender.heartbeats
    for run in runs:
        sender.watch_run(run)
    _deliver(sender)
    remote = {run: journal.ids.server_run(run)[0] for run in runs}
    server_client.delete_run(remote[runs[0]])
    for run in runs:
        beats._beats[run] -= 2 * beats.heartbeat_s  # a period has passed since they were born beating
    transport.requests.clear()
    for _ in range(5):  # five sender rounds
        beats.beat_round()
    assert sender.link.online is True
    assert transport.count("/runs/set-tag") == 2, "one refused beat, one delivered; neither repeated"
    live_beat = int(server_client.get_run(remote[runs[1]]).data.tags[config.HEARTBEAT_TAG])
    assert abs(live_beat - time.time()) < 30
    journal.close()


def test_a_batch_for_a_run_deleted_on_the_server_is_set_aside_whole_in_one_request(
    tmp_path, flaky_proxy, server_client
):
    name = f"deleted-batch-{uuid.uuid4().hex[:8]}"
    journal, run = _journal_run(tmp_path, name)
    sender = _sender(journal, flaky_proxy.url)
    _deliver(sender)
    server_client.delete_run(server_run(server_client, name).info.run_id)
    base = int(time.time() * 1000)
    journal.append_batch(run, [("m", float(i), base + i, i) for i in range(500)])
    flaky_proxy.reset_counts()
    _deliver(sender)
    assert flaky_proxy.count("/runs/log-batch") == 1, "not split entry by entry: the run, not an entry, is refused"
    dead = journal.queue.dead_letters()
    assert len(dead) == 500 and "active" in dead[0].error and dead[0].reason == "server-refused"
    journal.close()


def test_rediscovery_switches_to_the_newly_published_url(
    tmp_path, monkeypatch, flaky_proxy, mlflow_server, server_client
):
    from bridge.record import make_record

    token = "rediscovery-token-" + uuid.uuid4().hex
    record_file = tmp_path / "endpoint.json"
    monkeypatch.setenv("BRIDGE_DISCOVERY", f"file:{record_file}")
    record = make_record(mlflow_server.url, token=token, instance="test", mlflow_version="3", ttl_s=600)
    record_file.write_text(record.to_json())
    name = f"moved-{uuid.uuid4().hex[:8]}"
    journal, run = _journal_run(tmp_path, name)
    journal.append_batch(run, [("m", 1.0, 1, 0)])
    flaky_proxy.set_mode("refuse")  # the old tunnel URL is gone
    monkeypatch.setattr("bridge.client.link.REDISCOVER_AFTER_S", 0.2)
    sender = _sender(journal, flaky_proxy.url, token, send_interval_s=0.05)
    sender.start()
    try:
        assert sender.flush(30) == 0
        assert sender.link.url == mlflow_server.url
    finally:
        sender.stop()
    assert server_run(server_client, name).data.metrics == {"m": 1.0}


def _lock_free(journal: Journal) -> bool:
    """Whether another sender could take over the journal now."""
    import fcntl

    with open(str(journal.path) + ".lock", "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return True


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_stop_cuts_a_request_in_flight_instead_of_waiting_for_its_timeout(tmp_path, flaky_proxy):
    journal, _run = _journal_run(tmp_path, f"cut-{uuid.uuid4().hex[:8]}")
    flaky_proxy.set_mode("blackhole")
    sender = _sender(journal, flaky_proxy.url, http_timeout_s=60, send_interval_s=0.05)
    sender.start()
    _wait_for(lambda: flaky_proxy.count(mode="blackhole") >= 1, 30, "a request to hang")
    began = time.monotonic()
    stopped = sender.stop(timeout=30)
    # Far under the request's 60 s read timeout, with room for a loaded machine (the last journal fsync).
    assert time.monotonic() - began < 15, "stop() waited for the request's 60 s timeout"
    assert stopped is True
    assert _lock_free(journal)
    assert journal.queue.backlog().total == 2, "the cut request's rows are pending again"
    journal.close()


def test_a_sender_still_busy_after_stop_keeps_the_journal_until_it_ends(tmp_path, monkeypatch):
    journal, _ = _journal_run(tmp_path, "busy")
    sender = _sender(journal, "http://127.0.0.1:9", send_interval_s=0.05)
    entered, release = threading.Event(), threading.Event()

    def stuck_round() -> int:  # stands in for an upload that does not notice the stop
        entered.set()
        release.wait(30)
        return 0

    monkeypatch.setattr(sender, "deliver_records", stuck_round)
    sender.start()
    assert entered.wait(30)
    assert not sender.stop(timeout=0.3)
    assert not _lock_free(journal), "no other sender may re-send what this one is still sending"
    closed = []
    sender.when_stopped(lambda: closed.append(journal.close()))
    journal.append_batch("r", [], [("p", "1")])  # the journal is still open and usable
    release.set()
    _wait_for(lambda: closed and _lock_free(journal), 30, "the sender to end and let go")


def test_a_run_marked_killed_while_still_logging_is_running_again_and_still_finishes(
    tmp_path, mlflow_server, server_client
):
    KILLED_REASON_TAG = config.KILLED_REASON_TAG

    name = f"revived-{uuid.uuid4().hex[:8]}"
    journal, run = _journal_run(tmp_path, name)
    sender = _sender(journal, mlflow_server.url, heartbeat_s=0.2, send_interval_s=0.05)
    sender.watch_run(run)
    sender.start()
    try:
        assert sender.flush(30) == 0
        remote = server_run(server_client, name).info.run_id
        # What `bridge serve`'s reaper does after an outage longer than its heartbeat timeout:
        server_client.set_tag(remote, KILLED_REASON_TAG, "no heartbeat for 400 s; marked KILLED by bridge serve")
        server_client.set_terminated(remote, "KILLED")
        _wait_for(lambda: server_client.get_run(remote).info.status == "RUNNING", 30, "the run to be revived")
        assert KILLED_REASON_TAG not in server_client.get_run(remote).data.tags
        journal.update_run(run, status="FINISHED", end_time=int(time.time() * 1000), name=None)
        sender.unwatch_run(run)
        assert sender.flush(30) == 0
        assert sender.wait_rounds(5, 30), "several heartbeat periods of sender rounds"
    finally:
        sender.stop()
    assert server_client.get_run(remote).info.status == "FINISHED"


def test_the_journal_is_made_durable_while_a_delivery_round_is_stuck(tmp_path, monkeypatch):
    import os
    import sqlite3

    journal, run = _journal_run(tmp_path, "durable")
    sender = _sender(journal, "http://127.0.0.1:9", send_interval_s=0.05, durable_every_s=0.1)
    entered, release = threading.Event(), threading.Event()

    def stuck_round() -> int:  # a long upload, or timeouts during an outage
        entered.set()
        release.wait(30)
        return 0

    monkeypatch.setattr(sender, "deliver_records", stuck_round)
    synced: list[str] = []
    real_fsync = os.fsync

    def spy_fsync(fd):
        with contextlib.suppress(OSError):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    sender.start()
    try:
        assert entered.wait(30)
        synced.clear()
        journal.append_batch(run, [("m", 1.0, 1, 0)])  # only in the intake file, not yet fsynced anywhere

        def in_sqlite_and_synced() -> bool:
            with contextlib.closing(sqlite3.connect(journal.path)) as other:
                moved = other.execute("select count(*) from ops where kind='metric'").fetchone()[0]
            return moved == 1 and any(path.endswith("-wal") for path in synced)

        _wait_for(in_sqlite_and_synced, 30, "the point to reach SQLite and the WAL to be fsynced")
    finally:
        release.set()
        sender.stop()


def test_a_flush_waits_for_a_look_for_late_twins_only_while_this_sender_delivers(tmp_path):
    """A flush waits for a look for late twins (H21) — but not while another process holds the journal's
    delivery lock: that process looks, and this flush would sit out its whole timeout (review of H21)."""
    journal = Journal(tmp_path / "journal.sqlite")
    journal.ids.map_run("r1", "server-run", None, watch_twins_until=time.time() + 50)
    other = open(str(journal.path) + ".lock", "a+")  # noqa: SIM115 - held: another process delivers this journal
    assert try_lock(other.fileno())
    transport = FaultTransport()
    sender = Sender(
        journal,
        Link("http://127.0.0.1:9", "t", transport=transport),
        ClientOptions.from_env().replace(send_interval_s=0.05),
    )
    sender.start()
    try:
        started = time.monotonic()
        assert sender.flush(30) == 0
        assert time.monotonic() - started < 10, "the flush sat out a look only the other process can make"
        assert transport.requests == []
        assert journal.book.twin_watches() == {"r1": pytest.approx(time.time() + 50, abs=15)}
    finally:
        other.close()
        sender.stop()
        journal.close()


def test_no_create_begins_once_the_sender_is_stopping(tmp_path):
    """A stopping sender waits for creates in flight (H21's grace); one that would begin after the stop looked
    would be cut after it left — it does not begin, and its op goes back to the next sender (review of H21)."""
    journal = Journal(tmp_path / "journal.sqlite")
    link = Link("http://127.0.0.1:9", "t", transport=FaultTransport())
    operations = Operations(link, journal, Heartbeats(link, journal, 60.0))
    with operations.creating():
        with operations.creating():  # counted, not a flag: the inner one ending leaves the outer in flight
            pass
        assert not operations.wait_for_creates(0.0)
    assert operations.wait_for_creates(0.0)
    with pytest.raises(TransportError, match="stopping"), operations.creating():
        pytest.fail("a create began after the sender stopped waiting for creates")
    assert operations.wait_for_creates(0.0)  # the refused one is not left counted
    journal.close()
