"""The differential harness in CI: fixed seeds, each a few Hypothesis programs, against real MLflow servers.

A failure prints the seed, the shrunk program (Hypothesis's steps and the harness's own listing), every
difference, and the program as JSON for a regression test. Longer soaks: benchmarks/soak_differential.py.
"""

from __future__ import annotations

import os

import pytest

from tests.differential.harness import run_seed
from tests.differential.programs import KILL9, SLOW_EXIT, Features

pytestmark = pytest.mark.timeout(600)

#: Fixed seeds: CI runs the same programs every time. BRIDGE_DIFF_SEEDS=1,2,3 runs others.
SEEDS = [int(s) for s in os.environ.get("BRIDGE_DIFF_SEEDS", "11,23,37").split(",")]
EXAMPLES = int(os.environ.get("BRIDGE_DIFF_EXAMPLES", "6"))


@pytest.mark.parametrize("seed", SEEDS)
def test_programs_under_proxy_faults(harness, seed):
    """Random programs with link faults (lost answers, resets, 5xx, refusals, slow), reconnects and flushes."""
    run_seed(harness, seed, features=Features(), max_examples=EXAMPLES, steps=25)


def test_programs_killed_with_sigkill_then_synced(harness):
    """A child process runs the program through bridge and is killed with SIGKILL at a random call (or exits);
    `bridge sync` then delivers its journal: everything whose call returned is on the server, once."""
    run_seed(harness, 17, features=KILL9, max_examples=2, steps=12)


def test_programs_exiting_right_after_logging_over_a_slow_link(harness):
    """The child logs and exits over a slow link: its exit flush delivers, or says what it kept; sync delivers it."""
    run_seed(harness, 29, features=SLOW_EXIT, max_examples=2, steps=12)


@pytest.fixture(autouse=True)
def _throughput(harness, request):
    """Say how much ran (pytest -s shows it): programs, calls, seconds."""
    yield
    print(f"\n{request.node.name}: {harness.programs} programs, {harness.calls} calls, {harness.seconds:.1f} s")


def test_the_harness_reports_a_write_that_never_arrived(harness, monkeypatch):
    """Sanity: with a planted defect (the bridge world's MlflowClient.log_param does nothing), the harness
    reports the missing param and the read after the flush — it is not vacuously green."""
    from mlflow import MlflowClient

    from tests.differential.faults import BridgeWorld
    from tests.differential.harness import Difference
    from tests.differential.programs import Call

    begin = BridgeWorld.begin

    def planted_begin(self):
        begin(self)
        monkeypatch.setattr(MlflowClient, "log_param", lambda *args, **kwargs: None)

    monkeypatch.setattr(BridgeWorld, "begin", planted_begin)
    program = [
        Call("create_experiment", {"e": 0, "fluent": False, "tags": {}}),
        Call("create_run", {"r": 0, "e": 0, "name": "run0", "parent": None}),
        Call("log_param", {"r": 0, "key": "lr", "value": "0.1", "via": "client"}),
        Call("flush"),
        Call("get_run", {"r": 0}),
    ]
    with pytest.raises(Difference) as found:
        harness.check(program)
    assert "run 0 params lr: oracle '0.1', bridge '<absent>'" in str(found.value)
    assert "read at step 4 get_run(r=0)" in str(found.value)


def test_a_failure_hypothesis_could_not_replay_is_reported_with_what_it_was(harness, monkeypatch):
    """Hypothesis reports a failure that does not repeat as FlakyFailure ("Inconsistent results"): the seed's
    report names the failure itself (seed 90028 of a soak said only "FlakyFailure")."""
    from hypothesis.errors import FlakyFailure

    from tests.differential import harness as harness_module

    def first_failed_then_passed(machine, settings):
        try:
            raise ValueError("the server held 3 runs, the oracle 2")
        except ValueError as exc:
            raise FlakyFailure("Inconsistent results from replaying a test case!", [exc]) from None

    monkeypatch.setattr(harness_module, "run_state_machine_as_test", first_failed_then_passed)
    with pytest.raises(harness_module.Difference) as caught:
        run_seed(harness, 7, max_examples=1, steps=1)
    report = str(caught.value)
    assert "seed 7" in report and "FlakyFailure (not a state difference)" in report
    assert "ValueError: the server held 3 runs, the oracle 2" in report
    assert "first_failed_then_passed" in report  # where it was raised
