"""MLflow's model registry store for `bridge+http(s)://` URIs: writes go to the journal, reads to the server.

Registry writes (registered models, versions, aliases, tags) return at once and are delivered by the sender
under one run key, `REGISTRY_KEY`, strictly in call order. A version waits for what it names: the run (and
its files under the version's source) or the logged model (created, files uploaded, finalized) — until then
it is moved to the end of the journal, and every registry write after it waits behind it. On delivery ids
are translated: `run_id` to the server's run id, `models:/<local model id>` and `bridge-artifacts://<run>/…`
sources to the server's model id and artifact location.

MLflow wants version numbers at once, but the server numbers versions only when it gets them: a version
registered here is answered with the number the server will most likely give it (one more than the highest
known, asking the server when it answers). Aliases, tags and `get_model_version` of this process take that
number, before and after delivery, and are sent with the number the server really gave. Reads ask the server when
it answers; offline they answer from the journal what this process registered, or raise
TEMPORARILY_UNAVAILABLE naming the call — never wait for a timeout.
"""

from __future__ import annotations

import json
import time
import uuid

from mlflow.entities.model_registry import (
    ModelVersion, ModelVersionTag, RegisteredModel, RegisteredModelAlias, RegisteredModelTag,
)
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, TEMPORARILY_UNAVAILABLE
from mlflow.store.model_registry.abstract_store import AbstractStore
from mlflow.store.model_registry.rest_store import RestStore
from mlflow.utils.rest_utils import MlflowHostCreds

from bridge.client import journal as J
from bridge.client import models, operations, rest
from bridge.client.link import API, Link
from bridge.errors import HttpError, UndeliverableError

#: The run key every registry write is journaled under (one order for all of them).
REGISTRY_KEY = "registry"
#: `entities` kind of the registered models created here (versions are J.MODEL_VERSION).
REGISTERED_MODEL = "registered_model"
#: The tag that finds a version again after a lost answer.
VERSION_KEY_TAG = "bridge.versionKey"
VERSION_NOT_CREATED = "version-not-created"

CREATE_REGISTERED_MODEL = "create_registered_model"
CREATE_MODEL_VERSION = "create_model_version"
SET_ALIAS, DELETE_ALIAS = "set_registered_model_alias", "delete_registered_model_alias"
SET_MODEL_TAG, DELETE_MODEL_TAG = "set_registered_model_tag", "delete_registered_model_tag"
SET_VERSION_TAG, DELETE_VERSION_TAG = "set_model_version_tag", "delete_model_version_tag"
_KINDS = (CREATE_REGISTERED_MODEL, CREATE_MODEL_VERSION, SET_ALIAS, DELETE_ALIAS, SET_MODEL_TAG, DELETE_MODEL_TAG,
          SET_VERSION_TAG, DELETE_VERSION_TAG, models.SET_LOGGED_MODEL_TAGS)


def _seq() -> int:
    # Registry writes keep their call order even when one waits (moved to the journal's end): by this number.
    return time.time_ns()


_Offline = rest.Offline


class _RegistryReads(RestStore):
    """MLflow's registry RestStore, one try per call through the connection's `Link` (see store._ServerReads)."""

    def __init__(self, link: Link) -> None:
        self._link = link
        super().__init__(lambda: MlflowHostCreds(host=link.url, token=link.token))

    def _call_endpoint(self, api, json_body, call_all_endpoints=False, extra_headers=None):
        from mlflow.store.model_registry.rest_store import _METHOD_TO_INFO  # private: bridge/mlflow_internals.py

        endpoint, method = _METHOD_TO_INFO[api]  # the current endpoint, even where MLflow would try every one
        return rest.call_endpoint(self._link, endpoint, method, json_body, api.Response())


class JournalRegistryStore(AbstractStore):
    """The `bridge+http(s)` model registry store (registered through `mlflow.model_registry_store`)."""

    def __init__(self, store_uri: str | None = None, tracking_uri: str | None = None) -> None:
        super().__init__(store_uri, tracking_uri)
        self.store_uri = store_uri

    # ------------------------------------------------------------------------------ plumbing

    @property
    def connection(self):
        from bridge.client.connect import connection_for

        return connection_for(self.store_uri)

    def _read(self, call: str, fn, offline=None):
        """`fn(server reads)` online; offline `offline()` (None: raise TEMPORARILY_UNAVAILABLE naming `call`).

        `offline()` also answers what the server does not have yet, and — while registry writes of this journal
        are still on their way — first, so a read after a write sees it (read-your-writes).
        """
        conn = self.connection
        if offline is not None and conn.journal.undelivered(REGISTRY_KEY, _KINDS):
            answer = offline(conn)
            if answer is not None:
                return answer
        if conn.link.answers:
            reads = getattr(conn, "_registry_reads", None)
            if reads is None:
                reads = conn._registry_reads = _RegistryReads(conn.link)
            try:
                return fn(conn, reads)
            except _Offline:
                pass
            except MlflowException as exc:
                if offline is None or exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                answer = offline(conn)
                if answer is None:
                    raise
                return answer
        if offline is not None:
            answer = offline(conn)
            if answer is not None:
                return answer
        raise MlflowException(f"{call} needs the server, and {conn.link.url} does not answer right now (registry "
                              "writes are journaled; this read is not known locally)", TEMPORARILY_UNAVAILABLE)

    def _journal(self, conn, kind: str, body: dict, key: str | None = None) -> None:
        conn.journal.append(REGISTRY_KEY, kind, {**body, "seq": _seq()}, key=key)

    @staticmethod
    def _known_model(conn, name: str) -> dict | None:
        record = conn.journal.entity(REGISTERED_MODEL, name)
        return None if record is None else record.json()

    def _change_known_model(self, conn, name: str, change) -> None:
        known = self._known_model(conn, name)
        if known is not None:
            change(known)
            known["last_updated_timestamp"] = _now()
            conn.journal.update_entity(REGISTERED_MODEL, name, known)

    @staticmethod
    def _version_record(conn, name: str, version) -> J.EntityRecord | None:
        """The version registered by this journal that this process calls `version` of `name`, if any."""
        return conn.journal.entity(J.MODEL_VERSION, version_key(name, version))

    def _server_version(self, conn, name: str, version) -> str | None:
        """The server's number of `version` (None: registered here, not delivered yet)."""
        record = self._version_record(conn, name, version)
        if record is None:
            return str(version)
        return None if record.remote_id is None else _number(record.remote_id)

    def _predict_version(self, conn, name: str) -> int:
        """The number the server will most likely give the next version of `name`."""
        known = [int(_number(k)) for r in conn.journal.entities(J.MODEL_VERSION) if r.json()["name"] == name
                 for k in (r.local_id, r.remote_id) if k]

        def newest(c, server):
            found = server.search_model_versions(f"name = '{_quote(name)}'", 1, ["version_number DESC"], None)
            return [int(v.version) for v in found]

        try:
            known += self._read("create_model_version", newest)
        except MlflowException:
            pass  # offline: what this journal knows
        return max(known, default=0) + 1

    # ------------------------------------------------------------------------ translation

    def _local_version(self, conn, mv: ModelVersion) -> ModelVersion:
        journal = conn.journal
        model_id, source = mv.model_id, mv.source
        if model_id:
            record = journal.entity_for_remote(J.LOGGED_MODEL, model_id)
            model_id = model_id if record is None else record.local_id
        if source and source.startswith("models:/m-"):
            record = journal.entity_for_remote(J.LOGGED_MODEL, source[len("models:/"):].split("/", 1)[0])
            if record is not None:
                source = f"models:/{record.local_id}"
        tags = [ModelVersionTag(k, v) for k, v in (mv.tags or {}).items() if k != VERSION_KEY_TAG]
        mine = journal.entity_for_remote(J.MODEL_VERSION, version_key(mv.name, mv.version))
        version = mv.version if mine is None else _number(mine.local_id)
        return ModelVersion(mv.name, version, mv.creation_timestamp, mv.last_updated_timestamp, mv.description,
                            mv.user_id, mv.current_stage, source,
                            journal.local_run_id(mv.run_id) if mv.run_id else mv.run_id, mv.status,
                            mv.status_message, tags, mv.run_link, mv.aliases, model_id=model_id)

    def _local_registered_model(self, conn, model: RegisteredModel) -> RegisteredModel:
        return RegisteredModel(model.name, model.creation_timestamp, model.last_updated_timestamp, model.description,
                               [self._local_version(conn, v) for v in model.latest_versions or []],
                               [RegisteredModelTag(k, v) for k, v in (model.tags or {}).items()],
                               [RegisteredModelAlias(a, v) for a, v in (model.aliases or {}).items()])

    def _offline_version(self, conn, record: J.EntityRecord) -> ModelVersion:
        known = record.json()
        version = _number(record.local_id)
        aliases = [a for a, v in ((self._known_model(conn, known["name"]) or {}).get("aliases") or {}).items()
                   if v == version]
        return ModelVersion(known["name"], version, known["creation_timestamp"], known.get("last_updated_timestamp"),
                            known.get("description"), None, "None", known["source"], known.get("run_id"), "READY",
                            None, [ModelVersionTag(k, v) for k, v in (known.get("tags") or {}).items()],
                            known.get("run_link"), aliases, model_id=known.get("model_id"))

    def _offline_registered_model(self, conn, name: str) -> RegisteredModel | None:
        known = self._known_model(conn, name)
        if known is None:
            return None
        return RegisteredModel(name, known["creation_timestamp"], known.get("last_updated_timestamp"),
                               known.get("description"), [],
                               [RegisteredModelTag(k, v) for k, v in (known.get("tags") or {}).items()],
                               [RegisteredModelAlias(a, v) for a, v in (known.get("aliases") or {}).items()])

    # ------------------------------------------------------------------------------ writes

    def create_registered_model(self, name, tags=None, description=None, deployment_job_id=None):
        conn = self.connection
        if self._known_model(conn, name) is not None:
            raise MlflowException(f"Registered Model (name={name}) already exists.", RESOURCE_ALREADY_EXISTS)
        if conn.link.answers:  # MLflow refuses an existing name: say so now when the server answers
            try:
                self._read("create_registered_model", lambda c, s: s.get_registered_model(name))
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST" and exc.error_code != "TEMPORARILY_UNAVAILABLE":
                    raise
            else:
                raise MlflowException(f"Registered Model (name={name}) already exists.", RESOURCE_ALREADY_EXISTS)
        now = _now()
        tag_map = {t.key: str(t.value) for t in tags or []}
        conn.journal.add_entity(REGISTERED_MODEL, name, {"tags": tag_map, "description": description, "aliases": {},
                                                         "creation_timestamp": now, "last_updated_timestamp": now},
                                op=(REGISTRY_KEY, CREATE_REGISTERED_MODEL,
                                    {"name": name, "tags": tag_map, "description": description, "seq": _seq()}))
        return RegisteredModel(name, now, now, description, [], [RegisteredModelTag(k, v) for k, v in tag_map.items()])

    def create_model_version(self, name, source, run_id=None, tags=None, run_link=None, description=None,
                             local_model_path=None, model_id=None):
        conn = self.connection
        local_version = str(self._predict_version(conn, name))
        now = _now()
        tag_map = {t.key: str(t.value) for t in tags or []}
        spec = {"name": name, "source": source, "run_id": run_id, "model_id": model_id, "tags": tag_map,
                "description": description, "run_link": run_link}
        conn.journal.add_entity(J.MODEL_VERSION, version_key(name, local_version),
                                {**spec, "creation_timestamp": now, "last_updated_timestamp": now},
                                op=(REGISTRY_KEY, CREATE_MODEL_VERSION, {**spec, "version": local_version,
                                                                         "key": uuid.uuid4().hex, "seq": _seq()}))
        return self._offline_version(conn, conn.journal.entity(J.MODEL_VERSION, version_key(name, local_version)))

    def set_registered_model_alias(self, name, alias, version):
        conn = self.connection
        self._change_known_model(conn, name, lambda known: known["aliases"].update({alias: str(version)}))
        self._journal(conn, SET_ALIAS, {"name": name, "alias": alias, "version": str(version)})

    def delete_registered_model_alias(self, name, alias):
        conn = self.connection
        self._change_known_model(conn, name, lambda known: known["aliases"].pop(alias, None))
        self._journal(conn, DELETE_ALIAS, {"name": name, "alias": alias})

    def set_registered_model_tag(self, name, tag):
        conn = self.connection
        self._change_known_model(conn, name, lambda known: known["tags"].update({tag.key: str(tag.value)}))
        self._journal(conn, SET_MODEL_TAG, {"name": name, "value": str(tag.value)}, key=tag.key)

    def delete_registered_model_tag(self, name, key):
        conn = self.connection
        self._change_known_model(conn, name, lambda known: known["tags"].pop(key, None))
        self._journal(conn, DELETE_MODEL_TAG, {"name": name}, key=key)

    def set_model_version_tag(self, name, version, tag):
        conn = self.connection
        record = self._version_record(conn, name, version)
        if record is not None:
            known = record.json()
            known["tags"][tag.key] = str(tag.value)
            conn.journal.update_entity(J.MODEL_VERSION, record.local_id, known)
        self._journal(conn, SET_VERSION_TAG, {"name": name, "version": str(version), "value": str(tag.value)},
                      key=tag.key)

    def delete_model_version_tag(self, name, version, key):
        conn = self.connection
        record = self._version_record(conn, name, version)
        if record is not None:
            known = record.json()
            known["tags"].pop(key, None)
            conn.journal.update_entity(J.MODEL_VERSION, record.local_id, known)
        self._journal(conn, DELETE_VERSION_TAG, {"name": name, "version": str(version)}, key=key)

    # ---------------------------------------------------- online only (they change what exists on the server)

    def _online_version(self, call, name, version, fn):
        def run(conn, server):
            remote = self._server_version(conn, name, version)
            if remote is None:
                raise MlflowException(f"{call}: version {version} of {name!r} has not reached the server yet",
                                      TEMPORARILY_UNAVAILABLE)
            return fn(conn, server, remote)

        return self._read(call, run)

    def update_registered_model(self, name, description, deployment_job_id=None):
        return self._read("update_registered_model", lambda c, s: self._local_registered_model(
            c, s.update_registered_model(name, description)))

    def rename_registered_model(self, name, new_name):
        return self._read("rename_registered_model", lambda c, s: self._local_registered_model(
            c, s.rename_registered_model(name, new_name)))

    def delete_registered_model(self, name):
        return self._read("delete_registered_model", lambda c, s: s.delete_registered_model(name))

    def update_model_version(self, name, version, description):
        return self._online_version("update_model_version", name, version, lambda c, s, v: self._local_version(
            c, s.update_model_version(name, v, description)))

    def transition_model_version_stage(self, name, version, stage, archive_existing_versions):
        return self._online_version("transition_model_version_stage", name, version,
                                    lambda c, s, v: self._local_version(c, s.transition_model_version_stage(
                                        name, v, stage, archive_existing_versions)))

    def delete_model_version(self, name, version):
        return self._online_version("delete_model_version", name, version,
                                    lambda c, s, v: s.delete_model_version(name, v))

    # ------------------------------------------------------------------------------- reads

    def get_registered_model(self, name):
        return self._read("get_registered_model", lambda c, s: self._local_registered_model(
            c, s.get_registered_model(name)), lambda c: self._offline_registered_model(c, name))

    def search_registered_models(self, filter_string=None, max_results=None, order_by=None, page_token=None):
        from mlflow.store.entities.paged_list import PagedList

        def search(conn, server):
            page = server.search_registered_models(filter_string, max_results, order_by, page_token)
            return PagedList([self._local_registered_model(conn, m) for m in page], page.token)

        return self._read("search_registered_models", search)

    def get_latest_versions(self, name, stages=None):
        return self._read("get_latest_versions", lambda c, s: [self._local_version(c, v)
                                                               for v in s.get_latest_versions(name, stages)])

    def get_model_version(self, name, version):
        conn = self.connection
        record = self._version_record(conn, name, version)
        if record is not None and record.remote_id is None:
            return self._offline_version(conn, record)  # not on the server yet, online or not
        remote = str(version) if record is None else _number(record.remote_id)
        return self._read("get_model_version", lambda c, s: self._local_version(c, s.get_model_version(name, remote)),
                          lambda c: None if record is None else self._offline_version(c, record))

    def get_model_version_download_uri(self, name, version):
        # `models:/NAME@alias` loads through this: the files of a version registered here are read through the
        # journal's artifact plugin (spool first, then the server), online or not.
        conn = self.connection
        record = self._version_record(conn, name, version)
        if record is not None:
            local = _journal_uri(conn.journal, record.json())
            if local is not None:
                return local
        return self._online_version("get_model_version_download_uri", name, version,
                                    lambda c, s, v: _local_location(c.journal, s.get_model_version_download_uri(name, v)))

    def search_model_versions(self, filter_string=None, max_results=None, order_by=None, page_token=None):
        from mlflow.store.entities.paged_list import PagedList

        def search(conn, server):
            page = server.search_model_versions(filter_string, max_results, order_by, page_token)
            return PagedList([self._local_version(conn, v) for v in page], page.token)

        return self._read("search_model_versions", search)

    def get_model_version_by_alias(self, name, alias):
        def offline(conn):
            version = ((self._known_model(conn, name) or {}).get("aliases") or {}).get(alias)
            record = self._version_record(conn, name, version) if version else None
            return None if record is None else self._offline_version(conn, record)

        return self._read("get_model_version_by_alias", lambda c, s: self._local_version(
            c, s.get_model_version_by_alias(name, alias)), offline)

    def __repr__(self) -> str:
        return f"JournalRegistryStore({self.store_uri!r})"


models.name_unsupported_calls(JournalRegistryStore, AbstractStore)  # webhooks, …: an error naming the call


def _now() -> int:
    return int(time.time() * 1000)


def _journal_uri(journal: J.Journal, known: dict) -> str | None:
    """Where the files of a version registered here are, as the journal's artifact plugin reads them."""
    from bridge.client.store import artifact_uri_for

    source = known.get("source") or ""
    model_id = known.get("model_id")
    if not model_id and source.startswith("models:/m-"):
        model_id = source[len("models:/"):].split("/", 1)[0]
    if model_id and journal.entity(J.LOGGED_MODEL, model_id) is not None:
        return models.model_artifact_uri(model_id)
    if source.startswith("bridge-artifacts://"):
        return source
    if source.startswith("runs:/") and journal.run(source[len("runs:/"):].split("/", 1)[0]) is not None:
        run, _, path = source[len("runs:/"):].partition("/")
        return f"{artifact_uri_for(run)}/{path}".rstrip("/")
    return None


def _local_location(journal: J.Journal, location: str) -> str:
    """A server artifact location under a model or run created here, as the journal's artifact plugin reads it."""
    from bridge.client.store import artifact_uri_for

    for record in journal.entities(J.LOGGED_MODEL):
        if record.location and (location == record.location or location.startswith(record.location + "/")):
            return models.model_artifact_uri(record.local_id) + location[len(record.location):]
    for run in journal.runs():
        if run.artifact_uri and (location == run.artifact_uri or location.startswith(run.artifact_uri + "/")):
            return artifact_uri_for(run.local_id) + location[len(run.artifact_uri):]
    return location


def version_key(name: str, version) -> str:
    """How the `entities` table names a version of a registered model (local and server side alike)."""
    return f"{version}/{name}"


def _number(key: str) -> str:
    return key.split("/", 1)[0]


# ------------------------------------------------------------------------------ delivery (sender thread)


def _waits(ops: operations.Operations, op: J.Op, body: dict) -> bool:
    """Whether `op` must wait (it was moved to the journal's end): an earlier registry write is still waiting."""
    seq = body.get("seq")
    if seq is None:
        return False
    for other in ops.journal.undelivered(REGISTRY_KEY, _KINDS):
        if other.id != op.id and (other.json().get("seq") or 0) < seq:
            ops.journal.requeue(op.id)
            return True
    return False


def server_versions_tag(journal: J.Journal, value: str) -> str:
    """The `mlflow.modelVersions` tag of a logged model with local version names replaced by the server's."""
    try:
        entries = json.loads(value)
    except ValueError:
        return value
    for entry in entries if isinstance(entries, list) else ():
        record = journal.entity(J.MODEL_VERSION, version_key(entry.get("name"), entry.get("version")))
        if record is not None and record.remote_id is not None:
            entry["version"] = _number(record.remote_id)
    return json.dumps(entries)


def _server_version(journal: J.Journal, name: str, version: str) -> str:
    """The server's number of a version this journal calls `version` (registered here, or the server's own)."""
    record = journal.entity(J.MODEL_VERSION, version_key(name, version))
    if record is None:
        return version
    if record.remote_id is None:
        raise UndeliverableError(VERSION_NOT_CREATED, f"version {version} of {name!r} was never created on the server")
    return _number(record.remote_id)


def _call(ops: operations.Operations, method: str, endpoint: str, body: dict, *, missing_ok: bool = False) -> dict:
    try:
        return ops.link.request(method, API + endpoint, json_body=body).json()
    except HttpError as exc:
        if missing_ok and exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}  # deleted already (an earlier, unacknowledged try): the goal is reached
        raise


def _not_ready(journal: J.Journal, key: str, kinds: tuple[str, ...], prefix: str | None = None) -> bool:
    """Whether `key` (a run or a logged model) still has undelivered ops of `kinds` (artifacts under `prefix`)."""
    def under(path: str) -> bool:
        return not prefix or path == prefix or path.startswith(prefix + "/")

    return any(op.kind != J.ARTIFACT or under(op.key or "") for op in journal.undelivered(key, kinds))


def _source_on_server(ops: operations.Operations, source: str) -> tuple[str, bool]:
    """(the server's form of `source`, whether what it names is still on its way)."""
    journal = ops.journal
    if source.startswith("models:/m-"):
        local = source[len("models:/"):].split("/", 1)[0]
        if journal.entity(J.LOGGED_MODEL, local) is None:
            return source, False
        waiting = _model_waiting(journal, local)
        return ("models:/" + (models.server_model_id(journal, local) if not waiting else local)), waiting
    for scheme in ("bridge-artifacts://", "runs:/"):
        if source.startswith(scheme):
            owner, _, path = source[len(scheme):].partition("/")
            if owner.startswith("m-") and scheme == "bridge-artifacts://":
                waiting = _model_waiting(journal, owner)
            else:
                waiting = _run_waiting(journal, owner, path)
            if waiting:
                return source, True
            remote, root = journal.server_run(owner)
            if scheme == "runs:/":
                return f"runs:/{remote}/{path}", False
            if root is None:
                root = ops.link.call("/runs/get", {"run_id": remote}, method="GET")["run"]["info"]["artifact_uri"]
            return (root.rstrip("/") + "/" + path).rstrip("/"), False
    return source, False


def _model_waiting(journal: J.Journal, model_id: str) -> bool:
    """Whether a logged model created here is not on the server yet, or its files or READY are not."""
    record = journal.entity(J.LOGGED_MODEL, model_id)
    if record is None:
        return False
    if record.remote_id is None:
        if not journal.undelivered(model_id, (models.CREATE_LOGGED_MODEL,)):
            raise UndeliverableError(models.MODEL_NOT_CREATED, f"logged model {model_id} was never created on the "
                                                               "server")
        return True
    return _not_ready(journal, model_id, (J.ARTIFACT, models.FINALIZE_LOGGED_MODEL))


def _run_waiting(journal: J.Journal, run_id: str, path: str | None = None) -> bool:
    """Whether a run created here is not on the server yet, or (given `path`) files under `path` are not."""
    record = journal.run(run_id)
    if record is None:
        return False
    if record.remote_id is None:
        if not journal.undelivered(run_id, (J.CREATE_RUN,)):
            raise UndeliverableError(operations.RUN_NOT_CREATED, f"run {run_id} was never created on the server")
        return True
    return path is not None and _not_ready(journal, run_id, (J.ARTIFACT,), path.strip("/"))


def _apply_create_version(ops: operations.Operations, op: J.Op, body: dict) -> list[str]:
    journal = ops.journal
    key = version_key(body["name"], body["version"])
    record = journal.entity(J.MODEL_VERSION, key)
    if record is not None and record.remote_id is not None:
        return []
    run_id, model_id = body.get("run_id"), body.get("model_id")
    waiting = (run_id is not None and _run_waiting(journal, run_id)) or (
        model_id is not None and _model_waiting(journal, model_id))
    source, source_waiting = _source_on_server(ops, body["source"])
    if waiting or source_waiting:
        journal.requeue(op.id)  # what it names is still on its way: after it, and everything behind this waits
        return []
    # Always looked for first (one request per version): a lost answer must not register it twice.
    result = ops.link.request("GET", API + "/model-versions/search", params={
        "filter": f"name = '{_quote(body['name'])}' and tags.`{VERSION_KEY_TAG}` = '{body['key']}'",
        "max_results": 1}).json()
    versions = result.get("model_versions") or []
    if versions:
        found = versions[0]
    else:
        payload = {"name": body["name"], "source": source,
                   "tags": [{"key": k, "value": v} for k, v in {**(body.get("tags") or {}),
                                                                VERSION_KEY_TAG: body["key"]}.items()]}
        if run_id:
            payload["run_id"] = journal.server_run(run_id)[0]
        if model_id:
            payload["model_id"] = models.server_model_id(journal, model_id)
        for field in ("description", "run_link"):
            if body.get(field):
                payload[field] = body[field]
        with ops.creating():
            found = _call(ops, "POST", "/model-versions/create", payload)["model_version"]
    journal.map_entity(J.MODEL_VERSION, key, version_key(body["name"], found["version"]))
    return []


def _apply_registry(ops: operations.Operations, op: J.Op, body: dict) -> list[str]:
    if _waits(ops, op, body):
        return []
    journal = ops.journal
    if op.kind == CREATE_MODEL_VERSION:
        return _apply_create_version(ops, op, body)
    name = body.get("name")
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
        _call(ops, "POST", "/registered-models/alias",
              {"name": name, "alias": body["alias"], "version": _server_version(journal, name, body["version"])})
    elif op.kind == DELETE_ALIAS:
        _call(ops, "DELETE", "/registered-models/alias", {"name": name, "alias": body["alias"]}, missing_ok=True)
    elif op.kind == SET_MODEL_TAG:
        _call(ops, "POST", "/registered-models/set-tag", {"name": name, "key": op.key, "value": body["value"]})
    elif op.kind == DELETE_MODEL_TAG:
        _call(ops, "DELETE", "/registered-models/delete-tag", {"name": name, "key": op.key}, missing_ok=True)
    elif op.kind == SET_VERSION_TAG:
        _call(ops, "POST", "/model-versions/set-tag", {"name": name, "version": _server_version(
            journal, name, body["version"]), "key": op.key, "value": body["value"]})
    elif op.kind == DELETE_VERSION_TAG:
        _call(ops, "DELETE", "/model-versions/delete-tag", {"name": name, "version": _server_version(
            journal, name, body["version"]), "key": op.key}, missing_ok=True)
    return []


def _quote(text: str) -> str:
    return text.replace("'", "\\'")


def wait_turn(ops: operations.Operations, op: J.Op, body: dict) -> bool:
    """For ops of other modules journaled under REGISTRY_KEY: False when the op was moved back to wait."""
    return op.run != REGISTRY_KEY or not _waits(ops, op, body)


for _kind in _KINDS[:-1]:
    operations.register_kind(_kind, _apply_registry, upsert=_kind in (SET_ALIAS, SET_MODEL_TAG, SET_VERSION_TAG))

__all__ = ["JournalRegistryStore", "REGISTRY_KEY", "server_versions_tag"]
