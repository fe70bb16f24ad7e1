"""A stand-in ntfy relay on 127.0.0.1: ntfy's publish and poll API, with the real server's limits.

    POST|PUT /<topic>                          publish: the body is the message; answers the message as JSON
    GET /<topic>/json?poll=1[&since=…]         poll: the cached messages, one JSON object per line, oldest first

Limits, each as binwiederhier/ntfy enforces it (the numbers are bridge.rendezvous's, which cite their source):
topic names `[-_A-Za-z0-9]{1,64}` (server/server.go topicRegex), message bodies of at most 4,096 bytes (413 here,
as on a server without attachments), messages forgotten 12 h after publishing (cache-duration; the clock is
injectable so tests expire them without waiting), a request bucket of 60 refilled one per 5 s per visitor
(429, code 42901) and a daily message quota (429, code 42908; ntfy.sh's free tier: 250). Everything stored is
kept in `messages`, so a test can scan what the relay saw.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from bridge.rendezvous import (
    CACHE_DURATION_S,
    DAILY_MESSAGE_LIMIT,
    MESSAGE_LIMIT_BYTES,
    REQUEST_BURST,
    REQUEST_REPLENISH_S,
)

TOPIC = re.compile(r"^[-_A-Za-z0-9]{1,64}$")


@dataclass
class Message:
    id: str
    time: float
    expires: float
    topic: str
    message: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "time": int(self.time),
                "expires": int(self.expires),
                "event": "message",
                "topic": self.topic,
                "message": self.message,
            }
        )


@dataclass
class NtfyRelay:
    """The relay's state; `clock` is what it believes the time is (advance it to expire messages)."""

    clock: Callable[[], float] = time.time
    cache_s: float = CACHE_DURATION_S
    burst: int = REQUEST_BURST
    replenish_s: float = REQUEST_REPLENISH_S
    daily_limit: int = DAILY_MESSAGE_LIMIT
    url: str = ""
    messages: list[Message] = field(default_factory=list)
    #: Every request as (method, path with query, status answered).
    log: list[tuple[str, str, int]] = field(default_factory=list)
    #: When set, every request is answered with this status (a relay that is down behind its proxy).
    failing: int | None = None
    offset_s: float = 0.0
    _tokens: float = -1.0
    _refilled: float = 0.0
    _published_today: int = 0
    _day: int = -1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return self.clock() + self.offset_s

    def advance(self, seconds: float) -> None:
        """Move the relay's clock on: messages older than the cache duration are forgotten."""
        self.offset_s += seconds

    def on_topic(self, topic: str) -> list[Message]:
        now = self.now()
        return [m for m in self.messages if m.topic == topic and m.expires > now]

    def topics(self) -> set[str]:
        return {m.topic for m in self.messages}

    def stored_text(self) -> str:
        """Everything the relay holds or was asked, as one string to scan for secrets."""
        return "\n".join([m.to_json() for m in self.messages] + [path for _, path, _ in self.log])

    # ------------------------------------------------------------------------------------------ limits

    def _take_request(self) -> bool:
        """ntfy's per-visitor token bucket (every visitor here is 127.0.0.1)."""
        now = self.now()
        if self._tokens < 0:
            self._tokens, self._refilled = float(self.burst), now
        self._tokens = min(float(self.burst), self._tokens + (now - self._refilled) / self.replenish_s)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def handle(self, method: str, target: str, body: bytes) -> tuple[int, str, str]:
        """(status, content type, body) for one request."""
        with self._lock:
            status, ctype, text = self._handle(method, target, body)
            self.log.append((method, target, status))
            return status, ctype, text

    def _handle(self, method: str, target: str, body: bytes) -> tuple[int, str, str]:
        if self.failing is not None:
            return self.failing, "text/plain", "relay unavailable"
        if not self._take_request():
            return _error(429, 42901, "limit reached: too many requests")
        parts = urlsplit(target)
        segments = [s for s in parts.path.split("/") if s]
        if method in ("POST", "PUT") and len(segments) == 1:
            return self._publish(segments[0], body)
        if method == "GET" and len(segments) == 2 and segments[1] == "json":
            return self._poll(segments[0], parse_qs(parts.query))
        return _error(404, 40401, "page not found")

    def _publish(self, topic: str, body: bytes) -> tuple[int, str, str]:
        if not TOPIC.match(topic):
            return _error(400, 40009, "invalid topic")
        if len(body) > MESSAGE_LIMIT_BYTES:
            return _error(413, 41301, "message too large, and attachments are not allowed")
        day = int(self.now() // 86400)  # ntfy resets visitor stats at midnight UTC (visitor-stats-reset-time)
        if day != self._day:
            self._day, self._published_today = day, 0
        if self._published_today >= self.daily_limit:
            return _error(429, 42908, "limit reached: daily message quota reached")
        self._published_today += 1
        now = self.now()
        message = Message(secrets.token_urlsafe(9), now, now + self.cache_s, topic, body.decode("utf-8", "replace"))
        self.messages.append(message)
        return 200, "application/json", message.to_json() + "\n"

    def _poll(self, topic: str, query: dict[str, list[str]]) -> tuple[int, str, str]:
        if not TOPIC.match(topic):
            return _error(400, 40009, "invalid topic")
        if query.get("poll", ["0"])[0] not in ("1", "true", "yes"):
            return _error(400, 40000, "this stand-in answers polls only (poll=1)")
        since = query.get("since", ["all"])[0]
        cached = self.on_topic(topic)
        if since not in ("all", ""):
            if since.isdigit():
                cached = [m for m in cached if m.time >= int(since)]
            else:
                ids = [m.id for m in cached]
                cached = cached[ids.index(since) + 1 :] if since in ids else cached
        return 200, "application/x-ndjson", "".join(m.to_json() + "\n" for m in cached)


def _error(status: int, code: int, error: str) -> tuple[int, str, str]:
    # ntfy's error body: {"code":…,"http":…,"error":…,"link":…}
    body = {"code": code, "http": status, "error": error, "link": "https://ntfy.sh/docs/publish/#limitations"}
    return status, "application/json", json.dumps(body) + "\n"


def start_relay(relay: NtfyRelay) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, ctype, text = relay.handle(self.command, self.path, body)
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    relay.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, name="ntfy-relay", daemon=True).start()
    return server


@pytest.fixture
def ntfy_relay(monkeypatch) -> Iterator[NtfyRelay]:
    """A stand-in relay for this test; BRIDGE_RELAY points at it (the client side and `bridge serve` children)."""
    relay = NtfyRelay()
    server = start_relay(relay)
    monkeypatch.setenv("BRIDGE_RELAY", relay.url)
    yield relay
    server.shutdown()
    server.server_close()
