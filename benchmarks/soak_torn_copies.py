"""Soak: journal folders torn the way Google Drive uploads them, delivered by `bridge sync` (issue 18).

For each seed a client logs offline for a second while a copier takes each file of its journal folder at its
own random moment (some missing, some cut; tests/support/torn.py). The same torn copy is then delivered by two
bridges — `--before` (a checkout's path, e.g. main) and this one — each to its own stock MLflow server, and per
kind of tear the table shows what the copy's whole parts held and what reached the server, plus what went
wrong: a failed sync that said nothing (exit 0 with something not delivered), a crash, a duplicate.

    python benchmarks/soak_torn_copies.py --before /work/main --seeds 100      # ~1.5 s + 2 syncs per seed
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MlflowServer, argument_parser, print_table, scratch_dir
from mlflow import MlflowClient

from bridge.client.journal.queue import DEAD
from tests.support.torn import holdings, log_offline, server_holdings, write_copy

HERE = str(Path(__file__).resolve().parents[1])


def _sync(code: str, path: Path, url: str) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": code, "COLUMNS": "200"}
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from bridge.cli import app; app()",
            "sync",
            "--journal",
            str(path),
            "--url",
            url,
            "--timeout",
            "120",
        ],
        env=env,
        cwd=code,  # `python -c` puts the working folder first on sys.path: import `code`'s bridge
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def _dead_letters(path: Path) -> int:
    """Dead letters left in a delivered copy (read without opening it as a journal)."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            return conn.execute(f"select count(*) from ops where state={DEAD}").fetchone()[0]
    except sqlite3.DatabaseError:
        return 0


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--before", default=None, help="a checkout whose bridge is 'before' (e.g. /work/main)")
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--first-seed", type=int, default=1000)
    args = parser.parse_args()
    versions = {"after": HERE} | ({"before": args.before} if args.before else {})
    root = scratch_dir("soak-torn")
    servers = {}
    for label in versions:
        server = MlflowServer(root / f"mlflow-{label}")
        server.start()
        server.wait_healthy(600.0)  # a busy machine starts a stock server slowly
        servers[label] = server
    # per kind: copies, held, and per version: delivered, silent losses, crashes, duplicates, seconds
    table: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    try:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            rng = random.Random(seed)
            name = f"soak-{seed}"
            live = root / f"live-{seed}"
            live.mkdir()
            copy = log_offline(live, name, 1.0, rng)
            held = None
            for label, code in versions.items():
                path = write_copy(copy, root / f"copy-{seed}-{label}")
                held = held or holdings(path)
                rc, output, seconds = _sync(code, path, servers[label].url)
                if rc not in (0, 1) or "Traceback" in output:
                    print(f"seed {seed} ({label}): exit {rc}\n{output[-3000:]}", flush=True)
                got, names, repeats = server_holdings(MlflowClient(servers[label].url), name)
                delivered = held.size() - held.missing_from(got).size()
                lost = _dead_letters(path) + len(
                    [p for p in path.parent.iterdir() if ".damaged-" in p.name or ".set-aside-" in p.name]
                )
                for kind in copy.kinds | {"all copies"}:
                    row = table[kind]
                    if label == "after":
                        row["copies"] += 1
                        row["held"] += held.size()
                    row[f"{label} delivered"] += delivered
                    row[f"{label} silent"] += int(rc == 0 and (delivered < held.size() or lost > 0))
                    row[f"{label} said"] += int(rc == 1 and lost > 0)
                    row[f"{label} crash"] += int(rc not in (0, 1) or "Traceback" in output)
                    row[f"{label} dup"] += int(repeats > 0 or len(names) != len(set(names)))
                    row[f"{label} s"] += seconds
            print(f"seed {seed}: {sorted(copy.kinds)}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    labels = list(versions)
    headers = ["kind of tear", "copies", "held"]
    for label in labels:
        headers += [
            f"{label} delivered",
            f"{label} loss said (exit 1)",
            f"{label} silent loss (exit 0)",
            f"{label} crash",
            f"{label} dup",
            f"{label} s/sync",
        ]
    rows = []
    for kind, row in sorted(table.items()):
        line = [kind, int(row["copies"]), int(row["held"])]
        for label in labels:
            line += [
                int(row[f"{label} delivered"]),
                int(row[f"{label} said"]),
                int(row[f"{label} silent"]),
                int(row[f"{label} crash"]),
                int(row[f"{label} dup"]),
                f"{row[f'{label} s'] / max(1, row['copies']):.1f}",
            ]
        rows.append(line)
    print_table(f"torn journal copies, seeds {args.first_seed}..{args.first_seed + args.seeds - 1}", headers, rows)
    after = table["all copies"]
    ok = after["after delivered"] == after["held"] and not any(after[f"after {k}"] for k in ("crash", "dup", "silent"))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
