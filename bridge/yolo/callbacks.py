"""Explicit Ultralytics callbacks that record a training as one MLflow run.

The training thread only takes small snapshots (a dict of floats, a file name) and hands them to one
background thread, which makes the MLflow calls in order: reading a checkpoint, hashing a dataset or an HTTP
round-trip never slows an epoch. Everything goes through MLflow's public API, so after `bridge.connect()` the
journal makes it durable and delivers it; a failing call is reported once and tracking carries on.

What a run holds (step = the epoch number as Ultralytics prints it, 1..N; one point per epoch):
  params   every trainer argument; model.family/scale/task/parameters/gflops (at 640 px); data.name/nc/classes/hash
  inputs   datasets `<data>/train` (context training) and `<data>/val` (validation), digest = data.hash[:12]
  metrics  train/<loss>, val/<loss>, val/precision|recall|mAP50|mAP50-95 (segment/pose: _mask/_pose suffix),
           lr_pg<i>, epoch_time_s, gpu_mem_gb (on GPU); val/best/<metric> of best.pt, val/best/epoch,
           train_time_s
  The MLflow UI charts a run in sections named by each key's prefix, sorted by name, unprefixed keys last: these
  names put the learning curves (train, val) first and the best model's one-point summary (val/best) after them.
  Runs logged before had final/<metric>, final/best_epoch, final/train_time_s and lr/pg<i> (`legacy_name`).
  artifacts weights/best.pt (on improvement, rate-limited, and at the end), weights/last.pt, results.csv,
           args.yaml, plots/*.png|jpg, data/<data yaml>, data/dataset_summary.csv, console.log
           (console.log, results.csv and plots refreshed at most every `refresh_every_s` while training)
  tags     see `bridge.yolo.metadata.run_tags`, plus time.start/time.end and the user's tags
"""

from __future__ import annotations

import functools
import io
import logging
import math
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from bridge import ui
from bridge.yolo import metadata
from bridge.yolo import resume as resume_mod
from bridge.yolo.console import ConsoleCapture, ConsoleLog
from bridge.yolo.dataset import DatasetSummary, summarize_dataset
from bridge.yolo.system_metrics import DEFAULT_LOG_EVERY_S as DEFAULT_SYSTEM_METRICS_EVERY_S
from bridge.yolo.system_metrics import SystemMetricsSampler

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

#: MLflow's own limits (mlflow.utils.validation): longer param values are cut, not rejected.
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
#: How long the end of training waits for queued MLflow calls before ending the run anyway.
DEFAULT_END_TIMEOUT_S = 300.0
#: How often console.log, results.csv and new plots are refreshed on the server while training: live enough
#: to follow a run, and a few requests a minute against ngrok's free plan (20,000 requests a month).
DEFAULT_REFRESH_EVERY_S = 30.0
#: best.pt goes up when it improves, at most this often.
DEFAULT_LOG_BEST_EVERY_S = 60.0
EVENTS = (
    "on_pretrain_routine_start",
    "on_pretrain_routine_end",
    "on_train_epoch_end",
    "on_fit_epoch_end",
    "on_model_save",
    "on_train_end",
    "teardown",
)
_UNSAFE = re.compile(r"[^\w./\- ]")
_MODEL_NAME = re.compile(r"^(?P<family>yolo[a-z]*?v?\d+|yolo[a-z]*)(?P<scale>[nsmlx])(?:-(?P<variant>[\w-]+))?$")
_SUFFIXES = {"B": "", "M": "_mask", "P": "_pose", "S": "_semantic"}
#: best.pt's final validation: a chart section ('val/best') that sorts right after the per-epoch 'val'.
BEST_PREFIX = "val/best/"
BEST_EPOCH = BEST_PREFIX + "epoch"
TRAIN_TIME = "train_time_s"
#: The saved chart view each training experiment gets (the chart links open it): the learning first, then the
#: other per-epoch curves, the best model's summary, the run's own and the system metrics.
LEARNING_VIEW = "bridge-learning-curves"
LEARNING_VIEW_NAME = "Learning curves"
_LOSSES = ("box_loss", "cls_loss", "dfl_loss", "l1_loss", "seg_loss", "pose_loss", "kobj_loss", "loss")  # by task
LEARNING_CHARTS = ("val/mAP50-95", "val/mAP50", *(f"{split}/{loss}" for split in ("train", "val") for loss in _LOSSES))
_LEGACY = {BEST_EPOCH: "final/best_epoch", TRAIN_TIME: "final/train_time_s"}
#: A queued MLflow call: what it does (for the report when it fails), the function, its arguments.
_Job = tuple[str, Callable[..., Any], tuple[Any, ...]]


class TrackOptions(TypedDict):
    """The keyword options `bridge.yolo.train()` and `sweep()` hand on to `bridge.yolo.track()`."""

    experiment: str | None
    run_name: str | None
    tags: Mapping[str, str] | None
    log_best_every_s: float
    refresh_every_s: float
    run_key: str | None
    system_metrics: bool
    system_metrics_every_s: float


@functools.lru_cache(maxsize=4096)
def metric_name(key: str) -> str:
    """Ultralytics' metric key as a stable MLflow-safe name: 'metrics/mAP50-95(B)' → 'val/mAP50-95'.

    'lr/pg0' → 'lr_pg0': a section of its own would be charted before train and val in the MLflow UI.
    """
    m = re.match(r"^metrics/(.+?)(?:\((\w+)\))?$", key)
    if m:
        suffix = m.group(2)
        key = f"val/{m.group(1)}" + (_SUFFIXES.get(suffix, f"_{suffix.lower()}") if suffix else "")
    elif key.startswith("lr/"):
        key = "lr_" + key[3:]
    return _UNSAFE.sub("_", key)


def best_name(key: str) -> str:
    """The name of best.pt's final validation result for Ultralytics' key: 'metrics/mAP50(B)' → 'val/best/mAP50'."""
    name = metric_name(key)
    return BEST_PREFIX + (name[len("val/") :] if name.startswith("val/") else name)


def legacy_name(name: str) -> str | None:
    """What runs logged before the current names called a metric ('val/best/mAP50' → 'final/mAP50'), else None."""
    if name in _LEGACY:
        return _LEGACY[name]
    if name.startswith(BEST_PREFIX):
        return "final/" + name[len(BEST_PREFIX) :]
    if name.startswith("lr_pg"):
        return "lr/" + name[3:]
    return None


def metric_value(metrics: Mapping[str, float], name: str) -> float | None:
    """A run's `name`, or the same metric under its earlier name for a run logged before."""
    if name in metrics:
        return metrics[name]
    legacy = legacy_name(name)
    return metrics.get(legacy) if legacy else None


def model_identity(model_name: str, yaml_scale: str | None = None) -> dict[str, str]:
    """Family and scale from a model name: 'yolov8n.yaml' → yolov8 / n, 'yolo11s-seg.pt' → yolo11 / s."""
    stem = Path(str(model_name)).stem
    m = _MODEL_NAME.match(stem)
    if m:
        out = {"model.family": m.group("family"), "model.scale": m.group("scale")}
        if m.group("variant"):
            out["model.variant"] = m.group("variant")
        return out
    return {"model.family": stem, "model.scale": yaml_scale or ""}


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_VALUE_CHARS else text[: MAX_PARAM_VALUE_CHARS - 3] + "..."


class _Reporter:
    """Logs the first failure of each kind as a warning, later ones at debug level."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, what: str, exc: BaseException) -> None:
        with self._lock:
            first = what not in self._seen
            self._seen.add(what)
        if first:
            logger.warning(
                "bridge.yolo: %s failed (%s: %s); training goes on, tracking continues where it can",
                what,
                type(exc).__name__,
                exc,
            )
        else:
            logger.debug("bridge.yolo: %s failed again: %s", what, exc)

    @property
    def failures(self) -> set[str]:
        return set(self._seen)


class _Worker:
    """One daemon thread running queued MLflow calls in order; `idle` runs when nothing came for a while."""

    def __init__(self, report: _Reporter, idle: Callable[[], None] | None, idle_every_s: float) -> None:
        self._q: queue.Queue[list[_Job] | None] = queue.Queue()
        self._report = report
        self._idle = idle
        self._idle_every_s = idle_every_s
        self._thread = threading.Thread(target=self._loop, name="bridge-yolo-logger", daemon=True)
        self._thread.start()

    def submit(self, what: str, fn: Callable, *args: Any) -> None:
        self._q.put([(what, fn, args)])

    def submit_many(self, jobs: list[_Job]) -> None:
        """Queue several jobs with one wake-up of the thread, so it does not compete with the caller meanwhile."""
        if jobs:
            self._q.put(jobs)

    def drain(self, timeout_s: float) -> bool:
        """Wait until everything submitted so far has run; False when the deadline passed first."""
        done = threading.Event()
        self._q.put([("drain", done.set, ())])
        return done.wait(timeout_s)

    def close(self) -> None:
        self._q.put(None)

    def _loop(self) -> None:
        last_idle = time.monotonic()
        while True:
            try:
                jobs = self._q.get(timeout=self._idle_every_s)
            except queue.Empty:
                if self._idle is None or time.monotonic() - last_idle < self._idle_every_s:
                    continue
                last_idle = time.monotonic()
                jobs = [("idle refresh", self._idle, ())]
            if jobs is None:
                return
            for what, fn, args in jobs:
                try:
                    fn(*args)
                except Exception as exc:
                    self._report(what, exc)


class YoloTracker:
    """Callbacks on one Ultralytics model; each `model.train()` becomes one MLflow run."""

    def __init__(
        self,
        model: Any,
        *,
        experiment: str | None = None,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        log_best_every_s: float = DEFAULT_LOG_BEST_EVERY_S,
        console: bool = True,
        refresh_every_s: float = DEFAULT_REFRESH_EVERY_S,
        end_timeout_s: float = DEFAULT_END_TIMEOUT_S,
        run_key: str | None = None,
        resume: resume_mod.ResumePlan | None = None,
        system_metrics: bool = True,
        system_metrics_every_s: float = DEFAULT_SYSTEM_METRICS_EVERY_S,
    ) -> None:
        self.model = model
        self.experiment = experiment
        self.run_name = run_name
        self.user_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.log_best_every_s = log_best_every_s
        self.console = console
        self.refresh_every_s = refresh_every_s
        self.end_timeout_s = end_timeout_s
        self.run_key = run_key
        self.resume = resume  # used by the next training only
        self.system_metrics = system_metrics
        self.system_metrics_every_s = system_metrics_every_s
        self.experiment_id: str | None = None
        self.report = _Reporter()
        self.run_id: str | None = None
        self.save_dir: Path | None = None
        self.final_metrics: dict[str, float] = {}
        self._callbacks = {event: self._guard(event, getattr(self, f"_{event}")) for event in EVENTS}
        self._reset()
        previous = model.__dict__.get("_bridge_tracker")
        if previous is not None:  # tracking a model twice would log everything twice
            previous.detach()
        model.__dict__["_bridge_tracker"] = self
        for event, fn in self._callbacks.items():
            model.add_callback(event, fn)

    # -- lifecycle --------------------------------------------------------------------------------------------

    @property
    def callbacks(self) -> dict[str, Callable[[Any], None]]:
        """The Ultralytics event → callback this tracker added to the model."""
        return dict(self._callbacks)

    def detach(self) -> None:
        """Remove this tracker's callbacks from the model (the model's other callbacks are untouched)."""
        for event, fn in self._callbacks.items():
            lst = self.model.callbacks.get(event, [])
            if fn in lst:
                lst.remove(fn)
        if self.model.__dict__.get("_bridge_tracker") is self:
            del self.model.__dict__["_bridge_tracker"]
        self._stop_console()

    def _reset(self) -> None:
        self.run_id = None
        self.final_metrics = {}
        self._owns_run = False
        self._open = False
        self._client: MlflowClient | None = None
        self._worker: _Worker | None = None
        self._train_stash: dict[str, float] | None = None
        self._seen_metrics_obj: Any = None
        self._best_dirty = False
        self._last_best_upload = -math.inf
        self._last_refresh = -math.inf
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._console_version = -1
        self._capture: ConsoleCapture | None = None
        self._tmp: Path | None = None
        self._sampler: SystemMetricsSampler | None = None

    def _guard(self, event: str, fn: Callable) -> Callable:
        def callback(trainer: Any) -> None:
            try:
                fn(trainer)
            except Exception as exc:  # a tracking problem must never stop the training
                self.report(event, exc)

        callback.__name__ = f"bridge_{event}"
        callback.__qualname__ = f"YoloTracker.{event}"
        return callback

    # -- callbacks (training thread) --------------------------------------------------------------------------

    def _on_pretrain_routine_start(self, trainer: Any) -> None:
        if self._open:  # a previous training of this model died without teardown
            self._end_run("FAILED")
        self._stop_console()
        self._reset()
        _remove_builtin_mlflow(trainer)
        if self.console:
            log = ConsoleLog()
            if self.resume is not None:  # console.log goes on where the interrupted training's ended
                log.write(self.resume.console_prefix)
            self._capture = ConsoleCapture(log)
            self._capture.start()

    def _on_pretrain_routine_end(self, trainer: Any) -> None:
        import mlflow
        from mlflow import MlflowClient

        _remove_builtin_mlflow(trainer)  # in case it was added after our start hook
        self.save_dir = Path(trainer.save_dir)
        run_name = self.run_name or Path(str(trainer.args.model)).stem
        resume, self.resume = self.resume, None
        if resume is not None and resume.run_id is None:
            resume = None  # no run to go on with: a new run, whose params are logged as usual
        run_key = resume_mod.run_key_for(self.save_dir, self.run_key)
        active = mlflow.active_run()
        # Our sampler replaces MLflow's, whose status read after every sample costs a request each.
        if resume is not None:
            if active is not None and active.info.run_id != resume.run_id:
                raise RuntimeError(
                    f"resuming run {resume.run_id}, but run {active.info.run_id} is active: "
                    "end it first (mlflow.end_run())"
                )
            run = active or mlflow.start_run(run_id=resume.run_id, log_system_metrics=False)
            self._owns_run = active is None
        elif active is not None:
            run, self._owns_run = active, False
        else:
            tags = {**metadata.mlflow_source_tags(), resume_mod.RUN_KEY_TAG: run_key, **self.user_tags}
            kwargs: dict[str, Any] = {"run_name": run_name, "tags": tags, "log_system_metrics": False}
            if self.experiment:
                kwargs["experiment_id"] = _experiment_id(self.experiment)
            run, self._owns_run = mlflow.start_run(**kwargs), True
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self._open = True
        self._client = MlflowClient()
        try:
            resume_mod.write_run_file(self.save_dir, self.run_id, run_key, self.experiment_id, self.experiment or "")
        except OSError as exc:
            self.report("write bridge_run.json", exc)
        self._tmp = Path(tempfile.mkdtemp(prefix="bridge-yolo-"))
        self._worker = worker = _Worker(self.report, self._sync_console, self.refresh_every_s)
        self._seen_metrics_obj = trainer.metrics  # the placeholder zeros, not results: never logged

        data = getattr(trainer, "data", None) or {}
        jobs: list[_Job] = [("mark the experiment as model training", self._mark_experiment, ())]
        if resume is not None:  # params are set once per run (MLflow refuses a changed value): the resume goes in tags
            tags = {"bridge.tracker": "bridge.yolo", resume_mod.RUN_KEY_TAG: run_key, **resume.tags, **self.user_tags}
            jobs += [
                ("log resume tags", self._set_tags, (tags,)),
                ("log metadata tags", self._log_metadata, ()),
                ("log dataset inputs", self._log_resumed_dataset, (dict(data),)),
            ]
        else:
            params = {k: _param_value(v) for k, v in vars(trainer.args).items()}
            params.update(self._model_identity(trainer))  # GFLOPs take a model pass: not again on a resume
            names = data.get("names") or {}
            names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
            params.update(
                {
                    "data.name": Path(str(data.get("yaml_file") or trainer.args.data)).stem,
                    "data.nc": str(data.get("nc", len(names))),
                    "data.classes": _param_value(names),
                }
            )
            tags = {"time.start": metadata.utc_now(), "bridge.tracker": "bridge.yolo", **self.user_tags}
            jobs += [
                ("log params", self._log_params_and_tags, (params, tags)),
                ("log metadata tags", self._log_metadata, ()),
                ("log dataset", self._log_dataset, (dict(data), str(trainer.args.data))),
            ]
        jobs.append(("log args.yaml", self._upload, (self.save_dir / "args.yaml", None)))
        if self.system_metrics:
            jobs.append(("start system metrics", self._start_system_metrics, (run.info.start_time,)))
        worker.submit_many(jobs)

    def _on_train_epoch_end(self, trainer: Any) -> None:
        losses = trainer.tloss
        if isinstance(losses, Mapping):
            stash = {metric_name(f"train/{k}"): float(v) for k, v in losses.items()}
        else:
            stash = {metric_name(k): float(v) for k, v in trainer.label_loss_items(losses, prefix="train").items()}
        stash.update({metric_name(k): float(v) for k, v in (trainer.lr or {}).items()})
        self._train_stash = stash  # logged with the validation results, so each epoch is one point per metric

    def _on_model_save(self, trainer: Any) -> None:
        if trainer.best_fitness is not None and trainer.best_fitness == trainer.fitness:
            self._best_dirty = True

    def _on_fit_epoch_end(self, trainer: Any) -> None:
        if not self._open:
            return
        if self._train_stash is None:
            # No training epoch since the last call: this is final_eval() validating best.pt.
            final = {best_name(k): float(v) for k, v in (trainer.metrics or {}).items()}
            self.final_metrics.update(final)
            self._submit("log final metrics", self._log_metrics, final, trainer.epoch)
            return
        step = trainer.epoch + 1
        values = self._train_stash
        self._train_stash = None
        if trainer.metrics is not self._seen_metrics_obj:  # validate() ran this epoch (it returns a new dict)
            self._seen_metrics_obj = trainer.metrics
            values.update({metric_name(k): float(v) for k, v in (trainer.metrics or {}).items()})
        if trainer.epoch_time is not None:
            values["epoch_time_s"] = float(trainer.epoch_time)
        if getattr(trainer.device, "type", "cpu") not in ("cpu", "mps"):
            try:
                values["gpu_mem_gb"] = float(trainer._get_memory())  # what Ultralytics shows as GPU_mem
            except Exception as exc:  # never lose the epoch's metrics over it
                self.report("GPU memory", exc)
        jobs: list[_Job] = [("log epoch metrics", self._log_metrics, (values, step))]
        now = time.monotonic()
        if self._best_dirty and now - self._last_best_upload >= self.log_best_every_s:
            self._best_dirty = False
            self._last_best_upload = now
            jobs.append(("upload best.pt", self._upload, (Path(trainer.best), "weights")))
        if now - self._last_refresh >= self.refresh_every_s:
            self._last_refresh = now
            jobs += [
                ("upload results.csv", self._upload, (Path(trainer.csv), None)),
                ("upload plots", self._sync_plots, ()),
                ("upload console.log", self._sync_console, ()),
            ]
        if self._worker is not None:  # set while a run is open
            self._worker.submit_many(jobs)

    def _on_train_end(self, trainer: Any) -> None:
        if not self._open:
            return
        extra = {TRAIN_TIME: time.time() - trainer.train_time_start}
        best_epoch = getattr(getattr(trainer, "stopper", None), "best_epoch", None)
        if best_epoch is not None:
            extra[BEST_EPOCH] = float(best_epoch)  # EarlyStopping counts epochs from 1
        self.final_metrics.update(extra)
        self._submit("log final metrics", self._log_metrics, extra, trainer.epoch + 1)
        for path in (Path(trainer.best), Path(trainer.last)):
            if path.exists():
                self._submit(f"upload {path.name}", self._upload, path, "weights")
        self._submit("upload results.csv", self._upload, Path(trainer.csv), None)
        self._submit("upload plots", self._sync_plots)
        self._end_run("FINISHED")

    def _teardown(self, trainer: Any) -> None:
        if self._open:  # on_train_end did not run: the training raised
            exc = sys.exc_info()[1]
            self._end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        self._stop_console()

    # -- helpers on the training thread -----------------------------------------------------------------------

    def _model_identity(self, trainer: Any) -> dict[str, str]:
        net = trainer.model
        net = getattr(net, "module", net)  # unwrap DDP
        yaml_cfg = getattr(net, "yaml", None) or {}
        out = model_identity(str(trainer.args.model), yaml_cfg.get("scale"))
        out["model.task"] = str(trainer.args.task)
        out["model.parameters"] = str(sum(p.numel() for p in net.parameters()))
        try:
            from ultralytics.utils.torch_utils import get_flops

            out["model.gflops"] = f"{get_flops(net, 640):.4g}"  # at 640 px, as Ultralytics' model summary
        except Exception as exc:
            self.report("GFLOPs", exc)
        return out

    def _submit(self, what: str, fn: Callable, *args: Any) -> None:
        if self._worker is not None:
            self._worker.submit(what, fn, *args)

    def _end_run(self, status: str) -> None:
        import mlflow

        self._stop_console()
        self._submit("stop system metrics", self._stop_system_metrics)
        self._submit("log end tag", self._set_tags, {"time.end": metadata.utc_now(), "bridge.status": status})
        self._submit("upload console.log", self._sync_console)
        worker, self._worker = self._worker, None
        drained = True
        if worker is not None:
            timeout = self.end_timeout_s if status == "FINISHED" else min(self.end_timeout_s, 30.0)
            drained = worker.drain(timeout)
            if not drained:
                logger.warning("bridge.yolo: MLflow calls still pending after %.0f s; ending the run anyway", timeout)
            worker.close()  # it finishes what is queued, then stops
        self._open = False
        if self._owns_run:
            try:
                active = mlflow.active_run()
                if active is not None and active.info.run_id == self.run_id:
                    mlflow.end_run(status=status)
                else:
                    client, run_id = self._run()
                    client.set_terminated(run_id, status=status)
            except Exception as exc:
                self.report("end run", exc)
        if self._tmp is not None and drained:  # undrained uploads still read their snapshots from there
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _run(self) -> tuple[MlflowClient, str]:
        """The client and run the worker's jobs log to; they exist from the run's start hook on."""
        if self._client is None or self.run_id is None:
            raise RuntimeError("no MLflow run is open")
        return self._client, self.run_id

    def _stop_console(self) -> None:
        if self._capture is not None:
            self._capture.stop()

    # -- the worker's jobs ------------------------------------------------------------------------------------

    def _log_params_and_tags(self, params: dict[str, str], tags: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        client, run_id = self._run()
        client.log_batch(
            run_id,
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag(k, v[:MAX_TAG_VALUE_CHARS]) for k, v in tags.items()],
        )

    def _set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        client, run_id = self._run()
        client.log_batch(run_id, tags=[RunTag(k, str(v)[:MAX_TAG_VALUE_CHARS]) for k, v in tags.items()])

    def _log_metadata(self) -> None:
        self._set_tags(metadata.run_tags())

    def _mark_experiment(self) -> None:
        mark_training_experiment(self._run()[0], self.experiment_id)

    def _start_system_metrics(self, run_start_ms: int | None) -> None:
        client, run_id = self._run()
        self._sampler = SystemMetricsSampler(
            client, run_id, run_start_ms=run_start_ms or 0, log_every_s=self.system_metrics_every_s
        ).start()

    def _stop_system_metrics(self) -> None:
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.stop()

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        metrics = [Metric(k, v, ts, step) for k, v in values.items() if v is not None]
        client, run_id = self._run()
        client.log_batch(run_id, metrics=metrics)

    def _log_dataset(self, data: dict, data_arg: str) -> None:
        from mlflow.entities import Param

        client, run_id = self._run()
        yaml_file = data.get("yaml_file") or data_arg
        if yaml_file and Path(yaml_file).is_file():
            client.log_artifact(run_id, str(yaml_file), "data")
        summary = summarize_dataset(data)
        client.log_text(run_id, summary.to_csv(), "data/dataset_summary.csv")
        client.log_batch(run_id, params=[Param("data.hash", summary.content_hash)])
        self._log_dataset_inputs(summary)

    def _log_dataset_inputs(self, summary: DatasetSummary) -> None:
        """The train and val splits as the run's dataset inputs (the UI's Dataset column and filters)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        client, run_id = self._run()
        inputs = [
            DatasetInput(
                Dataset(s.name, s.digest, s.source_type, s.source, profile=s.profile),
                tags=[InputTag(MLFLOW_DATASET_CONTEXT, s.context)],
            )
            for s in summary.inputs()
        ]
        if inputs:  # the server keeps one input per dataset and run: a resume logging them again adds nothing
            client.log_inputs(run_id, datasets=inputs)

    def _log_resumed_dataset(self, data: dict) -> None:
        self._log_dataset_inputs(summarize_dataset(data))

    def _upload(self, path: Path, artifact_dir: str | None) -> None:
        """Upload a consistent copy of a file the training may rewrite at any moment."""
        if not path.is_file():
            return
        for _ in range(5):
            before = path.stat()
            data = path.read_bytes()
            after = path.stat()
            steady = (
                (before.st_mtime_ns, before.st_size)
                == (after.st_mtime_ns, after.st_size)
                == (after.st_mtime_ns, len(data))
            )
            if steady and (path.suffix != ".pt" or zipfile.is_zipfile(io.BytesIO(data))):
                break
            time.sleep(0.2)
        else:
            raise OSError(f"{path.name} kept changing while being read")
        if self._tmp is None:
            raise RuntimeError("no MLflow run is open")
        snap_dir = self._tmp / (artifact_dir or "_root")
        snap_dir.mkdir(parents=True, exist_ok=True)
        snap = snap_dir / path.name
        snap.write_bytes(data)
        try:
            client, run_id = self._run()
            client.log_artifact(run_id, str(snap), artifact_dir)
        finally:
            snap.unlink(missing_ok=True)
        self._uploaded[str(path)] = (after.st_mtime_ns, after.st_size)

    def _sync_plots(self) -> None:
        if self.save_dir is None or not self.save_dir.is_dir():
            return
        for path in sorted(self.save_dir.iterdir()):
            if path.suffix.lower() not in (".png", ".jpg", ".jpeg") or not path.is_file():
                continue
            st = path.stat()
            if self._uploaded.get(str(path)) != (st.st_mtime_ns, st.st_size):
                self._upload(path, "plots")

    def _sync_console(self) -> None:
        capture = self._capture
        if capture is None or self.run_id is None or self._client is None:
            return
        log = capture.log
        if log.version == self._console_version:
            return
        version = log.version
        text = log.text()
        if self.save_dir is not None and self.save_dir.is_dir():  # a resumed training appends to it
            try:
                (self.save_dir / resume_mod.CONSOLE_FILE).write_text(text)
            except OSError as exc:
                self.report("write console.log", exc)
        self._client.log_text(self.run_id, text, "console.log")
        self._console_version = version


def _remove_builtin_mlflow(trainer: Any) -> None:
    """Drop Ultralytics' own MLflow callbacks from this trainer, so nothing is logged twice.

    Only the trainer's copy of the callback lists changes: the model, SETTINGS and later trainings are untouched.
    """
    mod = sys.modules.get("ultralytics.utils.callbacks.mlflow")
    builtin = getattr(mod, "callbacks", None) or {}
    for event, fn in builtin.items():
        lst = trainer.callbacks.get(event, [])
        while fn in lst:
            lst.remove(fn)


def training_experiment_tags() -> dict[str, str]:
    """A training experiment's tags: its kind (the MLflow UI opens it on its runs) and the learning-curves view."""
    view = ui.chart_view(
        LEARNING_VIEW_NAME,
        LEARNING_CHARTS,
        ("val", BEST_PREFIX.rstrip("/"), ui.MODEL_METRICS_SECTION, ui.SYSTEM_METRICS_SECTION),
        now_ms=int(time.time() * 1000),
    )
    return {ui.EXPERIMENT_KIND_TAG: ui.MODEL_TRAINING_KIND, ui.SHARED_VIEW_TAG_PREFIX + LEARNING_VIEW: view}


def mark_training_experiment(client: Any, experiment_id: str | None) -> None:
    """Tag an experiment as model training with the learning-curves view, keeping a kind or view it has."""
    if not experiment_id:
        return
    try:
        tags = client.get_experiment(experiment_id).tags
    except Exception:  # unknown offline: the tags are idempotent, set them
        tags = {}
    for key, value in training_experiment_tags().items():
        if not tags.get(key):
            client.set_experiment_tag(experiment_id, key, value)


def learning_view_link(base_url: str, experiment: Any) -> str:
    """The experiment's chart view, opened on the learning curves where the experiment has that view."""
    has_view = bool((getattr(experiment, "tags", None) or {}).get(ui.SHARED_VIEW_TAG_PREFIX + LEARNING_VIEW))
    return ui.ui_link(base_url, experiment.experiment_id, charts=True, view=LEARNING_VIEW if has_view else None)


def _experiment_id(name: str) -> str:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, tags=training_experiment_tags())
    except MlflowException:  # created meanwhile by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
