"""What every benchmark needs: free ports, servers to measure, process-tree memory, percentiles, tables.

    from _common import MlflowServer, BridgeServe, StandInNgrok, tree_memory, percentile, print_table

Everything listens on 127.0.0.1 and lives in a temporary folder of its own; every start has a deadline and
every server started here is stopped (whole process tree) by `stop()` or at interpreter exit.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # so `tests.support.*` (the stand-in ngrok agent) imports from a plain script
    sys.path.insert(0, str(REPO))

#: Environment names that would leak the caller's bridge/MLflow/ngrok settings into a measured server.
_SCRUBBED_ENV = (
    "BRIDGE_HOME", "BRIDGE_TOKEN", "BRIDGE_URL", "BRIDGE_DISCOVERY", "BRIDGE_PORT", "BRIDGE_ENTRANCE_PORT",
    "BRIDGE_TUNNEL", "BRIDGE_PUBLISH", "BRIDGE_WORKERS", "NGROK_AUTHTOKEN", "MLFLOW_TRACKING_URI",
    "MLFLOW_BACKEND_STORE_URI", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
)  # fmt: skip

_live: list[Any] = []  # servers to stop if a benchmark dies half way


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_live):
        try:
            server.stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


# --- small helpers ---------------------------------------------------------------------------------


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


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without bridge/MLflow/ngrok settings, telemetry off, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env.update(extra)
    return env


def venv_script(name: str) -> Path | None:
    """The console script `name` next to this interpreter (what a user's shell would run), if installed."""
    path = Path(sys.executable).with_name(name)
    return path if path.exists() and os.access(path, os.X_OK) else None


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy (returned), or raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def http_status(url: str, timeout_s: float = 1.0, **kw: Any) -> int | None:
    """The status code of GET `url`, or None when nothing answers."""
    try:
        return requests.get(url, timeout=timeout_s, **kw).status_code
    except requests.RequestException:
        return None


def percentile(values: Sequence[float], pct: float) -> float:
    """The `pct`-th percentile (0..100) with linear interpolation, like numpy's default."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def tree_processes(pid: int) -> list[psutil.Process]:
    """The process `pid` and all its live descendants (zombies left out)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    alive = []
    for proc in procs:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def tree_memory(pid: int) -> tuple[int, int]:
    """(total RSS in bytes, process count) of the tree rooted at `pid`."""
    total, count = 0, 0
    for proc in tree_processes(pid):
        try:
            total += proc.memory_info().rss
            count += 1
        except psutil.NoSuchProcess:
            pass
    return total, count


def wait_memory_settled(
    pid: int, quiet_s: float = 3.0, timeout_s: float = 60.0, tolerance: float = 0.02
) -> tuple[int, int]:
    """Tree (RSS, count) once the count is unchanged and RSS moved < `tolerance` for `quiet_s` (or at timeout)."""
    deadline = time.monotonic() + timeout_s
    last = tree_memory(pid)
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = tree_memory(pid)
        if now[1] != last[1] or abs(now[0] - last[0]) > tolerance * max(last[0], 1):
            stable_since = time.monotonic()
            last = now
        elif time.monotonic() - stable_since >= quiet_s:
            return now
    return tree_memory(pid)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by the tree rooted at `pid`."""
    total = 0.0
    for proc in tree_processes(pid):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def wait_cpu_quiet(pid: int, below: float = 0.05, window_s: float = 1.0, windows: int = 2,
                   timeout_s: float = 60.0) -> bool:
    """Wait until the tree at `pid` used < `below` of a core for `windows` windows in a row (False at timeout).

    Start-up work that runs late (a background import, a first housekeeping round) then stays out of a measurement.
    """
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while time.monotonic() < deadline:
        before = tree_cpu_seconds(pid)
        time.sleep(window_s)
        quiet = quiet + 1 if tree_cpu_seconds(pid) - before < below * window_s else 0
        if quiet >= windows:
            return True
    return False


def kill_tree(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM `pid`'s process group and tree, SIGKILL whatever is left after `grace_s`."""
    procs = tree_processes(pid)
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A plain-text table (copies cleanly into Markdown notes)."""
    text_rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text_rows)) if text_rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print(line)
    for row in text_rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    sys.stdout.flush()


def machine_summary() -> str:
    """One line naming what the numbers were measured on."""
    import platform

    import mlflow

    load = os.getloadavg()
    return (
        f"{psutil.cpu_count()} CPU(s), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"load {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; "
        f"Python {platform.python_version()}, MLflow {mlflow.__version__}"
    )


def argument_parser(description: str) -> argparse.ArgumentParser:
    """An argparse parser with the `--quick` switch every benchmark accepts."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions: a smoke run, not a measurement")
    return parser


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed at exit."""
    path = Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


# --- servers ---------------------------------------------------------------------------------------


@dataclass
class MlflowServer:
    """A stock `mlflow server`, started the way a user would: `mlflow server --backend-store-uri sqlite:///…`.

    `args` adds flags (e.g. ["--workers", "1"]); `env` adds environment. The working directory is `root`,
    so MLflow's default `./mlartifacts` lands there too.
    """

    root: Path
    port: int = 0
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    started_at: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend_store_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def command(self) -> list[str]:
        mlflow_cli = venv_script("mlflow")
        launcher = [str(mlflow_cli)] if mlflow_cli else [sys.executable, "-m", "mlflow"]
        return [*launcher, "server", "--backend-store-uri", self.backend_store_uri,
                "--host", "127.0.0.1", "--port", str(self.port), *self.args]  # fmt: skip

    def start(self) -> None:
        """Launch it (returns at once; `wait_healthy()` waits)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        log = open(self.root / "mlflow-server.log", "ab")
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            self.command(), cwd=self.root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=clean_env(**self.env), start_new_session=True,
        )  # fmt: skip
        _live.append(self)

    def wait_healthy(self, timeout_s: float = 120.0) -> float:
        """Seconds from `start()` until GET /health answers 200."""

        def healthy() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log_tail()}")
            return http_status(self.url + "/health", timeout_s=1.0) == 200

        wait_until(healthy, timeout_s, f"mlflow server on {self.url} to answer /health", interval_s=0.05)
        return time.perf_counter() - self.started_at

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.root / "mlflow-server.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc.pid)
            self.proc.wait(timeout=10)
            self.proc = None
        if self in _live:
            _live.remove(self)


@dataclass
class StandInNgrok:
    """The test suite's stand-in ngrok agent (tests/support/fake_ngrok.py), set up for a `bridge serve` child."""

    folder: Path
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from tests.support.tunnel import FAKE_AUTHTOKEN, FakeNgrok, write_agent_executable

        self.agent = FakeNgrok(
            path=write_agent_executable(self.folder),
            state_file=self.folder / "forwards.json",
            session_lock=self.folder / "session.lock",
        )
        self.env = {
            "BRIDGE_NGROK_PATH": str(self.agent.path),
            "FAKE_NGROK_STATE": str(self.agent.state_file),
            "NGROK_AUTHTOKEN": FAKE_AUTHTOKEN,
            "FAKE_NGROK_AUTHTOKEN": FAKE_AUTHTOKEN,
        }

    def local_url(self, public_url: str, timeout_s: float = 5.0) -> str:
        """The forwarder's real http://127.0.0.1:<port> for a public https://….ngrok-free.app URL."""
        return self.agent.local_url(public_url, timeout=timeout_s)

    def kill_agents(self) -> None:
        for pid in self.agent.agent_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class BridgeServe:
    """A `bridge serve` child with a BRIDGE_HOME of its own (file secret store, never the user's keyring)."""

    home: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    entrance_port: int = 0
    proc: subprocess.Popen | None = None
    started_at: float = 0.0

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def entrance_url(self) -> str:
        return f"http://127.0.0.1:{self.entrance_port}"

    def _env(self) -> dict[str, str]:
        return clean_env(
            BRIDGE_HOME=str(self.home), PYTHON_KEYRING_BACKEND="keyring.backends.null.Keyring", COLUMNS="200",
            **self.env,
        )  # fmt: skip

    def _launcher(self) -> list[str]:
        script = venv_script("bridge")
        return [str(script)] if script else [sys.executable, "-c", "from bridge.cli import main; main()"]

    def start(self) -> None:
        """Launch it (returns at once; `wait_ready()` waits)."""
        self.home.mkdir(parents=True, exist_ok=True)
        if not (self.port and self.entrance_port):
            self.port, self.entrance_port = free_ports(2)
        log = open(self.home / "serve-output.log", "ab")
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            [*self._launcher(), "serve", "--port", str(self.port), "--entrance-port", str(self.entrance_port),
             *self.args],
            cwd=self.home, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
        )  # fmt: skip
        _live.append(self)

    def state(self) -> dict | None:
        """What it wrote to serve-state.json (what `bridge status` reads)."""
        try:
            return json.loads((self.home / "serve-state.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def published(self) -> dict | None:
        """The state once a record was published successfully, else None."""
        state = self.state()
        publish = (state or {}).get("last_publish") or {}
        return state if publish.get("ok") else None

    def wait_ready(self, check: Callable[["BridgeServe"], Any] | None = None, timeout_s: float = 120.0) -> Any:
        """Poll until `check(self)` is truthy (default: a record is published); return its value."""
        check = check or (lambda serve: serve.published())

        def ready() -> Any:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"bridge serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            return check(self)

        return wait_until(ready, timeout_s, "bridge serve to be ready", interval_s=0.05)

    def token(self) -> str:
        """The access token, read as a user would: `bridge token`."""
        out = subprocess.run([*self._launcher(), "token"], env=self._env(), capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"`bridge token` failed: {out.stderr}")
        return out.stdout.strip()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.home / "serve-output.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (what Ctrl-C does), then make sure nothing of its tree is left."""
        if self.proc is not None:
            procs = tree_processes(self.proc.pid)
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            for proc in procs:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            self.proc = None
        if self in _live:
            _live.remove(self)
