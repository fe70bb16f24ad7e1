import stat

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
    [(secrets.github_token, "GITHUB_TOKEN", secrets.GITHUB_TOKEN),
     (secrets.ngrok_authtoken, "NGROK_AUTHTOKEN", secrets.NGROK_AUTHTOKEN)],
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
