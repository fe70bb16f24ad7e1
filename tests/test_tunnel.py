"""The tunnels: real pyngrok launching the stand-in ngrok agent (tests/support/fake_ngrok.py), and bridge's
cloudflared runner launching the stand-in cloudflared (tests/support/fake_cloudflared.py).

The first tests are ngrok's own (authtoken, edge auth, domains, error codes); the shared suite at the end runs
every test once per tunnel kind (`tunnel_agent`)."""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import logging
import os
import re
import signal
import stat
import subprocess
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from bridge import secrets
from bridge.errors import ConfigError, NgrokAgentRunningError, NgrokAuthtokenError, NgrokBinaryError, TunnelError
from bridge.serve.public_tunnel import PublicTunnel
from bridge.serve.tunnel import (
    Tunnel,
    TunnelConfig,
    default_config_path,
    resolve_authtoken,
    resolve_ngrok_path,
)
from bridge.serve.tunnel_cloudflared import (
    CloudflaredBinaryError,
    CloudflaredConfig,
    CloudflaredTunnel,
    resolve_cloudflared_path,
)
from tests.support.mlflow_server import closed_url, free_port
from tests.support.tunnel import open_tunnel, write_agent_executable

PUBLIC_URL = r"^https://[0-9a-f]{12}\.ngrok-free\.app$"


class _Echo(BaseHTTPRequestHandler):
    """Answers with what arrived: method, path, headers and the body's length and sha256."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path.startswith("/bytes/"):
            payload = b"x" * int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        payload = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": dict(self.headers.items()),
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def echo_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def tunnel_factory(fake_ngrok, echo_server):
    """Tunnels to the echo server, closed at teardown."""
    made: list[Tunnel] = []

    def make(config: TunnelConfig | None = None) -> Tunnel:
        tunnel = Tunnel(echo_server, config or TunnelConfig.from_environment())
        made.append(tunnel)
        return tunnel

    yield make
    for tunnel in made:
        tunnel.close()


def test_request_through_tunnel_arrives_with_public_host_and_forwarded_headers(fake_ngrok, tunnel_factory):
    tunnel = tunnel_factory()
    url = tunnel.open()
    assert __import__("re").match(PUBLIC_URL, url)
    host = urlsplit(url).netloc
    local = fake_ngrok.local_url(url)

    body = os.urandom(1_500_000)
    reply = requests.post(
        f"{local}/api/2.0/mlflow/runs/log-batch?a=1&b=%2F",
        data=body,
        headers={"X-Forwarded-For": "203.0.113.7"},
        timeout=10,
    )

    assert reply.status_code == 200
    seen = reply.json()
    assert seen["method"] == "POST"
    assert seen["path"] == "/api/2.0/mlflow/runs/log-batch?a=1&b=%2F"
    assert seen["headers"]["Host"] == host
    assert seen["headers"]["X-Forwarded-Host"] == host
    assert seen["headers"]["X-Forwarded-Proto"] == "https"
    assert seen["headers"]["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"
    assert seen["headers"]["User-Agent"].startswith("python-requests/")  # the client's headers, not the proxy's
    assert seen["body_len"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()

    small = b'{"run_id": "r1", "metrics": []}'
    seen = requests.post(f"{local}/api/2.0/mlflow/runs/log-batch", data=small, timeout=10).json()
    assert (seen["body_len"], seen["headers"]["Host"]) == (len(small), host)
    assert seen["body_sha256"] == hashlib.sha256(small).hexdigest()

    download = requests.get(f"{local}/bytes/3000000", timeout=10)
    assert download.status_code == 200 and len(download.content) == 3_000_000
    assert tunnel.healthy()


def test_authtoken_stays_off_the_agent_command_line_and_in_a_0600_file(fake_ngrok, tunnel_factory):
    tunnel = tunnel_factory()
    tunnel.open()
    [pid] = fake_ngrok.agent_pids()
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert fake_ngrok.authtoken.encode() not in cmdline
    assert stat.S_IMODE(tunnel.config_path.stat().st_mode) == 0o600
    assert fake_ngrok.authtoken in tunnel.config_path.read_text()


def test_edge_basic_auth_is_opt_in_and_enforced(fake_ngrok, tunnel_factory):
    open_url = tunnel_factory().open()
    assert requests.get(fake_ngrok.local_url(open_url) + "/x", timeout=5).status_code == 200

    locked = tunnel_factory(TunnelConfig.from_environment(edge_auth=("bridge", "edge-password-1")))
    local = fake_ngrok.local_url(locked.open())
    missing = requests.get(local + "/x", timeout=5)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Basic")
    assert requests.get(local + "/x", auth=("bridge", "wrong-password"), timeout=5).status_code == 401
    ok = requests.get(local + "/x", auth=("bridge", "edge-password-1"), timeout=5)
    assert ok.status_code == 200
    expected = "Basic " + base64.b64encode(b"bridge:edge-password-1").decode()
    assert ok.json()["headers"]["Authorization"] == expected


def test_killed_agent_is_unhealthy_and_reopening_gives_a_working_new_url(fake_ngrok, tunnel_factory):
    tunnel = tunnel_factory()
    first = tunnel.open()
    first_local = fake_ngrok.local_url(first)
    assert tunnel.healthy()

    [pid] = fake_ngrok.agent_pids()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while tunnel.healthy() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not tunnel.healthy()
    with pytest.raises(requests.ConnectionError):
        requests.get(first_local + "/x", timeout=2)

    tunnel.close()
    second = tunnel.open()
    assert second != first
    assert requests.get(fake_ngrok.local_url(second) + "/x", timeout=5).status_code == 200
    assert tunnel.healthy()


def test_close_stops_the_agent_and_its_forwarders(fake_ngrok, tunnel_factory):
    tunnel = tunnel_factory()
    local = fake_ngrok.local_url(tunnel.open())
    tunnel.close()
    assert not tunnel.healthy()
    assert fake_ngrok.agent_pids() == []
    with pytest.raises(requests.ConnectionError):
        requests.get(local + "/x", timeout=2)
    tunnel.close()  # idempotent


def test_reserved_domain_becomes_the_public_url(fake_ngrok, tunnel_factory):
    tunnel = tunnel_factory(TunnelConfig.from_environment(domain="https://My-Lab.ngrok-free.app/"))
    url = tunnel.open()
    assert url == "https://my-lab.ngrok-free.app"
    seen = requests.get(fake_ngrok.local_url(url) + "/x", timeout=5).json()
    assert seen["headers"]["Host"] == "my-lab.ngrok-free.app"


def test_no_authtoken_raises_err_4018_as_an_actionable_error(fake_ngrok, tunnel_factory, monkeypatch):
    monkeypatch.delenv("NGROK_AUTHTOKEN")
    assert resolve_authtoken() is None
    tunnel = tunnel_factory(TunnelConfig.from_environment())
    with pytest.raises(NgrokAuthtokenError) as info:
        tunnel.open()
    message = str(info.value)
    assert "ERR_NGROK_4018" in message and "bridge login" in message and "NGROK_AUTHTOKEN" in message
    assert fake_ngrok.agent_pids() == []


def test_refused_authtoken_is_an_authtoken_error_without_the_token(fake_ngrok, tunnel_factory, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-token-5e5e5e5e5e5e5e5e"
    tunnel = tunnel_factory(TunnelConfig(wrong, ngrok_path=str(fake_ngrok.path)))
    with pytest.raises(NgrokAuthtokenError) as info:
        tunnel.open()
    assert "ERR_NGROK_105" in str(info.value)
    assert wrong not in str(info.value) and wrong not in repr(info.value)
    chain = "".join(traceback.format_exception(info.value))
    assert "ERR_NGROK_105" in chain and wrong not in chain  # the pyngrok error chained as __cause__ is scrubbed
    assert "Your authtoken: ***" in caplog.text  # the agent echoed it; the log shows it redacted
    assert wrong not in caplog.text


def test_another_running_agent_raises_err_108(fake_ngrok, tunnel_factory, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_NGROK_SESSION_LOCK", str(fake_ngrok.session_lock))
    other_config = tmp_path / "other-ngrok.yml"
    other_config.write_text(f'version: "2"\nauthtoken: {fake_ngrok.authtoken}\nweb_addr: 127.0.0.1:{free_port()}\n')
    other = subprocess.Popen(
        [str(fake_ngrok.path), "start", "--none", "--log", "stdout", "--config", str(other_config)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for line in other.stdout:
            if "client session established" in line:
                break
        with pytest.raises(NgrokAgentRunningError) as info:
            tunnel_factory().open()
        message = str(info.value)
        assert "ERR_NGROK_108" in message and "dashboard.ngrok.com/agents" in message
        assert fake_ngrok.authtoken not in message
    finally:
        other.kill()
        other.wait()
    # With the other agent gone, the same tunnel opens.
    assert tunnel_factory().open()


def test_missing_binary_that_cannot_be_downloaded_raises_binary_error_quickly(monkeypatch, tmp_path):
    missing = tmp_path / "no-such-dir" / "ngrok"
    monkeypatch.setenv("BRIDGE_NGROK_PATH", str(missing))
    # pyngrok's download goes through urllib, which honours the proxy variables: a closed local port refuses it
    # at once, whatever DNS does here.
    dead = closed_url()
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, dead)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    token = "tok-never-shown-1234567890"
    tunnel = Tunnel("http://127.0.0.1:9", TunnelConfig(token, ngrok_path=resolve_ngrok_path()))
    started = time.monotonic()
    with pytest.raises(NgrokBinaryError) as info:
        tunnel.open()
    assert time.monotonic() - started < 15
    message = str(info.value)
    assert "snap install ngrok" in message and "BRIDGE_NGROK_PATH" in message
    assert token not in message
    assert not missing.exists()


def test_binary_that_cannot_execute_raises_binary_error(tmp_path):
    binary = tmp_path / "ngrok"
    binary.write_text("not a program\n")
    binary.chmod(0o644)
    tunnel = Tunnel("http://127.0.0.1:9", TunnelConfig("tok-abcdef-123456", ngrok_path=str(binary)))
    with pytest.raises(NgrokBinaryError, match="could not be started"):
        tunnel.open()


def test_agent_that_never_reaches_ngrok_fails_at_the_startup_deadline(fake_ngrok, tunnel_factory, monkeypatch):
    monkeypatch.setenv("FAKE_NGROK_OFFLINE", "1")
    # The agent's "failed to dial" line must come before the deadline, or pyngrok has no error to report: the
    # stand-in needs about 0.7 s to print it on an idle machine (Python start, aiohttp import), so leave it 6 s.
    tunnel = tunnel_factory(TunnelConfig(fake_ngrok.authtoken, ngrok_path=str(fake_ngrok.path), startup_timeout_s=6))
    started = time.monotonic()
    with pytest.raises(TunnelError) as info:
        tunnel.open()
    assert time.monotonic() - started < 30  # given up at the deadline: the real agent would retry forever
    assert type(info.value) is TunnelError
    assert "failed to dial ngrok server" in str(info.value)
    assert fake_ngrok.agent_pids() == []


def test_no_secret_reaches_the_logs(fake_ngrok, tunnel_factory, caplog):
    caplog.set_level(logging.DEBUG)
    tunnel = tunnel_factory(TunnelConfig.from_environment(edge_auth=("bridge", "edge-password-2")))
    requests.get(fake_ngrok.local_url(tunnel.open()) + "/x", auth=("bridge", "edge-password-2"), timeout=5)
    tunnel.close()
    assert "Creating tunnel with options" in caplog.text  # pyngrok did log the options …
    assert fake_ngrok.authtoken not in caplog.text  # … without the secrets
    assert "edge-password-2" not in caplog.text


def test_config_validates_and_its_repr_hides_secrets():
    config = TunnelConfig("secret-authtoken-xyz", domain="lab.ngrok.app", edge_auth=("me", "a-long-password"))
    text = repr(config)
    assert "secret-authtoken-xyz" not in text and "a-long-password" not in text
    assert "lab.ngrok.app" in text and "<set>" in text
    with pytest.raises(ConfigError, match="host name"):
        TunnelConfig("t", domain="not a domain")
    with pytest.raises(ConfigError, match="8 to 128"):
        TunnelConfig("t", edge_auth=("me", "short"))
    with pytest.raises(ConfigError, match="':'"):
        TunnelConfig("t", edge_auth=("a:b", "long-enough-pass"))
    with pytest.raises(ConfigError, match="whitespace"):
        TunnelConfig("has space")
    with pytest.raises(ConfigError, match="with a port"):
        Tunnel("ftp://127.0.0.1", config)


def test_authtoken_resolution_prefers_the_environment_read_at_call_time(monkeypatch):
    assert resolve_authtoken() is None
    secrets.set_secret(secrets.NGROK_AUTHTOKEN, "from-keyring")
    assert resolve_authtoken() == "from-keyring"
    monkeypatch.setenv("NGROK_AUTHTOKEN", "from-env")
    assert resolve_authtoken() == "from-env"  # the same order as secrets.github_token()


def test_ngrok_path_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("BRIDGE_NGROK_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert resolve_ngrok_path() is None
    on_path = write_agent_executable(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert resolve_ngrok_path() == str(on_path)
    monkeypatch.setenv("BRIDGE_NGROK_PATH", "/opt/ngrok/ngrok")
    assert resolve_ngrok_path() == "/opt/ngrok/ngrok"


def test_snap_ngrok_gets_a_config_file_it_may_read(monkeypatch, tmp_path):
    monkeypatch.delenv("BRIDGE_HOME")
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    snap_path = default_config_path("/snap/bin/ngrok")
    assert snap_path.parent == tmp_path / "snap" / "ngrok" / "common"
    assert default_config_path("/usr/local/bin/ngrok") == tmp_path / ".config" / "bridge" / "ngrok.yml"


# --- the shared suite: each test below runs against the stand-in ngrok agent and the stand-in cloudflared ------


@pytest.fixture
def kind_tunnels(tunnel_agent, echo_server):
    """Tunnels of the parametrized kind to the echo server, closed at teardown."""
    made = []

    def make(**overrides):
        tunnel = open_tunnel(tunnel_agent, echo_server, **overrides)
        made.append(tunnel)
        return tunnel

    yield make
    for tunnel in made:
        tunnel.close()


def test_every_tunnel_forwards_with_the_public_host_and_names_the_client(tunnel_agent, kind_tunnels):
    tunnel = kind_tunnels()
    url = tunnel.open()
    assert re.match(tunnel_agent.url_pattern, url)
    host = urlsplit(url).netloc
    local = tunnel_agent.local_url(url)

    body = os.urandom(1_200_000)  # streamed both ways
    headers = {"X-Forwarded-For": "203.0.113.7", "X-Stand-In-Peer": "198.51.100.9"}
    seen = requests.post(
        f"{local}/api/2.0/mlflow/runs/log-batch?a=1&b=%2F", data=body, headers=headers, timeout=10
    ).json()
    assert seen["path"] == "/api/2.0/mlflow/runs/log-batch?a=1&b=%2F"
    assert seen["headers"]["Host"] == host
    assert seen["headers"]["X-Forwarded-Proto"] == "https"
    assert seen["body_len"] == len(body) and seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    # The header the entrance throttles by names the client the edge saw, whatever the client claimed.
    assert tunnel.client_header in seen["headers"]
    named = seen["headers"][tunnel.client_header].rsplit(",", 1)[-1].strip()
    assert named == ("198.51.100.9" if tunnel_agent.kind == "cloudflared" else "127.0.0.1")
    if tunnel_agent.kind == "cloudflared":
        spoofed = requests.get(f"{local}/x", headers={"Cf-Connecting-Ip": "10.9.9.9"}, timeout=10).json()
        assert spoofed["headers"]["Cf-Connecting-Ip"] == "127.0.0.1"
        assert spoofed["headers"]["X-Forwarded-For"] == "127.0.0.1"

    download = requests.get(f"{local}/bytes/3000000", timeout=10)
    assert download.status_code == 200 and len(download.content) == 3_000_000
    assert tunnel.healthy()


def test_every_tunnel_notices_a_killed_agent_and_reopens_at_a_new_url(tunnel_agent, kind_tunnels):
    tunnel = kind_tunnels()
    first = tunnel.open()
    first_local = tunnel_agent.local_url(first)
    [pid] = tunnel_agent.agent_pids()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while tunnel.healthy() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not tunnel.healthy()
    with pytest.raises(requests.ConnectionError):
        requests.get(first_local + "/x", timeout=2)

    second = tunnel.open()
    assert second != first and re.match(tunnel_agent.url_pattern, second)
    assert requests.get(tunnel_agent.local_url(second) + "/x", timeout=5).status_code == 200
    assert tunnel.healthy()
    assert len(tunnel_agent.agent_pids()) == 1


def test_every_tunnel_leaves_nothing_running_after_close(tunnel_agent, kind_tunnels):
    tunnel = kind_tunnels()
    local = tunnel_agent.local_url(tunnel.open())
    tunnel.close()
    assert not tunnel.healthy() and tunnel.public_url is None
    assert tunnel_agent.agent_pids() == []
    with pytest.raises(requests.ConnectionError):
        requests.get(local + "/x", timeout=2)
    tunnel.close()  # idempotent


def test_every_tunnel_that_cannot_reach_its_cloud_fails_with_the_agents_reason(tunnel_agent, kind_tunnels, monkeypatch):
    monkeypatch.setenv("FAKE_NGROK_OFFLINE" if tunnel_agent.kind == "ngrok" else "FAKE_CLOUDFLARED_OFFLINE", "1")
    tunnel = kind_tunnels(startup_timeout_s=6)
    started = time.monotonic()
    with pytest.raises(TunnelError) as info:
        tunnel.open()
    assert time.monotonic() - started < 30
    expected = "failed to dial ngrok server" if tunnel_agent.kind == "ngrok" else "failed to request quick Tunnel"
    assert expected in str(info.value)
    assert tunnel_agent.agent_pids() == []


def test_every_tunnel_gives_up_at_its_start_deadline(fake_cloudflared, monkeypatch):
    # ngrok's deadline is the same test above (its offline agent retries for ever); cloudflared's retries too.
    monkeypatch.setenv("FAKE_CLOUDFLARED_HANG", "1")
    tunnel = open_tunnel(fake_cloudflared, "http://127.0.0.1:9", startup_timeout_s=4)
    started = time.monotonic()
    with pytest.raises(TunnelError, match=r"no working quick tunnel within 4 s.*Retrying quick Tunnel"):
        tunnel.open()
    assert 3.5 < time.monotonic() - started < 15
    assert fake_cloudflared.agent_pids() == []


def test_every_tunnel_names_a_binary_that_cannot_run(tunnel_agent, tmp_path):
    binary = tmp_path / tunnel_agent.kind
    binary.write_text("not a program\n")
    binary.chmod(0o644)
    agent = type(tunnel_agent)(path=binary, state_file=tunnel_agent.state_file, session_lock=tmp_path / "l")
    tunnel = open_tunnel(agent, "http://127.0.0.1:9", startup_timeout_s=5)
    error = NgrokBinaryError if tunnel_agent.kind == "ngrok" else CloudflaredBinaryError
    with pytest.raises(error, match="could not be started"):
        tunnel.open()


def test_missing_cloudflared_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.delenv("BRIDGE_CLOUDFLARED_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert resolve_cloudflared_path() is None
    tunnel = CloudflaredTunnel("http://127.0.0.1:9", CloudflaredConfig.from_environment())
    with pytest.raises(CloudflaredBinaryError, match="BRIDGE_CLOUDFLARED_PATH") as info:
        tunnel.open()
    assert "cloudflared" in str(info.value) and "github.com/cloudflare/cloudflared" in str(info.value)
    on_path = write_agent_executable(tmp_path / "bin", "cloudflared")
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert resolve_cloudflared_path() == str(on_path)
    with pytest.raises(ConfigError, match="with a port"):
        CloudflaredTunnel("http://127.0.0.1", CloudflaredConfig("x"))
    with pytest.raises(ConfigError, match="positive"):
        CloudflaredConfig("x", startup_timeout_s=0)


def test_both_tunnel_kinds_are_public_tunnels(tmp_path):
    """The supervisor holds either kind as a `PublicTunnel`: both have its attributes and its calls, as declared."""
    tunnels = [
        Tunnel("http://127.0.0.1:9", TunnelConfig("tok-abcdef-123456", ngrok_path=str(tmp_path / "ngrok"))),
        CloudflaredTunnel("http://127.0.0.1:9", CloudflaredConfig(str(tmp_path / "cloudflared"))),
    ]
    for tunnel in tunnels:
        assert isinstance(tunnel, PublicTunnel)
        assert tunnel.public_url is None and tunnel.target_url == "http://127.0.0.1:9"
        for call in ("open", "healthy", "alive", "close"):
            assert inspect.signature(getattr(type(tunnel), call)) == inspect.signature(getattr(PublicTunnel, call))
    assert [t.kind for t in tunnels] == ["ngrok", "cloudflared"]
    assert not isinstance(object(), PublicTunnel)
