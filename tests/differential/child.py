"""A program run through bridge in a child process, which may be killed with SIGKILL mid-program.

    python -m tests.differential.child PROGRAM.json URL JOURNAL TRACE.json NONCE EXIT_FLUSH_S

The child connects (its own in-memory fault transport for `link_fault`), runs the program and writes its
trace (ids, errors, reads) to TRACE.json — at a `kill` call just before `kill -9` of itself, otherwise at the
end, before the interpreter exits and bridge's exit handler flushes for at most EXIT_FLUSH_S seconds.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import mlflow

from tests.differential.executor import Executor, Trace
from tests.differential.programs import Call


def trace_json(trace: Trace) -> dict:
    """The parts of a trace the parent compares; JSON round-tripped on both sides so tuples read alike."""
    return json.loads(
        json.dumps(
            {
                "experiments": {str(k): v for k, v in trace.experiments.items()},
                "runs": {str(k): v for k, v in trace.runs.items()},
                "errors": {str(k): v for k, v in trace.errors.items()},
                "said": {str(k): v for k, v in trace.said.items()},
                "reads": [[r.step, r.call, r.result, r.online, r.reconnected] for r in trace.reads],
            }
        )
    )


class ChildWorld:
    """bridge.connect() in this process; faults come from its own transport; `kill` is SIGKILL."""

    name = "bridge-child"

    def __init__(self, url: str, journal: Path, trace_path: Path, exit_flush_s: float) -> None:
        from tests.support.transport import FaultTransport

        self.url, self.journal, self.trace_path, self.exit_flush_s = url, journal, trace_path, exit_flush_s
        self.transport = FaultTransport()
        self.trace: Trace | None = None
        self.conn = None

    def begin(self) -> None:
        from bridge.client.connect import connect

        self.conn = connect(
            self.url,
            os.environ["BRIDGE_TOKEN"],
            journal=self.journal,
            probe_timeout=2.0,
            flush_at_exit=self.exit_flush_s,
            transport=self.transport,
        )

    def fault(self, call: Call) -> None:
        if call.op == "link_fault":
            args = call.args
            self.transport.fail(args["kind"], path=args["path"], times=args["times"], status=args["status"])
        elif call.op == "heal":
            self.transport.clear()
        elif call.op == "kill":
            self.trace_path.write_text(json.dumps(trace_json(self.trace)))
            os.kill(os.getpid(), signal.SIGKILL)
        # proxy faults, reconnects and copies are the in-process scenario's

    def flush(self) -> None:
        self.transport.clear()
        self.conn.flush(60)
        deadline = time.monotonic() + 60
        while self.conn.status().online is not True and time.monotonic() < deadline:
            time.sleep(0.05)

    def end(self) -> None:
        """Nothing: the interpreter's exit (bridge's exit handler) is what this scenario tests."""


def main() -> None:
    program_path, url, journal, trace_path, nonce, exit_flush_s = sys.argv[1:7]
    program = [Call.from_json(c) for c in json.loads(Path(program_path).read_text())]
    world = ChildWorld(url, Path(journal), Path(trace_path), float(exit_flush_s))
    executor = Executor(program, world, nonce, end_runs=False)  # MLflow's exit hook ends them, as for a user
    world.trace = executor.trace
    executor.run()
    Path(trace_path).write_text(json.dumps(trace_json(executor.trace)))
    mlflow.set_tracking_uri(world.conn.tracking_uri)  # what a user's process holds when it exits


if __name__ == "__main__":
    main()
