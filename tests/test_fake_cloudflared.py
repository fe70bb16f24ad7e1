"""The stand-in cloudflared's edge enforces Cloudflare's limits: 413 over 100 MB, 524 after the read timeout, 429
beyond 200 requests in flight (tests/support/fake_cloudflared.py says where each number comes from).

Each test runs the real stand-in process through bridge's own cloudflared runner, in front of a counting origin
(tests/support/byte_origin.py); uploads stream from a reused 1 MiB buffer, so no test holds a body in memory.
"""

from __future__ import annotations

import asyncio
import http.client
import time
from urllib.parse import urlsplit

import pytest

from tests.support import fake_cloudflared
from tests.support.fake_cloudflared import EdgeLimits
from tests.support.tunnel import open_tunnel

MB = 10**6
_BLOCK = bytes(1024 * 1024)


@pytest.fixture
def edge(fake_cloudflared, byte_origin, monkeypatch):
    """`edge(**env)`: open a quick tunnel to the origin with those FAKE_CLOUDFLARED_* switches; its local URL."""
    tunnels = []

    def open_edge(**env: str) -> str:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        tunnel = open_tunnel(fake_cloudflared, byte_origin.url)
        tunnels.append(tunnel)
        return fake_cloudflared.local_url(tunnel.open())

    yield open_edge
    for tunnel in tunnels:
        tunnel.close()


def _upload(url: str, size: int, *, chunked: bool, path: str = "/sink", pace_s: float = 0.0):
    """POST `size` bytes (zeros) to `url` + `path`, by Content-Length or chunked; (status, headers, body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Transfer-Encoding" if chunked else "Content-Length", "chunked" if chunked else str(size))
        conn.endheaders()
        left = size
        while left:
            piece = memoryview(_BLOCK)[: min(left, len(_BLOCK))]
            conn.send(b"%x\r\n" % len(piece) + piece + b"\r\n" if chunked else piece)
            left -= len(piece)
            if pace_s:
                time.sleep(pace_s)
        if chunked:
            conn.send(b"0\r\n\r\n")
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


# ------------------------------------------------------------------------------------ the numbers


def test_the_default_limits_are_cloudflares_and_the_environment_overrides_them(monkeypatch):
    for name in ("FAKE_CLOUDFLARED_MAX_BODY", "FAKE_CLOUDFLARED_ORIGIN_TIMEOUT_S", "FAKE_CLOUDFLARED_MAX_IN_FLIGHT"):
        monkeypatch.delenv(name, raising=False)
    assert EdgeLimits.from_environment() == EdgeLimits(100 * 10**6, 100.0, 200)
    assert (fake_cloudflared.MAX_BODY_BYTES, fake_cloudflared.ORIGIN_TIMEOUT_S) == (100_000_000, 100.0)
    assert fake_cloudflared.MAX_IN_FLIGHT == 200
    monkeypatch.setenv("FAKE_CLOUDFLARED_MAX_BODY", "1000")
    monkeypatch.setenv("FAKE_CLOUDFLARED_ORIGIN_TIMEOUT_S", "0.5")
    monkeypatch.setenv("FAKE_CLOUDFLARED_MAX_IN_FLIGHT", "3")
    assert EdgeLimits.from_environment() == EdgeLimits(1000, 0.5, 3)
    monkeypatch.setenv("FAKE_CLOUDFLARED_MAX_IN_FLIGHT", "many")
    with pytest.raises(ValueError, match="FAKE_CLOUDFLARED"):
        EdgeLimits.from_environment()
    with pytest.raises(ValueError, match="out of range"):
        EdgeLimits(max_in_flight=0)


# ------------------------------------------------------------------------------------ body size: 413


def test_a_body_at_the_limit_passes_and_one_byte_more_gets_413_either_framing(edge, byte_origin):
    local = edge(FAKE_CLOUDFLARED_MAX_BODY=str(300_000))  # over the edge's small-body size, so it streams
    for chunked in (False, True):
        status, _, body = _upload(local, 300_000, chunked=chunked)
        assert (status, body) == (200, b'{"received": 300000}')
        status, headers, body = _upload(local, 300_001, chunked=chunked)
        assert status == 413
        assert headers["Server"] == "cloudflare" and b"413 Request Entity Too Large" in body
    # The cut chunked body is logged when the origin notices the cut, which may come after the 413 reached us.
    assert byte_origin.wait_for(lambda origin: len(origin.seen) == 3, timeout=10)
    complete = [seen.received for seen in byte_origin.seen if seen.complete]
    assert complete == [300_000, 300_000]
    # The declared oversize body never reached the origin; the chunked one reached it cut, never whole.
    assert [(seen.received <= 300_000, seen.complete) for seen in byte_origin.seen[2:]] == [(True, False)]


def test_a_101_mb_body_gets_413_and_the_origin_never_sees_it_whole(edge, byte_origin):
    local = edge()
    status, _, _ = _upload(local, 101 * MB, chunked=False)
    assert status == 413
    assert byte_origin.arrived == 0  # refused by its Content-Length: nothing was forwarded

    status, _, _ = _upload(local, 101 * MB, chunked=True)
    assert status == 413
    assert byte_origin.wait_for(lambda origin: len(origin.seen) == 1, timeout=10)
    [cut] = byte_origin.seen
    assert not cut.complete and cut.received <= 100 * MB


def test_a_99_mb_body_passes_whole(edge, byte_origin):
    local = edge()
    status, _, body = _upload(local, 99 * MB, chunked=False)
    assert (status, body) == (200, b'{"received": 99000000}')
    status, _, body = _upload(local, 99 * MB, chunked=True)
    assert (status, body) == (200, b'{"received": 99000000}')
    assert [(seen.received, seen.complete) for seen in byte_origin.seen] == [(99 * MB, True)] * 2


# ------------------------------------------------------------------------------------ origin timeout: 524


def test_an_origin_that_does_not_answer_in_time_gets_524(edge, byte_origin):
    local = edge(FAKE_CLOUDFLARED_ORIGIN_TIMEOUT_S="1")
    started = time.monotonic()
    status, headers, body = _upload(local, 0, chunked=False, path="/hang")
    waited = time.monotonic() - started
    assert status == 524 and b"524: A timeout occurred" in body and headers["Server"] == "cloudflare"
    assert 1.0 <= waited < 10
    assert byte_origin.arrived == 1
    # An origin that answers within the timeout is answered through.
    assert _upload(local, 0, chunked=False, path="/sleep/0.3")[0] == 200


def test_the_524_timer_starts_once_the_request_is_sent(edge, byte_origin):
    # A body that takes 1.6 s to send through a 1 s read timeout: the origin answers at once, so no 524.
    local = edge(FAKE_CLOUDFLARED_ORIGIN_TIMEOUT_S="1")
    started = time.monotonic()
    status, _, body = _upload(local, 8 * 1024 * 1024, chunked=True, pace_s=0.2)
    assert time.monotonic() - started > 1.5
    assert (status, body) == (200, b'{"received": 8388608}')


# ------------------------------------------------------------------------------------ in flight: 429


async def _hold_in_flight(base: str, origin, count: int) -> list[int]:
    """`count` requests to /hang at once; once the origin holds all it will get, release them; the statuses."""
    from aiohttp import ClientSession, ClientTimeout, TCPConnector

    async with ClientSession(connector=TCPConnector(limit=0), timeout=ClientTimeout(total=60)) as session:

        async def one() -> int:
            async with session.get(base + "/hang") as response:
                await response.read()
                return response.status

        tasks = [asyncio.ensure_future(one()) for _ in range(count)]
        deadline = time.monotonic() + 30
        # Hold the origin until every request has either reached it or been answered by the edge.
        while time.monotonic() < deadline:
            answered = sum(task.done() for task in tasks)
            if origin.arrived + answered >= count:
                break
            await asyncio.sleep(0.02)
        origin.release.set()
        return list(await asyncio.gather(*tasks))


def test_more_than_200_requests_in_flight_get_429(edge, byte_origin):
    local = edge()
    started = time.monotonic()
    statuses = asyncio.run(_hold_in_flight(local, byte_origin, 201))
    assert sorted(statuses).count(429) == 1 and statuses.count(200) == 200
    assert byte_origin.arrived == 200
    assert time.monotonic() - started < 40
    # Once they are answered the tunnel has room again.
    byte_origin.release.clear()
    assert _upload(local, 0, chunked=False, path="/sleep/0")[0] == 200
