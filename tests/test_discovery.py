"""Token and endpoint discovery: order, verification before use, the gist/https/file sources, re-discovery."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bridge import config, secrets
from bridge.client.link import discovery
from bridge.client.link.discovery import Endpoint, fetch_record, find_endpoint, find_token, rediscover
from bridge.errors import ConfigError, DiscoveryError, RecordExpiredError, RecordSignatureError
from bridge.record import make_record
from tests.support.mlflow_server import free_port

TOKEN = "tok-" + "a" * 40


def _record_json(url: str, *, token: str = TOKEN, ttl_s: float = 600, now: float | None = None) -> str:
    return make_record(url, token=token, instance="inst-1", mlflow_version="3.17.2", ttl_s=ttl_s, now=now).to_json()


class GitHubStandIn:
    """The GitHub gist API and a plain record URL (ntfy-like), served on 127.0.0.1 from a thread."""

    def __init__(self) -> None:
        self.gists: dict[str, dict] = {}
        self.raw: dict[str, str] = {}
        self.topics: dict[str, tuple[int, str]] = {}
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization header)
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self, status: int, body: str, ctype: str = "application/json") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                stand_in.seen.append((self.path, self.headers.get("Authorization")))
                path = self.path.split("?", 1)[0]
                if path.startswith("/gists/"):
                    gist = stand_in.gists.get(path[len("/gists/") :])
                    if gist is None:
                        self._answer(404, '{"message": "Not Found"}')
                    else:
                        self._answer(200, json.dumps(gist))
                elif path.startswith("/raw/") and path[len("/raw/") :] in stand_in.raw:
                    self._answer(200, stand_in.raw[path[len("/raw/") :]], "text/plain")
                elif path.startswith("/topic/") and path[len("/topic/") :] in stand_in.topics:
                    status, body = stand_in.topics[path[len("/topic/") :]]
                    self._answer(status, body)
                else:
                    self._answer(404, "{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def put_gist(self, gist_id: str, content: str, *, truncated: bool = False, name: str = "bridge-endpoint.json"):
        self.raw[gist_id] = content
        entry = {
            "filename": name,
            "truncated": truncated,
            "raw_url": f"{self.base}/raw/{gist_id}",
            "content": content[:20] if truncated else content,
        }
        self.gists[gist_id] = {"id": gist_id, "files": {name: entry}}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def github(monkeypatch):
    stand_in = GitHubStandIn()
    monkeypatch.setenv("BRIDGE_GITHUB_API", stand_in.base)
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    monkeypatch.setenv("BRIDGE_REDISCOVER_INTERVAL_S", "0")
    yield stand_in
    stand_in.close()


class ColabUserdata(types.ModuleType):
    """A stand-in for `google.colab.userdata`: Colab's secret store cannot run here."""

    class SecretNotFoundError(Exception):
        pass

    class NotebookAccessError(Exception):
        pass

    def __init__(self, values: dict[str, str], deny: set[str] = frozenset()) -> None:
        super().__init__("google.colab.userdata")
        self.values, self.deny, self.calls = values, deny, []

    def get(self, key: str) -> str:
        self.calls.append(key)
        if key in self.deny:
            raise self.NotebookAccessError(f"Notebook does not have access to secret {key}")
        if key not in self.values:
            raise self.SecretNotFoundError(f"Secret {key} does not exist.")
        return self.values[key]


@pytest.fixture
def colab(monkeypatch):
    """Install a stand-in Colab into sys.modules; returns a function that sets its secrets."""

    def install(values: dict[str, str], deny: set[str] = frozenset()) -> ColabUserdata:
        userdata = ColabUserdata(values, deny)
        package = types.ModuleType("google.colab")
        package.userdata = userdata
        monkeypatch.setitem(sys.modules, "google.colab", package)
        monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)
        return userdata

    return install


# ----------------------------------------------------------------------------------------------- token


def test_token_order_argument_env_colab_keyring(monkeypatch, colab):
    secrets.set_secret(secrets.ACCESS_TOKEN, "from-keyring")
    assert find_token() == "from-keyring"
    userdata = colab({"BRIDGE_TOKEN": "from-colab"})
    assert discovery.in_colab()
    assert find_token() == "from-colab"
    monkeypatch.setenv("BRIDGE_TOKEN", "from-env")
    assert find_token() == "from-env"
    assert find_token("from-arg") == "from-arg"
    assert userdata.calls == ["BRIDGE_TOKEN"]  # env and argument never needed Colab


def test_token_env_is_read_at_call_time(monkeypatch):
    assert find_token() is None
    monkeypatch.setenv("BRIDGE_TOKEN", "later")
    assert find_token() == "later"


@pytest.mark.parametrize("deny", [False, True], ids=["secret-missing", "notebook-access-denied"])
def test_colab_secret_errors_fall_back_to_the_keyring(colab, deny):
    secrets.set_secret(secrets.ACCESS_TOKEN, "from-keyring")
    userdata = colab({"BRIDGE_TOKEN": "x"} if deny else {}, deny={"BRIDGE_TOKEN"} if deny else set())
    assert find_token() == "from-keyring"
    assert userdata.calls == ["BRIDGE_TOKEN"]


def test_colab_userdata_is_not_consulted_outside_colab(colab, monkeypatch):
    userdata = colab({"BRIDGE_TOKEN": "from-colab"})
    monkeypatch.setattr(discovery, "in_colab", lambda: False)
    assert find_token() is None
    assert userdata.calls == []


def test_not_in_colab_here():
    assert "google.colab" not in sys.modules
    assert discovery.in_colab() is False


# -------------------------------------------------------------------------------------------- endpoint


def test_endpoint_order_argument_env_discovery_local(tmp_path, monkeypatch):
    config.paths().record_file.write_text(_record_json("https://local.example"))
    assert find_endpoint(None, TOKEN).url == "https://local.example"
    assert find_endpoint(None, TOKEN).source.startswith("file:")

    published = tmp_path / "drive" / "endpoint.json"
    published.parent.mkdir()
    published.write_text(_record_json("https://published.example/"))
    monkeypatch.setenv("BRIDGE_DISCOVERY", f"file:{published}")
    endpoint = find_endpoint(None, TOKEN)
    assert endpoint.url == "https://published.example"
    assert endpoint.source == f"file:{published}"
    assert endpoint.record is not None and endpoint.record.instance == "inst-1"

    monkeypatch.setenv("BRIDGE_URL", "https://env.example/")
    assert find_endpoint(None, TOKEN) == Endpoint("https://env.example", "BRIDGE_URL", None)
    assert find_endpoint("https://arg.example//", TOKEN) == Endpoint("https://arg.example", "argument", None)


def test_explicit_url_needs_no_token():
    assert find_endpoint("http://127.0.0.1:5000/", None).url == "http://127.0.0.1:5000"


@pytest.mark.parametrize("bad", ["ftp://host", "127.0.0.1:5000", "https://", "https://host/?x=1"])
def test_bad_urls_are_refused_by_name(bad):
    with pytest.raises(ConfigError, match="server URL"):
        find_endpoint(bad, TOKEN)


def test_credentials_in_a_url_are_refused_without_being_echoed(monkeypatch):
    monkeypatch.setenv("BRIDGE_URL", "https://bridge:hunter2secret@x.example")
    with pytest.raises(ConfigError, match="must not carry credentials") as info:
        find_endpoint(None, TOKEN)
    assert "hunter2secret" not in str(info.value)


def test_tampered_record_url_is_never_returned(tmp_path, monkeypatch):
    data = json.loads(_record_json("https://good.example"))
    data["url"] = "https://evil.example"
    published = tmp_path / "endpoint.json"
    published.write_text(json.dumps(data))
    monkeypatch.setenv("BRIDGE_DISCOVERY", f"file:{published}")
    with pytest.raises(RecordSignatureError, match="signature") as info:
        find_endpoint(None, TOKEN)
    assert TOKEN not in str(info.value)
    # With a trustworthy local record as well, that one wins and the tampered URL is still never used.
    config.paths().record_file.write_text(_record_json("https://good.example"))
    assert find_endpoint(None, TOKEN).url == "https://good.example"


def test_record_signed_with_another_token_is_rejected(monkeypatch):
    config.paths().record_file.write_text(_record_json("https://other.example", token="someone-elses-token"))
    with pytest.raises(RecordSignatureError):
        find_endpoint(None, TOKEN)


def test_expired_record_says_so(tmp_path, monkeypatch):
    published = tmp_path / "endpoint.json"
    published.write_text(_record_json("https://old.example", ttl_s=60, now=time.time() - 3600))
    monkeypatch.setenv("BRIDGE_DISCOVERY", f"file:{published}")
    with pytest.raises(RecordExpiredError, match=r"old\.example expired \d+ s ago") as info:
        find_endpoint(None, TOKEN)
    assert f"file:{published}" in str(info.value)


def test_record_without_a_token_asks_for_the_token():
    config.paths().record_file.write_text(_record_json("https://local.example"))
    with pytest.raises(DiscoveryError, match="needs the access token") as info:
        find_endpoint(None, None)
    assert "BRIDGE_TOKEN" in str(info.value)


def test_nothing_found_lists_what_was_tried_and_how_to_fix():
    with pytest.raises(DiscoveryError) as info:
        find_endpoint(None, TOKEN)
    message = str(info.value)
    for needed in ("BRIDGE_URL", "BRIDGE_DISCOVERY", "bridge serve", str(config.paths().record_file)):
        assert needed in message
    assert TOKEN not in message


def test_unreachable_discovery_source_is_reported(monkeypatch):
    monkeypatch.setenv("BRIDGE_DISCOVERY", f"http://127.0.0.1:{free_port()}/topic/x")
    started = time.monotonic()
    with pytest.raises(DiscoveryError, match="could not be reached"):
        find_endpoint(None, TOKEN)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("spec", ["ftp://x/y", "gist:", "gist:not/valid!", "file:", "s3://bucket/key", "just-words"])
def test_bad_discovery_spec_names_it_and_the_accepted_forms(spec, monkeypatch):
    monkeypatch.setenv("BRIDGE_DISCOVERY", spec)
    with pytest.raises(ConfigError, match="accepted forms: file:PATH, gist:ID"):
        find_endpoint(None, TOKEN)


def test_plain_http_to_a_remote_host_is_refused():
    with pytest.raises(ConfigError, match="plain http"):
        fetch_record("http://records.example/topic")


def test_endpoint_repr_is_safe():
    endpoint = Endpoint(
        "https://x.example",
        "gist:abc",
        make_record("https://x.example", token=TOKEN, instance="i", mlflow_version="3", ttl_s=60),
    )
    text = repr(endpoint)
    assert "x.example" in text and "gist:abc" in text
    assert endpoint.record.signature not in text
    assert TOKEN not in text


# ------------------------------------------------------------------------------------ gist and https


def test_gist_record_is_fetched_and_verified(github, monkeypatch):
    github.put_gist("abc123", _record_json("https://gist-host.example"))
    monkeypatch.setenv("BRIDGE_DISCOVERY", "gist:abc123")
    endpoint = find_endpoint(None, TOKEN)
    assert endpoint == Endpoint("https://gist-host.example", "gist:abc123", endpoint.record)
    assert github.seen == [("/gists/abc123", None)]


def test_gist_uses_a_github_token_for_the_api_only(github, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_example")
    github.put_gist("big1", _record_json("https://truncated.example"), truncated=True)
    assert json.loads(fetch_record("gist:big1"))["url"] == "https://truncated.example"
    assert github.seen == [("/gists/big1", "Bearer ghp_example"), ("/raw/big1", None)]


def test_gist_github_token_from_the_secret_store(github):
    secrets.set_secret(secrets.GITHUB_TOKEN, "ghp_stored")
    github.put_gist("g2", _record_json("https://x.example"))
    fetch_record("gist:g2")
    assert github.seen == [("/gists/g2", "Bearer ghp_stored")]


def test_gist_errors_name_the_gist(github):
    with pytest.raises(DiscoveryError, match="gist:missing1: GitHub has no such gist"):
        fetch_record("gist:missing1")
    github.put_gist("other1", "{}", name="notes.md")
    with pytest.raises(DiscoveryError, match=r"gist:other1 has no file 'bridge-endpoint.json' \(files: notes.md\)"):
        fetch_record("gist:other1")


def test_gist_pasted_as_a_url_uses_its_id(github):
    github.put_gist("f00d", _record_json("https://x.example"))
    assert json.loads(fetch_record("gist:https://gist.github.com/someone/f00d"))["url"] == "https://x.example"


def test_https_form_reads_the_record(github, monkeypatch):
    github.topics["t1"] = (200, _record_json("https://topic.example"))
    monkeypatch.setenv("BRIDGE_DISCOVERY", f"{github.base}/topic/t1")
    endpoint = find_endpoint(None, TOKEN)
    assert endpoint.url == "https://topic.example"
    assert endpoint.source == f"{github.base}/topic/t1"


def test_https_form_errors_name_the_source_without_its_query(github):
    github.topics["t2"] = (500, "{}")
    # One redactor for every URL in a message (bridge.record.describe_url): the query becomes "?…".
    with pytest.raises(DiscoveryError, match=r"/topic/t2\?… answered HTTP 500") as info:
        fetch_record(f"{github.base}/topic/t2?auth=querysecret")
    assert "querysecret" not in str(info.value)


def test_oversized_answer_is_not_a_record(github):
    github.topics["big"] = (200, "x" * (discovery.MAX_RECORD_BYTES + 10))
    with pytest.raises(DiscoveryError, match="not an endpoint record"):
        fetch_record(f"{github.base}/topic/big")


# ---------------------------------------------------------------------------------------- rediscover


def test_rediscover_returns_a_new_endpoint_only_when_the_url_changes(tmp_path, monkeypatch):
    published = tmp_path / "endpoint.json"
    published.write_text(_record_json("https://one.example"))
    monkeypatch.setenv("BRIDGE_DISCOVERY", f"file:{published}")
    first = find_endpoint(None, TOKEN)
    assert rediscover(TOKEN, first.url) is None
    published.write_text(_record_json("https://two.example"))
    moved = rediscover(TOKEN, first.url)
    assert moved is not None and moved.url == "https://two.example" and moved.source == f"file:{published}"
    assert rediscover(TOKEN, moved.url + "/") is None
    assert rediscover(TOKEN, None).url == "https://two.example"


def test_rediscover_returns_none_when_unreachable_or_fixed(tmp_path, monkeypatch, github):
    monkeypatch.setenv("BRIDGE_DISCOVERY", f"file:{tmp_path / 'absent.json'}")
    assert rediscover(TOKEN, "https://one.example") is None
    monkeypatch.setenv("BRIDGE_DISCOVERY", f"http://127.0.0.1:{free_port()}/topic/x")
    assert rediscover(TOKEN, "https://one.example") is None
    monkeypatch.setenv("BRIDGE_DISCOVERY", "gist:nosuchgist")
    assert rediscover(TOKEN, "https://one.example") is None
    assert rediscover(None, "https://one.example") is None
    # An explicit URL is fixed: re-discovery never overrides it.
    github.put_gist("g3", _record_json("https://moved.example"))
    monkeypatch.setenv("BRIDGE_DISCOVERY", "gist:g3")
    monkeypatch.setenv("BRIDGE_URL", "https://fixed.example")
    assert rediscover(TOKEN, "https://fixed.example") is None
    monkeypatch.delenv("BRIDGE_URL")
    assert rediscover(TOKEN, "https://fixed.example").url == "https://moved.example"


def test_rediscover_warns_once_about_a_bad_signature(tmp_path, monkeypatch, caplog):
    data = json.loads(_record_json("https://good.example"))
    data["url"] = "https://evil.example"
    published = tmp_path / "tampered.json"
    published.write_text(json.dumps(data))
    monkeypatch.setenv("BRIDGE_DISCOVERY", f"file:{published}")
    with caplog.at_level(logging.DEBUG, logger="bridge.client.link.discovery"):
        for _ in range(3):
            assert rediscover(TOKEN, "https://good.example") is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "signature" in warnings[0].getMessage()
    assert TOKEN not in caplog.text


def test_rediscover_reads_remote_sources_at_most_once_per_interval(github, monkeypatch):
    github.put_gist("g4", _record_json("https://a.example"))
    monkeypatch.setenv("BRIDGE_DISCOVERY", "gist:g4")
    monkeypatch.setenv("BRIDGE_REDISCOVER_INTERVAL_S", "3600")
    assert rediscover(TOKEN, "https://old.example").url == "https://a.example"
    github.put_gist("g4", _record_json("https://b.example"))
    assert rediscover(TOKEN, "https://a.example") is None  # throttled: GitHub is not asked again
    assert len(github.seen) == 1
    monkeypatch.setenv("BRIDGE_REDISCOVER_INTERVAL_S", "0")
    assert rediscover(TOKEN, "https://a.example").url == "https://b.example"
    assert len(github.seen) == 2


def test_an_older_record_of_the_same_server_is_refused_as_a_replay(tmp_path, monkeypatch):
    from bridge.errors import RecordError
    from bridge.record import make_record

    token = "replay-token-" + "x" * 30
    path = tmp_path / "endpoint.json"
    monkeypatch.setenv("BRIDGE_DISCOVERY", f"file:{path}")
    new = make_record("https://new.ngrok-free.app", token=token, instance="replay-inst", mlflow_version="3", ttl_s=3600)
    old = make_record(
        "https://old.ngrok-free.app",
        token=token,
        instance="replay-inst",
        mlflow_version="3",
        ttl_s=3600,
        now=new.issued_at - 600,
    )
    path.write_text(new.to_json())
    assert discovery.find_endpoint(None, token).url == "https://new.ngrok-free.app"
    path.write_text(old.to_json())  # still signed and unexpired, but older: someone put it back
    with pytest.raises(RecordError, match="older record"):
        discovery.find_endpoint(None, token)
