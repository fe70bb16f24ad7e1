"""The harness: two real `mlflow server`s, a flaky proxy, and `check(program)` that runs and compares one program.

Used by the CI test (test_differential.py, with pytest's session servers) and the soak runner
(benchmarks/soak_differential.py, which starts its own).
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.differential import allowances, orders
from tests.differential.arrivals import RecordingEntrance
from tests.differential.child import trace_json
from tests.differential.executor import Executor, Read, Trace
from tests.differential.faults import SENDER_ENV, TOKEN, BridgeWorld, OracleWorld
from tests.differential.oracle import capture, compare
from tests.differential.programs import (
    FILE_PART_BYTES,
    Call,
    Features,
    FileProgramMachine,
    ProgramMachine,
    listing,
)
from tests.support.flaky_proxy import FlakyProxy
from tests.support.mlflow_server import PlainMlflowServer, free_port

#: Quiet what both worlds print per run and experiment; a difference report is what matters.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
logging.getLogger("mlflow").setLevel(logging.WARNING)


class Difference(AssertionError):
    """The bridge world's server differs from the oracle's after the same program."""


@dataclass
class Harness:
    oracle: PlainMlflowServer
    target: PlainMlflowServer
    proxy: FlakyProxy
    workdir: Path
    programs: int = 0
    calls: int = 0
    seconds: float = 0.0
    last: list[str] = field(default_factory=list)
    op_counts: Counter = field(default_factory=Counter)  # calls run, by operation (the faults too)
    # The file rules' way in: a flaky proxy in front of bridge's entrance in front of `target` (start_entrance).
    entrance: RecordingEntrance | None = None
    entrance_proxy: FlakyProxy | None = None
    rule_checks: Counter = field(default_factory=Counter)  # how often each file rule applied (orders.py)
    # Per program of the file rules, in order: (uploads begun without a sha256 — head starts, uploads created, bytes
    # of the head starts' parts sent before the sha256) (orders.head_starts).
    head_starts: list[tuple[int, int, int]] = field(default_factory=list)

    def db(self, server: PlainMlflowServer) -> Path:
        return Path(server.backend_store_uri[len("sqlite:///") :])

    def check(self, program: list[Call], *, files: bool = False) -> None:
        """Run `program` against the oracle and through bridge; raise Difference listing what differs.

        `files`: through `entrance_proxy` and the entrance, and the file lane's orders are checked too (orders.py).
        """
        started = time.monotonic()
        nonce = uuid.uuid4().hex[:10]
        experiments = sum(1 for call in program if call.op == "create_experiment")
        oracle_world = OracleWorld(self.oracle)
        oracle_trace = Executor(program, oracle_world, nonce).run()
        oracle_state = capture(
            self.oracle.url, self.db(self.oracle), nonce, experiments, oracle_trace, OracleWorld.key_of
        )
        workdir = self.workdir / nonce
        workdir.mkdir(parents=True)
        if files:
            assert self.entrance is not None and self.entrance_proxy is not None, "start_entrance() first"
            self.entrance.clear()
            bridge_world = BridgeWorld(self.target, self.entrance_proxy, workdir, files=True)
        else:
            bridge_world = BridgeWorld(self.target, self.proxy, workdir)
        bridge_trace = Executor(program, bridge_world, nonce).run()
        bridge_state = capture(
            self.target.url, self.db(self.target), nonce, experiments, bridge_trace, BridgeWorld.key_of
        )
        differences = compare(
            program, (oracle_state, oracle_trace), (bridge_state, bridge_trace), bridge_world.problems
        )
        if files:
            assert self.entrance is not None
            arrivals = self.entrance.arrivals()
            self.head_starts.append(orders.head_starts(arrivals))
            differences += orders.check(program, arrivals, bridge_state, bridge_trace, self.rule_checks)
        self._finish(program, differences, started, workdir)

    def start_entrance(self, staging: Path) -> None:
        """Bridge's entrance in front of `target` (uploads in parts of FILE_PART_BYTES, staged in `staging`, placed
        in the target's artifact folder as `bridge serve` does), and a flaky proxy in front of it."""
        self.entrance = RecordingEntrance(
            self.target.port, TOKEN, staging, self.target.root / "artifacts", max_part=4 * FILE_PART_BYTES
        )
        self.entrance.start()
        self.entrance_proxy = FlakyProxy("127.0.0.1", self.entrance.port, io_timeout=10.0)

    def stop_entrance(self) -> None:
        if self.entrance_proxy is not None:
            self.entrance_proxy.close()
        if self.entrance is not None:
            self.entrance.stop()
        self.entrance = self.entrance_proxy = None

    def check_in_child(self, program: list[Call], *, slow_link: bool = False) -> None:
        """The program through bridge in a child process: killed with SIGKILL at its `kill` call, or exiting
        normally (over a slow link when `slow_link`) — then `bridge sync` delivers what its journal kept."""
        started = time.monotonic()
        nonce = uuid.uuid4().hex[:10]
        killed = any(call.op == "kill" for call in program)
        experiments = sum(1 for call in program if call.op == "create_experiment")
        oracle_trace = Executor(program, OracleWorld(self.oracle, abandon_runs=killed), nonce, end_runs=not killed).run(
            stop_at_kill=True
        )
        oracle_state = capture(
            self.oracle.url, self.db(self.oracle), nonce, experiments, oracle_trace, OracleWorld.key_of
        )
        workdir = self.workdir / nonce
        workdir.mkdir(parents=True)
        (workdir / "program.json").write_text(json.dumps([c.to_json() for c in program]))
        journal, trace_path = workdir / "journal.sqlite", workdir / "trace.json"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MLFLOW_TRACKING", "MLFLOW_REGISTRY", "BRIDGE_JOURNAL", "MLFLOW_EXPERIMENT"))
        }
        env.update(SENDER_ENV, BRIDGE_TOKEN=TOKEN, MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true")
        root = Path(__file__).resolve().parents[2]
        problems: list[str] = []
        if slow_link:
            self.proxy.set_mode("slow", delay_s=0.05, chunk_size=1024)
        try:
            child = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tests.differential.child",
                    str(workdir / "program.json"),
                    self.proxy.url,
                    str(journal),
                    str(trace_path),
                    nonce,
                    "1.0",
                ],
                cwd=root,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
        finally:
            self.proxy.set_mode("pass")
        want_rc = -9 if killed else 0
        if child.returncode != want_rc:
            problems.append(f"child exited {child.returncode}, expected {want_rc}: {child.stderr[-1500:]}")
        if not killed:
            from bridge.client.connect import queue

            backlog = queue(journal).backlog
            if backlog.total and "not delivered yet" not in child.stderr:
                problems.append(
                    f"the child exited leaving {backlog.total} entries in its journal without a word "
                    f"(stderr: {child.stderr[-600:]!r})"
                )
        sync = subprocess.run(
            [
                str(Path(sys.executable).with_name("bridge")),
                "sync",
                "--journal",
                str(journal),
                "--url",
                self.proxy.url,
                "--timeout",
                "120",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=200,
        )
        if sync.returncode != 0:
            problems.append(f"bridge sync exited {sync.returncode}: {(sync.stdout + sync.stderr)[-1500:]}")
        if trace_path.exists():
            data = json.loads(trace_path.read_text())
            bridge_trace = Trace(
                {int(k): v for k, v in data["experiments"].items()},
                {int(k): v for k, v in data["runs"].items()},
                [Read(*r) for r in data["reads"]],
                {int(k): v for k, v in data["errors"].items()},
                said={int(k): v for k, v in data.get("said", {}).items()},
            )
        else:
            problems.append("the child wrote no trace")
            bridge_trace = Trace()
        bridge_state = capture(
            self.target.url, self.db(self.target), nonce, experiments, bridge_trace, BridgeWorld.key_of
        )
        plain = trace_json(oracle_trace)
        oracle_trace.reads = [Read(*r) for r in plain["reads"]]
        differences = compare(program, (oracle_state, oracle_trace), (bridge_state, bridge_trace), problems)
        self._finish(program, differences, started, workdir)

    def _finish(self, program: list[Call], differences: list[str], started: float, workdir: Path) -> None:
        """Count the program; raise Difference (its report kept beside the journal) or remove its folder."""
        self.programs += 1
        self.calls += len(program)
        self.op_counts.update(call.op for call in program)
        self.seconds += time.monotonic() - started
        if differences:
            text = report(program, differences)
            (workdir / "report.txt").write_text(text)  # beside the journal, for a look while shrinking goes on
            raise Difference(text)
        shutil.rmtree(workdir, ignore_errors=True)  # kept only when it differs, for a look at the journal


def report(program: list[Call], differences: list[str]) -> str:
    return (
        "bridge's server differs from stock MLflow's after this program:\n"
        + listing(program)
        + "\ndifferences:\n"
        + "\n".join(f"  - {d}" for d in differences[:40])
        + (f"\n  … {len(differences) - 40} more" if len(differences) > 40 else "")
        + "\nprogram as JSON (for a regression test):\n  "
        + json.dumps([c.to_json() for c in program])
    )


def machine_for(harness: Harness, features: Features) -> type[ProgramMachine]:
    """A ProgramMachine subclass whose teardown checks with `harness` and whose rules follow `features`."""
    if features.child:

        def check(program: list[Call]) -> None:
            harness.check_in_child(program, slow_link=features.slow_exit)
    elif features.files:

        def check(program: list[Call]) -> None:
            harness.check(program, files=True)
    else:
        check = harness.check
    base = FileProgramMachine if features.files else ProgramMachine
    return type("DifferentialProgram", (base,), {"check": staticmethod(check), "features": features})


def run_seed(
    harness: Harness,
    seed: int,
    *,
    features: Features = Features(),  # noqa: B008 - a frozen dataclass: one shared default is safe
    max_examples: int = 5,
    steps: int = 20,
    shrink: bool = True,
) -> None:
    """Hypothesis's stateful run of `max_examples` programs from `seed`; a difference raises with the seed."""
    machine = machine_for(harness, features)
    machine._hypothesis_internal_use_seed = seed  # what @seed(...) sets; run_state_machine_as_test reads it
    phases = [Phase.generate, Phase.shrink] if shrink else [Phase.generate]
    config = settings(
        max_examples=max_examples,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        derandomize=False,
        phases=phases,
        print_blob=True,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
    )
    try:
        run_state_machine_as_test(machine, settings=config)
    except Exception as exc:
        # Anything else that escapes (connect() failing, a capture error) also fails the seed, named as such.
        kind = "" if isinstance(exc, Difference) else f"{type(exc).__name__} (not a state difference): "
        raise Difference(
            f"seed {seed} ({features}): {kind}{exc}{_inner_failures(exc)}\n(allowances:\n{allowances.describe()})"
        ) from exc


def _inner_failures(exc: BaseException) -> str:
    """What a group (Hypothesis's FlakyFailure: a failure its replay did not repeat) holds: each failure's
    message and where it was raised — else the report says only "Inconsistent results"."""
    # BaseExceptionGroup is built in from Python 3.11 (Hypothesis raises one); on 3.10 there is none to unpack.
    group = getattr(builtins, "BaseExceptionGroup", None)
    if group is None or not isinstance(exc, group):
        return ""
    parts = []
    for number, inner in enumerate(exc.exceptions, 1):
        where = "".join(traceback.format_tb(inner.__traceback__)[-3:]) if inner.__traceback__ else ""
        parts.append(f"\n--- failure {number} of {len(exc.exceptions)}: {type(inner).__name__}: {inner}\n{where}")
    return "".join(parts)


def start_servers(root: Path) -> tuple[PlainMlflowServer, PlainMlflowServer]:
    """An oracle and a target `mlflow server` under `root` (the soak's; the tests use their fixtures)."""
    servers = []
    for name in ("oracle", "target"):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        server = PlainMlflowServer(root=folder, port=free_port(), backend_store_uri=f"sqlite:///{folder / 'mlflow.db'}")
        server.start()
        servers.append(server)
    return servers[0], servers[1]
