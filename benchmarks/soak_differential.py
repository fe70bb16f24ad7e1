"""Soak the differential harness: many seeds of random MLflow programs, stock MLflow vs bridge under faults.

    python benchmarks/soak_differential.py --seeds 200                 # ~2 s a program on the 2-core dev box
    python benchmarks/soak_differential.py --seeds 50 --restart --enable all --no-shrink
    python benchmarks/soak_differential.py --seeds 50 --files          # big files, throttled and flapping links
    python benchmarks/soak_differential.py --replay program.json [--repeat 5]   # one program, as printed

Each seed is one Hypothesis run of `--examples` programs (`--steps` calls at most); a seed with a difference
is shrunk to a minimal program (unless --no-shrink) and printed with the seed. Prints seeds and programs per
minute and, at the end, every failing seed; exit status 1 if any seed failed. `--enable` switches on rules
and checks that known defects keep off (tests/differential/allowances.py; `all` for every one).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20, help="how many seeds to run")
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--examples", type=int, default=3, help="programs per seed")
    parser.add_argument("--steps", type=int, default=30, help="calls per program at most")
    parser.add_argument("--minutes", type=float, default=None, help="stop starting new seeds after this long")
    parser.add_argument("--enable", default="", help="comma list of allowances to switch on, or 'all'")
    parser.add_argument("--restart", action="store_true", help="also restart the bridge server mid-program")
    parser.add_argument("--no-copy-journal", action="store_true", help="never deliver a stale journal copy again")
    parser.add_argument("--no-faults", action="store_true", help="no proxy or link faults (a plain differential run)")
    parser.add_argument(
        "--child",
        choices=("kill", "slow-exit"),
        help="the subprocess scenarios: the program runs "
        "in a child killed with SIGKILL (or exiting over a slow link), then `bridge sync`",
    )
    parser.add_argument(
        "--files",
        action="store_true",
        help="the file rules: big files in parts through bridge's entrance over a link that goes down, is "
        "throttled and flaps, and the file lane's orders checked (tests/differential/orders.py)",
    )
    parser.add_argument("--no-shrink", action="store_true", help="report a failing seed's first program as is")
    parser.add_argument("--replay", type=Path, help="run this program (the JSON a difference prints) and stop")
    parser.add_argument("--repeat", type=int, default=1, help="with --replay: how many times")
    args = parser.parse_args()
    # `kill` (SIGTERM) ends the soak like Ctrl-C: through the `finally` below, which stops its two servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.enable:
        os.environ["BRIDGE_DIFF_ENABLE"] = args.enable
    os.environ.setdefault("BRIDGE_HOME", tempfile.mkdtemp(prefix="soak-home-"))
    os.environ.setdefault("PYTHON_KEYRING_BACKEND", "keyring.backends.null.Keyring")

    from tests.differential import allowances, orders
    from tests.differential.harness import Difference, Harness, run_seed, start_servers
    from tests.differential.programs import FAULTS, FILES, KILL9, SLOW_EXIT, Features
    from tests.support.flaky_proxy import FlakyProxy

    features = Features(
        proxy_faults=not args.no_faults,
        link_faults=not args.no_faults,
        restart=args.restart,
        copy_journal=not args.no_copy_journal,
    )
    if args.child:
        features = KILL9 if args.child == "kill" else SLOW_EXIT
    if args.files:
        features = FILES
    root = Path(tempfile.mkdtemp(prefix="soak-differential-"))
    print(
        f"soak: {args.seeds} seeds from {args.first_seed}, {args.examples} programs each, ≤ {args.steps} calls; "
        f"{features}\nallowances:\n{allowances.describe()}\nwork folder {root}",
        flush=True,
    )
    oracle, target = start_servers(root)
    proxy = FlakyProxy("127.0.0.1", target.port, io_timeout=10.0)
    harness = Harness(oracle, target, proxy, root / "programs")
    if args.files:
        harness.start_entrance(root / "staging")
    failed: list[tuple[int, str]] = []
    started = time.monotonic()
    done = 0
    if args.replay:
        from tests.differential.programs import Call

        program = [Call.from_json(c) for c in json.loads(args.replay.read_text())]
        try:
            for attempt in range(args.repeat):
                try:
                    harness.check(program, files=args.files)
                    early = (
                        " (head starts: {} of {} uploads, {} bytes before the sha256)".format(*harness.head_starts[-1])
                        if args.files
                        else ""
                    )
                    print(f"replay {attempt}: same state{early}", flush=True)
                except Difference as exc:
                    failed.append((attempt, str(exc)))
                    print(f"replay {attempt}: {exc}", flush=True)
        finally:
            harness.stop_entrance()
            proxy.close()
            target.stop()
            oracle.stop()
        return 1 if failed else 0
    try:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            if args.minutes is not None and time.monotonic() - started > args.minutes * 60:
                break
            proxy.set_mode("pass")
            try:
                run_seed(
                    harness,
                    seed,
                    features=features,
                    max_examples=args.examples,
                    steps=args.steps,
                    shrink=not args.no_shrink,
                )
                verdict = "clean"
            except Difference as exc:
                failed.append((seed, str(exc)))
                verdict = "DIFFERS"
                print(f"\n===== seed {seed} differs =====\n{exc}\n", flush=True)
            done += 1
            minutes = (time.monotonic() - started) / 60
            print(
                f"seed {seed}: {verdict}  ({done} seeds, {harness.programs} programs in {minutes:.1f} min: "
                f"{done / minutes:.1f} seeds/min, {harness.programs / minutes:.1f} programs/min)",
                flush=True,
            )
    finally:
        harness.stop_entrance()
        proxy.close()
        target.stop()
        oracle.stop()
    minutes = (time.monotonic() - started) / 60
    print(
        f"\nsoak done: {done} seeds ({harness.programs} programs, {harness.calls} calls) in {minutes:.1f} min; "
        f"{done - len(failed)} clean, {len(failed)} differ"
        + (f"; failing seeds: {', '.join(str(s) for s, _ in failed)}" if failed else "")
    )
    if args.files:
        print("file rules applied: " + ", ".join(f"{rule} {harness.rule_checks[rule]}" for rule in orders.RULES))
        early, created, sent = (
            (sum(counts) for counts in zip(*harness.head_starts, strict=True)) if harness.head_starts else (0, 0, 0)
        )
        print(
            f"head starts: {early} of {created} uploads (in {sum(c[0] > 0 for c in harness.head_starts)} of "
            f"{len(harness.head_starts)} programs; {sent / 2**20:.1f} MiB of their parts sent before the sha256)"
        )
    print(
        "faults injected: "
        + (", ".join(f"{op} {n}" for op, n in sorted(harness.op_counts.items()) if op in FAULTS) or "none")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
