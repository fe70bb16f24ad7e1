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

import time
import uuid

from mlflow.entities.model_registry import (
    ModelVersion,
    ModelVersionTag,
    RegisteredModel,
    RegisteredModelAlias,
    RegisteredModelTag,
)
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, TEMPORARILY_UNAVAILABLE
from mlflow.store.model_registry.abstract_store import AbstractStore
from mlflow.store.model_registry.rest_store import RestStore
from mlflow.utils.rest_utils import MlflowHostCreds

from bridge.client import journal as J
from bridge.client.connect import connection_for
from bridge.client.delivery.registry import quote_name
from bridge.client.journal.kinds import (
    CREATE_MODEL_VERSION,
    CREATE_REGISTERED_MODEL,
    DELETE_ALIAS,
    DELETE_MODEL_TAG,
    DELETE_VERSION_TAG,
    REGISTERED_MODEL,
    REGISTRY_KEY,
    REGISTRY_KINDS,
    SET_ALIAS,
    SET_MODEL_TAG,
    SET_VERSION_TAG,
    VERSION_KEY_TAG,
    artifact_uri_for,
    version_key,
    version_number,
)
from bridge.client.link import Link
from bridge.client.plugins import models
from bridge.client.plugins import server_reads as rest


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
        # MLflow always builds a store with its URI; one built by hand without it (None) gets the only open
        # connection, or fails as it always has
        return connection_for(self.store_uri)  # type: ignore[arg-type]

    def _read(self, call: str, fn, offline=None):
        """`fn(server reads)` online; offline `offline()` (None: raise TEMPORARILY_UNAVAILABLE naming `call`).

        `offline()` also answers what the server does not have yet, and — while registry writes of this journal
        are still on their way — first, so a read after a write sees it (read-your-writes).
        """
        conn = self.connection
        if offline is not None and conn.journal.queue.undelivered(REGISTRY_KEY, REGISTRY_KINDS):
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
        raise MlflowException(
            f"{call} needs the server, and {conn.link.url} does not answer right now (registry "
            "writes are journaled; this read is not known locally)",
            TEMPORARILY_UNAVAILABLE,
        )

    def _journal(self, conn, kind: str, body: dict, key: str | None = None) -> None:
        conn.journal.append(REGISTRY_KEY, kind, {**body, "seq": _seq()}, key=key)

    @staticmethod
    def _known_model(conn, name: str) -> dict | None:
        record = conn.journal.ids.entity(REGISTERED_MODEL, name)
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
        return conn.journal.ids.entity(J.MODEL_VERSION, version_key(name, version))

    def _server_version(self, conn, name: str, version) -> str | None:
        """The server's number of `version` (None: registered here, not delivered yet)."""
        record = self._version_record(conn, name, version)
        if record is None:
            return str(version)
        return None if record.remote_id is None else version_number(record.remote_id)

    def _predict_version(self, conn, name: str) -> int:
        """The number the server will most likely give the next version of `name`."""
        known = [
            int(version_number(k))
            for r in conn.journal.ids.entities(J.MODEL_VERSION)
            if r.json()["name"] == name
            for k in (r.local_id, r.remote_id)
            if k
        ]

        def newest(c, server):
            found = server.search_model_versions(f"name = '{quote_name(name)}'", 1, ["version_number DESC"], None)
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
            record = journal.ids.entity_for_remote(J.LOGGED_MODEL, model_id)
            model_id = model_id if record is None else record.local_id
        if source and source.startswith("models:/m-"):
            record = journal.ids.entity_for_remote(J.LOGGED_MODEL, source[len("models:/") :].split("/", 1)[0])
            if record is not None:
                source = f"models:/{record.local_id}"
        tags = [ModelVersionTag(k, v) for k, v in (mv.tags or {}).items() if k != VERSION_KEY_TAG]
        mine = journal.ids.entity_for_remote(J.MODEL_VERSION, version_key(mv.name, mv.version))
        version = mv.version if mine is None else version_number(mine.local_id)
        return ModelVersion(
            mv.name,
            version,
            mv.creation_timestamp,
            mv.last_updated_timestamp,
            mv.description,
            mv.user_id,
            mv.current_stage,
            source,
            journal.ids.local_run_id(mv.run_id) if mv.run_id else mv.run_id,
            mv.status,
            mv.status_message,
            tags,
            mv.run_link,
            mv.aliases,
            model_id=model_id,
        )

    def _local_registered_model(self, conn, model: RegisteredModel) -> RegisteredModel:
        return RegisteredModel(
            model.name,
            model.creation_timestamp,
            model.last_updated_timestamp,
            model.description,
            [self._local_version(conn, v) for v in model.latest_versions or []],
            [RegisteredModelTag(k, v) for k, v in (model.tags or {}).items()],
            [RegisteredModelAlias(a, v) for a, v in (model.aliases or {}).items()],
        )

    def _offline_version(self, conn, record: J.EntityRecord) -> ModelVersion:
        known = record.json()
        version = version_number(record.local_id)
        aliases = [
            a for a, v in ((self._known_model(conn, known["name"]) or {}).get("aliases") or {}).items() if v == version
        ]
        return ModelVersion(
            known["name"],
            version,
            known["creation_timestamp"],
            known.get("last_updated_timestamp"),
            known.get("description"),
            None,
            "None",
            known["source"],
            known.get("run_id"),
            "READY",
            None,
            [ModelVersionTag(k, v) for k, v in (known.get("tags") or {}).items()],
            known.get("run_link"),
            aliases,
            model_id=known.get("model_id"),
        )

    def _offline_registered_model(self, conn, name: str) -> RegisteredModel | None:
        known = self._known_model(conn, name)
        if known is None:
            return None
        return RegisteredModel(
            name,
            known["creation_timestamp"],
            known.get("last_updated_timestamp"),
            known.get("description"),
            [],
            [RegisteredModelTag(k, v) for k, v in (known.get("tags") or {}).items()],
            [RegisteredModelAlias(a, v) for a, v in (known.get("aliases") or {}).items()],
        )

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
        conn.journal.add_entity(
            REGISTERED_MODEL,
            name,
            {
                "tags": tag_map,
                "description": description,
                "aliases": {},
                "creation_timestamp": now,
                "last_updated_timestamp": now,
            },
            op=(
                REGISTRY_KEY,
                CREATE_REGISTERED_MODEL,
                {"name": name, "tags": tag_map, "description": description, "seq": _seq()},
            ),
        )
        return RegisteredModel(name, now, now, description, [], [RegisteredModelTag(k, v) for k, v in tag_map.items()])

    def create_model_version(
        self,
        name,
        source,
        run_id=None,
        tags=None,
        run_link=None,
        description=None,
        local_model_path=None,
        model_id=None,
    ):
        conn = self.connection
        local_version = str(self._predict_version(conn, name))
        now = _now()
        tag_map = {t.key: str(t.value) for t in tags or []}
        spec = {
            "name": name,
            "source": source,
            "run_id": run_id,
            "model_id": model_id,
            "tags": tag_map,
            "description": description,
            "run_link": run_link,
        }
        conn.journal.add_entity(
            J.MODEL_VERSION,
            version_key(name, local_version),
            {**spec, "creation_timestamp": now, "last_updated_timestamp": now},
            op=(
                REGISTRY_KEY,
                CREATE_MODEL_VERSION,
                {**spec, "version": local_version, "key": uuid.uuid4().hex, "seq": _seq()},
            ),
        )
        return self._offline_version(conn, conn.journal.ids.entity(J.MODEL_VERSION, version_key(name, local_version)))

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
        self._journal(
            conn, SET_VERSION_TAG, {"name": name, "version": str(version), "value": str(tag.value)}, key=tag.key
        )

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
                raise MlflowException(
                    f"{call}: version {version} of {name!r} has not reached the server yet", TEMPORARILY_UNAVAILABLE
                )
            return fn(conn, server, remote)

        return self._read(call, run)

    def update_registered_model(self, name, description, deployment_job_id=None):
        return self._read(
            "update_registered_model",
            lambda c, s: self._local_registered_model(c, s.update_registered_model(name, description)),
        )

    def rename_registered_model(self, name, new_name):
        return self._read(
            "rename_registered_model",
            lambda c, s: self._local_registered_model(c, s.rename_registered_model(name, new_name)),
        )

    def delete_registered_model(self, name):
        return self._read("delete_registered_model", lambda c, s: s.delete_registered_model(name))

    def update_model_version(self, name, version, description):
        return self._online_version(
            "update_model_version",
            name,
            version,
            lambda c, s, v: self._local_version(c, s.update_model_version(name, v, description)),
        )

    def transition_model_version_stage(self, name, version, stage, archive_existing_versions):
        return self._online_version(
            "transition_model_version_stage",
            name,
            version,
            lambda c, s, v: self._local_version(
                c, s.transition_model_version_stage(name, v, stage, archive_existing_versions)
            ),
        )

    def delete_model_version(self, name, version):
        return self._online_version(
            "delete_model_version", name, version, lambda c, s, v: s.delete_model_version(name, v)
        )

    # ------------------------------------------------------------------------------- reads

    def get_registered_model(self, name):
        return self._read(
            "get_registered_model",
            lambda c, s: self._local_registered_model(c, s.get_registered_model(name)),
            lambda c: self._offline_registered_model(c, name),
        )

    def search_registered_models(self, filter_string=None, max_results=None, order_by=None, page_token=None):
        from mlflow.store.entities.paged_list import PagedList

        def search(conn, server):
            page = server.search_registered_models(filter_string, max_results, order_by, page_token)
            return PagedList([self._local_registered_model(conn, m) for m in page], page.token)

        return self._read("search_registered_models", search)

    def get_latest_versions(self, name, stages=None):
        return self._read(
            "get_latest_versions", lambda c, s: [self._local_version(c, v) for v in s.get_latest_versions(name, stages)]
        )

    def get_model_version(self, name, version):
        conn = self.connection
        record = self._version_record(conn, name, version)
        if record is None:
            remote = str(version)
        elif record.remote_id is None:
            return self._offline_version(conn, record)  # not on the server yet, online or not
        else:
            remote = version_number(record.remote_id)
        return self._read(
            "get_model_version",
            lambda c, s: self._local_version(c, s.get_model_version(name, remote)),
            lambda c: None if record is None else self._offline_version(c, record),
        )

    def get_model_version_download_uri(self, name, version):
        # `models:/NAME@alias` loads through this: the files of a version registered here are read through the
        # journal's artifact plugin (spool first, then the server), online or not.
        conn = self.connection
        record = self._version_record(conn, name, version)
        if record is not None:
            local = _journal_uri(conn.journal, record.json())
            if local is not None:
                return local
        return self._online_version(
            "get_model_version_download_uri",
            name,
            version,
            lambda c, s, v: _local_location(c.journal, s.get_model_version_download_uri(name, v)),
        )

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

        return self._read(
            "get_model_version_by_alias",
            lambda c, s: self._local_version(c, s.get_model_version_by_alias(name, alias)),
            offline,
        )

    def __repr__(self) -> str:
        return f"JournalRegistryStore({self.store_uri!r})"


models.name_unsupported_calls(JournalRegistryStore, AbstractStore)  # webhooks, …: an error naming the call


def _now() -> int:
    return int(time.time() * 1000)


def _journal_uri(journal: J.Journal, known: dict) -> str | None:
    """Where the files of a version registered here are, as the journal's artifact plugin reads them."""
    source = known.get("source") or ""
    model_id = known.get("model_id")
    if not model_id and source.startswith("models:/m-"):
        model_id = source[len("models:/") :].split("/", 1)[0]
    if model_id and journal.ids.entity(J.LOGGED_MODEL, model_id) is not None:
        return artifact_uri_for(model_id)
    if source.startswith("bridge-artifacts://"):
        return source
    if source.startswith("runs:/") and journal.ids.run(source[len("runs:/") :].split("/", 1)[0]) is not None:
        run, _, path = source[len("runs:/") :].partition("/")
        return f"{artifact_uri_for(run)}/{path}".rstrip("/")
    return None


def _local_location(journal: J.Journal, location: str) -> str:
    """A server artifact location under a model or run created here, as the journal's artifact plugin reads it."""
    for record in journal.ids.entities(J.LOGGED_MODEL):
        if record.location and (location == record.location or location.startswith(record.location + "/")):
            return artifact_uri_for(record.local_id) + location[len(record.location) :]
    for run in journal.ids.runs():
        if run.artifact_uri and (location == run.artifact_uri or location.startswith(run.artifact_uri + "/")):
            return artifact_uri_for(run.local_id) + location[len(run.artifact_uri) :]
    return location
