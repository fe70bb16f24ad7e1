"""A real, plain `mlflow server` process for tests: SQLite backend, proxied artifacts, loopback only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from bridge.serve.child import free_port

_HELD: list[socket.socket] = []


def closed_url() -> str:
    """A loopback URL that refuses every connection for the rest of the test process: its port stays bound (not
    listening), so no server started later — by this test or by another worker — can take it. A port from
    `free_port()` is only free at the moment it is picked."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    _HELD.append(held)
    return f"http://127.0.0.1:{held.getsockname()[1]}"


@dataclass
class PlainMlflowServer:
    """A running stock `mlflow server`; `stop()`/`start()` simulate an outage on the same port and store."""

    root: Path
    port: int
    backend_store_uri: str
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        log = open(self.root / "mlflow-server.log", "ab")  # noqa: SIM115 - the child writes it; closed on stop
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                self.backend_store_uri,
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'mlflow-server.log').read_text()[-2000:]}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("mlflow server did not become healthy in time")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> PlainMlflowServer:
    """One plain MLflow server for the whole session (tests use their own experiments)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    server = PlainMlflowServer(root=root, port=free_port(), backend_store_uri=f"sqlite:///{root / 'mlflow.db'}")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_mlflow_server(tmp_path) -> PlainMlflowServer:
    """A plain MLflow server of the test's own, for tests that stop and restart it."""
    root = tmp_path / "own-mlflow"
    root.mkdir()
    server = PlainMlflowServer(root=root, port=free_port(), backend_store_uri=f"sqlite:///{root / 'mlflow.db'}")
    server.start()
    yield server
    server.stop()
