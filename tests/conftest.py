"""Shared test set-up: every test gets its own BRIDGE_HOME and a file-backed secret store.

Fixtures of each area live in tests/support/ and are loaded as plugins below.
"""

from __future__ import annotations

import os

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
os.environ.setdefault("YOLO_OFFLINE", "1")

pytest_plugins = ["tests.support.mlflow_server", "tests.support.client", "tests.support.flaky_proxy", "tests.support.tunnel", "tests.support.serve",
                  "tests.support.yolo",
                  # Its autouse session fixture is set up before, so torn down after, the session's servers.
                  "tests.support.leak_scan"]


@pytest.fixture(autouse=True)
def bridge_home(tmp_path, monkeypatch):
    """Isolate bridge's data, config and secrets per test; the null keyring selects the 0600 file store."""
    home = tmp_path / "bridge-home"
    home.mkdir()
    monkeypatch.setenv("BRIDGE_HOME", str(home))
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.null.Keyring")
    for name in ("BRIDGE_URL", "BRIDGE_TOKEN", "BRIDGE_DISCOVERY", "BRIDGE_JOURNAL", "NGROK_AUTHTOKEN", "GITHUB_TOKEN",
                 "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    return home
