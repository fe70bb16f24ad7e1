"""The supervised `mlflow server` child: lean defaults, real readiness, restart with backoff, no orphans.

MLflow 3.17's own defaults (4 uvicorn workers, a job runner and 7 huey consumers: ~15 processes,
~3 GB) are wrong for a workstation, so this starts 1 worker with job execution off and lets
`--workers` raise it. The child runs in its own process group so stopping it stops all of it.

One process, through a private name (deliberately): `mlflow server` normally stays resident only to
wait for the uvicorn it starts through `mlflow.server._exec_cmd` (~300 MB for nothing). `_main`
below replaces that private name in the child so uvicorn is exec'd in its place, when job execution
is off and the call looks as expected. If a future MLflow drops or changes the name, nothing is
replaced and MLflow runs in its plain two-process layout (the process-group stop covers both).

SQLite backends (the embedded default or a `sqlite:///` URI the user passes) are switched to WAL
journaling before MLflow opens them: the mode persists in the file, makes each commit one append
and one fsync instead of several, and is safe for a database on a local disk (not on a network
share, where SQLite's locking cannot be trusted in any mode).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import requests

from bridge import config
from bridge.errors import ConfigError, MlflowStartError
from bridge.processes import process_group_alive
from bridge.retry import compute_backoff_ms

log = logging.getLogger(__name__)

DEFAULT_START_TIMEOUT_S = 90.0
DEFAULT_STOP_GRACE_S = 10.0
#: How many of MLflow's own log lines a start failure shows.
LOG_TAIL_LINES = 20
DEFAULT_HEALTH_INTERVAL_S = 10.0
DEFAULT_HEALTH_FAILURES = 3
DEFAULT_HEALTH_TIMEOUT_S = 5.0
#: A restart that then stays up this long resets the backoff.
STABLE_AFTER_S = 60.0
#: The private MLflow name `_main` replaces to run MLflow as one process (see the module docstring).
EXEC_HOOK = "_exec_cmd"  # private: see bridge/mlflow_internals.py


#: Query parameters that carry secrets in database URIs (libpq's `password`, `sslpassword`, …).
_SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "sslpassword", "secret", "token", "api_key"})


def redact_uri(uri: str) -> str:
    """`uri` with any password — in the user info or the query — replaced by `***`, safe for logs and errors."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable URI>"
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
    query = "&".join(
        f"{key}=***" if key.lower() in _SECRET_QUERY_KEYS else (f"{key}={value}" if sep else key)
        for key, sep, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _passwords_of(uri: str) -> list[str]:
    """Every secret `redact_uri` would hide: the user-info password and secret query values."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return []
    found = [parts.password] if parts.password else []
    for key, _, value in (item.partition("=") for item in parts.query.split("&") if item):
        if key.lower() in _SECRET_QUERY_KEYS and value:
            found.append(value)
    return found


def sqlite_database_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URI, or None for other stores and in-memory SQLite."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.split("+", 1)[0].lower() != "sqlite" or not rest.startswith("/"):
        return None
    path = rest[1:].split("?", 1)[0]  # sqlite:///rel.db → rel.db, sqlite:////abs.db → /abs.db
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return Path(path)


def enable_wal(path: Path) -> bool:
    """Put the SQLite database at `path` in WAL mode (creating the file if missing); True if it is now WAL.

    Anything in the way (missing folder, not a database, locked) is left for MLflow to report in its own words.
    """
    if not path.parent.is_dir():
        return False
    try:
        conn = sqlite3.connect(path, timeout=5.0)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        log.warning("Could not switch %s to WAL journaling (%s); MLflow will use it as it is", path, exc)
        return False
    if str(mode).lower() != "wal":
        log.warning("SQLite kept %s in %s journaling instead of WAL", path, mode)
        return False
    return True


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class MlflowOptions:
    """How to run MLflow. Unset stores mean the embedded default under the bridge data directory."""

    port: int = config.DEFAULT_MLFLOW_PORT
    backend_store_uri: str | None = None
    artifacts_destination: str | None = None
    workers: int = config.DEFAULT_WORKERS
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S
    stop_grace_s: float = DEFAULT_STOP_GRACE_S
    log_file: Path | None = None
    #: While running, /health is probed this often; this many misses in a row count as a hang and restart it.
    health_interval_s: float = DEFAULT_HEALTH_INTERVAL_S
    health_failures: int = DEFAULT_HEALTH_FAILURES
    health_timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"MLflow port {self.port} is not in 1..65535")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.backend_store_uri is not None and self.backend_store_uri.startswith("file:"):
            raise ConfigError("MLflow 3 refuses file:// backend stores; use sqlite:///PATH or postgresql://…")

    def resolved_backend_store_uri(self) -> str:
        return self.backend_store_uri or f"sqlite:///{config.paths().mlflow_db}"

    def resolved_artifacts_destination(self) -> str:
        return self.artifacts_destination or str(config.paths().artifacts_dir)

    def resolved_log_file(self) -> Path:
        return self.log_file or config.paths().logs_dir / "mlflow.log"


@dataclass
class MlflowStatus:
    """What the supervisor reports about MLflow; no secret in it."""

    url: str
    pid: int | None = None
    restarts: int = 0
    healthy: bool = False
    last_exit: str | None = None
    events: list[str] = field(default_factory=list)


class MlflowProcess:
    """One `mlflow server` child on 127.0.0.1: `start()`, `healthy()`, `watch()`, `stop()`."""

    HOST = "127.0.0.1"

    def __init__(self, options: MlflowOptions | None = None) -> None:
        self.options = options or MlflowOptions()
        self._proc: subprocess.Popen | None = None
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._session = requests.Session()
        self.status = MlflowStatus(url=self.url)

    def __repr__(self) -> str:
        return f"MlflowProcess(url={self.url!r}, pid={self.pid}, workers={self.options.workers})"

    @property
    def url(self) -> str:
        return f"http://{self.HOST}:{self.options.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        """The argv that starts `mlflow server` (through `_main` below, so MLflow's CLI becomes uvicorn).

        The backend URI travels in the environment, out of `ps`.
        """
        return [
            sys.executable, "-m", "bridge.serve.mlflow_process", "server",
            "--artifacts-destination", self.options.resolved_artifacts_destination(),
            "--serve-artifacts",
            "--host", self.HOST,
            "--port", str(self.options.port),
            "--workers", str(self.options.workers),
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # MLflow reads --backend-store-uri from here too; a PostgreSQL password then stays out of `ps`.
        env["MLFLOW_BACKEND_STORE_URI"] = self.options.resolved_backend_store_uri()
        # The job runner and its huey consumers are what make stock MLflow 15 processes and ~3 GB.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env["MLFLOW_DISABLE_TELEMETRY"] = "true"
        env["PYTHONUNBUFFERED"] = "1"
        env[PARENT_PID_ENV] = str(os.getpid())
        return env

    def alive(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    def healthy(self, timeout_s: float = 2.0) -> bool:
        """True when /health answers and a real API call reaches the backend store."""
        try:
            health = self._session.get(self.url + "/health", timeout=timeout_s)
            if health.status_code != 200:
                return False
            api = self._session.get(
                self.url + "/api/2.0/mlflow/experiments/search", params={"max_results": 1}, timeout=timeout_s
            )
            return api.status_code == 200
        except requests.RequestException:
            return False

    def start(self) -> None:
        """Start MLflow and wait until it is healthy, or clean up and raise `MlflowStartError` with its log."""
        with self._lock:
            if self.alive():
                return
            self._stopping.clear()
            self._spawn_and_wait()

    def _spawn_and_wait(self) -> None:
        opts = self.options
        if not port_is_free(self.HOST, opts.port):
            raise MlflowStartError(
                f"port {opts.port} on {self.HOST} is already in use (another MLflow or `bridge serve`?); "
                "choose another with --port"
            )
        if opts.backend_store_uri is None:
            config.paths().ensure()
        sqlite_path = sqlite_database_path(opts.resolved_backend_store_uri())
        if sqlite_path is not None:
            enable_wal(sqlite_path)
        if opts.artifacts_destination is None:
            config.paths().artifacts_dir.mkdir(parents=True, exist_ok=True)
        log_path = opts.resolved_log_file()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_fh:
            offset = log_fh.tell()
            log.info(
                "Starting MLflow on %s (backend %s, artifacts %s, %d worker(s)); log: %s",
                self.url, redact_uri(opts.resolved_backend_store_uri()),
                redact_uri(opts.resolved_artifacts_destination()), opts.workers, log_path,
            )  # fmt: skip
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,  # its own process group: stop() reaches uvicorn too
            )
        self.status.pid = self._proc.pid
        deadline = time.monotonic() + opts.start_timeout_s
        while time.monotonic() < deadline:
            if self._stopping.is_set():
                self._kill_group()
                raise MlflowStartError("MLflow start was interrupted by shutdown")
            code = self._proc.poll()
            if code is not None:
                self._kill_group()
                raise MlflowStartError(
                    f"mlflow server exited with code {code} during start-up "
                    f"(backend {redact_uri(opts.resolved_backend_store_uri())}).\n"
                    f"Last lines of {log_path}:\n{self._log_tail(log_path, offset)}"
                )
            if self.healthy(timeout_s=1.0):
                self.status.healthy = True
                log.info("MLflow is healthy at %s (pid %d)", self.url, self._proc.pid)
                return
            time.sleep(0.1)
        self._kill_group()
        raise MlflowStartError(
            f"mlflow server did not become healthy within {opts.start_timeout_s:.0f} s on {self.url}.\n"
            f"Last lines of {log_path}:\n{self._log_tail(log_path, offset)}"
        )

    def _log_tail(self, path: Path, offset: int) -> str:
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                text = fh.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        # MLflow may echo the backend URI; its password must not travel on in our error message.
        for uri in (self.options.resolved_backend_store_uri(), self.options.resolved_artifacts_destination()):
            for password in _passwords_of(uri):
                text = text.replace(password, "***")
        lines = [line for line in text.splitlines() if line.strip()]
        return "\n".join(lines[-LOG_TAIL_LINES:]) or "(MLflow wrote nothing)"

    def _kill_group(self) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after the grace period."""
        proc = self._proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session made the child its group leader
        try:
            os.killpg(pgid, signal.SIGTERM)
            os.killpg(pgid, signal.SIGCONT)  # a stopped (hung) process acts on SIGTERM only once continued
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=self.options.stop_grace_s)
        except subprocess.TimeoutExpired:
            pass
        # The leader may be gone while its uvicorn child still holds the port: wait for the group to empty.
        deadline = time.monotonic() + self.options.stop_grace_s
        while process_group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait()
        self.status.healthy = False

    def interrupt(self) -> None:
        """Make a start in progress give up, and `watch()` return; safe from a signal handler."""
        self._stopping.set()

    def stop(self) -> None:
        """Stop MLflow and everything it started; `watch()` will not restart it."""
        self._stopping.set()
        with self._lock:
            if self._proc is not None:
                log.info("Stopping MLflow (pid %d)", self._proc.pid)
                self._kill_group()
            self.status.pid = None
        self._session.close()

    def watch(self, stop: threading.Event, on_event: Callable[[str], None] | None = None) -> None:
        """Block until `stop` is set, restarting MLflow with backoff whenever it dies or stops answering."""
        recent_restarts = 0  # drives the backoff; forgiven once a restart stays up STABLE_AFTER_S
        up_since = time.monotonic()
        missed_probes = 0
        next_probe = time.monotonic() + self.options.health_interval_s
        while not self._wait(stop, 0.5):
            proc = self._proc
            if proc is None:
                continue
            hung = False
            if proc.poll() is None:
                if recent_restarts and time.monotonic() - up_since > STABLE_AFTER_S:
                    recent_restarts = 0
                if time.monotonic() < next_probe:
                    continue
                next_probe = time.monotonic() + self.options.health_interval_s
                missed_probes = 0 if self._answers_health() else missed_probes + 1
                self.status.healthy = missed_probes == 0
                if missed_probes < self.options.health_failures:
                    continue
                hung = True  # alive but deaf: as good as dead to every client
            with self._lock:
                if self._stopping.is_set() or self._proc is not proc:
                    continue
                self.status.healthy = False
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                if hung:
                    self.status.last_exit = f"stopped answering /health at {stamp}"
                    self._report(
                        on_event,
                        f"MLflow (pid {proc.pid}) stopped answering /health "
                        f"({missed_probes} probes missed); restarting",
                    )
                else:
                    self.status.last_exit = f"code {proc.returncode} at {stamp}"
                    self._report(on_event, f"MLflow (pid {proc.pid}) exited with code {proc.returncode}; restarting")
                self._kill_group()  # also whatever it started, which would keep the port
                missed_probes = 0
            while True:
                if recent_restarts:
                    wait_s = compute_backoff_ms(recent_restarts - 1, min_backoff_ms=500) / 1000
                    if self._wait(stop, wait_s):
                        return
                recent_restarts += 1
                try:
                    with self._lock:
                        if self._stopping.is_set():
                            return
                        self._spawn_and_wait()
                except MlflowStartError as exc:
                    self._report(on_event, f"MLflow restart failed: {str(exc).splitlines()[0]}", error=True)
                    continue
                up_since = time.monotonic()
                next_probe = up_since + self.options.health_interval_s
                self.status.restarts += 1
                self._report(on_event, f"MLflow restarted (pid {self.pid}, restart #{self.status.restarts})")
                break

    def _answers_health(self) -> bool:
        try:
            return self._session.get(self.url + "/health", timeout=self.options.health_timeout_s).status_code == 200
        except requests.RequestException:
            return False

    def _wait(self, stop: threading.Event, seconds: float) -> bool:
        """Sleep up to `seconds`; True as soon as either the caller or `stop()` asks to stop."""
        deadline = time.monotonic() + seconds
        while True:
            if stop.is_set() or self._stopping.is_set():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            stop.wait(min(left, 0.25))

    def _report(self, on_event: Callable[[str], None] | None, event: str, *, error: bool = False) -> None:
        (log.error if error else log.warning)(event)
        self.status.events = [*self.status.events, event][-10:]
        if on_event is not None:
            on_event(event)


PARENT_PID_ENV = "BRIDGE_PARENT_PID"


def _die_with_parent() -> None:
    """Linux: get SIGTERM when `bridge serve` dies, even by SIGKILL; the setting survives the exec into uvicorn.

    The kernel sends it when the *thread* that started this process exits: MLflow is started from the main
    thread and restarted from the supervisor's watch thread, both of which live until `bridge serve` stops.
    """
    expected = os.environ.pop(PARENT_PID_ENV, "")  # popped: uvicorn's own children don't inherit it
    if not sys.platform.startswith("linux") or not expected.isdigit():
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG; best effort
        return
    if os.getppid() != int(expected):  # bridge died before prctl took effect
        os._exit(0)


def _main(argv: list[str]) -> None:
    """Run MLflow's own `mlflow server` CLI, with its uvicorn exec'd in place of it when that is safe.

    Only with job execution off (the one case where MLflow does nothing with the child after starting it),
    only if MLflow still has the private `EXEC_HOOK`, and only for a call shaped as in MLflow 3.x
    (an argv list, asynchronous, output not captured); anything else goes to MLflow's own function.
    """
    _die_with_parent()
    import mlflow.server
    from mlflow.cli import cli

    original = getattr(mlflow.server, EXEC_HOOK, None)
    if callable(original) and os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "").lower() == "false":

        def exec_instead(cmd, *args, extra_env=None, env=None, **kwargs):
            shaped_as_expected = (
                not args
                and isinstance(cmd, (list, tuple))
                and len(cmd) > 0
                and all(isinstance(c, (str, os.PathLike)) for c in cmd)
                and kwargs.get("synchronous") is False
                and not kwargs.get("capture_output")
                and not kwargs.get("stream_output")
                and set(kwargs) <= {"synchronous", "capture_output", "stream_output", "throw_on_error"}
            )
            if not shaped_as_expected:
                return original(cmd, *args, extra_env=extra_env, env=env, **kwargs)
            merged = {**(env if env is not None else os.environ), **(extra_env or {})}
            argv_ = [os.fspath(c) for c in cmd]
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                os.execvpe(argv_[0], argv_, merged)
            except OSError:  # not found or not executable: let MLflow start it its own way
                return original(cmd, *args, extra_env=extra_env, env=env, **kwargs)

        setattr(mlflow.server, EXEC_HOOK, exec_instead)
    cli.main(args=argv, prog_name="mlflow")


if __name__ == "__main__":
    _main(sys.argv[1:])
