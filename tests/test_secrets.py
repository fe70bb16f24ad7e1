"""bridge.secrets: the 0600 file store, the token's life, and where the token really lives on a machine."""

import importlib
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import keyring
import pytest

from bridge import config, secrets


def test_fallback_file_is_private_and_round_trips():
    secrets.set_secret(secrets.NGROK_AUTHTOKEN, "abc123")
    assert secrets.get_secret(secrets.NGROK_AUTHTOKEN) == "abc123"
    mode = stat.S_IMODE(config.paths().secrets_file.stat().st_mode)
    assert mode == 0o600


def test_access_token_is_generated_once_with_enough_entropy():
    token = secrets.access_token()
    assert len(token) >= 22  # >= 128 bits in url-safe base64
    assert secrets.access_token() == token


def test_rotation_replaces_the_token():
    old = secrets.access_token()
    new = secrets.rotate_access_token()
    assert new != old
    assert secrets.access_token() == new


def test_separate_homes_do_not_share_tokens(tmp_path, monkeypatch):
    first = secrets.access_token()
    monkeypatch.setenv("BRIDGE_HOME", str(tmp_path / "other"))
    assert secrets.access_token() != first


def test_mask_never_reveals_more_than_four_characters():
    token = secrets.new_token()
    assert secrets.mask(token).endswith(token[-4:])
    assert token[:-4] not in secrets.mask(token)


@pytest.mark.parametrize(
    ("lookup", "env_name", "secret_name"),
    [
        (secrets.github_token, "GITHUB_TOKEN", secrets.GITHUB_TOKEN),
        (secrets.ngrok_authtoken, "NGROK_AUTHTOKEN", secrets.NGROK_AUTHTOKEN),
    ],
)
def test_service_tokens_share_one_order_environment_then_keyring(monkeypatch, lookup, env_name, secret_name):
    monkeypatch.delenv(env_name, raising=False)
    assert lookup() is None
    secrets.set_secret(secret_name, "from-keyring-0123456789")
    assert lookup() == "from-keyring-0123456789"
    monkeypatch.setenv(env_name, "  from-env-0123456789 ")  # read at call time, stripped
    assert lookup() == "from-env-0123456789"
    monkeypatch.setenv(env_name, "   ")  # blank means unset
    assert lookup() == "from-keyring-0123456789"


# --- where the token really lives ------------------------------------------------------------------------------


def _bridge(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from bridge.cli import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )


@pytest.fixture
def fresh_machine(tmp_path, bridge_home):
    """The environment of a headless machine with no keyring configured: keyring chooses for itself."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHON_KEYRING_BACKEND", "DBUS_SESSION_BUS_ADDRESS", "DISPLAY", "WAYLAND_DISPLAY")
    }
    home = tmp_path / "user"
    env.update(
        HOME=str(home),
        XDG_DATA_HOME=str(home / ".local/share"),
        XDG_CONFIG_HOME=str(home / ".config"),
        BRIDGE_HOME=str(bridge_home),
        MLFLOW_DISABLE_TELEMETRY="true",
        COLUMNS="400",
    )
    return env


@pytest.mark.integration  # starts a process of its own
def test_headless_machine_keeps_the_token_in_the_documented_0600_file_and_says_so(fresh_machine, bridge_home):
    # keyrings.alt is installed (as on the machine where the README's promise was broken): its plaintext keyring
    # must not count as an OS keyring.
    importlib.import_module("keyrings.alt.file")
    out = _bridge(fresh_machine, "token")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert "No OS keyring available" in out.stderr and str(bridge_home / "secrets.json") in out.stderr
    assert token not in out.stderr
    store = bridge_home / "secrets.json"
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    assert json.loads(store.read_text())["access-token"] == token
    user_home = Path(fresh_machine["HOME"])
    leaked = [p for p in user_home.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert leaked == [] and not list(user_home.rglob("keyring_pass.cfg"))
    status = _bridge(fresh_machine, "status")
    assert f"0600 file {store}" in " ".join(status.stdout.split()), status.stdout
    assert _bridge(fresh_machine, "token").stdout.strip() == token


def test_an_explicitly_chosen_plaintext_keyring_is_refused_too(bridge_home, tmp_path, monkeypatch, caplog):
    from keyrings.alt.file import PlaintextKeyring

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    previous = keyring.get_keyring()
    keyring.set_keyring(PlaintextKeyring())
    monkeypatch.setattr(secrets, "_warned_fallback", False)
    try:
        with caplog.at_level(logging.WARNING, logger="bridge.secrets"):
            token = secrets.access_token()
        assert "No OS keyring available (keyring offers" in caplog.text and "PlaintextKeyring" in caplog.text
        assert json.loads((bridge_home / "secrets.json").read_text())["access-token"] == token
        assert not (tmp_path / "data" / "python_keyring" / "keyring_pass.cfg").exists()
        assert secrets.describe_store().startswith(f"0600 file {bridge_home / 'secrets.json'}")
    finally:
        keyring.set_keyring(previous)


def test_a_token_an_earlier_bridge_left_in_the_plaintext_keyring_is_moved_into_the_file(
    bridge_home, tmp_path, monkeypatch
):
    from keyrings.alt.file import PlaintextKeyring

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    legacy = PlaintextKeyring()
    legacy.set_password(secrets.service_name(), secrets.ACCESS_TOKEN, "token-from-an-earlier-bridge-0123456789")
    assert secrets.access_token() == "token-from-an-earlier-bridge-0123456789"  # Colab's secret keeps working
    assert json.loads((bridge_home / "secrets.json").read_text())["access-token"].startswith("token-from-an-earlier")
    assert legacy.get_password(secrets.service_name(), secrets.ACCESS_TOKEN) is None
    assert b"token-from-an-earlier" not in Path(legacy.file_path).read_bytes()


@pytest.mark.integration  # starts a process of its own
def test_a_real_os_keyring_is_preferred_and_no_file_is_written(fresh_machine, bridge_home, tmp_path):
    env = {
        **fresh_machine,
        "PYTHON_KEYRING_BACKEND": "tests.support.keyring_backend.StandInOsKeyring",
        "BRIDGE_TEST_KEYRING_FILE": str(tmp_path / "os-keyring.json"),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    out = _bridge(env, "token")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert "No OS keyring" not in out.stderr
    assert token in (tmp_path / "os-keyring.json").read_text()
    assert not (bridge_home / "secrets.json").exists()
    status = _bridge(env, "status")
    assert "OS keyring (stand-in OS keyring)" in status.stdout, status.stdout
