"""`bridge serve` as a child process: what `bridge demo`, the test suite and the benchmarks start.

One launcher, so a private BRIDGE_HOME, free ports, waiting for readiness and stopping the whole process
tree are written once. The child runs the CLI exactly as a user would, in a session of its own, so a Ctrl-C
meant for the parent reaches it only through `stop()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

from bridge.errors import ServeError

#: How long `start()` waits for a child to publish its record and open its entrance.
START_TIMEOUT_S = 120.0
#: How long `stop()` lets the child shut down after SIGTERM before it is killed.
STOP_TIMEOUT_S = 30.0
#: The caller's bridge/MLflow/ngrok settings: never inherited, so a child serves only its own home.
SCRUBBED_ENV = (
    "BRIDGE_HOME", "BRIDGE_TOKEN", "BRIDGE_URL", "BRIDGE_DISCOVERY", "BRIDGE_JOURNAL", "BRIDGE_PORT",
    "BRIDGE_ENTRANCE_PORT", "BRIDGE_TUNNEL", "BRIDGE_PUBLISH", "BRIDGE_WORKERS", "NGROK_AUTHTOKEN",
    "MLFLOW_TRACKING_URI", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
    "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
)  # fmt: skip
CLI = (sys.executable, "-c", "from bridge.cli import main; main()")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports."""
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def http_status(url: str, timeout_s: float = 1.0) -> int | None:
    """The status code of GET `url`, or None when nothing answers."""
    try:
        return requests.get(url, timeout=timeout_s).status_code
    except requests.RequestException:
        return None


@dataclass
class ServeChild:
    """A `bridge serve` child process with a BRIDGE_HOME of its own.

    `args` are passed to `bridge serve` after the ports (`--tunnel none` is the caller's choice). Unless
    `keyring` is true, its secrets live in the 0600 file store inside `home`, never in the user's keyring.
    """

    home: Path
    args: Sequence[str] = ()
    env_extra: Mapping[str, str] = field(default_factory=dict)
    port: int = 0
    entrance_port: int = 0
    keyring: bool = False
    log_name: str = "serve-output.log"
    proc: subprocess.Popen | None = None
    started_at: float = 0.0

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def entrance_url(self) -> str:
        return f"http://127.0.0.1:{self.entrance_port}"

    @property
    def log_file(self) -> Path:
        return self.home / self.log_name

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
        env.update(BRIDGE_HOME=str(self.home), MLFLOW_DISABLE_TELEMETRY="true")
        if not self.keyring:
            env["PYTHON_KEYRING_BACKEND"] = "keyring.backends.null.Keyring"
        env.update(self.env_extra)
        return env

    def cli(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        """Run another `bridge` command against this child's home (e.g. `token`, `status`)."""
        return subprocess.run([*CLI, *args], env=self.env(), capture_output=True, text=True, timeout=timeout_s)

    def token(self) -> str:
        """The access token, read as a user would: `bridge token`."""
        out = self.cli("token")
        if out.returncode != 0 or not out.stdout.strip():
            raise ServeError(f"`bridge token` failed for {self.home}: {out.stderr.strip()[-300:]}")
        return out.stdout.strip().splitlines()[-1].strip()

    def launch(self) -> None:
        """Start the process (free ports are picked when none were given) without waiting for it."""
        self.home.mkdir(parents=True, exist_ok=True)
        if not (self.port and self.entrance_port):
            self.port, self.entrance_port = free_ports(2)
        self.started_at = time.perf_counter()
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(
                [*CLI, "serve", "--port", str(self.port), "--entrance-port", str(self.entrance_port), *self.args],
                cwd=self.home, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self.env(),
                start_new_session=True,
            )  # fmt: skip

    def state(self) -> dict | None:
        """What the child wrote to serve-state.json (what `bridge status` reads)."""
        try:
            return json.loads((self.home / "serve-state.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def published(self) -> dict | None:
        """The state once a record was published successfully, else None."""
        state = self.state()
        return state if ((state or {}).get("last_publish") or {}).get("ok") else None

    def ready(self) -> bool:
        """Start-up is over (record published or tried, start-up output printed) and the entrance answers HTTP."""
        return bool((self.state() or {}).get("ready_at")) and http_status(self.entrance_url + "/health") is not None

    def wait_ready(self, check: Callable[[ServeChild], Any] | None = None, timeout_s: float = START_TIMEOUT_S) -> Any:
        """Poll until `check(self)` is truthy (default: `ready()`) and return its value; stop and raise on failure."""
        check = check or (lambda child: child.ready())
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = self.stop()  # it is gone already: this only sweeps up what it may have left
                raise ServeError(f"bridge serve exited with {code}:\n{self.log_tail()}")
            value = check(self)
            if value:
                return value
            if time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"bridge serve did not come up within {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def start(self, check: Callable[[ServeChild], Any] | None = None, timeout_s: float = START_TIMEOUT_S) -> Any:
        """`launch()`, then `wait_ready()`."""
        self.launch()
        return self.wait_ready(check, timeout_s)

    def output(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def descendants(self) -> list[psutil.Process]:
        """Every live process under the child: MLflow too, though it runs in a session of its own."""
        if self.proc is None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (what Ctrl-C does), then SIGKILL whatever of its tree is left; returns its exit code."""
        if self.proc is None:
            return None
        children = self.descendants()  # found before the parent goes, while they are still its children
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything it started that outlived it
        for child in children:  # psutil checks it is still the same process before killing it
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        return self.proc.returncode
