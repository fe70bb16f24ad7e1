"""What a server holds after a program, captured in a world-independent form, and the comparison of two.

Runs are found by searching the program's experiments on the server (deleted ones included), then named by
their index in the program: the oracle's by server id, bridge's by its run key tag (the local id). A run no
index claims, or a second run claiming one, is a ghost. Metric histories are read from the server's SQLite
file (every point, one query per run, instead of one request per key); everything else through the REST API.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests
from mlflow import MlflowClient

from tests.differential import allowances
from tests.differential.executor import Trace, experiment_name, normalize_run, number, sort_key
from tests.differential.programs import Call

ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"


@dataclass
class State:
    experiments: dict[int, object] = field(default_factory=dict)
    runs: dict[int, dict] = field(default_factory=dict)
    ghosts: list[str] = field(default_factory=list)
    models: dict[str, dict] = field(default_factory=dict)
    registry: dict[int, object] = field(default_factory=dict)
    # Not compared (ids differ between worlds): for the file rules (orders.py).
    server_ids: dict[int, str] = field(default_factory=dict)  # run index -> the server's run id
    digests: dict[int, dict[str, str]] = field(default_factory=dict)  # run index -> artifact path -> sha256


def capture(
    server_url: str, db_path: Path, nonce: str, experiments: int, trace: Trace, key_of: Callable[[object], str | None]
) -> State:
    """The server's state for the program's experiments; `key_of(run)` gives the id the trace knows it by."""
    # The registry too: a bridge connect() of the other world points the process's registry URI at bridge's.
    client = MlflowClient(server_url, registry_uri=server_url)
    index_of = {run_id: r for r, run_id in trace.runs.items()}
    state = State()
    found: list[tuple[int, object, int]] = []
    for e in range(experiments):
        experiment = client.get_experiment_by_name(experiment_name(nonce, e))
        if experiment is None:
            state.experiments[e] = None
            continue
        state.experiments[e] = {
            "lifecycle": experiment.lifecycle_stage,
            "tags": {k: v for k, v in sorted(experiment.tags.items()) if not allowances.ignored_tag(k)},
        }
        for run in client.search_runs([experiment.experiment_id], run_view_type=3, max_results=1000):
            if allowances.removed_twin(run):
                continue
            r = index_of.get(key_of(run))
            if r is None:
                state.ghosts.append(
                    f"run {run.info.run_id} ({run.info.run_name!r}, key {key_of(run)!r}) in "
                    f"experiment e{e} is no run of the program"
                )
            elif any(r == seen for seen, _, _ in found):
                state.ghosts.append(f"run {run.info.run_id} is a second copy of program run {r}")
            else:
                found.append((r, run, e))
    server_index = {run.info.run_id: r for r, run, _ in found}
    if trace.models or allowances.enabled("models"):
        _capture_models(client, server_url, state, server_index, nonce, trace)
    with requests.Session() as session, _metrics_db(db_path) as db:
        for r, run, e in found:
            summary = normalize_run(run, r)
            parent = run.data.tags.get("mlflow.parentRunId")
            summary["parent"] = None if parent is None else server_index.get(parent, f"unknown id {parent}")
            summary["experiment"] = e
            summary["lifecycle"] = run.info.lifecycle_stage
            summary["ended"] = run.info.end_time is not None
            summary["history"] = _histories(db, run.info.run_id)
            summary["inputs"] = sorted(
                (
                    (
                        d.dataset.name,
                        d.dataset.digest,
                        d.dataset.source_type,
                        tuple(sorted((t.key, t.value) for t in d.tags)),
                    )
                    for d in run.inputs.dataset_inputs
                ),
                key=sort_key,
            )
            state.digests[r] = {}
            summary["artifacts"] = _artifacts(session, server_url, run.info.artifact_uri, state.digests[r])
            state.runs[r] = summary
            state.server_ids[r] = run.info.run_id
    return state


def _capture_models(
    client: MlflowClient, server_url: str, state: State, server_index: dict, nonce: str, trace: Trace
) -> None:
    """Logged models of the program's experiments (by name) and its registered models' versions and aliases."""
    from tests.differential.executor import registered_name

    ids = [client.get_experiment_by_name(experiment_name(nonce, e)) for e in range(len(state.experiments))]
    model_names = {}
    with requests.Session() as session:
        for model in client.search_logged_models([x.experiment_id for x in ids if x is not None]):
            model_names[model.model_id] = model.name
            state.models[model.name] = {
                "run": server_index.get(model.source_run_id, f"unknown id {model.source_run_id}"),
                "status": str(model.status),
                "params": dict(sorted((model.params or {}).items())),
                "metrics": _model_metrics(model.metrics),
                "tags": {
                    k: v
                    for k, v in sorted((model.tags or {}).items())
                    if not k.startswith("mlflow.") and not allowances.ignored_tag(k)
                },  # bridge.modelKey
                # MLmodel holds the model's id, time and uuid: file names only, not bytes.
                "files": sorted(_artifacts(session, server_url, model.artifact_location)),
            }
    for registered in range(2):
        name = registered_name(nonce, registered)
        versions = client.search_model_versions(f"name='{name}'")  # [] when the program did not register it
        if not versions:
            continue
        # A version made from models:/<id> names its model in `source` (model_id is not always filled in).
        state.registry[registered] = sorted(
            (
                int(v.version),
                model_names.get(v.model_id or v.source.removeprefix("models:/"), f"unknown {v.source}"),
                server_index.get(v.run_id, f"unknown run {v.run_id}"),
                # search_model_versions leaves aliases out: read each version.
                tuple(sorted(client.get_model_version(name, v.version).aliases or [])),
            )
            for v in versions
        )


class _metrics_db:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> sqlite3.Connection:
        self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        return self.conn

    def __exit__(self, *exc) -> None:
        self.conn.close()


def _model_metrics(metrics) -> list[tuple]:
    """A logged model's metrics (what log_model copied from its run at its step, and the points MLflow links to
    it afterwards): sorted (key, value, step, timestamp); clock-stamped keys a set without the time, as in
    `_histories`."""
    out = set()
    for m in metrics or ():
        stamped = m.key.startswith(allowances.CLOCK_STAMPED_PREFIX)
        out.add((m.key, repr(m.value), m.step, 0 if stamped else m.timestamp))
    return sorted(out)


def _histories(db: sqlite3.Connection, run_id: str) -> dict[str, list]:
    """Every point of every key: a sorted multiset of (step, value, timestamp); clock-stamped keys a set."""
    points: dict[str, list] = {}
    for key, value, ts, step, is_nan in db.execute(
        "select key, value, timestamp, step, is_nan from metrics where run_uuid=?", (run_id,)
    ):
        value = number(float("nan") if is_nan else float(value))
        points.setdefault(key, []).append((step, value, ts))
    out = {}
    for key, found in sorted(points.items()):
        if key.startswith(allowances.CLOCK_STAMPED_PREFIX):
            out[key] = sorted({(s, v) for s, v, _ in found}, key=sort_key)
        else:
            out[key] = sorted(found, key=sort_key)
    return out


def _artifact_base(artifact_uri: str) -> str:
    rest = artifact_uri[len("mlflow-artifacts:") :]
    if rest.startswith("//"):
        rest = rest[2:].split("/", 1)[1] if "/" in rest[2:] else ""
    return rest.strip("/")


def _artifacts(
    session: requests.Session, server_url: str, artifact_uri: str, digests: dict[str, str] | None = None
) -> dict[str, str]:
    """Every artifact file of the run: path -> size and sha256 prefix (and the start of small texts); each file's
    whole sha256 into `digests` when given."""
    base = _artifact_base(artifact_uri)
    out: dict[str, str] = {}
    folders = [""]
    while folders:
        folder = folders.pop()
        resp = session.get(server_url + ARTIFACTS_API, params={"path": f"{base}/{folder}".rstrip("/")}, timeout=30)
        resp.raise_for_status()
        for item in resp.json().get("files") or []:
            path = f"{folder}/{item['path']}".strip("/")
            if item.get("is_dir"):
                folders.append(path)
                continue
            data = session.get(f"{server_url}{ARTIFACTS_API}/{base}/{path}", timeout=30).content
            head = data[:24] if path.endswith((".txt", ".log", ".json")) else b""
            digest = hashlib.sha256(data).hexdigest()
            out[path] = f"{len(data)} bytes sha256 {digest[:12]} {head!r}"
            if digests is not None:
                digests[path] = digest
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------- comparison


def compare(
    program: list[Call], oracle: tuple[State, Trace], bridge: tuple[State, Trace], problems: list[str]
) -> list[str]:
    """Every difference between the two worlds, one line each (empty: the same)."""
    (want, want_trace), (got, got_trace) = oracle, bridge
    out = list(problems)
    out += [f"ghost on the bridge server: {g}" for g in got.ghosts]
    out += [f"ghost on the oracle server (harness bug): {g}" for g in want.ghosts]
    for e in sorted(set(want.experiments) | set(got.experiments)):
        _diff(out, f"experiment e{e}", want.experiments.get(e), got.experiments.get(e))
    for r in sorted(set(want.runs) | set(got.runs)):
        a, b = want.runs.get(r), got.runs.get(r)
        if a is None or b is None:
            out.append(f"run {r}: oracle {'has it' if a else 'has none'}, bridge {'has it' if b else 'has none'}")
            continue
        for key in sorted(set(a) | set(b)):
            if key == "history":
                _diff_history(out, r, a["history"], b["history"])
            elif key == "name" and "*" in (a[key], b[key]):
                continue  # an unnamed run: random in each world
            else:
                _diff(out, f"run {r} {key}", a.get(key), b.get(key))
    _diff(out, "logged models", want.models, got.models)
    _diff(out, "registered models", want.registry, got.registry)
    for step in sorted(set(want_trace.errors) | set(got_trace.errors)):
        a, b = want_trace.errors.get(step), got_trace.errors.get(step)
        if a != b:
            said = got_trace.said.get(step) or want_trace.said.get(step)
            out.append(
                f"step {step} {program[step]}: oracle {_outcome(a)}, bridge {_outcome(b)}"
                + (f" ({_short(said, 300)})" if said else "")
            )
    for a, b in zip(want_trace.reads, got_trace.reads, strict=False):
        if a.result == b.result or (not b.online and b.result in allowances.OFFLINE_READ_ANSWERS):
            continue
        out.append(
            f"read at step {a.step} {a.call}{'' if b.online else ' (after a fault)'}: "
            f"oracle {_short(a.result)}, bridge {_short(b.result)}"
        )
    return out


def _outcome(error: str | None) -> str:
    return "returned" if error is None else f"raised {error}"


def _short(value: object, limit: int = 400) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _diff(out: list[str], where: str, a: object, b: object) -> None:
    if a == b:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key, "<absent>") != b.get(key, "<absent>"):
                out.append(
                    f"{where} {key}: oracle {_short(a.get(key, '<absent>'))}, bridge {_short(b.get(key, '<absent>'))}"
                )
        return
    out.append(f"{where}: oracle {_short(a)}, bridge {_short(b)}")


def _diff_history(out: list[str], r: int, a: dict, b: dict) -> None:
    for key in sorted(set(a) | set(b)):
        pa, pb = Counter(a.get(key, [])), Counter(b.get(key, []))
        if pa == pb:
            continue
        missing, extra = sorted((pa - pb).elements(), key=sort_key), sorted((pb - pa).elements(), key=sort_key)
        out.append(
            f"run {r} metric {key!r}: bridge lacks {_short(missing, 200)}, has extra {_short(extra, 200)} "
            f"({sum(pb.values())} points vs {sum(pa.values())})"
        )
