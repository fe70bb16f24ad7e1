"""Run a program (programs.py) in one world: the same MLflow calls, whatever the tracking URI is.

The executor knows experiments and runs by their index in the program and keeps each world's ids for them
(bridge: local ids). It records what every read returned (normalized, ids turned back into indices) and which
calls raised, so two worlds' traces can be compared.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Protocol

import mlflow
import mlflow.pyfunc
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from tests.differential import allowances
from tests.differential.programs import BASE_TS, FAULTS, READS, Call, big_file_bytes


class World(Protocol):
    """Where a program runs: the oracle (stock MLflow) or bridge with its faults."""

    name: str

    def begin(self) -> None: ...
    def fault(self, call: Call) -> None: ...
    def pause(self, seconds: float) -> None: ...
    def flush(self) -> None: ...
    def end(self) -> None: ...


@dataclass
class Read:
    step: int
    call: str
    result: object
    online: bool  # no fault since the program began or since the last flush (which heals and reconnects)
    reconnected: bool = False  # a second connect() since the last flush (H3: such reads are compared too)


@dataclass
class Trace:
    """What executing a program in one world left behind, besides the server's state."""

    experiments: dict[int, str] = field(default_factory=dict)  # index -> this world's experiment id
    runs: dict[int, str] = field(default_factory=dict)  # index -> this world's run id
    reads: list[Read] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)  # step -> error of a call that raised
    said: dict[int, str] = field(default_factory=dict)  # step -> its message (reported, never compared)
    models: dict[str, str] = field(default_factory=dict)  # program's model name -> this world's model id
    seconds: float = 0.0
    returned: dict[int, float] = field(default_factory=dict)  # step -> time.monotonic() when it returned or raised


def experiment_name(nonce: str, e: int) -> str:
    return f"dx-{nonce}-e{e}"


def registered_name(nonce: str, registered: int) -> str:
    return f"dx-{nonce}-m{registered}"


def number(value: float) -> object:
    """A metric value that compares equal to itself (NaN) and prints the same in both worlds."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(value)


def sort_key(item) -> str:
    return repr(item)


class Executor:
    """Applies `program` to `world`; `run()` returns the trace."""

    def __init__(self, program: list[Call], world: World, nonce: str, *, end_runs: bool = True) -> None:
        self.program = program
        self.world = world
        self.nonce = nonce
        self.end_runs = end_runs
        self.trace = Trace()
        self.online = True
        self.reconnected = False
        self._files: str | None = None  # a folder for big files' local copies (log_big_file), made on first use

    @property
    def client(self) -> MlflowClient:
        return MlflowClient()  # the current tracking URI, as a user's MlflowClient() would

    def run(self, stop_at_kill: bool = False) -> Trace:
        started = time.monotonic()
        self.world.begin()
        try:
            for step, call in enumerate(self.program):
                if call.op == "kill" and stop_at_kill:
                    break
                self.apply(step, call)
            if self.end_runs:
                while mlflow.active_run() is not None:  # what MLflow's exit hook does
                    mlflow.end_run()
        finally:
            try:
                self.world.end()
            finally:
                if self._files is not None:
                    shutil.rmtree(self._files, ignore_errors=True)
        self.trace.seconds = time.monotonic() - started
        return self.trace

    def apply(self, step: int, call: Call) -> None:
        self._apply(step, call)
        self.trace.returned.setdefault(step, time.monotonic())

    def _apply(self, step: int, call: Call) -> None:
        if call.op in FAULTS:
            self.online = False
            self.reconnected = self.reconnected or call.op == "reconnect"
            self.world.fault(call)
            return
        if call.op == "pause":
            self.world.pause(call.args["seconds"])
            return
        if call.op == "flush":
            self.world.flush()
            self.online = True
            self.reconnected = False
            return
        if call.op in READS:
            try:
                result = getattr(self, call.op)(**call.args)
            except Exception as exc:  # a read that raises is a result like any other
                result = ("raised", _error(exc))
            self.trace.reads.append(Read(step, str(call), result, self.online, self.reconnected))
            return
        try:
            getattr(self, call.op)(**call.args)
        except Exception as exc:
            if not (
                call.op in allowances.RETRIED_ONCE_ONLINE
                and not self.online
                and _error(exc) == allowances.OFFLINE_READ_ANSWERS[0][1]
            ):
                self.trace.errors[step] = _error(exc)
                self.trace.said[step] = str(exc)[:400]
                return
            # Documented: a write that must read the server first raises while it is unreachable; the
            # person tries again once it is back — so does the program.
            self.world.flush()
            self.online, self.reconnected = True, False
            try:
                getattr(self, call.op)(**call.args)
            except Exception as again:
                self.trace.errors[step] = _error(again)
                self.trace.said[step] = str(again)[:400]

    # ---------------------------------------------------------------------------- experiments

    def create_experiment(self, e: int, fluent: bool, tags: dict) -> None:
        name = experiment_name(self.nonce, e)
        if fluent:
            self.trace.experiments[e] = mlflow.set_experiment(name).experiment_id
            if tags:
                mlflow.set_experiment_tags(tags)
        else:
            self.trace.experiments[e] = self.client.create_experiment(name, tags=tags or None)

    def set_experiment_tag(self, e: int, key: str, value: str) -> None:
        self.client.set_experiment_tag(self.trace.experiments[e], key, value)

    def delete_experiment_tag(self, e: int, key: str) -> None:
        self.client.delete_experiment_tag(self.trace.experiments[e], key)

    # ----------------------------------------------------------------------------------- runs

    def _id(self, r: int) -> str:
        return self.trace.runs[r]

    def start_run(self, r: int, e: int, name: str | None, nested: bool, tags: dict) -> None:
        run = mlflow.start_run(experiment_id=self.trace.experiments[e], run_name=name, nested=nested, tags=tags or None)
        self.trace.runs[r] = run.info.run_id

    def create_run(self, r: int, e: int, name: str, parent: int | None) -> None:
        tags = {"mlflow.parentRunId": self._id(parent)} if parent is not None else None
        self.trace.runs[r] = self.client.create_run(self.trace.experiments[e], run_name=name, tags=tags).info.run_id

    def end_run(self, r: int, status: str) -> None:
        mlflow.end_run(status)

    def set_terminated(self, r: int, status: str) -> None:
        self.client.set_terminated(self._id(r), status)

    def resume_run(self, r: int) -> None:
        # start_run(run_id=…) refuses a run outside the fluent API's active experiment: select its own first.
        mlflow.set_experiment(experiment_id=self.client.get_run(self._id(r)).info.experiment_id)
        mlflow.start_run(run_id=self._id(r))

    # ----------------------------------------------------------------------------- run writes

    def log_param(self, r: int, key: str, value: str, via: str, raises: bool = False) -> None:
        if via == "fluent":
            mlflow.log_param(key, value)
        else:
            self.client.log_param(self._id(r), key, value)

    def log_metric(self, r: int, key: str, value: float, step: int, ts: int | None, via: str) -> None:
        if via == "fluent":
            mlflow.log_metric(key, value, step=step, timestamp=ts)
        else:
            self.client.log_metric(self._id(r), key, value, timestamp=ts, step=step)

    def log_metrics(self, r: int, keys: int, step: int, base: float, ts: int, via: str) -> None:
        metrics = {f"m{i:04d}": base + i for i in range(keys)}
        if via == "fluent":
            mlflow.log_metrics(metrics, step=step, timestamp=ts)
        else:
            self.client.log_batch(self._id(r), metrics=[Metric(k, v, ts, step) for k, v in metrics.items()])

    def log_batch(self, r: int, metrics: list, params: dict, tags: dict) -> None:
        self.client.log_batch(
            self._id(r),
            metrics=[Metric(k, v, ts, s) for k, v, s, ts in metrics],
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )

    def set_tag(self, r: int, key: str, value: str, via: str) -> None:
        if via == "fluent":
            mlflow.set_tag(key, value)
        else:
            self.client.set_tag(self._id(r), key, value)

    def delete_tag(self, r: int, key: str, via: str) -> None:
        if via == "fluent":
            mlflow.delete_tag(key)
        else:
            self.client.delete_tag(self._id(r), key)

    def log_text(self, r: int, path: str, text: str) -> None:
        self.client.log_text(self._id(r), text, path)

    def log_dict(self, r: int, path: str, data: dict) -> None:
        self.client.log_dict(self._id(r), data, path)

    def log_table(self, r: int, rows: int, path: str) -> None:
        self.client.log_table(
            self._id(r), data={"x": list(range(rows)), "y": [i * 0.5 for i in range(rows)]}, artifact_file=path
        )

    def log_image(self, r: int, shade: int, path: str) -> None:
        import numpy as np

        self.client.log_image(self._id(r), np.full((4, 4, 3), shade, dtype=np.uint8), artifact_file=path)

    def log_big_file(self, r: int, path: str, size: int, seed: int) -> None:
        if self._files is None:
            self._files = tempfile.mkdtemp(prefix="dx-files-")
        folder, _, name = path.rpartition("/")
        local = f"{self._files}/{seed}/{name}"
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "wb") as fh:
            fh.write(big_file_bytes(size, seed))
        self.client.log_artifact(self._id(r), local, folder or None)

    def epoch(self, r: int, step: int, path: str, size: int, seed: int) -> None:
        """A point, the weights, a point (explicit timestamps: compared exactly)."""
        self.client.log_metric(self._id(r), "loss", 1.0 / (step + 1), timestamp=BASE_TS + 10 + step, step=10 + step)
        self.log_big_file(r, path, size, seed)
        self.client.log_metric(self._id(r), "acc", step / 10, timestamp=BASE_TS + 10 + step, step=10 + step)

    def log_input(self, r: int, rows: int, context: str) -> None:
        # A dataset entity built directly: its source and digest do not depend on the process that logs it.
        dataset = Dataset(
            name=f"ds{rows}",
            digest=f"d{rows:04d}",
            source_type="local",
            source=f'{{"uri": "/data/ds{rows}.npy"}}',
            schema=None,
            profile=f'{{"rows": {rows}}}',
        )
        self.client.log_inputs(self._id(r), [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    # ------------------------------------------------------------------------ models, registry

    def log_model(self, r: int, flavor: str, name: str, params: dict) -> None:
        if flavor == "pyfunc":
            info = mlflow.pyfunc.log_model(name=name, python_model=AddN(), pip_requirements=[], params=params or None)
        else:
            import numpy as np
            import torch
            from mlflow import pytorch as mlflow_pytorch

            torch.manual_seed(0)
            # MLflow 3's default pt2 format traces the model: it needs an input example.
            info = mlflow_pytorch.log_model(
                torch.nn.Linear(2, 1),
                name=name,
                params=params or None,
                pip_requirements=[],
                input_example=np.zeros((1, 2), dtype=np.float32),
            )
        self.trace.models[name] = info.model_id

    def register_model(self, model: str, registered: int) -> None:
        mlflow.register_model(f"models:/{self.trace.models[model]}", registered_name(self.nonce, registered))

    def set_alias(self, registered: int, alias: str, version: int) -> None:
        self.client.set_registered_model_alias(registered_name(self.nonce, registered), alias, str(version))

    # ---------------------------------------------------------------------------------- reads

    def _index(self, run_id: str) -> object:
        for r, known in self.trace.runs.items():
            if known == run_id:
                return r
        return f"unknown run {run_id}"

    def get_run(self, r: int) -> dict:
        run = self.client.get_run(self._id(r))
        return normalize_run(run, r)

    def get_metric_history(self, r: int, key: str) -> list:
        points = self.client.get_metric_history(self._id(r), key)
        if key.startswith(allowances.CLOCK_STAMPED_PREFIX):
            return sorted({(m.step, number(m.value)) for m in points}, key=sort_key)
        return sorted(((m.step, number(m.value), m.timestamp) for m in points), key=sort_key)

    def search_runs(self, e: int, filter_string: str | None, order_by: str | None) -> dict:
        runs = self.client.search_runs(
            [self.trace.experiments[e]], filter_string or "", run_view_type=3, order_by=[order_by] if order_by else None
        )
        found = [self._index(run.info.run_id) for run in runs]
        order = []
        if order_by:
            field_, _, _ = order_by.partition(" ")
            kind, _, key = field_.partition(".")
            for run, r in zip(runs, found, strict=False):
                if kind == "metrics":
                    order.append(number(run.data.metrics[key]) if key in run.data.metrics else None)
                elif kind == "params":
                    order.append(run.data.params.get(key))
                elif run.info.run_name == f"run{r}":  # unnamed runs' random names are not the program's
                    order.append(run.info.run_name)
        return {"runs": sorted(found, key=sort_key), "order": order}


class AddN(mlflow.pyfunc.PythonModel):
    """A tiny pyfunc model (module level, so both worlds pickle the same class)."""

    def predict(self, context, model_input, params=None):
        return model_input


def normalize_run(run, r: int) -> dict:
    """A run as reads and the final state compare it: ids and clock-dependent parts left out."""
    data = run.data
    return {
        "status": run.info.status,
        "name": run.info.run_name if run.info.run_name == f"run{r}" else "*",
        "params": dict(sorted(data.params.items())),
        "tags": {
            k: v for k, v in sorted(data.tags.items()) if not allowances.ignored_tag(k) and k != "mlflow.parentRunId"
        },
        # The latest value of a clock-stamped key depends on the clock: only its presence is compared.
        "metrics": {
            k: ("*" if k.startswith(allowances.CLOCK_STAMPED_PREFIX) else number(v))
            for k, v in sorted(data.metrics.items())
        },
    }


def _error(exc: BaseException) -> str:
    if isinstance(exc, MlflowException):
        return f"MlflowException {exc.error_code}"
    return type(exc).__name__
