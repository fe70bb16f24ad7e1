"""What every benchmark needs: free ports, servers to measure, process-tree memory, percentiles, tables.

    from _common import MlflowServer, BridgeServe, StandInNgrok, tree_memory, percentile, print_table

The client benchmarks (log_call, requests, outage, drain, kill9) also share the measured-child plumbing at the end:
`child_env`, `run_child`/`child_process`, the RESULT line, `lean_server_behind_proxy`,
`server_points`.

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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # so `tests.support.*` (the stand-in ngrok agent) imports from a plain script
    sys.path.insert(0, str(REPO))

from bridge.serve.child import SCRUBBED_ENV, ServeChild, free_port  # noqa: E402

_live: list[Any] = []  # servers to stop if a benchmark dies half way


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_live):
        try:
            server.stop()
        except Exception:  # best effort at exit
            pass


# --- small helpers ---------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without bridge/MLflow/ngrok settings, telemetry off, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env.update(extra)
    return env


def venv_script(name: str) -> Path | None:
    """The console script `name` next to this interpreter (what a user's shell would run), if installed."""
    path = Path(sys.executable).with_name(name)
    return path if path.exists() and os.access(path, os.X_OK) else None


def bridge_cli() -> list[str]:
    """The command that runs bridge's CLI: the installed `bridge` script, or the module via this interpreter."""
    script = venv_script("bridge")
    return [str(script)] if script else [sys.executable, "-c", "from bridge.cli import main; main()"]


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


def wait_cpu_quiet(
    pid: int, below: float = 0.05, window_s: float = 1.0, windows: int = 2, timeout_s: float = 60.0
) -> bool:
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
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print(line)
    for row in text_rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)))
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


def argument_parser(
    description: str, quick_help: str = "fewer repetitions: a smoke run, not a measurement"
) -> argparse.ArgumentParser:
    """An argparse parser with the `--quick` switch every benchmark accepts."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    return parser


def file_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file ("" if it is not there yet)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


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
        self.started_at = time.perf_counter()
        # The child holds its own copy of the log's descriptor; ours is closed once it has started.
        with open(self.root / "mlflow-server.log", "ab") as log:
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
        return file_tail(self.root / "mlflow-server.log", lines)

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
class StandInCloudflared:
    """The test suite's stand-in cloudflared (tests/support/fake_cloudflared.py) as a `cloudflared` on a `bridge
    serve` child's PATH: a quick tunnel whose edge enforces Cloudflare's limits (413 over 100 MB, 524 after 100 s,
    429 beyond 200 in flight; `limits` takes FAKE_CLOUDFLARED_* overrides)."""

    folder: Path
    limits: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from tests.support.tunnel import make_fake_cloudflared

        self.agent = make_fake_cloudflared(self.folder)
        self.env = {
            "PATH": f"{self.agent.path.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "FAKE_CLOUDFLARED_STATE": str(self.agent.state_file),
            **self.limits,
        }

    def local_url(self, public_url: str, timeout_s: float = 5.0) -> str:
        """The edge's real http://127.0.0.1:<port> for a public https://….trycloudflare.com URL."""
        return self.agent.local_url(public_url, timeout=timeout_s)


class BridgeServe(ServeChild):
    """The library's `bridge serve` child (file secret store, never the user's keyring), stopped at exit."""

    def env(self) -> dict[str, str]:
        return {**super().env(), "COLUMNS": "200"}

    def launch(self) -> None:
        super().launch()
        _live.append(self)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        code = super().stop(timeout_s)
        self.proc = None
        if self in _live:
            _live.remove(self)
        return code


# --- client benchmarks: a measured child process per variant, behind the test-owned flaky proxy ----------


def child_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment for a measured child: its own BRIDGE_HOME, no keyring, no inherited MLflow settings."""
    env = {k: v for k, v in clean_env().items() if not k.startswith(("MLFLOW_", "BRIDGE_"))}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "BRIDGE_HOME": str(home),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring",
            **extra,
        }
    )
    return env


def client_argument_parser(description: str, quick_help: str) -> argparse.ArgumentParser:
    """`argument_parser` plus the hidden `--child CLIENT --url URL --journal PATH` a script passes to its children."""
    parser = argument_parser(description, quick_help)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--journal", help=argparse.SUPPRESS)
    return parser


def connect_client(client: str, url: str, experiment: str, journal: str, async_logging: bool | None = None) -> Any:
    """In a child: point this process's MLflow at `url` through bridge (its Connection returned) or stock MLflow.

    `client` "bridge" calls `bridge.connect()`; anything else sets MLflow's tracking URI and experiment and,
    unless `async_logging` is None, MLflow's async switch. Returns None for stock MLflow.
    """
    import mlflow

    if client == "bridge":
        import bridge

        return bridge.connect(url=url, token="bench-token", experiment=experiment, journal=journal)
    mlflow.set_tracking_uri(url)
    mlflow.set_experiment(experiment)
    if async_logging is not None:
        mlflow.config.enable_async_logging(async_logging)
    return None


def report_result(result: dict) -> None:
    """In a child: hand `result` to the parent as the `RESULT {json}` line."""
    print("RESULT " + json.dumps(result), flush=True)


def _result_from(line: str) -> dict | None:
    return json.loads(line[len("RESULT ") :]) if line.startswith("RESULT ") else None


def run_child(cmd: Sequence[str], env: dict[str, str], what: str, timeout_s: float) -> dict:
    """Run a child to its end and return its RESULT, or raise naming `what` with the end of its stderr."""
    proc = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    results = [r for r in map(_result_from, proc.stdout.splitlines()) if r is not None]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"{what} child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return results[-1]


@contextmanager
def child_process(cmd: Sequence[str], env: dict[str, str], stdin: bool = False) -> Iterator[subprocess.Popen]:
    """A child talking over text pipes (stdin too if `stdin`), killed if still running when the block ends."""
    proc = subprocess.Popen(
        list(cmd),
        env=env,
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def expect_line(proc: subprocess.Popen, word: str) -> str:
    """Read the child's stdout up to a line starting with `word` (returned), or raise when it ends first."""
    for line in proc.stdout:
        if line.startswith(word):
            return line
    raise RuntimeError(f"child ended before {word}: {proc.stderr.read()[-3000:]}")


def tell_child(proc: subprocess.Popen, word: str) -> None:
    """Send the child one line on its stdin (what its `sys.stdin.readline()` waits for)."""
    proc.stdin.write(word + "\n")
    proc.stdin.flush()


def read_result(proc: subprocess.Popen, what: str) -> dict:
    """Read the child's stdout up to its RESULT line and return it, or raise naming `what`."""
    for line in proc.stdout:
        result = _result_from(line)
        if result is not None:
            return result
    raise RuntimeError(f"{what} child ended without a result: {proc.stderr.read()[-3000:]}")


def start_lean_mlflow_server(root: Path) -> MlflowServer:
    """The anchor server: a plain `mlflow server` (SQLite, one worker, no job execution), healthy on 127.0.0.1."""
    server = MlflowServer(root=root, args=["--workers", "1"], env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    server.start()
    try:
        server.wait_healthy(120)
    except Exception:
        server.stop()
        raise
    return server


@contextmanager
def lean_server_behind_proxy(work: Path) -> Iterator[tuple[MlflowServer, Any]]:
    """A lean server in `work`/server and the test-owned flaky proxy in front of it; both closed at the end."""
    from tests.support.flaky_proxy import FlakyProxy

    server = start_lean_mlflow_server(work / "server")
    proxy = None
    try:
        proxy = FlakyProxy("127.0.0.1", server.port)
        yield server, proxy
    finally:
        if proxy is not None:
            proxy.close()
        server.stop()


def lean_server_caption(quick: bool) -> str:
    """How a client benchmark's table names its anchor server and the machine."""
    return f"plain mlflow server (SQLite, 1 worker) on 127.0.0.1{' [quick]' if quick else ''}; {machine_summary()}"


def server_points_and_steps(server: MlflowServer, experiment: str, key: str = "loss") -> tuple[int, int]:
    """(points, distinct steps) of metric `key` the server stored for `experiment`, read from its SQLite file."""
    import sqlite3

    conn = sqlite3.connect(f"file:{server.root / 'mlflow.db'}?mode=ro", uri=True)
    try:
        return conn.execute(
            "select count(*), count(distinct m.step) from metrics m "
            "join runs r on m.run_uuid = r.run_uuid "
            "join experiments e on r.experiment_id = e.experiment_id "
            "where e.name = ? and m.key = ?",
            (experiment, key),
        ).fetchone()
    finally:
        conn.close()


def server_points(server: MlflowServer, experiment: str, key: str = "loss") -> int:
    """Points of metric `key` the server stored for `experiment`."""
    return server_points_and_steps(server, experiment, key)[0]
