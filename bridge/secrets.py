"""The one place bridge reads and writes secrets: the OS keyring, or a 0600 file when there is none.

Secrets are the access token (`access-token`), the ngrok authtoken (`ngrok-authtoken`) and a
GitHub token for gist publishing (`github-token`). Under `BRIDGE_HOME` the keyring service name
carries that folder, so separate instances never read each other's token.

Tokens of other services (`github_token()`, `ngrok_authtoken()`) are looked up in one order: the
environment variable first (`GITHUB_TOKEN`, `NGROK_AUTHTOKEN`, read at call time), then the keyring. An
explicit variable is how a person overrides a stored token for one run, as with `gh` and `ngrok` themselves.
"""

from __future__ import annotations

import json
import logging
import os
import secrets as _random
import threading
from pathlib import Path

import keyring
import keyring.errors

from bridge import config
from bridge.errors import SecretError

log = logging.getLogger(__name__)

ACCESS_TOKEN = "access-token"
NGROK_AUTHTOKEN = "ngrok-authtoken"
GITHUB_TOKEN = "github-token"
#: Environment variables that override the stored tokens of other services.
GITHUB_TOKEN_ENV = "GITHUB_TOKEN"
NGROK_AUTHTOKEN_ENV = "NGROK_AUTHTOKEN"

#: 32 random bytes, url-safe: 256 bits, well above the 128-bit floor.
TOKEN_BYTES = 32

_lock = threading.Lock()
_warned_fallback = False


def service_name() -> str:
    home = config.bridge_home()
    return config.APP_NAME if home is None else f"{config.APP_NAME}:{home}"


def _keyring_usable() -> bool:
    backend = keyring.get_keyring()
    # fail.Keyring and null.Keyring are what keyring picks when nothing real is available.
    module = type(backend).__module__
    if module.startswith(("keyring.backends.fail", "keyring.backends.null")):
        return False
    try:
        return float(getattr(backend, "priority", 1)) > 0
    except Exception:  # priority is a classproperty that may raise when the backend is unusable
        return False


def _warn_fallback(path: Path) -> None:
    global _warned_fallback
    if not _warned_fallback:
        log.warning("No OS keyring available; keeping secrets in %s (mode 0600).", path)
        _warned_fallback = True


def _read_file(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise SecretError(f"secret file {path} is unreadable: {type(exc).__name__}") from None


def write_private_file(path: Path, text: str) -> None:
    """Replace `path` atomically with `text`, readable by the owner only (0600) from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)  # O_CREAT's mode does not apply to a leftover temp file
    os.replace(tmp, path)


def _write_file(path: Path, data: dict[str, str]) -> None:
    write_private_file(path, json.dumps(data))


def get_secret(name: str) -> str | None:
    """The stored secret `name`, or None when it was never set."""
    with _lock:
        if _keyring_usable():
            try:
                return keyring.get_password(service_name(), name)
            except keyring.errors.KeyringError as exc:
                raise SecretError(f"keyring could not read {name!r}: {type(exc).__name__}") from None
        path = config.paths().secrets_file
        _warn_fallback(path)
        return _read_file(path).get(name)


def set_secret(name: str, value: str) -> None:
    """Store `value` as secret `name`, replacing any earlier value."""
    if not value:
        raise SecretError(f"refusing to store an empty {name!r}")
    with _lock:
        if _keyring_usable():
            try:
                keyring.set_password(service_name(), name, value)
                return
            except keyring.errors.KeyringError as exc:
                raise SecretError(f"keyring could not store {name!r}: {type(exc).__name__}") from None
        path = config.paths().secrets_file
        _warn_fallback(path)
        data = _read_file(path)
        data[name] = value
        _write_file(path, data)


def delete_secret(name: str) -> None:
    with _lock:
        if _keyring_usable():
            try:
                keyring.delete_password(service_name(), name)
            except keyring.errors.PasswordDeleteError:
                pass
            return
        path = config.paths().secrets_file
        data = _read_file(path)
        if data.pop(name, None) is not None:
            _write_file(path, data)


def _env_then_keyring(env_name: str, secret_name: str) -> str | None:
    value = os.environ.get(env_name, "").strip()
    if value:
        return value
    return get_secret(secret_name) or None


def github_token() -> str | None:
    """The GitHub token for gists: `GITHUB_TOKEN` if set, else the keyring's `github-token`."""
    return _env_then_keyring(GITHUB_TOKEN_ENV, GITHUB_TOKEN)


def ngrok_authtoken() -> str | None:
    """The ngrok authtoken: `NGROK_AUTHTOKEN` if set, else the one `bridge login` stored."""
    return _env_then_keyring(NGROK_AUTHTOKEN_ENV, NGROK_AUTHTOKEN)


def new_token() -> str:
    return _random.token_urlsafe(TOKEN_BYTES)


def access_token(*, create: bool = True) -> str | None:
    """The access token clients present; generated and stored on first use when `create`."""
    token = get_secret(ACCESS_TOKEN)
    if token is None and create:
        token = new_token()
        set_secret(ACCESS_TOKEN, token)
        log.info("Generated a new access token (see `bridge token`).")
    return token


def rotate_access_token() -> str:
    """Replace the access token; a running entrance sees the revision file change and drops the old one."""
    token = new_token()
    set_secret(ACCESS_TOKEN, token)
    mark_token_changed()
    return token


def mark_token_changed() -> None:
    """Write a new revision marker (no secret in it) that running entrances watch."""
    # Replaced, not rewritten: a new inode tells watchers even when two rotations share one mtime tick.
    write_private_file(config.paths().token_revision_file, _random.token_hex(8) + "\n")


def mask(secret: str | None) -> str:
    """A form safe to print: never more than the last four characters."""
    if not secret:
        return "(none)"
    return "…" + secret[-4:] if len(secret) >= 16 else "****"
