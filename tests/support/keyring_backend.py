"""A keyring backend for tests that stands in for an OS keyring (Secret Service, Keychain): it is a real
`keyring` plugin, selected with `PYTHON_KEYRING_BACKEND=tests.support.keyring_backend.StandInOsKeyring`, and keeps
its secrets in the JSON file named by `BRIDGE_TEST_KEYRING_FILE` so a test can see exactly what landed where.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from keyring.backend import KeyringBackend
from keyring.errors import PasswordDeleteError


class StandInOsKeyring(KeyringBackend):
    priority = 5  # what a working Secret Service reports
    name = "stand-in OS keyring"

    @property
    def _path(self) -> Path:
        return Path(os.environ["BRIDGE_TEST_KEYRING_FILE"])

    def _load(self) -> dict[str, str]:
        try:
            return json.loads(self._path.read_text())
        except FileNotFoundError:
            return {}

    def get_password(self, service: str, username: str) -> str | None:
        return self._load().get(f"{service}\0{username}")

    def set_password(self, service: str, username: str, password: str) -> None:
        data = self._load()
        data[f"{service}\0{username}"] = password
        self._path.write_text(json.dumps(data))

    def delete_password(self, service: str, username: str) -> None:
        data = self._load()
        if data.pop(f"{service}\0{username}", None) is None:
            raise PasswordDeleteError(username)
        self._path.write_text(json.dumps(data))
