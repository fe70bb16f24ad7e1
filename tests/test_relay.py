"""The relay rendezvous: with only the token, a client finds and follows the workstation through an ntfy relay.

Every test talks to the stand-in relay (tests/support/ntfy_relay.py), which speaks ntfy's publish and poll API
and enforces its limits (message size, cache expiry, request rate, daily quota).
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid

import mlflow
import pytest
import requests

from bridge import secrets
from bridge.client.link import discovery
from bridge.errors import ConfigError, DiscoveryError, PublishError, RecordError
from bridge.record import make_record
from bridge.rendezvous import (
    CACHE_DURATION_S,
    DEFAULT_RELAY,
    MESSAGE_LIMIT_BYTES,
    Rendezvous,
    relay_url,
)
from bridge.serve.entrance import Entrance
from bridge.serve.publisher import RelayPublisher
from bridge.serve.supervisor import ServeOptions, Supervisor
from tests.support.client import server_run
from tests.support.mlflow_server import free_port
from tests.support.ntfy_relay import TOPIC, NtfyRelay

TOKEN = "relay-test-token-" + "r" * 32
OTHER_TOKEN = "another-token-" + "o" * 32
PUBLIC_URL = "https://quick-brown-fox.trycloudflare.com"


def _record(url: str = PUBLIC_URL, token: str = TOKEN, instance: str = "serve-1", ttl_s: float = 3600):
    return make_record(url, token=token, instance=instance, mlflow_version="3", ttl_s=ttl_s)


def _publisher(relay: NtfyRelay, token: str = TOKEN) -> RelayPublisher:
    return RelayPublisher(relay.url, lambda: token)


# ------------------------------------------------------------------------------------------- derivation


def test_topic_and_key_come_from_the_token_and_reveal_nothing_of_it():
    one = Rendezvous.for_token(DEFAULT_RELAY, TOKEN)
    assert one == Rendezvous.for_token(DEFAULT_RELAY + "/", TOKEN)  # the same everywhere, every time
    assert TOPIC.match(one.topic) and len(one.topic) == 32  # 24 bytes: 192 bits, ntfy's topic alphabet
    other = Rendezvous.for_token(DEFAULT_RELAY, OTHER_TOKEN)
    assert other.topic != one.topic and other.key != one.key
    assert TOKEN not in one.topic and one.key not in TOKEN.encode()
    assert one.topic not in repr(one) and "ntfy.sh" in repr(one)

    text = _record().to_json()
    sealed, again = one.seal(text), one.seal(text)
    assert sealed != again  # a fresh nonce each time: two publishes of one record do not look alike
    assert one.open(sealed) == text and len(sealed) < MESSAGE_LIMIT_BYTES
    with pytest.raises(RecordError, match="does not open"):
        other.open(sealed)
    tampered = sealed[:-6] + ("A" if sealed[-6] != "A" else "B") + sealed[-5:]
    for junk in (tampered, "b1.!!!", "hello", "b1." + "A" * 20):
        with pytest.raises(RecordError):
            one.open(junk)


def test_relay_setting_accepts_a_url_or_off_and_refuses_the_rest():
    assert relay_url(None) == relay_url("") == DEFAULT_RELAY
    assert relay_url("off") is None and relay_url("NONE") is None
    assert relay_url("https://ntfy.example.org/") == "https://ntfy.example.org"
    with pytest.raises(ConfigError, match="plain http"):
        relay_url("http://ntfy.example.org")
    with pytest.raises(ConfigError, match="query"):
        relay_url("https://ntfy.example.org/?auth=x")
    with pytest.raises(ConfigError):
        ServeOptions(relay="ftp://x")
    with pytest.raises(ConfigError, match="query"):
        ServeOptions(relay="https://ntfy.example.org/?auth=x")
    assert ServeOptions(relay="off").relay is None
    assert ServeOptions(relay="https://ntfy.example.org/").relay == "https://ntfy.example.org"
    with pytest.raises(ConfigError, match="relay-republish"):
        ServeOptions(relay_republish_s=5)


# ------------------------------------------------------------------------------------ publish, discover


def test_publish_then_discover_with_only_the_token(ntfy_relay, monkeypatch):
    _publisher(ntfy_relay).publish(_record())
    monkeypatch.setenv("BRIDGE_TOKEN", TOKEN)
    endpoint = discovery.find_endpoint(None, discovery.find_token())
    assert endpoint.url == PUBLIC_URL and endpoint.source.startswith("relay http://127.0.0.1")
    assert endpoint.record is not None and endpoint.record.instance == "serve-1"
    # One POST to one topic, one poll of it: nothing else was asked of the relay.
    assert [(m, s) for m, _, s in ntfy_relay.log] == [("POST", 200), ("GET", 200)]


def test_the_newest_record_that_opens_and_verifies_wins_and_junk_is_skipped(ntfy_relay, monkeypatch):
    publisher = _publisher(ntfy_relay)
    publisher.publish(_record("https://old.trycloudflare.com"))
    topic = Rendezvous.for_token(ntfy_relay.url, TOKEN).topic
    publisher.publish(_record("https://new.trycloudflare.com"))
    # Anyone holding the topic can post; none of it opens, or verifies (sealed by another token's key).
    requests.post(f"{ntfy_relay.url}/{topic}", data=b"b1.AAAAjunkjunkjunkjunkjunkjunkjunkjunk", timeout=5)
    requests.post(f"{ntfy_relay.url}/{topic}", data=b'{"url": "https://evil.example"}', timeout=5)
    forged = Rendezvous(ntfy_relay.url, topic, Rendezvous.for_token(ntfy_relay.url, OTHER_TOKEN).key)
    requests.post(f"{ntfy_relay.url}/{topic}", data=forged.seal(_record("https://evil.example").to_json()), timeout=5)
    assert discovery.find_endpoint(None, TOKEN).url == "https://new.trycloudflare.com"


def test_a_wrong_token_learns_nothing(ntfy_relay):
    _publisher(ntfy_relay).publish(_record())
    with pytest.raises(DiscoveryError, match="holds no record for this access token") as caught:
        discovery.find_endpoint(None, OTHER_TOKEN)
    assert PUBLIC_URL not in str(caught.value)
    # Its topic is another one, and the message on ours does not open with its key.
    wrong = Rendezvous.for_token(ntfy_relay.url, OTHER_TOKEN)
    assert ntfy_relay.on_topic(wrong.topic) == []
    (message,) = ntfy_relay.messages
    with pytest.raises(RecordError):
        wrong.open(message.message)


def test_the_relay_stores_no_plaintext_url_token_or_record(ntfy_relay):
    record = _record()
    _publisher(ntfy_relay).publish(record)
    discovery.find_endpoint(None, TOKEN)
    seen = ntfy_relay.stored_text()
    for secret_or_plain in (
        TOKEN,
        PUBLIC_URL,
        "trycloudflare",
        record.signature,
        record.instance,
        '"url"',
        "issued_at",
        "bridge",
    ):
        assert secret_or_plain not in seen, secret_or_plain
    (message,) = ntfy_relay.messages
    assert re.fullmatch(r"b1\.[-_A-Za-z0-9]+=*", message.message)


def test_rotating_the_token_moves_the_rendezvous(ntfy_relay):
    token = {"now": TOKEN}
    publisher = RelayPublisher(ntfy_relay.url, lambda: token["now"])
    publisher.publish(_record(token=TOKEN))
    old = Rendezvous.for_token(ntfy_relay.url, TOKEN).topic
    token["now"] = OTHER_TOKEN
    publisher.publish(_record("https://moved.trycloudflare.com", token=OTHER_TOKEN))
    new = Rendezvous.for_token(ntfy_relay.url, OTHER_TOKEN).topic
    assert len(ntfy_relay.on_topic(old)) == 1 and len(ntfy_relay.on_topic(new)) == 1
    assert discovery.find_endpoint(None, OTHER_TOKEN).url == "https://moved.trycloudflare.com"
    publisher.publish(_record("https://again.trycloudflare.com", token=OTHER_TOKEN))
    assert len(ntfy_relay.on_topic(old)) == 1, "the old topic got something new after the rotation"


# --------------------------------------------------------------------------------------------- limits


def test_the_relays_limits_become_clear_publish_errors_without_the_topic(ntfy_relay):
    publisher = _publisher(ntfy_relay)
    topic = Rendezvous.for_token(ntfy_relay.url, TOKEN).topic
    # 4,096 bytes at most per message: a record that would not fit is refused before it is sent.
    huge = _record(PUBLIC_URL + "/" + "p" * 4000)
    with pytest.raises(PublishError, match="4096"):
        publisher.publish(huge)
    assert ntfy_relay.log == []
    assert requests.post(f"{ntfy_relay.url}/{topic}", data=b"x" * 4097, timeout=5).status_code == 413

    # The request bucket: 60, then one per 5 s; past it 429.
    ntfy_relay._tokens, ntfy_relay._refilled = 0.0, ntfy_relay.now()
    with pytest.raises(PublishError, match="429") as caught:
        publisher.publish(_record())
    assert topic not in str(caught.value)

    # The daily message quota (ntfy.sh's free tier: 250): 429 as well.
    ntfy_relay.advance(10)  # two requests' worth of bucket
    ntfy_relay._published_today, ntfy_relay._day = ntfy_relay.daily_limit, int(ntfy_relay.now() // 86400)
    with pytest.raises(PublishError, match="daily message quota"):
        publisher.publish(_record())

    ntfy_relay.failing = 503
    with pytest.raises(PublishError, match="503") as caught:
        publisher.publish(_record())
    assert topic not in str(caught.value)


def test_relay_down_is_a_clear_error_and_other_sources_still_answer(ntfy_relay, monkeypatch, tmp_path):
    _publisher(ntfy_relay).publish(_record())
    ntfy_relay.failing = 502
    with pytest.raises(DiscoveryError, match=r"relay http://127\.0\.0\.1:\d+ .*answered HTTP 502") as caught:
        discovery.find_endpoint(None, TOKEN)
    assert Rendezvous.for_token(ntfy_relay.url, TOKEN).topic not in str(caught.value)

    record_file = tmp_path / "endpoint.json"
    record_file.write_text(_record("https://from-the-file.example").to_json())
    monkeypatch.setenv("BRIDGE_DISCOVERY", f"file:{record_file}")
    assert discovery.find_endpoint(None, TOKEN).url == "https://from-the-file.example"

    # The relay unreachable altogether: the same.
    monkeypatch.setenv("BRIDGE_RELAY", f"http://127.0.0.1:{free_port()}")
    record_file.unlink()
    with pytest.raises(DiscoveryError, match=r"could not be reached \(ConnectionError\)"):
        discovery.find_endpoint(None, TOKEN)
    monkeypatch.setenv("BRIDGE_RELAY", "off")
    with pytest.raises(DiscoveryError, match="BRIDGE_RELAY is off"):
        discovery.find_endpoint(None, TOKEN)


def _supervisor(relay: NtfyRelay, **options) -> Supervisor:
    """A supervisor with a named, never started entrance and a public URL: enough to publish."""
    supervisor = Supervisor(ServeOptions(port=free_port(), tunnel="none", relay=relay.url, **options))
    supervisor.entrance = Entrance(supervisor.options.port, port=free_port())
    supervisor.record_url = PUBLIC_URL
    return supervisor


def _on_relay(relay: NtfyRelay, token: str) -> str:
    """The URL the relay alone gives (the supervisor also writes the local record, which discovery reads first)."""
    return discovery._verified_endpoint(discovery._Spec("relay", relay.url), token, timeout=5).url


def test_an_expired_message_is_republished_before_and_after_the_relay_forgets(ntfy_relay, bridge_home):
    # Republishing every 24 h would be too late: the relay says when it forgets (ntfy's "expires"), and that wins.
    supervisor = _supervisor(ntfy_relay, relay_republish_s=24 * 3600)
    token = secrets.access_token(create=True)
    try:
        supervisor._publish()
        assert supervisor.last_relay and supervisor.last_relay["ok"], supervisor.last_relay
        assert supervisor._next_relay_at <= time.time() + CACHE_DURATION_S / 2 + 5
        assert _on_relay(ntfy_relay, token) == PUBLIC_URL

        ntfy_relay.advance(CACHE_DURATION_S + 1)  # the republish did not happen (the machine slept): forgotten
        with pytest.raises(DiscoveryError, match="holds no record"):
            _on_relay(ntfy_relay, token)
        supervisor._next_relay_at = 0  # as the clock would have it now
        supervisor._tick()
        assert _on_relay(ntfy_relay, token) == PUBLIC_URL
        assert len(ntfy_relay.messages) == 2
        # Nothing changed and nothing is due: another tick publishes nothing more.
        supervisor._tick()
        assert len(ntfy_relay.messages) == 2
        state = supervisor.state()
        assert state["relay"]["target"].startswith("relay http://127.0.0.1")
        assert Rendezvous.for_token(ntfy_relay.url, token).topic not in json.dumps(state)

        # A relay refusing (429) is retried with a backoff of its own, and the failure is in the state.
        ntfy_relay._tokens, ntfy_relay._refilled = 0.0, ntfy_relay.now()
        supervisor._next_relay_at = 0
        supervisor._tick()
        assert supervisor.last_relay["ok"] is False and "429" in supervisor.last_relay["error"]
        assert supervisor._next_relay_at >= time.time() + 4
    finally:
        supervisor.stop()


def test_no_relay_is_used_without_a_tunnel(ntfy_relay, bridge_home):
    supervisor = Supervisor(ServeOptions(port=free_port(), tunnel="none", relay=ntfy_relay.url))
    assert supervisor.relay is not None
    off = Supervisor(ServeOptions(port=free_port(), tunnel="none", relay=None))
    assert off.relay is None and off.state()["relay"]["note"].startswith("switched off")


# ------------------------------------------------------------------------------- a client follows a move


def test_a_connected_client_follows_a_url_change_through_the_relay(
    ntfy_relay, mlflow_server, make_flaky_proxy, bridge_connect, server_client, monkeypatch, capsys
):
    """Only BRIDGE_TOKEN in the environment: connect finds the URL on the relay and follows it when it moves."""
    monkeypatch.setenv("BRIDGE_HTTP_TIMEOUT_S", "1")
    monkeypatch.setenv("BRIDGE_TOKEN", TOKEN)
    old = make_flaky_proxy("127.0.0.1", mlflow_server.port)
    new = make_flaky_proxy("127.0.0.1", mlflow_server.port)
    publisher = _publisher(ntfy_relay)
    publisher.publish(_record(old.url, instance="serve-1"))
    experiment = f"relay-moved-{uuid.uuid4().hex[:8]}"
    conn = bridge_connect(None, None, experiment=experiment)
    assert conn.url == old.url
    with mlflow.start_run(run_name="moved") as run:
        mlflow.log_metric("before", 1.0)
        assert conn.flush(20) == 0
        old.set_mode("refuse")  # the tunnel was replaced…
        publisher.publish(_record(new.url, instance="serve-1"))  # …and `bridge serve` published the new URL
        moved_at = time.monotonic()
        mlflow.log_metric("after", 2.0)
        deadline = time.monotonic() + 90
        while conn.url != new.url:
            assert time.monotonic() < deadline, "the client did not follow the URL change"
            conn.flush(0.1)
        followed_s = time.monotonic() - moved_at
    assert conn.flush(30) == 0
    delivered_s = time.monotonic() - moved_at
    metrics = server_run(server_client, experiment).data.metrics
    assert metrics == {"before": 1.0, "after": 2.0}
    assert run.info.run_id
    with capsys.disabled():
        print(
            f"\nrelay follow: client on the new URL {followed_s:.1f} s after it was published, all delivered at "
            f"{delivered_s:.1f} s (defaults: re-discovery after 3 failures over 5 s)"
        )
    assert followed_s < 60


# ---------------------------------------------------------------------------------- bridge serve, whole


def _wait_for(predicate, timeout: float = 60, what: str = "a condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.integration  # a `bridge serve` child with the stand-in cloudflared
def test_bridge_serve_publishes_to_the_relay_says_where_follows_changes_and_rotation_moves_it(
    ntfy_relay, own_bridge_serve, fake_cloudflared
):
    import signal

    server = own_bridge_serve("--tunnel", "cloudflared", env_extra=fake_cloudflared.env)
    token = server.token()
    first_url = server.state()["tunnel"]["public_url"]
    topic = Rendezvous.for_token(ntfy_relay.url, token).topic
    _wait_for(lambda: ntfy_relay.on_topic(topic), what="the record on the relay")
    assert _on_relay(ntfy_relay, token) == first_url

    # Said once at start, and in `bridge status`: the relay's host, that the topic is the token's; never the topic.
    out = server.output()
    assert "Relay" in out and f"relay {ntfy_relay.url} (token-derived topic)" in out, out
    assert f'os.environ["BRIDGE_RELAY"] = "{ntfy_relay.url}"' in out and 'os.environ["BRIDGE_URL"]' not in out
    status = server.cli("status")
    assert "Relay" in status.stdout and "token-derived topic" in status.stdout, status.stdout
    for text in (out, status.stdout + status.stderr, (server.home / "serve-state.json").read_text()):
        assert topic not in text and token not in text

    # A new tunnel URL goes to the relay at once.
    for pid in fake_cloudflared.agent_pids():
        os.kill(pid, signal.SIGKILL)

    def moved():
        s = server.state()
        url = s and s["tunnel"]["public_url"]
        relay = (s and (s.get("relay") or {}).get("last")) or {}
        return url if url and url != first_url and relay.get("url") == url and relay.get("ok") else None

    second_url = _wait_for(moved, what="the new URL on the relay")
    assert _on_relay(ntfy_relay, token) == second_url

    # `bridge token --rotate` moves the rendezvous: the new token's topic gets the record, the old one nothing more.
    rotated = server.cli("token", "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    new_token = rotated.stdout.strip().splitlines()[-1]
    new_topic = Rendezvous.for_token(ntfy_relay.url, new_token).topic
    _wait_for(lambda: ntfy_relay.on_topic(new_topic), what="the record on the new token's topic")
    old_count = len(ntfy_relay.on_topic(topic))
    assert _on_relay(ntfy_relay, new_token) == second_url
    time.sleep(1.5)  # a few supervisor ticks
    assert len(ntfy_relay.on_topic(topic)) == old_count
    assert server.stop() == 0
    for secret in (token, new_token):
        assert secret not in ntfy_relay.stored_text()


def test_an_old_genuine_message_posted_again_does_not_win(ntfy_relay):
    """Whoever holds the topic may re-post an earlier ciphertext; the record issued last still wins."""
    publisher = _publisher(ntfy_relay)
    publisher.publish(_record("https://old.trycloudflare.com", instance="replayed"))
    (old,) = ntfy_relay.messages
    time.sleep(0.01)
    publisher.publish(_record("https://new.trycloudflare.com", instance="replayed"))
    requests.post(f"{ntfy_relay.url}/{old.topic}", data=old.message.encode(), timeout=5)  # the replay comes last
    assert discovery.find_endpoint(None, TOKEN).url == "https://new.trycloudflare.com"


def test_connect_takes_the_relay_as_an_argument_and_exports_it(ntfy_relay, monkeypatch):
    from bridge.client.connect import connect

    monkeypatch.setenv("BRIDGE_RELAY", "off")

    def stop_here(url, token):  # discovery itself is tested above: only the export is of interest here
        raise RuntimeError("stop here")

    monkeypatch.setattr("bridge.client.connect._resolve", stop_here)
    with pytest.raises(RuntimeError):
        connect(token=TOKEN, relay=ntfy_relay.url)
    assert os.environ["BRIDGE_RELAY"] == ntfy_relay.url
    with pytest.raises(RuntimeError):
        connect(token=TOKEN, relay="off")
    assert os.environ["BRIDGE_RELAY"] == "off"
    with pytest.raises(ConfigError, match="plain http"):
        connect(token=TOKEN, relay="http://relay.example")


def test_rediscovery_through_a_rate_limited_relay_returns_nothing_and_never_raises(ntfy_relay):
    _publisher(ntfy_relay).publish(_record("https://moved.trycloudflare.com"))
    ntfy_relay._tokens, ntfy_relay._refilled = 0.0, ntfy_relay.now()
    assert discovery.rediscover(TOKEN, PUBLIC_URL, interval_s=0) is None  # 429: the last good URL stays
    ntfy_relay.advance(5)
    moved = discovery.rediscover(TOKEN, PUBLIC_URL, interval_s=0)
    assert moved is not None and moved.url == "https://moved.trycloudflare.com"
    assert [s for _, _, s in ntfy_relay.log] == [200, 429, 200]
