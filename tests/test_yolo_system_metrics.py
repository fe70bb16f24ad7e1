"""bridge.yolo.system_metrics: MLflow's samplers, bridge's loop — averages logged at the pace asked, nothing else."""

from __future__ import annotations

import threading
import time

import pytest
from mlflow import MlflowClient

from bridge.yolo import system_metrics


def test_mlflow_samplers_bridge_relies_on_are_still_there():
    """MLflow's system-metrics samplers are internal modules: fail loudly if an upgrade moves or renames them."""
    monitors = system_metrics.make_monitors()
    cpu = monitors[0]
    cpu.collect_metrics()
    cpu.collect_metrics()
    averaged = cpu.aggregate_metrics()
    assert {"cpu_utilization_percentage", "system_memory_usage_megabytes", "system_memory_usage_percentage"} <= set(
        averaged
    )
    cpu.clear_metrics()
    assert not cpu.metrics


class CountingClient:
    """Stands in for MlflowClient: counts log_batch calls, forwards them to a real (SQLite) store."""

    def __init__(self, real: MlflowClient) -> None:
        self.real, self.calls, self.lock = real, 0, threading.Lock()

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        with self.lock:
            self.calls += 1
        self.real.log_batch(run_id, metrics=list(metrics))


def test_samples_are_averaged_and_logged_once_per_period_with_increasing_steps(tmp_path):
    real = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run = real.create_run(real.create_experiment("sys"))
    client = CountingClient(real)
    sampler = system_metrics.SystemMetricsSampler(
        client, run.info.run_id, run_start_ms=run.info.start_time, sample_every_s=0.1, log_every_s=0.5
    ).start()
    deadline = time.monotonic() + 30
    while client.calls < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    sampler.stop()
    calls = client.calls
    assert 3 <= calls <= 5  # one log_batch per period plus the last partial one — not one per sample
    history = real.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(history) == calls == sampler.logged
    steps = [m.step for m in sorted(history, key=lambda m: m.timestamp)]
    assert steps == sorted(set(steps)) and steps[0] >= 0
    assert all(0 <= m.value <= 100 for m in history)
    sampler.stop()  # idempotent: nothing more is logged
    assert client.calls == calls


def test_bad_periods_are_refused():
    with pytest.raises(ValueError, match="log_every_s"):
        system_metrics.SystemMetricsSampler(None, "r", run_start_ms=0, log_every_s=0)
