"""Programs of MLflow calls, generated and shrunk by Hypothesis's stateful testing.

A program is a list of `Call`s naming experiments and runs by their index in the program, never by id, so
the same program runs against any server. `ProgramMachine`'s rules are the calls a user makes (fluent
`mlflow.*` and `MlflowClient`) plus fault events; a small model keeps the program valid under stock MLflow
(fluent runs nest, a param never changes value, only tags that exist are deleted). Its teardown hands the
program to `check` (set by the test), which runs it twice and compares.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from tests.differential import allowances

#: Explicit metric timestamps: a small range, so the same key, step, value and timestamp recur.
BASE_TS = 1_700_000_000_000
STATUSES = ("FINISHED", "FAILED", "KILLED")
PARAM_KEYS = ("p0", "p1", "p2", "lr")
TAG_KEYS = ("t0", "t1", "stage")
METRIC_KEYS = ("loss", "acc", "n_loss")  # n_*: no explicit timestamp (allowances.CLOCK_STAMPED_PREFIX)
MAX_EXPERIMENTS = 3
MAX_RUNS = 6
MiB = 1024 * 1024
#: The upload part size of the bridge world when files are on (BRIDGE_UPLOAD_PART_BYTES): every big file goes in
#: several parts through the entrance, cheaply.
FILE_PART_BYTES = MiB
#: Big files: larger than a part, a few MiB (each a version of one of BIG_PATHS).
BIG_SIZES = (MiB + MiB // 2, 2 * MiB + MiB // 2, 3 * MiB)
BIG_PATHS = ("weights/last.pt", "weights/best.pt")
#: The throttled link's rates (bytes/s client → server), None: unlimited.
THROTTLES = (MiB, 2 * MiB, None)

values = st.one_of(
    st.sampled_from([0.0, 1.0, -1.5, 0.25, math.nan, math.inf, -math.inf]),
    st.floats(min_value=-1e9, max_value=1e9, allow_nan=False),
)
texts = st.text(alphabet="abcxyz019 _-", min_size=0, max_size=12)


@dataclass
class Call:
    """One step of a program: an operation name and its world-independent arguments."""

    op: str
    args: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.op}({', '.join(f'{k}={v!r}' for k, v in self.args.items())})"

    def to_json(self) -> dict:
        return {"op": self.op, "args": self.args}

    @classmethod
    def from_json(cls, data: dict) -> Call:
        return cls(data["op"], dict(data["args"]))


#: Calls that do not change server state in either world (the executor records what they return).
READS = frozenset({"get_run", "search_runs", "get_metric_history"})
#: Fault events: applied in the bridge world only.
FAULTS = frozenset(
    {
        "fault",
        "link_fault",
        "heal",
        "reconnect",
        "copy_journal",
        "restart_server",
        "kill",
        # the link of the file rules (features.files): down until link_up, throttled, flapping
        "link_down",
        "link_up",
        "throttle",
        "flap",
    }
)
#: Calls that log a big file (a version of a path in BIG_PATHS): `epoch` logs a point, the file, a point.
BIG_FILE_OPS = frozenset({"log_big_file", "epoch"})


def big_file_bytes(size: int, seed: int) -> bytes:
    """The bytes of a big file version: the same in both worlds, different for every (size, seed)."""
    import random

    return random.Random(seed * 7919 + size).randbytes(size)


def listing(program: list[Call]) -> str:
    return "\n".join(f"  {i:3d}  {call}" for i, call in enumerate(program))


@dataclass
class RunModel:
    index: int
    experiment: int
    name: str | None
    fluent: bool
    status: str = "RUNNING"
    params: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    texts: dict = field(default_factory=dict)  # artifact path -> size, for same-size overwrites
    tables: int = 0
    epochs: int = 0  # steps of `epoch` calls so far
    big: dict = field(default_factory=dict)  # big file path -> size of its latest version


@dataclass(frozen=True)
class Features:
    """Which groups of rules a machine may use (the CI test, the soak and the subprocess scenarios differ)."""

    proxy_faults: bool = True
    link_faults: bool = True
    restart: bool = False
    reconnect: bool = True
    copy_journal: bool = True
    kill: bool = False
    reads: bool = True
    child: bool = False  # run through bridge in a child process (kill -9, or exit), then `bridge sync`
    slow_exit: bool = False  # with child: the link is slow while the child runs and exits
    files: bool = False  # big files in parts through the entrance, a throttled or flapping link (orders.py)


#: The subprocess scenarios: the child controls only its own transport, so no proxy faults or reconnects.
KILL9 = Features(proxy_faults=False, reconnect=False, kill=True, child=True)
SLOW_EXIT = Features(proxy_faults=False, link_faults=False, reconnect=False, child=True, slow_exit=True)
#: The file rules: through the entrance (resumable uploads), the link down, throttled or flapping instead of the
#: proxy's per-request faults; no stale journal copies (their spools would double every big file's cost).
FILES = Features(proxy_faults=False, copy_journal=False, files=True)


class ProgramMachine(RuleBasedStateMachine):
    """Builds a program; `check(program)` (a class attribute set per test) runs and compares it at teardown."""

    check: Callable[[list[Call]], None] | None = None
    features: Features = Features()

    def __init__(self) -> None:
        super().__init__()
        self.program: list[Call] = []
        self.experiments = 0
        self.experiment_tags: list[dict] = []
        self.runs: list[RunModel] = []
        self.stack: list[int] = []  # fluent active runs, innermost last
        self.killed = False
        self.models = 0
        self.versions: dict[int, int] = {}  # registered model -> versions made

    def add(self, op: str, **args) -> None:
        self.program.append(Call(op, args))

    # ------------------------------------------------------------------------------- helpers

    def _run(self, i: int) -> RunModel:
        return self.runs[i % len(self.runs)]

    def _writable(self) -> bool:
        return bool(self.runs) and not self.killed

    # ---------------------------------------------------------------------------- experiments

    @initialize(fluent=st.booleans())
    def first_experiment(self, fluent):
        self._create_experiment(fluent, {})

    def _create_experiment(self, fluent: bool, tags: dict) -> None:
        self.add("create_experiment", e=self.experiments, fluent=fluent, tags=tags)
        self.experiments += 1
        self.experiment_tags.append(dict(tags))

    @precondition(lambda self: self.experiments < MAX_EXPERIMENTS and not self.killed)
    @rule(fluent=st.booleans(), tags=st.dictionaries(st.sampled_from(TAG_KEYS), texts, max_size=2))
    def create_experiment(self, fluent, tags):
        self._create_experiment(fluent, tags)

    @precondition(lambda self: not self.killed)
    @rule(e=st.integers(0, MAX_EXPERIMENTS - 1), key=st.sampled_from(TAG_KEYS), value=texts)
    def set_experiment_tag(self, e, key, value):
        e %= self.experiments
        self.experiment_tags[e][key] = value
        self.add("set_experiment_tag", e=e, key=key, value=value)

    @precondition(lambda self: not self.killed and any(self.experiment_tags))
    @rule(e=st.integers(0, MAX_EXPERIMENTS - 1), k=st.integers(0, 5))
    def delete_experiment_tag(self, e, k):
        tagged = [i for i, tags in enumerate(self.experiment_tags) if tags]
        e = tagged[e % len(tagged)]
        key = sorted(self.experiment_tags[e])[k % len(self.experiment_tags[e])]
        del self.experiment_tags[e][key]
        self.add("delete_experiment_tag", e=e, key=key)

    # ------------------------------------------------------------------------------------ runs

    @precondition(lambda self: len(self.runs) < MAX_RUNS and not self.killed)
    @rule(
        e=st.integers(0, MAX_EXPERIMENTS - 1),
        named=st.booleans(),
        tags=st.dictionaries(st.sampled_from(TAG_KEYS), texts, max_size=2),
    )
    def start_run(self, e, named, tags):
        """mlflow.start_run(); nested under the active run when there is one."""
        nested = bool(self.stack)
        e = self.runs[self.stack[-1]].experiment if nested else e % self.experiments
        r = len(self.runs)
        name = f"run{r}" if named else None
        self.runs.append(RunModel(r, e, name, fluent=True, tags=dict(tags)))
        self.stack.append(r)
        self.add("start_run", r=r, e=e, name=name, nested=nested, tags=tags)

    @precondition(lambda self: len(self.runs) < MAX_RUNS and not self.killed)
    @rule(e=st.integers(0, MAX_EXPERIMENTS - 1), parent=st.one_of(st.none(), st.integers(0, MAX_RUNS)))
    def create_run(self, e, parent):
        """MlflowClient().create_run(), optionally naming a parent by mlflow.parentRunId like MLflow does."""
        if parent is not None and not self.runs:
            parent = None
        e = e % self.experiments
        r = len(self.runs)
        parent = None if parent is None else self._run(parent).index
        self.runs.append(RunModel(r, e, f"run{r}", fluent=False))
        self.add("create_run", r=r, e=e, name=f"run{r}", parent=parent)

    @precondition(lambda self: bool(self.stack) and not self.killed)
    @rule(status=st.sampled_from(STATUSES))
    def end_run(self, status):
        r = self.stack.pop()
        self.runs[r].status = status
        self.add("end_run", r=r, status=status)

    @precondition(lambda self: self._writable())
    @rule(r=st.integers(0, MAX_RUNS), status=st.sampled_from(STATUSES))
    def set_terminated(self, r, status):
        run = self._run(r)
        if run.index in self.stack:
            return
        run.status = status
        self.add("set_terminated", r=run.index, status=status)

    @precondition(lambda self: not self.stack and self._writable())
    @rule(r=st.integers(0, MAX_RUNS))
    def resume_run(self, r):
        """mlflow.start_run(run_id=…): the run is RUNNING again and the active run."""
        run = self._run(r)
        run.status = "RUNNING"
        self.stack.append(run.index)
        self.add("resume_run", r=run.index)

    # ----------------------------------------------------------------------------- run writes

    def _via(self, run: RunModel, client: bool) -> str:
        """Fluent only for the active run (that is what it logs to); MlflowClient for any run."""
        return "fluent" if self.stack and self.stack[-1] == run.index and not client else "client"

    @precondition(lambda self: self._writable())
    @rule(r=st.integers(0, MAX_RUNS), key=st.sampled_from(PARAM_KEYS), value=texts, client=st.booleans())
    def log_param(self, r, key, value, client):
        run = self._run(r)
        value = run.params.setdefault(key, value)  # the same value again is fine; a new one raises
        self.add("log_param", r=run.index, key=key, value=value, via=self._via(run, client))

    @precondition(lambda self: self._writable())
    @rule(r=st.integers(0, MAX_RUNS), value=texts)
    def change_param(self, r, value):
        """A param logged again with a different value: MLflow raises INVALID_PARAMETER_VALUE."""
        run = self._run(r)
        if not run.params:
            return
        key = sorted(run.params)[0]
        if run.params[key] == value:
            return
        self.add("log_param", r=run.index, key=key, value=value, via="client", raises=True)

    @precondition(lambda self: self._writable())
    @rule(
        r=st.integers(0, MAX_RUNS),
        key=st.sampled_from(METRIC_KEYS),
        value=values,
        step=st.integers(0, 3),
        ts=st.integers(0, 3),
        client=st.booleans(),
    )
    def log_metric(self, r, key, value, step, ts, client):
        run = self._run(r)
        stamp = None if key.startswith(allowances.CLOCK_STAMPED_PREFIX) else BASE_TS + ts
        self.add("log_metric", r=run.index, key=key, value=value, step=step, ts=stamp, via=self._via(run, client))

    @precondition(lambda self: self._writable())
    @rule(r=st.integers(0, MAX_RUNS), keys=st.integers(1, 1200), step=st.integers(0, 2), base=values)
    def log_metrics(self, r, keys, step, base):
        """Many keys in one call: more than one log_batch (≤ 1000 metrics each) when keys > 1000."""
        run = self._run(r)
        self.add(
            "log_metrics", r=run.index, keys=keys, step=step, base=base, ts=BASE_TS + step, via=self._via(run, False)
        )

    @precondition(lambda self: self._writable())
    @rule(
        r=st.integers(0, MAX_RUNS),
        metrics=st.lists(st.tuples(st.sampled_from(("loss", "acc")), values, st.integers(0, 3)), max_size=4),
        params=st.dictionaries(st.sampled_from(PARAM_KEYS), texts, max_size=2),
        tags=st.dictionaries(st.sampled_from(TAG_KEYS), texts, max_size=2),
    )
    def log_batch(self, r, metrics, params, tags):
        run = self._run(r)
        params = {k: run.params.setdefault(k, v) for k, v in params.items()}
        run.tags.update(tags)
        self.add(
            "log_batch", r=run.index, metrics=[[k, v, s, BASE_TS + s] for k, v, s in metrics], params=params, tags=tags
        )

    @precondition(lambda self: self._writable())
    @rule(r=st.integers(0, MAX_RUNS), key=st.sampled_from(TAG_KEYS), value=texts, client=st.booleans())
    def set_tag(self, r, key, value, client):
        run = self._run(r)
        run.tags[key] = value
        self.add("set_tag", r=run.index, key=key, value=value, via=self._via(run, client))

    @precondition(lambda self: self._writable() and any(run.tags for run in self.runs))
    @rule(r=st.integers(0, MAX_RUNS), k=st.integers(0, 5), client=st.booleans())
    def delete_tag(self, r, k, client):
        tagged = [run for run in self.runs if run.tags]
        run = tagged[r % len(tagged)]
        key = sorted(run.tags)[k % len(run.tags)]
        del run.tags[key]
        self.add("delete_tag", r=run.index, key=key, via=self._via(run, client))

    # ------------------------------------------------------------------------------ artifacts

    @precondition(lambda self: self._writable())
    @rule(
        r=st.integers(0, MAX_RUNS),
        path=st.sampled_from(("notes.txt", "logs/console.log", "a/b/c.txt")),
        text=st.text(alphabet="abc\n", min_size=1, max_size=40),
    )
    def log_text(self, r, path, text):
        run = self._run(r)
        run.texts[path] = len(text.encode())
        self.add("log_text", r=run.index, path=path, text=text)

    @precondition(lambda self: self._writable() and any(run.texts for run in self.runs))
    @rule(r=st.integers(0, MAX_RUNS), k=st.integers(0, 3), fill=st.sampled_from("xyz"))
    def overwrite_text(self, r, k, fill):
        """The same path again, same size, different bytes (console.log refreshed in place)."""
        with_texts = [run for run in self.runs if run.texts]
        run = with_texts[r % len(with_texts)]
        path = sorted(run.texts)[k % len(run.texts)]
        self.add("log_text", r=run.index, path=path, text=fill * run.texts[path])

    @precondition(lambda self: self._writable())
    @rule(
        r=st.integers(0, MAX_RUNS),
        data=st.dictionaries(st.sampled_from(("a", "b", "lr")), st.integers(-5, 5), max_size=3),
    )
    def log_dict(self, r, data):
        run = self._run(r)
        self.add("log_dict", r=run.index, path="config/args.json", data=data)

    @precondition(lambda self: self._writable())
    @rule(r=st.integers(0, MAX_RUNS), rows=st.integers(1, 4), path=st.sampled_from(("table.json", "eval/t.json")))
    def log_table(self, r, rows, path):
        run = self._run(r)
        run.tables += 1
        self.add("log_table", r=run.index, rows=rows, path=path)

    @precondition(lambda self: self._writable())
    @rule(r=st.integers(0, MAX_RUNS), shade=st.integers(0, 255))
    def log_image(self, r, shade):
        run = self._run(r)
        self.add("log_image", r=run.index, shade=shade, path="images/sample.png")

    @precondition(lambda self: self._writable())
    @rule(r=st.integers(0, MAX_RUNS), rows=st.integers(1, 5), context=st.sampled_from(("train", "eval")))
    def log_input(self, r, rows, context):
        run = self._run(r)
        self.add("log_input", r=run.index, rows=rows, context=context)

    # ------------------------------------------------------------------ big files (features.files)

    # The big-file rules draw one argument each: Hypothesis orders rules by how many arguments they draw and falls
    # back to the first valid ones, so these come right after the argument-less ones.

    @precondition(lambda self: self.features.files and self._writable())
    @rule(spec=st.tuples(st.integers(0, MAX_RUNS), st.sampled_from(BIG_PATHS), st.sampled_from(BIG_SIZES)))
    def log_big_file(self, spec):
        """MlflowClient.log_artifact of a file of a few MiB; the same path again is a newer version of it."""
        r, path, size = spec
        run = self._run(r)
        run.big[path] = size
        self.add("log_big_file", r=run.index, path=path, size=size, seed=len(self.program))

    @precondition(lambda self: self.features.files and self._writable() and any(run.big for run in self.runs))
    @rule(spec=st.tuples(st.integers(0, MAX_RUNS), st.integers(0, 1), st.sampled_from((None, *BIG_SIZES))))
    def new_version(self, spec):
        """A big file logged again at its path (a checkpoint refreshed): the newer version must win."""
        r, k, size = spec
        with_big = [run for run in self.runs if run.big]
        run = with_big[r % len(with_big)]
        path = sorted(run.big)[k % len(run.big)]
        run.big[path] = size = size or run.big[path]
        self.add("log_big_file", r=run.index, path=path, size=size, seed=len(self.program))

    @precondition(lambda self: self.features.files and self._writable())
    @rule(spec=st.tuples(st.integers(0, MAX_RUNS), st.sampled_from(BIG_SIZES)))
    def epoch(self, spec):
        """What a training loop does each epoch: a point, the weights (BIG_PATHS[0], a new version), a point."""
        r, size = spec
        run = self._run(r)
        step = run.epochs
        run.epochs += 1
        run.big[BIG_PATHS[0]] = size
        self.add("epoch", r=run.index, step=step, path=BIG_PATHS[0], size=size, seed=len(self.program))

    @precondition(lambda self: self.features.files and not self.killed)
    @rule(seconds=st.sampled_from((0.3, 1.0, 2.0)))
    def pause(self, seconds):
        """The program waits (a training epoch): bridge's lanes deliver meanwhile, over the link as it is now."""
        self.add("pause", seconds=seconds)

    @precondition(lambda self: self.features.files and not self.killed)
    @rule()
    def link_down(self):
        """The link refuses every connection until link_up (or heal, or a flush)."""
        self.add("link_down")

    @precondition(lambda self: self.features.files and not self.killed)
    @rule()
    def link_up(self):
        self.add("link_up")

    @precondition(lambda self: self.features.files and not self.killed)
    @rule(rate=st.sampled_from(THROTTLES))
    def throttle(self, rate):
        """The link's bandwidth client → server from now on (None: unlimited)."""
        self.add("throttle", up_bytes_per_s=rate)

    @precondition(lambda self: self.features.files and not self.killed)
    @rule(up_s=st.sampled_from((1.0, 2.0, None)), down_s=st.sampled_from((0.2, 0.5)))
    def flap(self, up_s, down_s):
        """The link flaps from now on: up for up_s, down for down_s, again (None: steady again)."""
        self.add("flap", up_s=up_s, down_s=None if up_s is None else down_s)

    # ------------------------------------------------------------- models and registry (behind flags)

    @precondition(lambda self: allowances.enabled("models") and bool(self.stack) and not self.killed)
    @rule(
        flavor=st.sampled_from(("pyfunc", "pytorch")),
        params=st.dictionaries(st.sampled_from(("alpha", "epochs")), st.integers(0, 9), max_size=2),
    )
    def log_model(self, flavor, params):
        """mlflow.<flavor>.log_model in the active run: a LoggedModel with params, artifacts and a run link."""
        self.add("log_model", r=self.stack[-1], flavor=flavor, name=f"model{self.models}", params=params)
        self.models += 1

    @precondition(lambda self: allowances.enabled("registry") and self.models > 0 and not self.killed)
    @rule(model=st.integers(0, 5), registered=st.integers(0, 1))
    def register_model(self, model, registered):
        """mlflow.register_model(models:/<id>, name): a new version of registered model `registered`."""
        self.add("register_model", model=f"model{model % self.models}", registered=registered)
        self.versions[registered] = self.versions.get(registered, 0) + 1

    @precondition(lambda self: allowances.enabled("registry") and bool(self.versions) and not self.killed)
    @rule(registered=st.integers(0, 1), alias=st.sampled_from(("champion", "candidate")), version=st.integers(1, 3))
    def set_alias(self, registered, alias, version):
        registered = sorted(self.versions)[registered % len(self.versions)]
        version = 1 + (version - 1) % self.versions[registered]
        self.add("set_alias", registered=registered, alias=alias, version=version)

    # ----------------------------------------------------------------------------------- reads

    @precondition(lambda self: self.features.reads and bool(self.runs) and not self.killed)
    @rule(r=st.integers(0, MAX_RUNS))
    def get_run(self, r):
        self.add("get_run", r=self._run(r).index)

    @precondition(lambda self: self.features.reads and bool(self.runs) and not self.killed)
    @rule(r=st.integers(0, MAX_RUNS), key=st.sampled_from(METRIC_KEYS))
    def get_metric_history(self, r, key):
        self.add("get_metric_history", r=self._run(r).index, key=key)

    @precondition(lambda self: self.features.reads and not self.killed)
    @rule(
        e=st.integers(0, MAX_EXPERIMENTS - 1),
        filter_string=st.sampled_from(
            (
                None,
                "params.p0 = 'a'",
                "metrics.loss > 0",
                "tags.stage != 'x'",
                "attributes.status = 'FINISHED'",
                "attributes.run_name = 'run1'",
            )
        ),
        order_by=st.sampled_from((None, "metrics.acc DESC", "params.lr ASC", "attributes.run_name ASC")),
    )
    def search_runs(self, e, filter_string, order_by):
        self.add("search_runs", e=e % self.experiments, filter_string=filter_string, order_by=order_by)

    @precondition(lambda self: not self.killed)
    @rule()
    def flush(self):
        """A sync point: bridge heals the link and delivers everything; reads after it must match MLflow."""
        self.add("flush")

    # ---------------------------------------------------------------------------------- faults

    @precondition(lambda self: self.features.proxy_faults and not self.killed)
    @rule(
        mode=st.sampled_from(
            ("lost_ack", "reset_response", "reset_request", "http_5xx", "refuse", "slow", "blackhole")
        ),
        path=st.sampled_from(
            (
                None,
                "runs/create",
                "runs/log-batch",
                "runs/update",
                "mlflow-artifacts",
                "experiments/create",
                "runs/delete-tag",
                "runs/log-inputs",
                "experiments/set-experiment-tag",
                "runs/search",
                "experiments/get-by-name",
            )
        ),
        times=st.integers(1, 3),
    )
    def fault(self, mode, path, times):
        """The flaky proxy between bridge and its server changes mode (see faults.py)."""
        if mode == "blackhole":  # every affected request costs the sender's whole HTTP timeout
            times = 1
        self.add("fault", mode=mode, path=path, times=times)

    @precondition(lambda self: self.features.link_faults and not self.killed)
    @rule(
        kind=st.sampled_from(("lost_answer", "refuse", "timeout", "status")),
        path=st.sampled_from(
            (
                None,
                "runs/create",
                "runs/log-batch",
                "runs/update",
                "mlflow-artifacts",
                "experiments/create",
                "runs/delete-tag",
                "runs/log-inputs",
                "runs/search",
                "experiments/get-by-name",
                "runs/get",
                "runs/set-tag",
            )
        ),
        times=st.integers(1, 3),
        status=st.sampled_from((503, 500, 429, 502)),
    )
    def link_fault(self, kind, path, times, status):
        """A fault in the client's own transport (Link's seam): exact, whatever the timing."""
        self.add("link_fault", kind=kind, path=path, times=times, status=status)

    @precondition(lambda self: (self.features.proxy_faults or self.features.link_faults) and not self.killed)
    @rule()
    def heal(self):
        self.add("heal")

    @precondition(lambda self: self.features.reconnect and not self.killed)
    @rule()
    def reconnect(self):
        """A second bridge.connect() on the same journal (a notebook cell run again)."""
        self.add("reconnect")

    @precondition(lambda self: self.features.copy_journal and not self.killed)
    @rule()
    def copy_journal(self):
        """Keep a copy of the journal now; it is delivered again after the program (Drive sync lag)."""
        self.add("copy_journal")

    @precondition(lambda self: self.features.restart and not self.killed)
    @rule()
    def restart_server(self):
        self.add("restart_server")

    @precondition(lambda self: self.features.kill and bool(self.runs) and not self.killed)
    @rule()
    def kill(self):
        """kill -9 of the client process here; `bridge sync` delivers the journal afterwards."""
        self.killed = True
        self.add("kill")

    @precondition(lambda self: self.killed)
    @rule()
    def after_kill(self):
        """Nothing happens after kill -9 (Hypothesis needs a rule it may still take)."""

    def teardown(self) -> None:
        if type(self).check is not None and self.program:
            type(self).check(self.program)


class FileProgramMachine(ProgramMachine):
    """The programs of the file rules (FILES): runs, points, small and big files, the link's faults, reads.

    Rules that do not touch the file lane's orders are taken out (an attribute that is no rule hides the
    inherited one), so big files, new versions and epochs are a good share of every program."""

    # A second experiment's tags, params that raise, tables and datasets are the default programs' business.
    create_experiment = set_experiment_tag = delete_experiment_tag = None
    change_param = delete_tag = overwrite_text = log_dict = log_table = log_input = None
    log_param = set_tag = get_metric_history = None
    log_model = register_model = set_alias = None
    fault = copy_journal = restart_server = kill = after_kill = search_runs = heal = None

    @initialize(fluent=st.booleans(), rate=st.sampled_from(THROTTLES))
    def first_experiment(self, fluent, rate):
        """The experiment, a run to log files to from the first step, and (mostly) a throttled link."""
        self._create_experiment(fluent, {})
        self.runs.append(RunModel(0, 0, "run0", fluent=False))
        self.add("create_run", r=0, e=0, name="run0", parent=None)
        if rate is not None:
            self.add("throttle", up_bytes_per_s=rate)

    @precondition(lambda self: not self.killed and (not self.program or self.program[-1].op != "flush"))
    @rule()
    def flush(self):
        """A sync point (not twice in a row: an always-valid rule, Hypothesis would pick little else)."""
        self.add("flush")
