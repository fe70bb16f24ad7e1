"""Train several YOLO models one after another into one experiment, with the same settings."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.errors import ConfigError

if TYPE_CHECKING:
    from bridge.yolo.callbacks import TrackOptions

logger = logging.getLogger(__name__)


def _offline() -> bool:
    return os.environ.get("YOLO_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(name: str) -> str:
    """What to load for a model name: paths and names ending in .pt/.yaml/.yml as given; a bare name such as
    'yolo11n' becomes 'yolo11n.pt' (pretrained weights, downloaded by Ultralytics) — or 'yolo11n.yaml' (fresh
    weights) when the .pt file is not here and `YOLO_OFFLINE=1` forbids downloading.
    """
    name = name.strip()
    if not name:
        raise ConfigError("empty model name")
    if Path(name).suffix.lower() in (".pt", ".yaml", ".yml"):
        return name
    if Path(name).suffix:
        raise ConfigError(f"model {name!r}: expected a name such as 'yolo11n', or a .pt or .yaml file")
    weights = f"{name}.pt"
    if Path(weights).exists() or not _offline():
        return weights
    return f"{name}.yaml"


class _ProgressHooks:
    """Ultralytics callbacks that turn a training's progress into `on_epoch_end`/`on_batch_end` calls."""

    def __init__(self, label: str, on_epoch_end, on_batch_end) -> None:
        self.label, self.on_epoch_end, self.on_batch_end = label, on_epoch_end, on_batch_end
        self.batch = 0

    def attach(self, model: Any) -> None:
        if self.on_epoch_end:
            model.add_callback("on_fit_epoch_end", self._fit_epoch_end)
        if self.on_batch_end:
            model.add_callback("on_train_epoch_start", self._epoch_start)
            model.add_callback("on_train_batch_end", self._batch_end)

    def _fit_epoch_end(self, trainer: Any) -> None:
        if trainer.epoch < trainer.epochs:  # the extra call after the last epoch validates best.pt
            self.on_epoch_end(self.label, trainer.epoch + 1, trainer.epochs)

    def _epoch_start(self, trainer: Any) -> None:
        self.batch = 0

    def _batch_end(self, trainer: Any) -> None:
        self.batch += 1
        loader = getattr(trainer, "train_loader", None)
        self.on_batch_end(self.label, self.batch, len(loader) if loader is not None else 0)


def _track_options(experiment: str | None, run_name: str, tags: dict[str, str]) -> TrackOptions:
    from bridge.yolo.callbacks import DEFAULT_LOG_BEST_EVERY_S, DEFAULT_REFRESH_EVERY_S, TrackOptions
    from bridge.yolo.system_metrics import DEFAULT_LOG_EVERY_S

    return TrackOptions(
        experiment=experiment,
        run_name=run_name,
        tags=tags,
        log_best_every_s=DEFAULT_LOG_BEST_EVERY_S,
        refresh_every_s=DEFAULT_REFRESH_EVERY_S,
        run_key=None,
        system_metrics=True,
        system_metrics_every_s=DEFAULT_LOG_EVERY_S,
    )


@dataclass
class SweepResult:
    """One model's outcome in a sweep."""

    model: str
    run_id: str | None = None
    error: str | None = None
    final_metrics: dict[str, float] = field(default_factory=dict)


def sweep(
    models: Sequence[str],
    *,
    data: str | Path,
    experiment: str | None = None,
    tags: dict[str, str] | None = None,
    on_model_start: Callable[[str, int], None] | None = None,
    on_epoch_end: Callable[[str, int, int], None] | None = None,
    on_batch_end: Callable[[str, int, int], None] | None = None,
    stop_on_error: bool = False,
    resume: bool = False,
    **overrides: Any,
) -> list[SweepResult]:
    """Train each model with `overrides` (epochs, imgsz, batch, device, …) as one run in `experiment`.

    A model that fails is recorded (its run is marked FAILED) and the sweep goes on unless `stop_on_error`.
    `on_model_start(model, index)`, `on_epoch_end(model, epoch, epochs)` and `on_batch_end(model, batch,
    batches)` feed a progress display. With `resume`, each model's interrupted training in
    `<project>/<model>` continues into its run (see `bridge.yolo.train`); a finished one is left as it is.
    """
    from ultralytics import YOLO

    from bridge.yolo.callbacks import YoloTracker

    if not models:
        raise ConfigError("no model to train: give at least one --model")
    if not Path(data).is_file():
        raise ConfigError(f"data YAML {str(data)!r} does not exist")
    specs = [resolve_model(m) for m in models]
    results = []
    for i, spec in enumerate(specs):
        label = Path(spec).stem
        if on_model_start:
            on_model_start(label, i)
        result = SweepResult(model=label)
        tracker = None
        run_tags = {"sweep.models": ",".join(Path(s).stem for s in specs), **(tags or {})}
        try:
            if resume:
                from bridge.yolo import _resume

                hooks = _ProgressHooks(label, on_epoch_end, on_batch_end)
                tracker = _resume(
                    spec,
                    data=data,
                    options=_track_options(experiment, label, run_tags),
                    overrides={"name": label, **overrides},
                    prepare=hooks.attach,
                )
                if tracker is not None:
                    result.run_id, result.final_metrics = tracker.run_id, dict(tracker.final_metrics)
                    results.append(result)
                    continue
                overrides = {"exist_ok": True, **overrides}
            model = YOLO(spec)
            tracker = YoloTracker(model, experiment=experiment, run_name=label, tags=run_tags)
            _ProgressHooks(label, on_epoch_end, on_batch_end).attach(model)
            model.train(data=str(data), **{"name": label, **overrides})
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            logger.warning("training %s failed: %s", label, result.error)
            if stop_on_error:
                raise
        finally:
            if tracker is not None:
                tracker.detach()
                result.run_id = tracker.run_id
                result.final_metrics = dict(tracker.final_metrics)
        results.append(result)
    return results
