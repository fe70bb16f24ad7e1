"""The one place bridge reads and writes secrets: the OS keyring, or a 0600 file when there is none.

"OS keyring" means a backend that keeps secrets out of plain files: Secret Service (GNOME Keyring, KWallet),
macOS Keychain, Windows Credential Locker, or another real keyring plugin. Backends that only stand in for one
are refused — `keyring`'s fail/null backends and every `keyrings.alt` backend, whose PlaintextKeyring would
otherwise count as usable on a headless machine and keep the token base64-encoded in
~/.local/share/python_keyring/keyring_pass.cfg. Then bridge uses its own file, `secrets.json` in the bridge config
directory (`BRIDGE_HOME` when set), mode 0600, and warns once per process; a secret an earlier bridge left in
keyrings.alt's plaintext file is moved into it. `describe_store()` says which store is in use (`bridge status`).

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
from typing import Literal, overload

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


#: Backends that are no OS keyring: keyring's placeholders, and keyrings.alt's file-based stand-ins.
_NOT_AN_OS_KEYRING = ("keyring.backends.fail", "keyring.backends.null", "keyring.backends.chainer", "keyrings.alt")


def _is_os_keyring(backend: object) -> bool:
    if type(backend).__module__.startswith(_NOT_AN_OS_KEYRING):
        return False
    try:
        return float(getattr(backend, "priority", 1)) > 0
    except Exception:  # priority is a classproperty that may raise when the backend is unusable
        return False


def os_keyring():
    """The OS keyring backend bridge uses, or None when there is none (then the 0600 file holds the secrets).

    keyring's chainer (what it picks when several backends are installed) is looked into: its best OS backend
    is used directly, so a plaintext backend chained behind it never receives a secret.
    """
    backend = keyring.get_keyring()
    candidates = (
        list(getattr(backend, "backends", None) or [])
        if type(backend).__module__.startswith("keyring.backends.chainer")
        else [backend]
    )
    usable = [b for b in candidates if _is_os_keyring(b)]
    if not usable:
        return None
    return max(usable, key=lambda b: float(getattr(b, "priority", 0)))


def _backend_name(backend: object) -> str:
    name = getattr(backend, "name", None)
    return str(name) if name else f"{type(backend).__module__}.{type(backend).__name__}"


def describe_store() -> str:
    """Where bridge's secrets are kept on this machine, in words (no secret in it): for `bridge status`."""
    backend = os_keyring()
    if backend is not None:
        return f"OS keyring ({_backend_name(backend)})"
    return f"0600 file {config.paths().secrets_file} (no OS keyring: {_backend_name(keyring.get_keyring())})"


def _warn_fallback(path: Path) -> None:
    global _warned_fallback
    if not _warned_fallback:
        log.warning(
            "No OS keyring available (keyring offers %s); keeping secrets in %s (mode 0600).",
            _backend_name(keyring.get_keyring()),
            path,
        )
        _warned_fallback = True


def _plaintext_keyring():
    """keyrings.alt's PlaintextKeyring when its file exists: where earlier bridges may have left secrets."""
    try:
        from keyrings.alt.file import PlaintextKeyring
    except ImportError:
        return None
    try:
        backend = PlaintextKeyring()
        return backend if Path(backend.file_path).exists() else None
    except Exception:  # a broken legacy store must not stop bridge
        return None


def _take_from_plaintext(name: str) -> str | None:
    """Move secret `name` out of keyrings.alt's plaintext file (if an earlier bridge put it there)."""
    legacy = _plaintext_keyring()
    if legacy is None:
        return None
    try:
        value = legacy.get_password(service_name(), name)
        if value:
            legacy.delete_password(service_name(), name)
    except Exception:  # a broken legacy store must not stop bridge
        return None
    if value:
        log.warning(
            "Moved %r from keyrings.alt's plaintext file %s into %s.",
            name,
            legacy.file_path,
            config.paths().secrets_file,
        )
    return value or None


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
        backend = os_keyring()
        if backend is not None:
            try:
                return backend.get_password(service_name(), name)
            except keyring.errors.KeyringError as exc:
                raise SecretError(f"keyring could not read {name!r}: {type(exc).__name__}") from None
        path = config.paths().secrets_file
        _warn_fallback(path)
        data = _read_file(path)
        if name not in data:
            moved = _take_from_plaintext(name)
            if moved is not None:
                data[name] = moved
                _write_file(path, data)
        return data.get(name)


def set_secret(name: str, value: str) -> None:
    """Store `value` as secret `name`, replacing any earlier value."""
    if not value:
        raise SecretError(f"refusing to store an empty {name!r}")
    with _lock:
        backend = os_keyring()
        if backend is not None:
            try:
                backend.set_password(service_name(), name, value)
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
        backend = os_keyring()
        if backend is not None:
            try:
                backend.delete_password(service_name(), name)
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


@overload
def access_token(*, create: Literal[True] = True) -> str: ...
@overload
def access_token(*, create: bool) -> str | None: ...
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
