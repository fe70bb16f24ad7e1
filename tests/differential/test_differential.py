"""The differential harness in CI: fixed seeds, each a few Hypothesis programs, against real MLflow servers.

A failure prints the seed, the shrunk program (Hypothesis's steps and the harness's own listing), every
difference, and the program as JSON for a regression test. Longer soaks: benchmarks/soak_differential.py.
"""

from __future__ import annotations

import os

import pytest

from tests.differential.harness import run_seed
from tests.differential.programs import FILES, KILL9, SLOW_EXIT, Features

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


@pytest.mark.slow
def test_programs_with_big_files_over_a_throttled_flapping_link(file_harness):
    """Big files (several parts of 1 MiB) and new versions of them through the entrance, between points and before
    end statuses, over a link that goes down, is throttled and flaps: the server's state equals stock MLflow's and
    the file lane keeps its orders (orders.py: whole-once, newest-wins, superseded-unsent, end-after-everything,
    points-not-held, sha256-before-placed)."""
    run_seed(file_harness, 40, features=FILES, max_examples=4, steps=25)
    print(f"\nfile rules: {file_harness.programs} programs, applied {dict(file_harness.rule_checks)}")
    print(f"head starts (of uploads) per program: {file_harness.head_starts}")


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


MiB = 1024 * 1024
_EXPERIMENT_AND_RUN = [
    {"op": "create_experiment", "args": {"e": 0, "fluent": False, "tags": {}}},
    {"op": "create_run", "args": {"r": 0, "e": 0, "name": "run0", "parent": None}},
]
#: A planted defect per file rule, and a program it shows in: the rule must report it (not vacuously green).
_PLANTED = {
    "superseded-unsent": [
        {"op": "link_down", "args": {}},
        {"op": "log_big_file", "args": {"r": 0, "path": "weights/best.pt", "size": 2 * MiB, "seed": 3}},
        {"op": "log_big_file", "args": {"r": 0, "path": "weights/best.pt", "size": 2 * MiB, "seed": 4}},
        {"op": "link_up", "args": {}},
    ],
    "end-after-everything": [
        {"op": "throttle", "args": {"up_bytes_per_s": MiB}},
        {"op": "log_big_file", "args": {"r": 0, "path": "weights/best.pt", "size": 3 * MiB, "seed": 3}},
        {"op": "set_terminated", "args": {"r": 0, "status": "FINISHED"}},
    ],
    "points-not-held": [
        {"op": "flush", "args": {}},  # the run is on the server: its file need not wait for the record lane
        {"op": "throttle", "args": {"up_bytes_per_s": MiB}},
        {"op": "epoch", "args": {"r": 0, "step": 0, "path": "weights/last.pt", "size": 3 * MiB, "seed": 3}},
        {"op": "log_metric", "args": {"r": 0, "key": "loss", "value": 0.5, "step": 1, "ts": 1, "via": "client"}},
    ],
    # A head start: the run is on the server and the file lane idle when a file of three parts is logged, so the
    # lane begins its upload (without the sha256) while log_artifact still copies it.
    "sha256-before-placed": [
        {"op": "flush", "args": {}},
        {"op": "log_big_file", "args": {"r": 0, "path": "weights/last.pt", "size": 3 * MiB, "seed": 3}},
        {"op": "flush", "args": {}},
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("rule", sorted(_PLANTED))
def test_the_file_rules_report_a_planted_defect(file_harness, monkeypatch, rule):
    """Sanity: with the file lane's order broken on purpose, the rule of that order reports it — a superseded
    version sent anyway, an end status not waiting for its run's files, points waiting behind an upload, a head
    start placed with no sha256 announced."""
    import time

    from bridge.client.delivery import handlers, operations
    from bridge.client.delivery.sender import Sender
    from bridge.client.journal.kinds import ARTIFACT, UPDATE_RUN
    from bridge.client.journal.queue import OpQueue
    from bridge.client.link import uploads as tus
    from bridge.serve import uploads
    from tests.differential.harness import Difference
    from tests.differential.programs import Call

    if rule == "superseded-unsent":
        monkeypatch.setattr(OpQueue, "superseded", lambda self, op, before=None: False)
    elif rule == "end-after-everything":
        monkeypatch.setitem(handlers.HANDLERS, UPDATE_RUN, handlers.Handler(operations.apply_update_run))
    elif rule == "sha256-before-placed":
        # No part names the file's sha256, and the entrance neither refuses the part that completes an upload begun
        # without one nor checks it: it places whatever came.
        send_part = tus.send_part
        monkeypatch.setattr(tus, "send_part", lambda *args, sha256=None, **kwargs: send_part(*args, **kwargs))
        monkeypatch.setattr(uploads.Uploads, "_take_sha256", lambda self, upload, announced, offset, declared: None)
        complete = uploads.Uploads._complete

        async def unchecked(self, upload):
            if upload.sha256 is None:
                upload.sha256 = uploads._sha256_of(upload.data)
            await complete(self, upload)

        monkeypatch.setattr(uploads.Uploads, "_complete", unchecked)
    else:  # a batch of points waits while a file does (the "the live charts freeze behind a file")
        send_batch = Sender._send_batch

        def held(self, *args, **kwargs):
            deadline = time.monotonic() + 60
            while self.journal.queue.runs_with_undelivered((ARTIFACT,)) and time.monotonic() < deadline:
                time.sleep(0.05)
            return send_batch(self, *args, **kwargs)

        monkeypatch.setattr(Sender, "_send_batch", held)
    program = [Call.from_json(c) for c in _EXPERIMENT_AND_RUN + _PLANTED[rule]]
    with pytest.raises(Difference) as found:
        file_harness.check(program, files=True)
    assert f"rule {rule}:" in str(found.value)


@pytest.mark.slow
def test_the_file_rules_pass_the_same_programs_unbroken(file_harness):
    """The programs of the planted defects, with bridge as it is: no difference, every order kept; the head start's
    program goes through a head start (so the path stays exercised under the file rules)."""
    from tests.differential.programs import Call

    for rule, steps in _PLANTED.items():
        before = file_harness.rule_checks["sha256-before-placed"]
        file_harness.check([Call.from_json(c) for c in _EXPERIMENT_AND_RUN + steps], files=True)
        if rule == "sha256-before-placed":
            started_early, created, _ = file_harness.head_starts[-1]
            assert started_early >= 1, f"no head start: {created} upload(s), each begun with its sha256"
            assert file_harness.rule_checks["sha256-before-placed"] > before  # a head start's upload was placed
