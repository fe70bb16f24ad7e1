"""The stand-in ngrok agent itself: it must answer pyngrok the way the real agent does, in both API modes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests
from pyngrok import conf, ngrok, process
from pyngrok.exception import PyngrokNgrokHTTPError

from tests.support.mlflow_server import free_port
from tests.support.tunnel import FAKE_AGENT


@pytest.fixture
def pyngrok_config(fake_ngrok, tmp_path):
    """A plain pyngrok config (pyngrok's own defaults: v3 endpoints API) running the stand-in."""
    config_path = tmp_path / "ngrok.yml"
    config_path.write_text(
        f'version: "3"\nagent:\n  authtoken: {fake_ngrok.authtoken}\n  web_addr: 127.0.0.1:{free_port()}\n'
    )
    config = conf.PyngrokConfig(ngrok_path=str(fake_ngrok.path), config_path=str(config_path))
    yield config
    process.kill_process(config.ngrok_path)


def test_pyngrok_default_v3_endpoints_mode_works(fake_ngrok, pyngrok_config):
    tunnel = ngrok.connect("9", pyngrok_config=pyngrok_config)
    assert tunnel.public_url.endswith(".ngrok-free.app")
    assert tunnel.upstream["url"] == "http://localhost:9"
    assert [t.public_url for t in ngrok.get_tunnels(pyngrok_config)] == [tunnel.public_url]
    ngrok.disconnect(tunnel.public_url, pyngrok_config)
    assert ngrok.get_tunnels(pyngrok_config) == []
    assert fake_ngrok.forwards() == {}


def test_v3_traffic_policy_basic_auth_is_enforced(fake_ngrok, pyngrok_config):
    policy = {"on_http_request": [{"actions": [{"type": "basic-auth", "config": {"credentials": ["u:password-123"]}}]}]}
    tunnel = ngrok.connect("9", pyngrok_config=pyngrok_config, traffic_policy=policy)
    local = fake_ngrok.local_url(tunnel.public_url)
    assert requests.get(local, timeout=5).status_code == 401
    # Past the edge, the upstream (port 9, nothing listening) is down: ngrok's 502 ERR_NGROK_8012.
    behind = requests.get(local, auth=("u", "password-123"), timeout=5)
    assert behind.status_code == 502 and "ERR_NGROK_8012" in behind.text


def test_basic_auth_password_too_short_is_refused_like_ngrok(fake_ngrok, pyngrok_config):
    pyngrok_config.config_version = "2"
    with pytest.raises(PyngrokNgrokHTTPError) as info:
        ngrok.connect("9", pyngrok_config=pyngrok_config, basic_auth=["u:short"])
    assert info.value.status_code == 400


@pytest.mark.integration  # starts a process of its own
def test_version_and_config_subcommands():
    out = subprocess.run([sys.executable, str(FAKE_AGENT), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ngrok version 3.")


def test_add_authtoken_writes_the_config(tmp_path, fake_ngrok):
    config = tmp_path / "n.yml"
    conf_ = conf.PyngrokConfig(ngrok_path=str(fake_ngrok.path), config_path=str(config))
    process.set_auth_token(conf_, "abc-token")
    assert "authtoken: abc-token" in config.read_text()
