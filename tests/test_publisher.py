"""bridge.serve.publisher: records land where clients look, verifiable; failures are PublishErrors without secrets."""

from __future__ import annotations

import json
import os
import stat
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bridge import secrets
from bridge.config import paths
from bridge.errors import ConfigError, PublishError
from bridge.record import make_record, verify_record
from bridge.serve.publisher import (
    GIST_FILE_NAME,
    FilePublisher,
    GistPublisher,
    HttpPublisher,
    publisher_for,
)
from tests.support.mlflow_server import free_port

TOKEN = "access-token-for-publisher-tests-0123456789"
GITHUB_TOKEN = "ghp_publisher_test_token_abcdef0123456789"


def _record(url: str = "https://abc123.ngrok-free.app"):
    return make_record(url, token=TOKEN, instance="inst-1", mlflow_version="3.17.2", ttl_s=3600)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class StandIn:
    """A local HTTP stand-in for GitHub's API or an ntfy server: records requests, answers scripted statuses."""

    url: str
    requests: list[Seen] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # popped per request; 200 when empty


@pytest.fixture
def stand_in():
    state = StandIn(url="")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _handle(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state.requests.append(Seen(self.command, self.path, dict(self.headers.items()), body))
            status = state.statuses.pop(0) if state.statuses else 200
            payload = json.dumps({"ok": status < 400}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_PUT = do_POST = do_PATCH = _handle

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def test_default_publisher_writes_a_verifiable_record_to_the_data_folder():
    publisher = publisher_for(None)
    assert isinstance(publisher, FilePublisher) and publisher.path == paths().record_file
    publisher.publish(_record("https://first.ngrok-free.app"))
    publisher.publish(_record("https://second.ngrok-free.app"))

    text = paths().record_file.read_text()
    assert verify_record(text, TOKEN).url == "https://second.ngrok-free.app"
    assert TOKEN not in text
    assert stat.S_IMODE(paths().record_file.stat().st_mode) == 0o644
    assert sorted(p.name for p in paths().record_file.parent.iterdir() if "endpoint" in p.name) == ["endpoint.json"]


@pytest.mark.parametrize("form", ["file:{path}", "file://{path}"])
def test_file_spec_writes_where_it_names(tmp_path, form):
    target = tmp_path / "Drive" / "bridge" / "endpoint.json"
    publisher = publisher_for(form.format(path=target))
    assert publisher.describe() == f"file:{target}"
    publisher.publish(_record())
    assert verify_record(target.read_text(), TOKEN).url == "https://abc123.ngrok-free.app"


def test_file_publisher_failure_is_a_publish_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(PublishError, match="could not write"):
        FilePublisher(blocker / "endpoint.json").publish(_record())


def test_gist_publisher_patches_the_gist_with_the_record(stand_in, monkeypatch):
    monkeypatch.setenv("BRIDGE_GITHUB_API", stand_in.url)
    secrets.set_secret(secrets.GITHUB_TOKEN, GITHUB_TOKEN)
    publisher = publisher_for("gist:0123abcdef")
    assert publisher.describe() == "gist:0123abcdef"
    publisher.publish(_record())

    [seen] = stand_in.requests
    assert (seen.method, seen.path) == ("PATCH", "/gists/0123abcdef")
    assert seen.headers["Authorization"] == f"Bearer {GITHUB_TOKEN}"
    content = json.loads(seen.body)["files"][GIST_FILE_NAME]["content"]
    assert verify_record(content, TOKEN).instance == "inst-1"


def test_gist_publisher_without_a_github_token_sends_nothing(stand_in, monkeypatch):
    monkeypatch.setenv("BRIDGE_GITHUB_API", stand_in.url)
    with pytest.raises(PublishError, match="no GitHub token"):
        GistPublisher("abc123").publish(_record())
    assert stand_in.requests == []


def test_gist_api_base_must_not_send_the_token_in_clear_off_this_machine(monkeypatch):
    monkeypatch.setenv("BRIDGE_GITHUB_API", "http://api.example.com")
    secrets.set_secret(secrets.GITHUB_TOKEN, GITHUB_TOKEN)
    with pytest.raises(ConfigError, match=r"only to 127.0.0.1"):
        GistPublisher("abc123").publish(_record())


def test_https_publisher_puts_the_record(stand_in):
    publisher = publisher_for(f"{stand_in.url}/bridge-topic?auth=topic-key")
    assert isinstance(publisher, HttpPublisher)
    assert "topic-key" not in publisher.describe()
    publisher.publish(_record())
    [seen] = stand_in.requests
    assert (seen.method, seen.path) == ("PUT", "/bridge-topic?auth=topic-key")
    assert verify_record(seen.body, TOKEN).url == "https://abc123.ngrok-free.app"


def test_http_publisher_can_post(stand_in):
    HttpPublisher(f"{stand_in.url}/topic", method="POST").publish(_record())
    assert [r.method for r in stand_in.requests] == ["POST"]


def test_a_server_error_is_one_attempt_and_a_publish_error_the_supervisor_retries(stand_in, monkeypatch):
    # One retry layer: the supervisor's compute_backoff_ms loop. A publisher retrying inside it would
    # multiply attempts and delays, so each publish() is exactly one request.
    stand_in.statuses = [500] * 10
    monkeypatch.setenv("BRIDGE_GITHUB_API", stand_in.url)
    secrets.set_secret(secrets.GITHUB_TOKEN, GITHUB_TOKEN)
    with pytest.raises(PublishError) as info:
        GistPublisher("abc123").publish(_record())
    assert "500" in str(info.value)
    assert GITHUB_TOKEN not in str(info.value) and GITHUB_TOKEN not in repr(info.value.__cause__)
    assert len(stand_in.requests) == 1

    stand_in.requests.clear()
    stand_in.statuses = [503]
    publisher = HttpPublisher(f"{stand_in.url}/topic")
    with pytest.raises(PublishError, match="503"):
        publisher.publish(_record())
    publisher.publish(_record())  # the next round of the supervisor's loop
    assert len(stand_in.requests) == 2


def test_gist_token_comes_from_the_environment_before_the_keyring(stand_in, monkeypatch):
    monkeypatch.setenv("BRIDGE_GITHUB_API", stand_in.url)
    secrets.set_secret(secrets.GITHUB_TOKEN, GITHUB_TOKEN)
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_from_the_environment_0123456789")
    GistPublisher("abc123").publish(_record())
    assert stand_in.requests[0].headers["Authorization"] == "Bearer ghp_from_the_environment_0123456789"


def test_client_error_is_not_retried(stand_in):
    stand_in.statuses = [404]
    with pytest.raises(PublishError, match="404"):
        HttpPublisher(f"{stand_in.url}/topic").publish(_record())
    assert len(stand_in.requests) == 1


def test_unreachable_target_is_a_publish_error():
    with pytest.raises(PublishError, match="could not reach"):
        HttpPublisher(f"http://127.0.0.1:{free_port()}/topic").publish(_record())


@pytest.mark.parametrize("spec", ["ftp://example.com/x", "s3://bucket/key", "gist", "endpoint.json", "file:"])
def test_bad_spec_is_a_config_error_naming_it_and_the_accepted_forms(spec):
    with pytest.raises(ConfigError) as info:
        publisher_for(spec)
    message = str(info.value)
    assert repr(spec) in message and "file:PATH" in message and "gist:" in message and "https://" in message


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://ntfy.example.com/topic", "only to 127.0.0.1"),
        ("https://user:pass@ntfy.example.com/topic", "credentials"),
    ],
)
def test_unsafe_https_specs_are_refused(url, reason):
    with pytest.raises(ConfigError, match=reason) as info:
        publisher_for(url)
    assert "pass@" not in str(info.value)


def test_bad_gist_id_is_a_config_error():
    with pytest.raises(ConfigError, match="gist id"):
        publisher_for("gist:../../etc")


def test_file_spec_naming_a_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        publisher_for(f"file:{tmp_path}")
    assert os.listdir(tmp_path) == ["bridge-home"]
