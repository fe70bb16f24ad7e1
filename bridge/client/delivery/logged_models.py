"""What each logged-model op becomes on the server (the model half of delivery; see plugins/models.py for the calls).

A model created here is found again by its model key tag before it is created (a lost answer, a copy of the
journal), its params sent in pages, its metrics merged per run, and `log_model`'s copy of a step's metrics read
on the server at delivery, with its progress kept in the op.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import quote

from bridge.client.delivery.batch import MAX_METRICS_PER_BATCH
from bridge.client.delivery.operations import Operations, server_model_id, server_run
from bridge.client.delivery.registry import server_versions_tag, wait_turn
from bridge.client.journal import Op
from bridge.client.journal.kinds import (
    CREATE_LOGGED_MODEL,
    LOGGED_MODEL,
    MODEL_KEY_TAG,
    STEP_METRICS_TO_MODEL,
)
from bridge.errors import HttpError, UndeliverableError

log = logging.getLogger(__name__)

LOGGED_MODELS_API = "/api/2.0/mlflow/logged-models"
_PARAMS_PER_REQUEST = 100
#: MLflow's tag listing a logged model's registered versions (mlflow.utils.mlflow_tags.MLFLOW_MODEL_VERSIONS;
#: spelled here so the sender never imports mlflow, checked by tests/test_mlflow_internals.py).
MLFLOW_MODEL_VERSIONS = "mlflow.modelVersions"


def _model_url(model_id: str, tail: str = "") -> str:
    return f"{LOGGED_MODELS_API}/{quote(model_id, safe='')}{tail}"


def _find_model(ops: Operations, experiment: str, local_id: str) -> dict | None:
    """The model an earlier try (or a copy of this journal) already created, found by its model key tag."""
    found = ops.link.request(
        "POST",
        f"{LOGGED_MODELS_API}/search",
        json_body={
            "experiment_ids": [experiment],
            "max_results": 1,
            "filter": f"tags.`{MODEL_KEY_TAG}` = '{local_id}'",
        },
    ).json()
    models = found.get("models") or []
    return models[0]["info"] if models else None


def apply_create(ops: Operations, op: Op, body: dict) -> list[str]:
    journal = ops.journal
    local_id = body["model"]
    record = journal.ids.entity(LOGGED_MODEL, local_id)
    if record is not None and record.remote_id is not None:
        return []
    experiment = ops._server_experiment(body["experiment_id"], f"logged model {local_id}")
    source_run = server_run(journal, body["source_run_id"])[0] if body.get("source_run_id") else None
    # Always looked for first (one request per model): a lost answer or a second copy of the journal must
    # not make a second model.
    info = _find_model(ops, experiment, local_id)
    params = [{"key": k, "value": v} for k, v in (body.get("params") or {}).items()]
    if info is None:
        payload = {
            "experiment_id": experiment,
            "name": body["name"],
            "tags": [{"key": k, "value": v} for k, v in {**(body.get("tags") or {}), MODEL_KEY_TAG: local_id}.items()],
            "params": params[:_PARAMS_PER_REQUEST],
        }
        if source_run:
            payload["source_run_id"] = source_run
        if body.get("model_type"):
            payload["model_type"] = body["model_type"]
        with ops.creating():
            info = ops.link.request("POST", LOGGED_MODELS_API, json_body=payload).json()["model"]["info"]
        rest, again = params[_PARAMS_PER_REQUEST:], False
    else:
        rest, again = params, True  # an earlier try created it (its answer lost): with some of its params
    _send_params(ops, info["model_id"], rest, again=again)
    journal.ids.map_entity(LOGGED_MODEL, local_id, info["model_id"], info.get("artifact_uri"))
    return []


def _send_params(ops: Operations, remote: str, params: list[dict], *, again: bool = False) -> None:
    """Log `params` to server model `remote`. MLflow inserts a model's params (no upsert): one it holds already
    makes it refuse the request, so `again` (an earlier try may have sent some) leaves those out (H28)."""
    if again and params:
        found = ops.link.request("GET", _model_url(remote)).json().get("model", {}).get("data", {})
        held = {p.get("key") for p in found.get("params") or ()}
        params = [p for p in params if p["key"] not in held]
    for start in range(0, len(params), _PARAMS_PER_REQUEST):
        ops.link.request(
            "POST",
            _model_url(remote, "/params"),
            json_body={"model_id": remote, "params": params[start : start + _PARAMS_PER_REQUEST]},
        )


def apply_params(ops: Operations, op: Op, body: dict) -> list[str]:
    _send_params(
        ops,
        server_model_id(ops.journal, body["model"]),
        [{"key": k, "value": v} for k, v in body["params"].items()],
        again=op.attempts > 0,
    )
    return []


def apply_tags(ops: Operations, op: Op, body: dict) -> list[str]:
    if not wait_turn(ops, op, body):
        return []
    remote = server_model_id(ops.journal, body["model"])
    tags = dict(body["tags"])
    if MLFLOW_MODEL_VERSIONS in tags:
        tags[MLFLOW_MODEL_VERSIONS] = server_versions_tag(ops.journal, tags[MLFLOW_MODEL_VERSIONS])
    ops.link.request(
        "PATCH",
        _model_url(remote, "/tags"),
        json_body={"model_id": remote, "tags": [{"key": k, "value": v} for k, v in tags.items()]},
    )
    return []


def apply_delete_tag(ops: Operations, op: Op, body: dict) -> list[str]:
    remote = server_model_id(ops.journal, body["model"])
    try:
        ops.link.request("DELETE", _model_url(remote, "/tags/" + quote(op.named(), safe="")))
    except HttpError as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST" or op.attempts == 0:
            raise  # gone already after an earlier, unacknowledged delete: that is the goal
    return []


def apply_finalize(ops: Operations, op: Op, body: dict) -> list[str]:
    remote = server_model_id(ops.journal, body["model"])
    # mlflow imported here only: a sender delivering no model never pays for `import mlflow`.
    from mlflow.entities import LoggedModelStatus
    from mlflow.protos.service_pb2 import LoggedModelStatus as StatusProto

    status = LoggedModelStatus(body["status"]).to_proto()

    ops.link.request("PATCH", _model_url(remote), json_body={"model_id": remote, "status": StatusProto.Name(status)})
    return []


def apply_outputs(ops: Operations, op: Op, body: dict) -> list[str]:
    run, model, step = (
        server_run(ops.journal, body["run"])[0],
        server_model_id(ops.journal, body["model"]),
        body.get("step") or 0,
    )
    try:
        ops.link.call("/runs/outputs", {"run_id": run, "models": [{"model_id": model, "step": step}]})
    except HttpError:
        # Linked already (an unacknowledged try, or a copy of this journal): MLflow refuses the second link.
        found = ops.link.call("/runs/get", {"run_id": run}, method="GET").get("run", {}).get("outputs") or {}
        if not any(
            o.get("model_id") == model and int(o.get("step") or 0) == step for o in found.get("model_outputs") or ()
        ):
            raise
    return []


def apply_record(ops: Operations, op: Op, body: dict) -> list[str]:
    journal = ops.journal
    run = server_run(journal, body["run"])[0]
    model_json = dict(body["model_json"])
    model_json["run_id"] = run
    for key in ("model_id", "model_uuid"):
        if isinstance(model_json.get(key), str) and model_json[key].startswith("m-"):
            record = journal.ids.entity(LOGGED_MODEL, model_json[key])
            if record is not None and record.remote_id:
                model_json[key] = record.remote_id
    ops.link.call("/runs/log-model", {"run_id": run, "model_json": json.dumps(model_json)})
    return []


def waits_for_model(ops: Operations, op: Op, body: dict) -> bool:
    """Whether a model this op names was created here and its creation is still on its way to the server."""
    if op.kind == STEP_METRICS_TO_MODEL:
        named = {body["model"]}
    else:
        named = {p["model_id"] for p in body["metrics"] if p.get("model_id")}
    for model_id in named:
        record = ops.journal.ids.entity(LOGGED_MODEL, model_id) if model_id.startswith("m-") else None
        if (
            record is not None
            and record.remote_id is None
            and ops.journal.queue.undelivered(model_id, (CREATE_LOGGED_MODEL,))
        ):
            return True
    return False


def _log_batch_metrics(ops: Operations, run: str, points: list[dict]) -> None:
    for start in range(0, len(points), MAX_METRICS_PER_BATCH):
        ops.link.call(
            "/runs/log-batch",
            {"run_id": run, "metrics": points[start : start + MAX_METRICS_PER_BATCH], "params": [], "tags": []},
        )


def apply_model_metrics(ops: Operations, op: Op, body: dict) -> list[str]:
    """Several consecutive ops of a run arrive merged into one (sender.py): one request for up to 1,000 points."""
    journal = ops.journal
    run = server_run(journal, op.run)[0]
    points = []
    for point in body["metrics"]:
        if point.get("model_id"):
            try:
                point = dict(point, model_id=server_model_id(journal, point["model_id"]))
            except UndeliverableError as exc:
                # The run's own point is not lost with the model: it goes to the run alone.
                log.warning("bridge: metric %r of run %s goes to the run only: %s", point["key"], op.run, exc.message)
                point = {k: v for k, v in point.items() if k != "model_id"}
        points.append(point)
    _send_model_points(ops, run, points)
    return []


def _send_model_points(ops: Operations, run: str, points: list[dict]) -> None:
    """log-batch `points` of server run `run` (server model ids): the run keeps every point, each model the
    first of each key, step and millisecond.

    MLflow's store keeps one model point per key, step, millisecond and run (the value is not in its key) and
    refuses a whole request holding a second one (stock MLflow's own call raises then). So a second one in
    the request goes to the run alone; refused (400) for one the model holds already, the model's points are
    read and those go to the run alone too; a model the server no longer has takes none (its points go to the run).
    """
    points = _first_of_each(points, set(), set())
    try:
        _log_batch_metrics(ops, run, points)  # the server keeps one of each point: a try again changes nothing
    except HttpError as exc:
        if exc.status != 400 or not any(p.get("model_id") for p in points):
            raise
        held, gone = _model_points_on_server(ops, run, {p["model_id"] for p in points if p.get("model_id")})
        again = _first_of_each(points, held, gone)
        if again == points:
            raise
        _log_batch_metrics(ops, run, again)


def _point_key(point: dict) -> tuple:
    return point.get("model_id"), point["key"], int(point.get("step") or 0), int(point["timestamp"])


def _first_of_each(points: list[dict], held: set[tuple], gone: set[str]) -> list[dict]:
    """`points` with the model's id kept only on the first point of each key, step and millisecond of a model
    (on none `held` by the model already, on none of a model `gone`); the others go to the run alone."""
    seen, out = set(held), []
    for point in points:
        if point.get("model_id"):
            found = _point_key(point)
            if found in seen or point["model_id"] in gone:
                point = {k: v for k, v in point.items() if k != "model_id"}
            seen.add(found)
        out.append(point)
    return out


def _model_points_on_server(ops: Operations, run: str, models: set[str]) -> tuple[set[tuple], set[str]]:
    """(the points of `run` each model holds, the models the server does not have)."""
    held: set[tuple] = set()
    gone: set[str] = set()
    for model in models:
        try:
            found = ops.link.request("GET", _model_url(model)).json().get("model", {}).get("data", {})
        except HttpError as exc:
            if exc.status != 404:
                raise
            gone.add(model)
            continue
        held.update(
            _point_key(dict(m, model_id=model))
            for m in found.get("metrics") or ()
            if not m.get("run_id") or m["run_id"] == run
        )
    return held, gone


def apply_step_metrics(ops: Operations, op: Op, body: dict) -> list[str]:
    """What `log_model` does online (mlflow/models/model.py), on the server's data: every point of the run at
    the step that names no model yet, again with the model's id. The run's earlier writes are there by now.

    One read per metric key, as MLflow makes them; how far it got is kept in the op (`update_body`), so on a
    link that drops now and then it carries on instead of starting again.
    """
    journal = ops.journal
    run = server_run(journal, op.run)[0]
    model = server_model_id(journal, body["model"])
    step = body.get("step") or 0
    progress = dict(body)
    if "keys" not in progress:
        if body.get("key") is not None:
            keys = [body["key"]]
        else:
            answer = ops.link.call("/runs/get", {"run_id": run}, method="GET")
            keys = sorted({m["key"] for m in (answer.get("run", {}).get("data", {}).get("metrics") or [])})
        progress.update(keys=keys, read=0, points=[])
        journal.queue.update_body(op.id, progress)
    keys, points = progress["keys"], progress["points"]
    for index in range(progress["read"], len(keys)):
        token = None
        found: list[dict] = []
        while True:
            query = {"run_id": run, "metric_key": keys[index]}
            if token:
                query["page_token"] = token
            page = ops.link.call("/metrics/get-history", query, method="GET")
            found.extend(
                {
                    **{k: p[k] for k in ("key", "value", "timestamp", "dataset_name", "dataset_digest") if k in p},
                    "step": step,
                }
                for p in page.get("metrics") or ()
                if int(p.get("step") or 0) == step and not p.get("model_id")
            )
            token = page.get("next_page_token")
            if not token:
                break
        points.extend(found)
        progress["read"] = index + 1
        journal.queue.update_body(op.id, progress)
    _send_model_points(ops, run, [dict(p, model_id=model) for p in points])
    return []
