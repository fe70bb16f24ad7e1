"""Track Ultralytics YOLO trainings in MLflow, sweep several models, and compare them.

    import bridge, bridge.yolo
    bridge.connect()
    bridge.yolo.train("yolo11n.pt", data="data.yaml", epochs=50, experiment="detector")

Everything is logged through MLflow's public API; after `bridge.connect()` the journal carries it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bridge.yolo.callbacks import (
    DEFAULT_LOG_BEST_EVERY_S,
    DEFAULT_REFRESH_EVERY_S,
    YoloTracker,
    metric_name,
    model_identity,
)
from bridge.yolo.compare import Comparison, compare
from bridge.yolo.dataset import DatasetSummary, make_synthetic_dataset, summarize_dataset
from bridge.yolo.sweep import resolve_model, sweep

__all__ = [
    "Comparison", "DatasetSummary", "YoloTracker", "compare", "make_synthetic_dataset", "metric_name",
    "model_identity", "resolve_model", "summarize_dataset", "sweep", "track", "train",
]


def track(
    model: Any,
    *,
    experiment: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    log_best_every_s: float = DEFAULT_LOG_BEST_EVERY_S,
    console: bool = True,
    refresh_every_s: float = DEFAULT_REFRESH_EVERY_S,
) -> YoloTracker:
    """Attach bridge's callbacks to an Ultralytics `YOLO` model: each `model.train()` becomes one MLflow run.

    Without `experiment`, MLflow's active experiment applies (`mlflow.set_experiment`, `MLFLOW_EXPERIMENT_NAME`);
    without `run_name`, the model's name (e.g. `yolo11n`). best.pt goes up when it improves, at most every
    `log_best_every_s`; console.log, results.csv and plots at most every `refresh_every_s` (all again at the end).
    `tracker.detach()` removes the callbacks again.
    """
    return YoloTracker(
        model, experiment=experiment, run_name=run_name, tags=tags,
        log_best_every_s=log_best_every_s, console=console, refresh_every_s=refresh_every_s,
    )


def train(
    model: Any,
    *,
    data: str | Path,
    experiment: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    log_best_every_s: float = DEFAULT_LOG_BEST_EVERY_S,
    refresh_every_s: float = DEFAULT_REFRESH_EVERY_S,
    **overrides: Any,
) -> YoloTracker:
    """Train `model` (a `YOLO` object, or a name/path such as 'yolo11n.pt' or 'yolov8n.yaml') with tracking.

    `overrides` go to `model.train()` unchanged. Returns the tracker: `.run_id`, `.save_dir`, `.final_metrics`.
    """
    if not hasattr(model, "add_callback"):
        from ultralytics import YOLO

        model = YOLO(resolve_model(str(model)))
    tracker = track(model, experiment=experiment, run_name=run_name, tags=tags, log_best_every_s=log_best_every_s,
                    refresh_every_s=refresh_every_s)
    try:
        model.train(data=str(data), **overrides)
    finally:
        tracker.detach()
    return tracker
