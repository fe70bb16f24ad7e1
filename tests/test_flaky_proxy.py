"""The flaky proxy does what each mode says, against the real MLflow server; its throttle and flapping link,
against a counting origin."""

from __future__ import annotations

import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.support.flaky_proxy import FlakyProxy, TokenBucket

CREATE = "/api/2.0/mlflow/experiments/create"
GET_BY_NAME = "/api/2.0/mlflow/experiments/get-by-name"


def _name() -> str:
    return f"proxy-{uuid.uuid4().hex[:12]}"


def _exists_on_server(server, name: str) -> bool:
    """Ask the server directly (not through the proxy) whether the experiment exists."""
    resp = requests.get(server.url + GET_BY_NAME, params={"experiment_name": name}, timeout=5)
    if resp.status_code == 404:
        return False
    resp.raise_for_status()
    return resp.json()["experiment"]["name"] == name


def _create(base: str, name: str, timeout: float = 5) -> requests.Response:
    return requests.post(base + CREATE, json={"name": name}, timeout=timeout)


def test_pass_forwards_and_counts_keep_alive_requests(flaky_proxy, mlflow_server):
    name = _name()
    with requests.Session() as session:
        assert session.post(flaky_proxy.url + CREATE, json={"name": name}, timeout=5).status_code == 200
        for _ in range(4):
            resp = session.get(flaky_proxy.url + GET_BY_NAME, params={"experiment_name": name}, timeout=5)
            assert resp.status_code == 200
            assert resp.json()["experiment"]["name"] == name
    assert _exists_on_server(mlflow_server, name)
    assert flaky_proxy.requests["pass"] == 5
    assert flaky_proxy.count(CREATE, method="POST") == 1
    assert flaky_proxy.count(GET_BY_NAME, method="GET", mode="pass") == 4
    flaky_proxy.reset_counts()
    assert flaky_proxy.count() == 0


def test_refuse_closes_the_port_and_pass_reopens_the_same_port(flaky_proxy):
    port = flaky_proxy.port
    flaky_proxy.set_mode("refuse")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    started = time.monotonic()
    with pytest.raises(requests.ConnectionError):
        requests.get(flaky_proxy.url + "/health", timeout=2)
    assert time.monotonic() - started < 1.5  # refused, not timed out
    flaky_proxy.set_mode("pass")
    assert flaky_proxy.port == port
    assert requests.get(flaky_proxy.url + "/health", timeout=5).status_code == 200


def test_refuse_cuts_open_keep_alive_connections(flaky_proxy):
    with requests.Session() as session:
        assert session.get(flaky_proxy.url + "/health", timeout=5).status_code == 200
        flaky_proxy.set_mode("refuse")
        with pytest.raises(requests.ConnectionError):
            session.get(flaky_proxy.url + "/health", timeout=2)


def test_blackhole_accepts_but_never_answers(flaky_proxy, mlflow_server):
    flaky_proxy.set_mode("blackhole")
    name = _name()
    started = time.monotonic()
    with pytest.raises(requests.ReadTimeout):
        _create(flaky_proxy.url, name, timeout=(2, 0.5))
    assert time.monotonic() - started < 2
    # The proxy's connection thread counts the request once it has read it whole, which on a loaded machine
    # can come after the client's 0.5 s read timeout: wait for the count, then check it is exactly one.
    deadline = time.monotonic() + 10
    while flaky_proxy.count(CREATE, mode="blackhole") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert flaky_proxy.count(CREATE, mode="blackhole") == 1
    assert not _exists_on_server(mlflow_server, name)
    flaky_proxy.set_mode("pass")
    assert _create(flaky_proxy.url, name).status_code == 200
    assert _exists_on_server(mlflow_server, name)


def test_reset_mid_request_never_reaches_the_server(flaky_proxy, mlflow_server):
    flaky_proxy.set_mode("reset", at="request")
    name = _name()
    with pytest.raises(requests.ConnectionError) as info:
        _create(flaky_proxy.url, name)
    assert "reset" in repr(info.value).lower() or "aborted" in repr(info.value).lower()
    assert not _exists_on_server(mlflow_server, name)
    assert flaky_proxy.count(CREATE, mode="reset") == 1


def test_reset_mid_response_is_applied_but_the_client_fails(flaky_proxy, mlflow_server):
    flaky_proxy.set_mode("reset", at="response")
    name = _name()
    with pytest.raises(requests.RequestException):
        _create(flaky_proxy.url, name)
    assert _exists_on_server(mlflow_server, name)


def test_http_5xx_answers_without_forwarding(flaky_proxy, mlflow_server):
    flaky_proxy.set_mode("http_5xx")
    name = _name()
    with requests.Session() as session:
        for _ in range(3):  # the 503 keeps the connection usable
            resp = session.post(flaky_proxy.url + CREATE, json={"name": name}, timeout=5)
            assert resp.status_code == 503
    assert not _exists_on_server(mlflow_server, name)
    flaky_proxy.set_mode("http_5xx", status=502)
    assert _create(flaky_proxy.url, name).status_code == 502
    assert flaky_proxy.requests["http_5xx"] == 4


def test_slow_adds_latency_per_chunk_but_delivers_intact(flaky_proxy, mlflow_server):
    name = _name()
    assert _create(flaky_proxy.url, name).status_code == 200
    flaky_proxy.set_mode("slow", delay_s=0.05, chunk_size=64)
    started = time.monotonic()
    resp = requests.get(flaky_proxy.url + GET_BY_NAME, params={"experiment_name": name}, timeout=10)
    elapsed = time.monotonic() - started
    assert resp.status_code == 200
    assert resp.json()["experiment"]["name"] == name
    # The request and the response are each at least one chunk, so at least two delays.
    chunks = -(-len(resp.content) // 64)
    assert elapsed >= 0.05 * (1 + chunks) * 0.9
    assert flaky_proxy.requests["slow"] == 1


def test_lost_ack_applies_on_the_server_but_the_client_never_learns(flaky_proxy, mlflow_server):
    flaky_proxy.set_mode("lost_ack")
    name = _name()
    with pytest.raises(requests.ConnectionError):
        _create(flaky_proxy.url, name)
    assert _exists_on_server(mlflow_server, name)
    flaky_proxy.set_mode("pass")
    # A retry now meets the already-applied create: MLflow says so instead of making a second one.
    assert _create(flaky_proxy.url, name).status_code == 400


def test_unknown_mode_or_option_is_refused(flaky_proxy):
    with pytest.raises(ValueError, match="unknown proxy mode 'flood'"):
        flaky_proxy.set_mode("flood")
    with pytest.raises(TypeError, match="delay_s"):
        flaky_proxy.set_mode("reset", delay_s=1)
    assert flaky_proxy.mode == "pass"


def test_upstream_down_looks_like_a_reset_and_close_frees_everything(make_flaky_proxy):
    from tests.support.mlflow_server import free_port

    proxy: FlakyProxy = make_flaky_proxy("127.0.0.1", free_port())  # nothing listens there
    with pytest.raises(requests.ConnectionError):
        requests.get(proxy.url + "/health", timeout=2)
    proxy.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
    assert not proxy._threads


def test_path_and_times_limit_a_fault_to_chosen_requests(flaky_proxy, mlflow_server):
    flaky_proxy.set_mode("lost_ack", path=CREATE, times=1)
    name = _name()
    with requests.Session() as session:
        # Other paths pass untouched while the fault waits for its request.
        assert (
            session.get(flaky_proxy.url + GET_BY_NAME, params={"experiment_name": name}, timeout=5).status_code == 404
        )
    with pytest.raises(requests.ConnectionError):
        _create(flaky_proxy.url, name)
    assert flaky_proxy.mode == "pass"  # spent: back to pass by itself
    assert _create(flaky_proxy.url, _name()).status_code == 200
    assert flaky_proxy.count(CREATE, mode="lost_ack") == 1
    assert flaky_proxy.count(mode="pass") == 2
    assert _exists_on_server(mlflow_server, name)
    with pytest.raises(TypeError, match="refuse"):
        flaky_proxy.set_mode("refuse", times=1)
    with pytest.raises(ValueError, match="times"):
        flaky_proxy.set_mode("reset", times=0)


# --- the link itself: bandwidth and flapping, against a counting origin (tests/support/byte_origin.py) -------


class _Clock:
    """A clock that moves only when a test sets it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_lets_rate_times_time_plus_one_burst_through():
    clock = _Clock()

    def sleep(seconds: float) -> None:
        clock.now += seconds

    bucket = TokenBucket(1000, burst=100, clock=clock, sleep=sleep)
    for _ in range(10):  # the first burst is free; then each 100 bytes cost 0.1 s
        bucket.take(100)
    assert clock.now == pytest.approx(0.9)
    clock.now += 5  # idle: the bucket fills up to one burst, not to 5 s worth
    start = clock.now
    for _ in range(11):
        bucket.take(100)
    assert clock.now - start == pytest.approx(1.0)
    assert TokenBucket(8 * 2**20).burst == 8 * 2**20 // 50  # 20 ms of traffic
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(0)


def _timed_get(url: str) -> tuple[int, float]:
    started = time.monotonic()
    resp = requests.get(url, timeout=30)
    return len(resp.content), time.monotonic() - started


def test_throttle_holds_each_direction_to_its_rate_shared_by_connections(make_flaky_proxy, byte_origin):
    rate = 2_000_000
    proxy = make_flaky_proxy("127.0.0.1", byte_origin.port, down_bytes_per_s=rate, up_bytes_per_s=rate)

    received, elapsed = _timed_get(proxy.url + "/bytes/3000000")
    assert received == 3_000_000
    assert received / elapsed == pytest.approx(rate, rel=0.15)

    started = time.monotonic()
    resp = requests.put(proxy.url + "/sink", data=bytes(3_000_000), timeout=30)
    assert resp.json() == {"received": 3_000_000}
    assert 3_000_000 / (time.monotonic() - started) == pytest.approx(rate, rel=0.15)

    # Two downloads at once share the link: together they get the rate, not twice it.
    with ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        results = list(pool.map(_timed_get, [proxy.url + "/bytes/1500000"] * 2))
        elapsed = time.monotonic() - started
    assert [size for size, _ in results] == [1_500_000] * 2
    assert 3_000_000 / elapsed == pytest.approx(rate, rel=0.15)
    assert proxy.bytes_down >= 6_000_000 and proxy.bytes_up >= 3_000_000

    proxy.throttle()  # unlimited again
    received, elapsed = _timed_get(proxy.url + "/bytes/3000000")
    assert received / elapsed > 3 * rate


def test_flapping_cuts_connections_and_refuses_new_ones_on_the_schedule_of_its_clock(make_flaky_proxy, byte_origin):
    clock = _Clock()
    proxy = make_flaky_proxy("127.0.0.1", byte_origin.port, down_bytes_per_s=1_000_000)
    proxy.flap(up_s=10, down_s=5, clock=clock)

    download = requests.get(proxy.url + "/bytes/50000000", stream=True, timeout=10)
    assert download.status_code == 200
    got = len(next(download.iter_content(65536)))
    clock.now = 9.99
    got += len(next(download.iter_content(65536)))  # still up
    assert proxy.link_up and proxy.link_events == []

    clock.now = 10.0
    assert proxy.wait_link(up=False, timeout=5)
    with pytest.raises(requests.RequestException):
        for chunk in download.iter_content(65536):
            got += len(chunk)
    assert got < 50_000_000
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()

    clock.now = 15.0
    assert proxy.wait_link(up=True, timeout=5)
    assert requests.get(proxy.url + "/bytes/10", timeout=10).content == bytes(10)
    clock.now = 25.0  # 25 is 10 s into the second period: down again
    assert proxy.wait_link(up=False, timeout=5)
    assert proxy.link_events == [(10.0, "down"), (15.0, "up"), (25.0, "down")]

    proxy.stop_flapping()
    assert proxy.link_up
    assert requests.get(proxy.url + "/bytes/10", timeout=10).status_code == 200


def test_flapping_on_the_real_clock_cuts_a_throttled_download_after_up_s_worth_of_bytes(make_flaky_proxy, byte_origin):
    rate, up_s, down_s = 1_000_000, 0.6, 0.4
    proxy = make_flaky_proxy("127.0.0.1", byte_origin.port, down_bytes_per_s=rate)
    started = time.monotonic()
    proxy.flap(up_s=up_s, down_s=down_s)
    with pytest.raises(requests.RequestException):
        requests.get(proxy.url + "/bytes/5000000", timeout=10).raise_for_status()
    assert proxy.wait_link(up=False, timeout=5)
    cut_at, state = proxy.link_events[0]
    assert state == "down" and cut_at - started == pytest.approx(up_s, abs=0.1)
    # What passed before the cut is the link's rate over the up time (less the request's own start-up).
    assert 0.75 * rate * up_s <= proxy.bytes_down <= 1.1 * rate * up_s

    assert proxy.wait_link(up=True, timeout=5)
    assert proxy.link_events[1][0] - cut_at == pytest.approx(down_s, abs=0.1)
    assert requests.get(proxy.url + "/bytes/1000", timeout=5).status_code == 200


def test_throttle_and_flapping_compose_with_a_mode(make_flaky_proxy, byte_origin):
    proxy = make_flaky_proxy("127.0.0.1", byte_origin.port, up_bytes_per_s=4_000_000)
    proxy.set_mode("http_5xx", path="/sink", times=1)
    resp = requests.put(proxy.url + "/sink", data=bytes(2_000_000), timeout=30)
    assert resp.status_code == 503  # the large body was read (and dropped), the answer the proxy's own
    assert requests.put(proxy.url + "/sink", data=bytes(2_000_000), timeout=30).json() == {"received": 2_000_000}
    assert [(seen.received, seen.complete) for seen in byte_origin.seen] == [(2_000_000, True)]
    proxy.set_mode("refuse")
    proxy.flap(up_s=0.2, down_s=0.2)
    assert proxy.wait_link(up=False, timeout=5) and proxy.wait_link(up=True, timeout=5)
    with pytest.raises(ConnectionRefusedError):  # up, but the mode still refuses
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
