"""Track Ultralytics YOLO trainings in MLflow, sweep several models, and compare them.

    import bridge, bridge.yolo
    bridge.connect()
    bridge.yolo.train("yolo11n.pt", data="data.yaml", epochs=50, experiment="detector")

Everything is logged through MLflow's public API; after `bridge.connect()` the journal carries it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bridge.yolo.callbacks import (
    DEFAULT_LOG_BEST_EVERY_S,
    DEFAULT_REFRESH_EVERY_S,
    TrackOptions,
    YoloTracker,
    metric_name,
    model_identity,
)
from bridge.yolo.compare import Comparison, compare
from bridge.yolo.dataset import DatasetSummary, make_synthetic_dataset, summarize_dataset
from bridge.yolo.resume import ResumePlan
from bridge.yolo.sweep import resolve_model, sweep
from bridge.yolo.system_metrics import DEFAULT_LOG_EVERY_S as DEFAULT_SYSTEM_METRICS_EVERY_S

__all__ = [
    "Comparison",
    "DatasetSummary",
    "YoloTracker",
    "compare",
    "make_synthetic_dataset",
    "metric_name",
    "model_identity",
    "resolve_model",
    "summarize_dataset",
    "sweep",
    "track",
    "train",
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
    run_key: str | None = None,
    system_metrics: bool = True,
    system_metrics_every_s: float = DEFAULT_SYSTEM_METRICS_EVERY_S,
    resume: ResumePlan | None = None,
) -> YoloTracker:
    """Attach bridge's callbacks to an Ultralytics `YOLO` model: each `model.train()` becomes one MLflow run.

    Without `experiment`, MLflow's active experiment applies (`mlflow.set_experiment`, `MLFLOW_EXPERIMENT_NAME`);
    without `run_name`, the model's name (e.g. `yolo11n`). best.pt goes up when it improves, at most every
    `log_best_every_s`; console.log, results.csv and plots at most every `refresh_every_s` (all again at the end);
    CPU/RAM/GPU averages every `system_metrics_every_s`. `run_key` (default: the save directory) is how
    `train(resume=True)` finds the run again. `tracker.detach()` removes the callbacks again.
    """
    return YoloTracker(
        model,
        experiment=experiment,
        run_name=run_name,
        tags=tags,
        log_best_every_s=log_best_every_s,
        console=console,
        refresh_every_s=refresh_every_s,
        run_key=run_key,
        system_metrics=system_metrics,
        system_metrics_every_s=system_metrics_every_s,
        resume=resume,
    )


def train(
    model: Any,
    *,
    data: str | Path,
    experiment: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    resume: bool = False,
    run_key: str | None = None,
    log_best_every_s: float = DEFAULT_LOG_BEST_EVERY_S,
    refresh_every_s: float = DEFAULT_REFRESH_EVERY_S,
    system_metrics: bool = True,
    system_metrics_every_s: float = DEFAULT_SYSTEM_METRICS_EVERY_S,
    **overrides: Any,
) -> YoloTracker:
    """Train `model` (a `YOLO` object, or a name/path such as 'yolo11n.pt' or 'yolov8n.yaml') with tracking.

    `overrides` go to `model.train()` unchanged. With `resume=True` (and `project=`, `name=`) an interrupted
    training continues from `<project>/<name>/weights/last.pt` into the MLflow run it started; without a
    last.pt there it starts afresh. Returns the tracker: `.run_id`, `.save_dir`, `.final_metrics`.
    """
    from ultralytics import YOLO

    options = TrackOptions(
        experiment=experiment,
        run_name=run_name,
        tags=tags,
        log_best_every_s=log_best_every_s,
        refresh_every_s=refresh_every_s,
        run_key=run_key,
        system_metrics=system_metrics,
        system_metrics_every_s=system_metrics_every_s,
    )
    if resume:
        resumed = _resume(model, data=data, options=options, overrides=overrides)
        if resumed is not None:
            return resumed
        overrides.setdefault("exist_ok", True)  # the fresh training goes into <project>/<name> itself
    if not hasattr(model, "add_callback"):
        model = YOLO(resolve_model(str(model)))
    tracker = track(model, **options)
    try:
        model.train(data=str(data), **overrides)
    finally:
        tracker.detach()
    return tracker


def _resume(
    model: Any,
    *,
    data: str | Path,
    options: TrackOptions,
    overrides: dict,
    prepare: Callable[[Any], None] | None = None,
) -> YoloTracker | None:
    """Continue `<project>/<name>`'s training; None when there is no last.pt to continue (start afresh)."""
    import sys

    from ultralytics import YOLO
    from ultralytics.nn.tasks import guess_model_task

    from bridge.yolo import resume as resume_mod

    task = getattr(model, "task", None) or guess_model_task(str(model))
    save_dir = resume_mod.save_dir_for(overrides.get("project"), overrides.get("name"), task)
    last = save_dir / "weights" / "last.pt"
    if not last.is_file():
        print(
            f"bridge: nothing to resume in {save_dir} (no weights/last.pt yet): starting a fresh training",
            file=sys.stderr,
        )
        return None
    yolo = YOLO(str(last))
    run_key = resume_mod.run_key_for(save_dir, options["run_key"])
    if not resume_mod.is_resumable(yolo.ckpt):  # Ultralytics strips the optimizer from last.pt when it finishes
        print(f"bridge: the training in {save_dir} already finished; nothing to resume", file=sys.stderr)
        tracker = track(yolo, **options)
        tracker.detach()
        noted = resume_mod.read_run_file(save_dir)
        run = resume_mod.find_run(
            run_key,
            run_id_hint=noted.get("run_id"),
            experiment=options["experiment"] or noted.get("experiment_name"),
            experiment_id_hint=noted.get("experiment_id"),
        )
        tracker.run_id, tracker.save_dir = (run.info.run_id if run else None), save_dir
        return tracker
    plan = resume_mod.plan(yolo.ckpt, save_dir=save_dir, run_key=run_key, experiment=options["experiment"])
    if plan.run_id is None:
        print(
            f"bridge: no MLflow run tagged {resume_mod.RUN_KEY_TAG}={run_key!r} found; the resumed training "
            "is logged as a new run",
            file=sys.stderr,
        )
    tracker = track(yolo, **options, resume=plan)
    if prepare is not None:
        prepare(yolo)
    try:
        yolo.train(**{**overrides, "data": str(data), "resume": True, "save_dir": str(save_dir)})
    finally:
        tracker.detach()
    return tracker
