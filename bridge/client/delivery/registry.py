"""What each registry op becomes on the server (the registry half of delivery; see plugins/registry.py for the calls).

Registry writes are journaled under one key, REGISTRY_KEY, and keep their call order by a sequence number in
each body: a version whose run, files or logged model are still on their way goes back to the journal's end, and
every registry write after it waits behind it. Ids are translated here: local version numbers, run ids, model ids
and `bridge-artifacts://` sources to the server's.
"""

from __future__ import annotations

import json

from bridge.client.delivery.operations import MODEL_NOT_CREATED, RUN_NOT_CREATED, Operations, server_model_id
from bridge.client.journal import Journal, Op
from bridge.client.journal.kinds import (
    ARTIFACT,
    CREATE_LOGGED_MODEL,
    CREATE_MODEL_VERSION,
    CREATE_REGISTERED_MODEL,
    CREATE_RUN,
    DELETE_ALIAS,
    DELETE_MODEL_TAG,
    DELETE_VERSION_TAG,
    FINALIZE_LOGGED_MODEL,
    LOGGED_MODEL,
    MODEL_VERSION,
    REGISTRY_KEY,
    REGISTRY_KINDS,
    SET_ALIAS,
    SET_MODEL_TAG,
    SET_VERSION_TAG,
    VERSION_KEY_TAG,
    version_key,
    version_number,
)
from bridge.client.link import API
from bridge.errors import HttpError, UndeliverableError

VERSION_NOT_CREATED = "version-not-created"


def _waits(ops: Operations, op: Op, body: dict) -> bool:
    """Whether `op` must wait (it was moved to the journal's end): an earlier registry write is still waiting."""
    seq = body.get("seq")
    if seq is None:
        return False
    for other in ops.journal.queue.undelivered(REGISTRY_KEY, REGISTRY_KINDS):
        if other.id != op.id and (other.json().get("seq") or 0) < seq:
            ops.journal.queue.requeue(op.id)
            return True
    return False


def server_versions_tag(journal: Journal, value: str) -> str:
    """The `mlflow.modelVersions` tag of a logged model with local version names replaced by the server's."""
    try:
        entries = json.loads(value)
    except ValueError:
        return value
    for entry in entries if isinstance(entries, list) else ():
        record = journal.ids.entity(MODEL_VERSION, version_key(entry.get("name"), entry.get("version")))
        if record is not None and record.remote_id is not None:
            entry["version"] = version_number(record.remote_id)
    return json.dumps(entries)


def _server_version(journal: Journal, name: str, version: str) -> str:
    """The server's number of a version this journal calls `version` (registered here, or the server's own)."""
    record = journal.ids.entity(MODEL_VERSION, version_key(name, version))
    if record is None:
        return version
    if record.remote_id is None:
        raise UndeliverableError(VERSION_NOT_CREATED, f"version {version} of {name!r} was never created on the server")
    return version_number(record.remote_id)


def _call(ops: Operations, method: str, endpoint: str, body: dict, *, missing_ok: bool = False) -> dict:
    try:
        return ops.link.request(method, API + endpoint, json_body=body).json()
    except HttpError as exc:
        if missing_ok and exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}  # deleted already (an earlier, unacknowledged try): the goal is reached
        raise


def _not_ready(journal: Journal, key: str, kinds: tuple[str, ...], prefix: str | None = None) -> bool:
    """Whether `key` (a run or a logged model) still has undelivered ops of `kinds` (artifacts under `prefix`)."""

    def under(path: str) -> bool:
        return not prefix or path == prefix or path.startswith(prefix + "/")

    return any(op.kind != ARTIFACT or under(op.key or "") for op in journal.queue.undelivered(key, kinds))


def _source_on_server(ops: Operations, source: str) -> tuple[str, bool]:
    """(the server's form of `source`, whether what it names is still on its way)."""
    journal = ops.journal
    if source.startswith("models:/m-"):
        local = source[len("models:/") :].split("/", 1)[0]
        if journal.ids.entity(LOGGED_MODEL, local) is None:
            return source, False
        waiting = _model_waiting(journal, local)
        return ("models:/" + (server_model_id(journal, local) if not waiting else local)), waiting
    for scheme in ("bridge-artifacts://", "runs:/"):
        if source.startswith(scheme):
            owner, _, path = source[len(scheme) :].partition("/")
            if owner.startswith("m-") and scheme == "bridge-artifacts://":
                waiting = _model_waiting(journal, owner)
            else:
                waiting = _run_waiting(journal, owner, path)
            if waiting:
                return source, True
            remote, root = journal.ids.server_run(owner)
            if scheme == "runs:/":
                return f"runs:/{remote}/{path}", False
            if root is None:
                root = ops.link.call("/runs/get", {"run_id": remote}, method="GET")["run"]["info"]["artifact_uri"]
            return (root.rstrip("/") + "/" + path).rstrip("/"), False
    return source, False


def _model_waiting(journal: Journal, model_id: str) -> bool:
    """Whether a logged model created here is not on the server yet, or its files or READY are not."""
    record = journal.ids.entity(LOGGED_MODEL, model_id)
    if record is None:
        return False
    if record.remote_id is None:
        if not journal.queue.undelivered(model_id, (CREATE_LOGGED_MODEL,)):
            raise UndeliverableError(MODEL_NOT_CREATED, f"logged model {model_id} was never created on the server")
        return True
    return _not_ready(journal, model_id, (ARTIFACT, FINALIZE_LOGGED_MODEL))


def _run_waiting(journal: Journal, run_id: str, path: str | None = None) -> bool:
    """Whether a run created here is not on the server yet, or (given `path`) files under `path` are not."""
    record = journal.ids.run(run_id)
    if record is None:
        return False
    if record.remote_id is None:
        if not journal.queue.undelivered(run_id, (CREATE_RUN,)):
            raise UndeliverableError(RUN_NOT_CREATED, f"run {run_id} was never created on the server")
        return True
    return path is not None and _not_ready(journal, run_id, (ARTIFACT,), path.strip("/"))


def _apply_create_version(ops: Operations, op: Op, body: dict) -> list[str]:
    journal = ops.journal
    key = version_key(body["name"], body["version"])
    record = journal.ids.entity(MODEL_VERSION, key)
    if record is not None and record.remote_id is not None:
        return []
    run_id, model_id = body.get("run_id"), body.get("model_id")
    waiting = (run_id is not None and _run_waiting(journal, run_id)) or (
        model_id is not None and _model_waiting(journal, model_id)
    )
    source, source_waiting = _source_on_server(ops, body["source"])
    if waiting or source_waiting:
        journal.queue.requeue(op.id)  # what it names is still on its way: after it, and everything behind this waits
        return []
    # Always looked for first (one request per version): a lost answer must not register it twice.
    result = ops.link.request(
        "GET",
        API + "/model-versions/search",
        params={
            "filter": f"name = '{quote_name(body['name'])}' and tags.`{VERSION_KEY_TAG}` = '{body['key']}'",
            "max_results": 1,
        },
    ).json()
    versions = result.get("model_versions") or []
    if versions:
        found = versions[0]
    else:
        payload = {
            "name": body["name"],
            "source": source,
            "tags": [
                {"key": k, "value": v} for k, v in {**(body.get("tags") or {}), VERSION_KEY_TAG: body["key"]}.items()
            ],
        }
        if run_id:
            payload["run_id"] = journal.ids.server_run(run_id)[0]
        if model_id:
            payload["model_id"] = server_model_id(journal, model_id)
        for field in ("description", "run_link"):
            if body.get(field):
                payload[field] = body[field]
        with ops.creating():
            found = _call(ops, "POST", "/model-versions/create", payload)["model_version"]
    journal.ids.map_entity(MODEL_VERSION, key, version_key(body["name"], found["version"]))
    return []


def apply_registry(ops: Operations, op: Op, body: dict) -> list[str]:
    if _waits(ops, op, body):
        return []
    journal = ops.journal
    if op.kind == CREATE_MODEL_VERSION:
        return _apply_create_version(ops, op, body)
    name = body.get("name")
    assert name is not None  # every registry write names its model (plugins/registry.py)
    if op.kind == CREATE_REGISTERED_MODEL:
        payload = {"name": name, "tags": [{"key": k, "value": v} for k, v in (body.get("tags") or {}).items()]}
        if body.get("description"):
            payload["description"] = body["description"]
        try:
            _call(ops, "POST", "/registered-models/create", payload)
        except HttpError as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise  # else: created by an earlier, unacknowledged try (or someone else): get-or-create
    elif op.kind == SET_ALIAS:
        _call(
            ops,
            "POST",
            "/registered-models/alias",
            {"name": name, "alias": body["alias"], "version": _server_version(journal, name, body["version"])},
        )
    elif op.kind == DELETE_ALIAS:
        _call(ops, "DELETE", "/registered-models/alias", {"name": name, "alias": body["alias"]}, missing_ok=True)
    elif op.kind == SET_MODEL_TAG:
        _call(ops, "POST", "/registered-models/set-tag", {"name": name, "key": op.key, "value": body["value"]})
    elif op.kind == DELETE_MODEL_TAG:
        _call(ops, "DELETE", "/registered-models/delete-tag", {"name": name, "key": op.key}, missing_ok=True)
    elif op.kind == SET_VERSION_TAG:
        _call(
            ops,
            "POST",
            "/model-versions/set-tag",
            {
                "name": name,
                "version": _server_version(journal, name, body["version"]),
                "key": op.key,
                "value": body["value"],
            },
        )
    elif op.kind == DELETE_VERSION_TAG:
        _call(
            ops,
            "DELETE",
            "/model-versions/delete-tag",
            {"name": name, "version": _server_version(journal, name, body["version"]), "key": op.key},
            missing_ok=True,
        )
    return []


def quote_name(text: str) -> str:
    """`text` inside a quoted string of an MLflow registry search filter."""
    return text.replace("'", "\\'")


def wait_turn(ops: Operations, op: Op, body: dict) -> bool:
    """For ops of other modules journaled under REGISTRY_KEY: False when the op was moved back to wait."""
    return op.run != REGISTRY_KEY or not _waits(ops, op, body)
