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
from bridge.client.connect import active_connection, connection_for
from bridge.client.link import ARTIFACTS_API
from bridge.errors import LinkError


class _NotProxied(Exception):
    """The run's artifact root is not one the server's artifact proxy serves."""


class JournalArtifactRepository(ArtifactRepository):
    """Artifacts of one run (local or server id), written through the journal."""

    def __init__(self, artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None) -> None:
        super().__init__(artifact_uri, tracking_uri, registry_uri)
        parts = urlsplit(artifact_uri)
        self.run_id = parts.netloc
        self.prefix = parts.path.strip("/")

    @property
    def connection(self):
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
        conn = self.connection
        path = self._path(artifact_path, source.name)
        # A big file's first parts may go while it is still being copied into the spool (delivery/files.py).
        progress = conn.sender.head_start(self.run_id, path, source.stat().st_size)
        conn.journal.spool_artifact(self.run_id, source, path, progress=progress)
        conn.sender.wake_files()

    def log_artifacts(self, local_dir, artifact_path=None):
        conn = self.connection
        journal = conn.journal
        root = Path(local_dir)
        for folder, _, files in os.walk(root):
            rel = Path(folder).relative_to(root).as_posix()
            for name in sorted(files):
                journal.spool_artifact(
                    self.run_id, Path(folder) / name, self._path(artifact_path, "" if rel == "." else rel, name)
                )
        conn.sender.wake_files()

    # ---------------------------------------------------------------------------------- reads

    def _server_base(self, *, strict: bool = False) -> str | None:
        """The run's folder under the server's artifact proxy, or None while the run is not there yet.

        `strict`: raise MlflowException(TEMPORARILY_UNAVAILABLE) when the server cannot be asked, and
        _NotProxied for an artifact root the proxy does not serve, instead of None.
        """
        conn = self.connection
        remote, root = conn.journal.ids.server_run(self.run_id)
        if remote is None:
            return None
        try:
            if not conn.link.answers:
                raise LinkError("the server cannot be reached")
            if root is None:
                root = conn.link.call("/runs/get", {"run_id": remote}, method="GET")["run"]["info"]["artifact_uri"]
            return conn.link.artifact_path(root)
        except LinkError:
            if strict:
                raise self._unavailable() from None
            return None
        except ValueError:
            if strict:
                raise _NotProxied() from None
            return None

    def _unavailable(self) -> MlflowException:
        last = self.connection.link.last_error
        return MlflowException(
            f"the artifacts of run {self.run_id} cannot be listed: the server cannot be reached "
            f"{f'(last error: {last}) ' if last else ''}(the journal holds only the files not "
            "delivered yet); try again once it is back",
            TEMPORARILY_UNAVAILABLE,
        )

    def _is_directory(self, artifact_path):
        """A file still in the spool is a file, whatever the server can say (MLflow asks before downloading)."""
        target = self._path(artifact_path)
        spooled = self._spooled()
        if target in spooled:
            return False
        if any(p.startswith(target.rstrip("/") + "/") for p in spooled):
            return True
        return super()._is_directory(artifact_path)

    def _spooled(self) -> dict[str, dict]:
        """Files of this run still waiting in the spool, by artifact path."""
        return {op.key: op.json() for op in self.connection.journal.queue.undelivered(self.run_id, (J.ARTIFACT,))}

    def list_artifacts(self, path=None):
        """The server's files of the run plus those still in the spool.

        A run that is on the server but cannot be asked raises TEMPORARILY_UNAVAILABLE rather than pass the
        spool's part for the whole: `log_table` appends to a table it finds listed, and would otherwise replace
        the server's rows with only the new ones (harness finding H9).
        """
        wanted = self._path(path)
        found: dict[str, FileInfo] = {}
        # Read before the server is asked: a file delivered while the listing is on its way back is in neither
        # the listing nor the spool afterwards (a second `log_table` replaced the first's rows: harness H20).
        spooled_before = self._spooled()
        remote, _ = self.connection.journal.ids.server_run(self.run_id)
        if remote is not None:
            try:
                base = self._server_base(strict=True)
            except _NotProxied:
                base = None  # an artifact root bridge cannot read: the spool is all there is to list
        if remote is not None and base is not None:
            try:
                for item in self.connection.link.list_artifacts(posixpath.join(base, wanted) if wanted else base):
                    rel = posixpath.join(path or "", item["path"]) if path else item["path"]
                    found[rel] = FileInfo(
                        rel, item.get("is_dir", False), None if item.get("is_dir") else int(item.get("file_size") or 0)
                    )
            except LinkError:
                raise self._unavailable() from None
        for artifact_path, body in {**spooled_before, **self._spooled()}.items():
            rel = artifact_path[len(self.prefix) :].strip("/") if self.prefix else artifact_path
            head = rel[len(path.strip("/")) :].strip("/") if path else rel
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
            try:
                shutil.copyfile(self.connection.journal.spool.path(spooled["spool"]), local_path)
                return
            except FileNotFoundError:
                pass  # delivered (and discarded) since it was looked up: the server has it now
        base = self._server_base()
        if base is None:
            raise MlflowException(
                f"artifact {remote_file_path} of run {self.run_id} is not in the journal and the "
                "server cannot be reached",
                TEMPORARILY_UNAVAILABLE,
            )
        from urllib.parse import quote

        resp = self.connection.link.request("GET", f"{ARTIFACTS_API}/{quote(posixpath.join(base, target))}")
        with open(local_path, "wb") as fh:
            fh.write(resp.content)

    def delete_artifacts(self, artifact_path=None):
        raise MlflowException("bridge does not delete artifacts on the server")
