"""Where the harness does not demand that bridge equal stock MLflow — the one place, each entry with why.

Three kinds of entries:
  * what is compared loosely because it is not the journal's doing (timing, random names, bridge's own tags);
  * documented bridge behaviour that differs from MLflow on purpose (reads that are not read-your-writes);
  * rules and checks switched off because a known defect would fail every program (issue 8's numbers),
    so the rest keeps running. `BRIDGE_DIFF_ENABLE=all` (or a comma list of names below) switches them on,
    which is how a fix is verified; the lead removes an entry once its defect is fixed.
"""

from __future__ import annotations

import os

#: Tags that bridge adds for its own bookkeeping (run key, heartbeat, killed reason): never on the oracle.
IGNORED_TAG_PREFIXES = ("bridge.",)
#: System tags whose value depends on when or where a call ran, not on what the program said.
IGNORED_TAGS = frozenset(
    {
        # A run started without a name gets a random one from the server (oracle) or from the client (bridge):
        # compared only for named runs, see `compare_run_name`.
        "mlflow.runName",
        # The script that logged: pytest for the oracle, tests/differential/child.py in the subprocess scenarios.
        "mlflow.source.name",
        # MLflow's git context of the process that started the run: the subprocess scenarios run in a checkout,
        # the oracle's run may not see one (seed 17 with offline_reads_after_reconnect on).
        "mlflow.source.git.branch",
        "mlflow.source.git.commit",
        "mlflow.source.git.repoURL",
    }
)

#: Metric keys starting with this prefix are logged without a timestamp: MLflow stamps them with the wall
#: clock of the call, which differs between the two executions (and two calls within one millisecond are
#: one point on the server). Their histories are compared as sets of (step, value); every other key is
#: logged with an explicit timestamp and compared exactly, as a multiset of (step, value, timestamp).
CLOCK_STAMPED_PREFIX = "n_"

#: Reads are read-your-writes (docs/journal.md: Reads), online and offline, with one documented
#: exception: offline, a read that needs the server (a metric history partly delivered, a run or experiment
#: the journal does not know) raises TEMPORARILY_UNAVAILABLE instead of passing a part for the whole. The
#: harness accepts that answer for a read made after a fault (before the next flush, which heals the link and
#: waits until the client is online again); every other read must equal the oracle's.
OFFLINE_READ_ANSWERS = (("raised", "MlflowException TEMPORARILY_UNAVAILABLE"),)

#: Writes that must read the server first (MLflow's `log_table` appends to the table it finds listed) raise
#: TEMPORARILY_UNAVAILABLE while the server cannot be reached (docs/journal.md: Reads) rather than
#: replace the server's rows with the new ones alone (H9). The harness does what the person would: it tries
#: the call again after the next flush.
RETRIED_ONCE_ONLINE = frozenset({"log_table"})

#: Known defects (issue 8) that would make (nearly) every program differ: the rule or check named here is
#: off unless enabled. Value: (defect number, why it is off).
KNOWN_DEFECTS: dict[str, tuple[int | str, str]] = {
    # Fixed by 333299c and switched on for good (kept here as the record): read_your_writes (7),
    # change_param (8), delete_experiment_tag (9), table_twice (7), nested_runs (6); defect 4 (a journal
    # delivered twice makes one run); and copy_journal, fixed by the delivery marks (H2: a stale journal copy
    # delivered again re-applied its old writes over newer ones; bridge/client/delivery/marks.py).
    # H3 (offline get_run after a second connect()) is fixed and switched on for good.
    # Journaled now (defects 12, 13; tests/test_models.py, tests/test_registry.py), but off in the CI seeds for
    # time: every log_model spawns MLflow's capture-modules subprocess. `BRIDGE_DIFF_ENABLE=models,registry`.
    "models": (12, "slow: log_model spawns a subprocess per call (journaled since this session)"),
    "registry": (13, "slow with models on (journaled since this session)"),
}


def enabled(name: str) -> bool:
    """Whether the rule or check `name` of KNOWN_DEFECTS is switched on (BRIDGE_DIFF_ENABLE)."""
    if name not in KNOWN_DEFECTS:
        raise KeyError(f"unknown allowance {name!r}; known: {sorted(KNOWN_DEFECTS)}")
    wanted = {w.strip() for w in os.environ.get("BRIDGE_DIFF_ENABLE", "").split(",") if w.strip()}
    return "all" in wanted or name in wanted


def removed_twin(run) -> bool:
    """An empty second run a late-landing create left, which bridge deleted and tagged (docs/journal.md, H11): not a
    ghost of the program — the oracle never had a create arrive after its client gave up."""
    return run.info.lifecycle_stage == "deleted" and "bridge.duplicate_of" in run.data.tags


def ignored_tag(key: str) -> bool:
    return key in IGNORED_TAGS or key.startswith(IGNORED_TAG_PREFIXES)


def describe() -> str:
    """One line per switched-off rule or check, for the test report and the soak's header."""
    return "\n".join(
        f"  {name:<22} {'on ' if enabled(name) else 'off'} defect {n}: {why}"
        for name, (n, why) in KNOWN_DEFECTS.items()
    )
