"""The replica's cost (issue 18): bytes written to the replica folder per minute of logging, and time per snapshot.

A client logs `--rate` metric points a second (and a param every 100 points, a 1 MB artifact every 10 s) into a
local journal for `--seconds`, while a `ReplicaKeeper` snapshots it every `--every` seconds into another folder
(standing in for Google Drive).

    python benchmarks/bench_replica.py [--seconds 60] [--rate 1000] [--every 5]
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import argument_parser, print_table, scratch_dir

from bridge.client.journal import Journal
from bridge.client.journal.replica import Replica, ReplicaKeeper


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--every", type=float, default=5.0)
    args = parser.parse_args()
    seconds = 10.0 if args.quick else args.seconds
    root = scratch_dir("replica")
    journal = Journal(root / "local" / "journal.sqlite")
    keeper = ReplicaKeeper(Replica(journal.path, root / "drive" / "journal.sqlite"), journal.sync, args.every)
    keeper.start()
    artifact = root / "weights.bin"
    artifact.write_bytes(os.urandom(1 << 20))
    stop = threading.Event()

    def durable() -> None:  # the sender's journal-sync thread
        while not stop.wait(1.0):
            journal.sync()

    threading.Thread(target=durable, daemon=True).start()
    started = time.monotonic()
    step = 0
    next_artifact = started
    while time.monotonic() - started < seconds:
        journal.append_batch("run", [("loss", float(step), int(time.time() * 1000), step)])
        if step % 100 == 0:
            journal.append_batch("run", params=[(f"p{step}", "1")])
        if time.monotonic() >= next_artifact:
            journal.spool_artifact("run", artifact, f"weights/{step}.bin")
            next_artifact += 10.0
        step += 1
        time.sleep(max(0.0, started + step / args.rate - time.monotonic()))
    stop.set()
    keeper.stop()
    elapsed = time.monotonic() - started
    journal.close()
    rows = [
        ("logging", f"{elapsed:.0f} s, {step} points, {step // 100} params, {int(elapsed // 10) + 1} x 1 MiB files"),
        ("snapshots", keeper.snapshots),
        ("bytes written to the replica per minute", f"{keeper.bytes_written / elapsed * 60 / 2**20:.1f} MiB"),
        ("time per snapshot", f"{1000 * keeper.seconds / max(1, keeper.snapshots):.1f} ms"),
    ]
    print_table("replica cost", ["", "value"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
