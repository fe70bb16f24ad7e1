"""MLflow artifact repository for `bridge-artifacts://<run id>/…`: uploads go through the journal's spool.

`mlflow.log_artifact(s)`, `log_figure`, `log_dict`, `log_text` end here (the store gives every run this
artifact URI). Each file is copied into the spool at call time — a later change or deletion of the source
does not matter — and the sender uploads it. Listing and downloading ask the server, falling back to the
spool for files not delivered yet.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from pathlib import Path
from urllib.parse import urlsplit

from mlflow.entities import FileInfo
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.store.artifact.artifact_repo import ArtifactRepository

from bridge.client import journal as J
from bridge.client.sender import ARTIFACTS_API, HttpFailure, TransportFailure


class JournalArtifactRepository(ArtifactRepository):
    """Artifacts of one run (local or server id), written through the journal."""

    def __init__(self, artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None) -> None:
        super().__init__(artifact_uri, tracking_uri, registry_uri)
        parts = urlsplit(artifact_uri)
        self.run_id = parts.netloc
        self.prefix = parts.path.strip("/")

    @property
    def connection(self):
        from bridge.client.connect import active_connection, connection_for

        if self.tracking_uri and self.tracking_uri.startswith("bridge+"):
            return connection_for(self.tracking_uri)
        conn = active_connection()
        if conn is None:
            raise MlflowException("bridge artifacts need bridge.connect() (or MLFLOW_TRACKING_URI=bridge+…) first")
        return conn

    def _path(self, *parts: str | None) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p and p.strip("/"))

    def log_artifact(self, local_file, artifact_path=None):
        source = Path(local_file)
        self.connection.journal.spool_artifact(self.run_id, source, self._path(artifact_path, source.name))

    def log_artifacts(self, local_dir, artifact_path=None):
        journal = self.connection.journal
        root = Path(local_dir)
        for folder, _, files in os.walk(root):
            rel = Path(folder).relative_to(root).as_posix()
            for name in sorted(files):
                journal.spool_artifact(self.run_id, Path(folder) / name,
                                       self._path(artifact_path, "" if rel == "." else rel, name))

    # ---------------------------------------------------------------------------------- reads

    def _server_base(self) -> str | None:
        """The run's folder under the server's artifact proxy, or None while the run is not there yet."""
        conn = self.connection
        remote, root = conn.sender.remote_run(self.run_id)
        if remote is None or conn.sender.online is False:
            return None
        try:
            if root is None:
                root = conn.sender.call("/runs/get", {"run_id": remote}, method="GET")["run"]["info"]["artifact_uri"]
            return conn.sender.artifact_url(root, "")[len(ARTIFACTS_API) + 1:]
        except (TransportFailure, HttpFailure):
            return None

    def _spooled(self) -> dict[str, dict]:
        """Files of this run still waiting in the spool, by artifact path."""
        return {op.key: op.json() for op in self.connection.journal.undelivered(self.run_id, (J.ARTIFACT,))}

    def list_artifacts(self, path=None):
        wanted = self._path(path)
        found: dict[str, FileInfo] = {}
        base = self._server_base()
        if base is not None:
            try:
                listing = self.connection.sender.request(
                    "GET", ARTIFACTS_API, params={"path": posixpath.join(base, wanted) if wanted else base}).json()
                for item in listing.get("files") or []:
                    rel = posixpath.join(path or "", item["path"]) if path else item["path"]
                    found[rel] = FileInfo(rel, item.get("is_dir", False),
                                          None if item.get("is_dir") else int(item.get("file_size") or 0))
            except (TransportFailure, HttpFailure):
                pass
        for artifact_path, body in self._spooled().items():
            rel = artifact_path[len(self.prefix):].strip("/") if self.prefix else artifact_path
            head = rel[len(path.strip("/")):].strip("/") if path else rel
            if path and not rel.startswith(path.strip("/") + "/"):
                continue
            first, _, rest = head.partition("/")
            entry = posixpath.join(path.strip("/"), first) if path else first
            if entry not in found:
                found[entry] = FileInfo(entry, True, None) if rest else FileInfo(entry, False, body["size"])
        return sorted(found.values(), key=lambda f: f.path)

    def _download_file(self, remote_file_path, local_path):
        target = self._path(remote_file_path)
        spooled = self._spooled().get(target)
        if spooled is not None:
            shutil.copyfile(self.connection.journal.spool_dir / spooled["spool"], local_path)
            return
        base = self._server_base()
        if base is None:
            raise MlflowException(f"artifact {remote_file_path} of run {self.run_id} is not in the journal and the "
                                  "server cannot be reached", TEMPORARILY_UNAVAILABLE)
        from urllib.parse import quote

        resp = self.connection.sender.request("GET", f"{ARTIFACTS_API}/{quote(posixpath.join(base, target))}")
        with open(local_path, "wb") as fh:
            fh.write(resp.content)

    def delete_artifacts(self, artifact_path=None):
        raise MlflowException("bridge does not delete artifacts on the server")
