"""The upload benchmark in its CI size (benchmarks/bench_uploads.py `--size ci`), goals asserted.

One `bridge serve --tunnel cloudflared` with the stand-in cloudflared on its PATH (its edge here takes bodies up
to 40 MB, so the CI files, like the full-size ones through Cloudflare's 100 MB, must go in parts) serves the
three scenarios: a file over a throttled, flapping link while points are logged; upload throughput against one
PUT straight to MLflow; a tiny YOLO training with padded checkpoints over a throttled link. Each measured client
is a process of its own; every outcome is read back from the server (MLflow's SQLite file, files as MLflow
serves them, the entrance's staging folder). Full sizes: run the benchmark.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_uploads

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def stand(tmp_path_factory):
    with bench_uploads.Stand(tmp_path_factory.mktemp("bench-uploads"), "ci") as running:
        yield running


@pytest.mark.timeout(240)
def test_a_file_over_a_flapping_throttled_link_arrives_whole_and_the_points_keep_flowing(stand):
    r = bench_uploads.run_flapping(stand, "ci")
    bench_uploads.print_flapping(r, "ci")
    assert r["cuts"] >= 3, "the link was cut while the file travelled"
    assert r["points_while_uploading"] >= 10
    assert r["worst_lag_s"] <= bench_uploads.GOAL_LAG_S, r["stretches"]
    assert r["link_sent_ratio"] <= bench_uploads.GOAL_SENT_RATIO, "nothing went over the link twice but cut parts"
    assert r["arrived"] and r["identical"], "MLflow serves the file byte for byte, in time"
    assert r["run_status"] == "FINISHED" and r["left"] == 0


@pytest.mark.timeout(240)
def test_a_file_over_the_edge_limit_goes_in_parts_at_the_throughput_of_one_put(stand):
    r = bench_uploads.run_throughput(stand, "ci", repeat=1)
    bench_uploads.print_throughput(r, "ci")
    bridge = r["tries"]["tunnel"][0]
    assert r["one_put_through_edge"] in (413, None), "the edge refuses the whole file in one request"
    assert all(t["identical"] for got in r["tries"].values() for t in got), "MLflow serves the file byte for byte"
    assert bridge["sent_ratio"] == 1.0, "every byte went once: parts under the edge's limit, none refused"
    # The throughput goal (>= 0.8x one PUT) is the benchmark's to judge, on a quiet machine, not this test's: on a
    # shared 2-core runner a wall-clock ratio says more about the neighbours than about bridge.
    assert r["ratio"] > 0 and (bridge["check_and_place_s"] or 0.0) < r["median_s"]["anchor"], (
        "a finished upload is placed without copying it again (a move into MLflow's local artifact folder)"
    )


@pytest.mark.timeout(240)
def test_a_training_with_big_weights_shows_every_epoch_while_they_upload_and_finishes_with_them(stand):
    r = bench_uploads.run_yolo(stand, "ci")
    bench_uploads.print_yolo(r, "ci")
    assert [e["epoch"] for e in r["epochs"]] == [1, 2]
    assert all(e["lag_s"] is not None and e["lag_s"] <= bench_uploads.GOAL_EPOCH_LAG_S for e in r["epochs"]), r
    assert all(e["seen_before_weights_done"] for e in r["epochs"]), r["timeline"]
    if any(e["weights_uploading_when_logged"] for e in r["epochs"]):
        # An epoch logged while weights were on their way reached the server while they still were. (On a fast
        # run both epochs can reach the server before the first weights upload begins — seen in a full-suite run
        # — and then there is nothing to hold them up; the harness rule `points-not-held` checks that case.)
        assert r["all_epochs_seen_while_weights_uploading"], r["timeline"]
    assert r["status"] == "FINISHED" and r["identical"], "best.pt and last.pt as MLflow serves them"
