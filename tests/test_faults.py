"""Faults on the link between `bridge.connect()` and a real MLflow server, made by the test-owned flaky proxy.

Each test logs a known set of points, params and tags through the MLflow fluent API while a fault is active,
recovers, flushes, and then asks the server directly (not through the proxy) for what arrived: every point
exactly once with its value, the params and tags, one run (no ghost) with the right status.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import mlflow
import pytest

from bridge.record import make_record
from tests.support.client import server_run

pytestmark = pytest.mark.timeout(120)

STEPS = 600  # two metrics → 1,200 points: more than one log_batch (≤ 1,000 metrics each)
PARAMS = {"lr": "0.01", "batch": "8", "model": "yolov8n"}
TAGS = {"stage": "02", "dataset": "synthetic"}
LATE_PARAMS = {"epochs": "3"}
LATE_TAGS = {"phase": "late"}
TOKEN = "fault-test-token-" + "x" * 24


def _loss(step: int) -> float:
    return 1.0 / (step + 1)


def _acc(step: int) -> float:
    return step / STEPS


def _name(prefix: str) -> str:
    return f"fault-{prefix}-{uuid.uuid4().hex[:8]}"


def _log_points(steps: range) -> None:
    for step in steps:
        mlflow.log_metric("loss", _loss(step), step=step)
        mlflow.log_metric("acc", _acc(step), step=step)


def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _assert_server_holds_exactly(
    server_client,
    experiment: str,
    local_id: str,
    *,
    steps: int = STEPS,
    params: dict | None = None,
    tags: dict | None = None,
    status: str = "FINISHED",
):
    """Exactly one run (no ghost), its status, the params and tags, and every point once with its value."""
    run = server_run(server_client, experiment)
    assert run.info.status == status
    assert run.data.tags["bridge.run_key"] == local_id
    assert run.data.params == (params if params is not None else {**PARAMS, **LATE_PARAMS})
    for key, value in (tags if tags is not None else {**TAGS, **LATE_TAGS}).items():
        assert run.data.tags[key] == value
    for key, fn in (("loss", _loss), ("acc", _acc)):
        history = server_client.get_metric_history(run.info.run_id, key)
        assert len(history) == steps, f"{key}: {len(history)} points on the server, {steps} logged"
        assert sorted((m.step, m.value) for m in history) == [(s, fn(s)) for s in range(steps)]
    return run


def _why_not_delivered(conn, proxy) -> str:
    status = conn.status()
    return (
        f"online={status.online} last_error={status.last_error!r} pending={status.pending} requests={dict(proxy.lines)}"
    )


def _fault_bit(conn, proxy, mode: str) -> bool:
    """The sender has met the fault: a failed attempt for `refuse`, two affected requests otherwise."""
    if mode == "refuse":
        return conn.status().online is False and conn.status().last_error is not None
    return proxy.count(mode=mode) >= 2 and conn.status().last_error is not None


FAULTS = [
    pytest.param("refuse", {}, id="outage-refused"),
    pytest.param("blackhole", {}, id="blackhole"),
    pytest.param("reset", {"at": "request"}, id="reset-mid-request"),
    pytest.param("reset", {"at": "response"}, id="reset-mid-response"),
    pytest.param("http_5xx", {"status": 503}, id="http-503"),
    pytest.param("http_5xx", {"status": 500}, id="http-500"),
    # Each request and response is cut into pieces 0.3 s apart: longer than the client's 1 s read timeout,
    # so the server applies batches whose answers the client has stopped waiting for.
    pytest.param("slow", {"delay_s": 0.3, "chunk_size": 8192}, id="slow-beyond-timeout"),
    pytest.param("lost_ack", {}, id="lost-ack"),
]


@pytest.mark.parametrize("mode, options", FAULTS)
def test_fault_mid_run_then_recovery_delivers_every_point_once(
    mode, options, flaky_proxy, bridge_connect, server_client, monkeypatch
):
    monkeypatch.setenv("BRIDGE_HTTP_TIMEOUT_S", "1")
    experiment = _name(mode)
    conn = bridge_connect(flaky_proxy.url, experiment=experiment)
    assert conn.status().online is True
    with mlflow.start_run(run_name=f"under-{mode}") as run:
        mlflow.log_params(PARAMS)
        mlflow.set_tags(TAGS)
        _log_points(range(100))
        assert conn.flush(20) == 0  # the run exists on the server before the link goes bad

        flaky_proxy.set_mode(mode, **options)
        started = time.monotonic()
        _log_points(range(100, STEPS))
        mlflow.log_params(LATE_PARAMS)
        mlflow.set_tags(LATE_TAGS)
        logging_s = time.monotonic() - started
    # The training thread never waited on the broken link (1,000 calls plus end_run).
    assert logging_s < 3.0, f"logging took {logging_s:.2f} s during {mode}"
    _wait_until(lambda: _fault_bit(conn, flaky_proxy, mode), 60, f"the sender to meet {mode}")
    assert conn.status().pending > 0

    flaky_proxy.set_mode("pass")
    assert conn.flush(40) == 0, _why_not_delivered(conn, flaky_proxy)
    status = conn.status()
    assert status.online is True and status.dead_letters == 0
    _assert_server_holds_exactly(server_client, experiment, run.info.run_id)


# A lost create is not sent again blindly: the sender first looks for what it may have made, so one loss is
# all a create meets; batches and status updates are simply re-sent, so they lose two answers in a row.
@pytest.mark.parametrize(
    "path, losses", [("experiments/create", 1), ("runs/create", 1), ("runs/log-batch", 2), ("runs/update", 2)]
)
def test_lost_acknowledgement_of_each_write_kind_makes_no_duplicate(
    path, losses, flaky_proxy, bridge_connect, server_client, monkeypatch
):
    """The server applied the request, the answer was cut: the retry finds what it made, adds nothing."""
    monkeypatch.setenv("BRIDGE_HTTP_TIMEOUT_S", "1")
    flaky_proxy.set_mode("lost_ack", path=path, times=losses)
    experiment = _name("ack")
    conn = bridge_connect(flaky_proxy.url, experiment=experiment)
    with mlflow.start_run(run_name="lost-ack") as run:
        mlflow.log_params({**PARAMS, **LATE_PARAMS})
        mlflow.set_tags({**TAGS, **LATE_TAGS})
        _log_points(range(STEPS))
    assert conn.flush(40) == 0, _why_not_delivered(conn, flaky_proxy)
    assert flaky_proxy.count(path, mode="lost_ack") == losses  # the answers really were lost
    assert flaky_proxy.mode == "pass"
    _assert_server_holds_exactly(server_client, experiment, run.info.run_id)
    experiments = list(server_client.search_experiments(filter_string=f"name = '{experiment}'"))
    assert len(experiments) == 1


def test_offline_from_the_start_then_the_link_comes_back(flaky_proxy, bridge_connect, server_client, monkeypatch):
    monkeypatch.setenv("BRIDGE_HTTP_TIMEOUT_S", "1")
    flaky_proxy.set_mode("refuse")
    experiment = _name("offline")
    conn = bridge_connect(flaky_proxy.url, experiment=experiment, probe_timeout=0.5)
    assert conn.status().online is False
    with mlflow.start_run(run_name="offline") as run:
        mlflow.log_params({**PARAMS, **LATE_PARAMS})
        mlflow.set_tags({**TAGS, **LATE_TAGS})
        _log_points(range(STEPS))
    assert server_client.get_experiment_by_name(experiment) is None  # nothing got through
    flaky_proxy.set_mode("pass")
    assert conn.flush(40) == 0
    _assert_server_holds_exactly(server_client, experiment, run.info.run_id)


def test_tunnel_url_change_mid_run_follows_the_new_record(
    mlflow_server, make_flaky_proxy, bridge_connect, server_client, monkeypatch, tmp_path
):
    """The tunnel restarts with a new URL: the sender re-reads the published record and carries on."""
    # The old tunnel refuses at once, so no short timeout is needed to notice it; a 1 s one made the new URL's
    # answers time out on a loaded machine (603 entries left after 40 s at load 30).
    monkeypatch.setenv("BRIDGE_HTTP_TIMEOUT_S", "5")
    old = make_flaky_proxy("127.0.0.1", mlflow_server.port)
    new = make_flaky_proxy("127.0.0.1", mlflow_server.port)
    record = tmp_path / "published" / "endpoint.json"
    record.parent.mkdir()

    def publish(url: str) -> None:
        text = make_record(url, token=TOKEN, instance="serve-1", mlflow_version=mlflow.__version__, ttl_s=600).to_json()
        tmp = record.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, record)

    publish(old.url)
    monkeypatch.setenv("BRIDGE_DISCOVERY", f"file:{record}")
    experiment = _name("moved")
    conn = bridge_connect(None, TOKEN, experiment=experiment)
    assert conn.url == old.url
    with mlflow.start_run(run_name="moved") as run:
        mlflow.log_params(PARAMS)
        mlflow.set_tags(TAGS)
        _log_points(range(300))
        assert conn.flush(20) == 0
        old.set_mode("refuse")  # the old tunnel is gone…
        publish(new.url)  # …and `bridge serve` published the new one
        _log_points(range(300, STEPS))
        mlflow.log_params(LATE_PARAMS)
        mlflow.set_tags(LATE_TAGS)
    assert conn.flush(40) == 0
    assert conn.url == new.url
    assert new.count("/runs/log-batch", method="POST") >= 1
    assert old.count("/runs/log-batch", mode="pass") >= 1
    _assert_server_holds_exactly(server_client, experiment, run.info.run_id)


def test_a_tampered_record_never_redirects_delivery(
    mlflow_server, make_flaky_proxy, bridge_connect, server_client, monkeypatch, tmp_path, caplog
):
    """A record naming another URL but not signed with our token is ignored; delivery resumes on the old URL."""
    import json

    monkeypatch.setenv("BRIDGE_HTTP_TIMEOUT_S", "1")
    old = make_flaky_proxy("127.0.0.1", mlflow_server.port)
    trap = make_flaky_proxy("127.0.0.1", mlflow_server.port)
    record = tmp_path / "endpoint.json"
    record.write_text(make_record(old.url, token=TOKEN, instance="s", mlflow_version="x", ttl_s=600).to_json())
    monkeypatch.setenv("BRIDGE_DISCOVERY", f"file:{record}")
    experiment = _name("tampered")
    conn = bridge_connect(None, TOKEN, experiment=experiment)
    with mlflow.start_run(run_name="tampered") as run:
        mlflow.log_params({**PARAMS, **LATE_PARAMS})
        mlflow.set_tags({**TAGS, **LATE_TAGS})
        old.set_mode("refuse")
        data = json.loads(record.read_text())
        data["url"] = trap.url
        record.write_text(json.dumps(data))
        _log_points(range(STEPS))
    # The sender re-reads the record after 3 failures over 5 s, and refuses it.
    with caplog.at_level(logging.WARNING, logger="bridge.client.link.discovery"):
        # flush() wakes the sender every 50 ms, so the failures needed come quickly.
        _wait_until(
            lambda: conn.flush(0.1) > 0 and any("signature" in r.getMessage() for r in caplog.records),
            60,
            "re-discovery to reject the tampered record",
        )
    assert conn.status().pending > 0
    old.set_mode("pass")
    assert conn.flush(40) == 0
    assert conn.url == old.url
    assert trap.count() == 0  # not one request (so not one token) went to the URL the bad record named
    _assert_server_holds_exactly(server_client, experiment, run.info.run_id)


_KILLED_SCRIPT = textwrap.dedent("""
    import sys, time
    import mlflow, bridge

    url, journal, experiment, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    bridge.connect(url, token="test-token", experiment=experiment, journal=journal, probe_timeout=0.5)
    mlflow.start_run(run_name="killed")
    mlflow.log_params({"lr": "0.01", "batch": "8"})
    mlflow.set_tag("stage", "02")
    print("RUN", mlflow.active_run().info.run_id, flush=True)
    for step in range(steps):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        print("ACK", step, flush=True)  # printed only after log_metric returned: acknowledged
        time.sleep(0.0005)
    print("DONE", flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("recover_with", ["bridge-sync", "connect"])
def test_kill_9_during_an_outage_then_everything_acknowledged_is_delivered(
    recover_with, flaky_proxy, bridge_connect, server_client, tmp_path, monkeypatch
):
    monkeypatch.setenv("BRIDGE_HTTP_TIMEOUT_S", "1")
    monkeypatch.setenv("BRIDGE_SEND_INTERVAL_S", "0.05")
    flaky_proxy.set_mode("refuse")
    journal = tmp_path / "killed-journal.sqlite"
    experiment = _name("kill9")
    script = tmp_path / "train.py"
    script.write_text(_KILLED_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), flaky_proxy.url, str(journal), experiment, "5000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path.cwd(),
    )
    acked = -1
    local_id = None
    try:
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            if line.startswith("RUN "):
                local_id = line.split()[1]
            elif line.startswith("ACK "):
                acked = int(line.split()[1])
                if acked >= 1500:
                    os.kill(proc.pid, signal.SIGKILL)  # mid-run, mid-outage
                    break
            assert time.monotonic() < deadline, "the logging process did not get going"
        else:
            pytest.fail(f"logging process ended early: {proc.wait()} {proc.stderr.read()[-2000:]}")
        for line in proc.stdout:  # lines already in the pipe when it died
            if line.startswith("ACK "):
                acked = int(line.split()[1])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    assert local_id is not None
    assert server_client.get_experiment_by_name(experiment) is None  # the outage held everything back

    flaky_proxy.set_mode("pass")
    if recover_with == "bridge-sync":
        result = subprocess.run(
            [
                str(Path(sys.executable).with_name("bridge")),
                "sync",
                "--journal",
                str(journal),
                "--url",
                flaky_proxy.url,
                "--timeout",
                "60",
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "test-token" not in result.stdout + result.stderr
    else:
        conn = bridge_connect(flaky_proxy.url, journal=journal)
        assert conn.flush(40) == 0

    run = server_run(server_client, experiment)
    assert run.data.tags["bridge.run_key"] == local_id
    assert run.data.params == {"lr": "0.01", "batch": "8"}
    assert run.data.tags["stage"] == "02"
    history = server_client.get_metric_history(run.info.run_id, "loss")
    steps = sorted(m.step for m in history)
    assert len(steps) == len(set(steps)), "duplicate points after recovery"
    # Every acknowledged point, and at most the one being logged when the process died.
    assert steps == list(range(len(steps)))
    assert acked + 1 <= len(steps) <= acked + 2
    assert all(m.value == 1.0 / (m.step + 1) for m in history)
    # Nobody ended the run: it stays RUNNING on the server (the heartbeat tag tells a dead run from a live one).
    assert run.info.status == "RUNNING"
