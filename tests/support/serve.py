"""A real `bridge serve` subprocess for tests: its own BRIDGE_HOME, free ports, `--tunnel none` unless told.

`bridge_serve` is shared by the whole session (tests that only send requests); `own_bridge_serve` starts
one per test for tests that kill, rotate or stop things.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests

from tests.support.mlflow_server import free_port

REPO = Path(__file__).resolve().parents[2]
_client_ids = itertools.count(1)


def unique_client() -> dict[str, str]:
    """An X-Forwarded-For header naming a client of its own, so one test's failed logins never throttle another's."""
    n = next(_client_ids)
    return {"X-Forwarded-For": f"198.51.100.{n % 250 + 1}, 203.0.{n // 250 % 250}.{n % 250 + 1}"}


@dataclass
class BridgeServe:
    """A running `bridge serve` process and where to reach its parts."""

    home: Path
    port: int
    entrance_port: int
    args: list[str] = field(default_factory=list)
    env_extra: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def entrance_url(self) -> str:
        return f"http://127.0.0.1:{self.entrance_port}"

    @property
    def log_file(self) -> Path:
        return self.home / "serve-output.log"

    def env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "BRIDGE_HOME": str(self.home),
            "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "BRIDGE_LOG_LEVEL": "INFO",
            "COLUMNS": "200",
        }
        for name in ("NGROK_AUTHTOKEN", "BRIDGE_TOKEN", "MLFLOW_TRACKING_URI"):
            env.pop(name, None)
        env.update(self.env_extra)
        return env

    def token(self) -> str:
        """The access token, read the way a user would: `bridge token`."""
        out = self.cli("token")
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", "from bridge.cli import main; main()", *args],
            env=self.env(), capture_output=True, text=True, timeout=timeout,
        )

    def launch(self) -> None:
        """Start the process without waiting for it to come up."""
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from bridge.cli import main; main()", "serve",
                 "--port", str(self.port), "--entrance-port", str(self.entrance_port), *self.args],
                stdout=out, stderr=subprocess.STDOUT, env=self.env(), cwd=REPO,
            )  # fmt: skip

    def start(self, timeout: float = 90.0) -> None:
        """Start the process and wait until it has published its record and its entrance answers."""
        self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bridge serve exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            state = self.state()
            if state and state.get("last_publish") and _answers(self.entrance_url):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"bridge serve did not come up in {timeout} s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def state(self) -> dict | None:
        try:
            return json.loads((self.home / "serve-state.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def descendants(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        children = self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Whatever the outcome, leave nothing running behind the test.
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        code = self.proc.returncode
        return code


def _answers(url: str) -> bool:
    try:
        return requests.get(url + "/health", timeout=1).status_code == 401
    except requests.RequestException:
        return False


def new_bridge_serve(root: Path, *args: str, env_extra: dict[str, str] | None = None) -> BridgeServe:
    port = free_port()
    entrance = free_port()
    while entrance == port:
        entrance = free_port()
    return BridgeServe(home=root, port=port, entrance_port=entrance, args=["--tunnel", "none", *args],
                       env_extra=env_extra or {})


@pytest.fixture(scope="session")
def bridge_serve(tmp_path_factory) -> BridgeServe:
    """One `bridge serve --tunnel none` for the session; tests must not kill or rotate anything in it."""
    server = new_bridge_serve(tmp_path_factory.mktemp("bridge-serve") / "home")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_bridge_serve(tmp_path):
    """A factory for per-test `bridge serve` processes (stopped at the end of the test)."""
    started: list[BridgeServe] = []

    def start(*args: str, env_extra: dict[str, str] | None = None, name: str = "serve") -> BridgeServe:
        server = new_bridge_serve(tmp_path / f"{name}-{len(started)}", *args, env_extra=env_extra)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()
