"""CPU, RAM and (with nvidia-ml-py) GPU utilisation of a training, as MLflow system metrics.

MLflow's own samplers (`CPUMonitor`, `GPUMonitor`) read the machine; the loop is bridge's: MLflow's
`SystemMetricsMonitor` asks the server for the run's status after every sample (one HTTP request each, 360 an
hour at its 10 s default), which a tunnel on ngrok's free plan cannot afford. Here samples are averaged and
logged once per `log_every_s` (60 s by default, the journal's heartbeat period, so the batch carries the beat
it would have sent anyway), and the tracker stops the loop when the run ends. Names are MLflow's
(`system/cpu_utilization_percentage`, `system/gpu_0_utilization_percentage`, …), so the UI shows them in the
run's "System metrics" charts; the step is the second of the run (since its start time), so a resumed
training's points follow the interrupted one's without reading anything back from the server.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

#: How often the machine is sampled, and how often the averages are logged (one log_batch each).
DEFAULT_SAMPLE_EVERY_S = 10.0
DEFAULT_LOG_EVERY_S = 60.0
PREFIX = "system/"


def make_monitors() -> list[Any]:
    """MLflow's CPU/RAM sampler, plus its NVIDIA GPU sampler when nvidia-ml-py finds a GPU."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

    monitors: list[Any] = [CPUMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())  # raises without nvidia-ml-py or without a GPU
    except Exception as exc:
        logger.debug("no GPU system metrics: %s", exc)
    return monitors


class SystemMetricsSampler:
    """A daemon thread sampling the machine and logging averages to one run through `client.log_batch`."""

    def __init__(
        self,
        client: Any,
        run_id: str,
        *,
        run_start_ms: int,
        sample_every_s: float = DEFAULT_SAMPLE_EVERY_S,
        log_every_s: float = DEFAULT_LOG_EVERY_S,
    ) -> None:
        if sample_every_s <= 0 or log_every_s <= 0:
            raise ValueError(
                f"system metrics: sample_every_s ({sample_every_s}) and log_every_s ({log_every_s}) must be > 0"
            )
        self.client, self.run_id = client, run_id
        self.run_start_ms = run_start_ms
        self._last_step = -1
        #: How many averages reached the client (the journal, under bridge): a killed process keeps these.
        self.logged = 0
        self.sample_every_s = min(sample_every_s, log_every_s)
        self.log_every_s = log_every_s
        self.monitors = make_monitors()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="bridge-system-metrics", daemon=True)

    def start(self) -> SystemMetricsSampler:
        self._sample()  # psutil's first cpu_percent() call only sets its reference point
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop sampling and log what was gathered since the last average (so short runs get a point too)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout_s)
        self._publish()

    def _loop(self) -> None:
        next_log = time.monotonic() + self.log_every_s
        while not self._stop.wait(self.sample_every_s):
            self._sample()
            if time.monotonic() >= next_log:
                next_log += self.log_every_s
                self._publish()

    def _sample(self) -> None:
        for monitor in self.monitors:
            try:
                monitor.collect_metrics()
            except Exception as exc:  # a flaky driver read must not end the sampling
                logger.debug("system metrics sample failed: %s", exc)

    def _publish(self) -> None:
        from mlflow.entities import Metric

        with self._lock:
            values: dict[str, float] = {}
            for monitor in self.monitors:
                if monitor.metrics:
                    values.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
            if not values:
                return
            ts = int(time.time() * 1000)
            step = self._last_step = max((ts - self.run_start_ms) // 1000, self._last_step + 1)
        try:
            self.client.log_batch(
                self.run_id, metrics=[Metric(PREFIX + k, float(v), ts, step) for k, v in values.items()]
            )
            self.logged += 1
        except Exception as exc:
            logger.warning("bridge.yolo: logging system metrics failed (%s); training goes on", exc)
