"""The two worlds a program runs in, and the faults the bridge world suffers.

    OracleWorld   stock MLflow: plain `http://` tracking URI straight to its own `mlflow server`.
    BridgeWorld   `bridge.connect(proxy, token, journal=…)` to another `mlflow server` behind the test-owned
                  flaky proxy (tests/support/flaky_proxy.py), whose mode the program's fault calls set:

        fault(mode, path, times)  lost_ack · reset_request · reset_response · http_5xx · slow · blackhole
                                  for `times` requests whose path contains `path`; refuse until heal()
        heal()                    the proxy passes everything again
        reconnect()               a second bridge.connect() on the same journal
        copy_journal()            a copy of the journal now, delivered again by `sync` after the program
        restart_server()          the bridge world's MLflow server stops and starts on the same port and store
        link_fault(kind, path, times, status)
                                  the client's own transport (bridge/client/link/'s seam, driven by
                                  tests/support/transport.py's FaultTransport): refuse · timeout ·
                                  lost_answer (the server applied it) · status — exact, no proxy timing

    With the file rules (programs.FILES) the proxy stands in front of bridge's entrance (arrivals.py), which
    serves resumable uploads in parts of programs.FILE_PART_BYTES, and the link itself is the fault:

        link_down() / link_up()   the proxy refuses every connection until link_up (or heal, or a flush)
        throttle(rate)            bytes per second client → server from now on (None: unlimited)
        flap(up_s, down_s)        the link flaps: up for up_s, down for down_s, again (up_s None: steady)

    A flush heals faults and a link that is down, but keeps the link's throttle and flapping: what waits is
    delivered over that link (FILES_FLUSH_TIMEOUT_S). `pause(s)` lets the bridge world's lanes work for a while.

At the end the bridge world heals the link and flushes; entries left or dead letters are differences.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from pathlib import Path

import mlflow

from tests.differential.programs import FILE_PART_BYTES, Call
from tests.support.client import FAST_SENDER_ENV, _reset_mlflow
from tests.support.flaky_proxy import FlakyProxy
from tests.support.mlflow_server import PlainMlflowServer

TOKEN = "differential-harness-token-" + "d" * 20
#: How long a flush may take once the link is healed (backoff after a fault is at most a few seconds).
FLUSH_TIMEOUT_S = 60.0
#: With the file rules a flush delivers big files over a throttled, flapping link (at worst ~1 MiB/s, up half the
#: time): a program's files take up to a minute or so.
FILES_FLUSH_TIMEOUT_S = 150.0
#: The sender's HTTP timeout in the bridge world: a blackholed request costs this much.
HTTP_TIMEOUT_S = "3"

_PROXY_MODES = {
    "lost_ack": ("lost_ack", {}),
    "reset_request": ("reset", {"at": "request"}),
    "reset_response": ("reset", {"at": "response"}),
    "http_5xx": ("http_5xx", {"status": 503}),
    "slow": ("slow", {"delay_s": 0.02, "chunk_size": 2048}),
    "blackhole": ("blackhole", {}),
}

#: Environment bridge reads (sender tempo) and what connect() exports; set for the bridge world only.
SENDER_ENV = {**FAST_SENDER_ENV, "BRIDGE_HTTP_TIMEOUT_S": HTTP_TIMEOUT_S}
_EXPORTED = (
    "BRIDGE_JOURNAL",
    "BRIDGE_JOURNAL_LIMIT",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_AUTH",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_EXPERIMENT_NAME",
    "BRIDGE_TOKEN",
    "BRIDGE_URL",
)


class _Environment:
    """Set variables for one world and put everything back afterwards (connect() exports some)."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        for name in set(self.values) | set(_EXPORTED):
            self.saved[name] = os.environ.get(name)
            os.environ.pop(name, None)
        os.environ.update(self.values)

    def __exit__(self, *exc) -> None:
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class OracleWorld:
    """Stock MLflow straight to `server`."""

    name = "oracle"

    def __init__(self, server: PlainMlflowServer, *, abandon_runs: bool = False) -> None:
        self.server = server
        self.abandon_runs = abandon_runs  # the program ends in kill -9: nothing ends its active runs
        self.problems: list[str] = []
        self._env = _Environment({})

    def begin(self) -> None:
        self._env.__enter__()
        _reset_mlflow()
        mlflow.set_tracking_uri(self.server.url)

    def fault(self, call: Call) -> None:
        """Faults are the bridge world's; the oracle carries on as if nothing happened."""

    def pause(self, seconds: float) -> None:
        """Nothing runs in the background here: no need to wait."""

    def flush(self) -> None:
        """Stock MLflow's calls are synchronous: nothing to wait for."""

    def end(self) -> None:
        if self.abandon_runs:
            from mlflow.tracking import fluent

            fluent._active_run_stack.get().clear()
        _reset_mlflow()
        self._env.__exit__()

    @staticmethod
    def key_of(run) -> str:
        return run.info.run_id


def _copy_if_still_there(source: str, target: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.copy2(source, target)


class BridgeWorld:
    """bridge.connect() through a flaky proxy to `server`; `problems` collects what went wrong besides state."""

    name = "bridge"

    def __init__(self, server: PlainMlflowServer, proxy: FlakyProxy, workdir: Path, *, files: bool = False) -> None:
        """`files`: `proxy` leads to bridge's entrance (the file rules), and uploads go in small parts."""
        self.server = server
        self.proxy = proxy
        self.workdir = workdir
        self.journal = workdir / "journal.sqlite"
        self.copies: list[Path] = []
        self.problems: list[str] = []
        self.conn = None
        self.flush_timeout_s = FILES_FLUSH_TIMEOUT_S if files else FLUSH_TIMEOUT_S
        env = dict(SENDER_ENV)
        if files:
            env["BRIDGE_UPLOAD_PART_BYTES"] = str(FILE_PART_BYTES)
        self._env = _Environment(env)
        from tests.support.transport import FaultTransport

        self.transport = FaultTransport()  # every connect() of this world sends through it

    def _connect(self):
        from bridge.client.connect import connect

        self.conn = connect(
            self.proxy.url, TOKEN, journal=self.journal, probe_timeout=2.0, flush_at_exit=0.0, transport=self.transport
        )

    def begin(self) -> None:
        self._env.__enter__()
        _reset_mlflow()
        self._steady_link(throttle=True)
        self._connect()

    def _steady_link(self, *, throttle: bool) -> None:
        """The proxy passes everything, the link stays up (and, with `throttle`, is as fast as it goes)."""
        self.proxy.set_mode("pass")
        self.proxy.stop_flapping()
        if throttle:
            self.proxy.throttle(up_bytes_per_s=None)

    def fault(self, call: Call) -> None:
        op, args = call.op, call.args
        if op == "fault":
            if args["mode"] == "refuse":
                self.proxy.set_mode("refuse")
            else:
                mode, options = _PROXY_MODES[args["mode"]]
                self.proxy.set_mode(mode, path=args["path"], times=args["times"], **options)
        elif op == "link_fault":
            self.transport.fail(args["kind"], path=args["path"], times=args["times"], status=args["status"])
        elif op == "heal":
            self.proxy.set_mode("pass")
            self.transport.clear()
        elif op == "link_up":
            self.proxy.set_mode("pass")
        elif op == "link_down":
            self.proxy.set_mode("refuse")
        elif op == "throttle":
            self.proxy.throttle(up_bytes_per_s=args["up_bytes_per_s"])
        elif op == "flap":
            if args["up_s"] is None:
                self.proxy.stop_flapping()
            else:
                self.proxy.flap(args["up_s"], args["down_s"])
        elif op == "reconnect":
            self._connect()  # connect() closes the connection it replaces
        elif op == "copy_journal":
            self.copies.append(self._copy_journal(len(self.copies)))
        elif op == "restart_server":
            self.server.stop()
            self.server.start()
        else:
            raise ValueError(f"the bridge world has no fault {op!r}")

    def _copy_journal(self, n: int) -> Path:
        """A consistent copy of the journal file and its spool, as a Drive folder copied now would hold."""
        target = self.workdir / f"copy{n}" / "journal.sqlite"
        target.parent.mkdir(parents=True)
        source = sqlite3.connect(self.journal)
        try:
            dest = sqlite3.connect(target)
            source.backup(dest)
            dest.close()
        finally:
            source.close()
        spool = self.journal.with_name(self.journal.name + ".spool")
        if spool.exists():
            # The sender goes on meanwhile: a file delivered and discarded during the copy is not in it, as a
            # folder sync would miss it (seed 100133: copytree raised on it).
            shutil.copytree(spool, target.with_name(target.name + ".spool"), copy_function=_copy_if_still_there)
        return target

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)

    def flush(self) -> None:
        self.proxy.set_mode("pass")
        self.transport.clear()
        left = self.conn.flush(self.flush_timeout_s)
        if left:
            self.problems.append(
                f"flush left {left} entries {self.flush_timeout_s:.0f} s after the link healed: "
                f"{self.conn.status().last_error}"
            )
            return
        # Reads ask the server only while the sender believes it is online; after a fault it probes again soon.
        deadline = time.monotonic() + self.flush_timeout_s
        while self.conn.status().online is not True and time.monotonic() < deadline:
            time.sleep(0.05)

    def end(self) -> None:
        try:
            if self.conn is not None:
                self.flush()
                status = self.conn.status()
                if status.dead_letters:
                    self.problems.append(f"{status.dead_letters} dead letter(s): {self._dead_letters()}")
                self.conn.close()
        finally:
            _reset_mlflow()
            self._steady_link(throttle=True)
        try:
            for copy in self.copies:
                self._deliver_copy(copy)
        finally:
            self._env.__exit__()

    def _dead_letters(self) -> str:
        from bridge.client.connect import queue

        try:
            dead = queue(self.journal).dead
        except Exception as exc:  # the count is the finding; the details are a courtesy
            return f"(could not list them: {exc})"
        return "; ".join(f"{d.op.kind} {d.op.key or ''} ({d.reason}): {d.error}"[:200] for d in dead[:5])

    def _deliver_copy(self, copy: Path) -> None:
        from bridge.client.connect import sync

        os.environ["BRIDGE_TOKEN"] = TOKEN
        report = sync(copy, self.proxy.url, timeout=FLUSH_TIMEOUT_S)
        if report.left:
            self.problems.append(f"sync of journal copy {copy.parent.name} left {report.left} entries")

    @staticmethod
    def key_of(run) -> str | None:
        return run.data.tags.get("bridge.run_key")
