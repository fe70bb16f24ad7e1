"""The tunnel keeper against the real stand-in cloudflared process: a grace for an edge drop, a replacement after it
or when the agent dies, and a start refused by Cloudflare's rate limit retried with backoff.

Time in the keeper is a fake clock the test moves; only the stand-in's own drop runs on the wall clock.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from bridge.errors import CloudflaredBinaryError, ConfigError
from bridge.serve.tunnel_keeper import TunnelEvent, TunnelKeeper
from tests.support.tunnel import open_tunnel


class _Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def origin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class Clock:
    """The keeper's clock: moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def keeper(fake_cloudflared, origin):
    """A factory for keepers of stand-in quick tunnels to `origin`, each with a fake clock; closed at teardown."""
    made: list[TunnelKeeper] = []

    def make(**timing) -> tuple[TunnelKeeper, Clock, list[TunnelEvent]]:
        clock, events = Clock(), []
        timing = {"grace_s": 30.0, "check_interval_s": 1.0, "min_backoff_ms": 2000, **timing}
        kept = TunnelKeeper(
            lambda: open_tunnel(fake_cloudflared, origin), on_event=events.append, clock=clock, **timing
        )
        made.append(kept)
        return kept, clock, events

    yield make
    for kept in made:
        kept.close()


def _tick_until(kept: TunnelKeeper, clock: Clock, predicate, *, step_s: float, limit_s: float, what: str) -> None:
    """Tick, moving the fake clock `step_s` each time, until `predicate()` holds (for at most `limit_s` wall time)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; keeper {kept!r}")
        clock.now += step_s
        kept.tick()
        time.sleep(0.1)


def test_an_edge_drop_within_the_grace_keeps_the_agent_and_its_url(keeper, fake_cloudflared, monkeypatch):
    monkeypatch.setenv("FAKE_CLOUDFLARED_DROP_S", "2")
    kept, clock, events = keeper(grace_s=30.0)
    url = kept.start()
    [pid] = fake_cloudflared.agent_pids()
    public = fake_cloudflared.local_url(url)
    assert requests.get(public + "/x", timeout=5).text == "ok"

    os.kill(pid, signal.SIGUSR1)  # the one edge connection drops; the agent redials it under the same hostname
    _tick_until(kept, clock, lambda: kept.status == "reconnecting", step_s=1, limit_s=10, what="the drop seen")
    assert requests.get(public + "/x", timeout=5).status_code == 530  # no connector: Cloudflare's 1033
    # 0.1 s of wall time per fake second: the 2 s drop ends well inside the 30 s grace.
    _tick_until(kept, clock, lambda: kept.status == "open", step_s=1, limit_s=15, what="the agent back")

    assert kept.public_url == url and fake_cloudflared.agent_pids() == [pid]
    assert requests.get(public + "/x", timeout=5).text == "ok"
    assert [e.kind for e in events] == ["opened", "unready", "recovered"]
    assert not any(e.url_changed for e in events[1:])
    assert "back after" in events[-1].message and url in events[-1].message


def test_an_agent_not_back_within_the_grace_is_replaced_at_a_new_url(keeper, fake_cloudflared, monkeypatch):
    monkeypatch.setenv("FAKE_CLOUDFLARED_DROP_S", "3600")
    kept, clock, events = keeper(grace_s=30.0)
    first = kept.start()
    [first_pid] = fake_cloudflared.agent_pids()
    os.kill(first_pid, signal.SIGUSR1)
    _tick_until(kept, clock, lambda: kept.status == "reconnecting", step_s=1, limit_s=10, what="the drop seen")
    clock.now += 29
    kept.tick()
    assert kept.status == "reconnecting" and kept.public_url == first  # one second of grace left: kept

    clock.now += 2
    kept.tick()
    assert kept.status == "open" and kept.public_url != first
    [second_pid] = fake_cloudflared.agent_pids()
    assert second_pid != first_pid
    assert requests.get(fake_cloudflared.local_url(kept.public_url) + "/x", timeout=5).text == "ok"
    assert [e.kind for e in events] == ["opened", "unready", "replacing", "reopened"]
    assert events[-1].url_changed and events[-1].url == kept.public_url
    assert "not back after 30 s" in events[-2].message


def _exited(pid: int) -> bool:
    """Whether our child `pid` can be waited for, without reaping it (the keeper's `poll()` must do that). Not
    `agent_pids()` nor /proc's "Z": a killed multi-threaded process drops out of both while its other threads are
    still being torn down, and until then `waitpid` (so `poll()`) still says it runs."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def test_a_dead_agent_is_replaced_at_once_whatever_the_grace(keeper, fake_cloudflared):
    kept, clock, events = keeper(grace_s=1000.0)
    first = kept.start()
    [pid] = fake_cloudflared.agent_pids()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not _exited(pid) and time.monotonic() < deadline:  # the kill lands: a zombie until the keeper reaps it
        time.sleep(0.05)
    clock.now += 1
    kept.tick()
    assert kept.status == "open" and kept.public_url not in (None, first)
    assert [e.kind for e in events] == ["opened", "replacing", "reopened"]
    assert "exited" in events[1].message


def test_a_start_refused_by_the_rate_limit_is_retried_with_backoff(keeper, fake_cloudflared, monkeypatch, tmp_path):
    limited = tmp_path / "rate-limited"
    limited.touch()
    monkeypatch.setenv("FAKE_CLOUDFLARED_RATE_LIMITED", str(limited))
    kept, clock, events = keeper(min_backoff_ms=2000, max_backoff_ms=60_000)

    assert kept.start() is None
    assert kept.status == "down" and kept.failures == 1
    assert "429 Too Many Requests" in kept.error and "1015" in kept.error
    first_wait = kept.retry_in_s()
    assert 1 <= first_wait <= 2
    clock.now += first_wait - 0.5
    kept.tick()
    assert kept.failures == 1  # not due yet: no new agent was started
    clock.now += 0.5
    kept.tick()
    assert kept.failures == 2 and 2 <= kept.retry_in_s() <= 4  # doubled
    assert fake_cloudflared.agent_pids() == []

    limited.unlink()  # the limit lifts
    clock.now += kept.retry_in_s()
    kept.tick()
    assert kept.status == "open" and kept.failures == 0 and kept.error is None
    assert requests.get(fake_cloudflared.local_url(kept.public_url) + "/x", timeout=5).text == "ok"
    assert [e.kind for e in events] == ["failed", "failed", "opened"]
    assert "next try in" in events[0].message and events[-1].url_changed


def test_an_error_waiting_cannot_fix_stops_the_start(keeper):
    def missing():
        raise CloudflaredBinaryError("no cloudflared binary found; install cloudflared")

    kept = TunnelKeeper(missing)
    with pytest.raises(CloudflaredBinaryError, match="install cloudflared"):
        kept.start()
    with pytest.raises(ConfigError, match="tunnel timing"):
        TunnelKeeper(missing, check_interval_s=0)
