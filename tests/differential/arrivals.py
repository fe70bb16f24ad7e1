"""What reached the workstation, and when: bridge's entrance, recording every request the file rules look at.

The bridge world of the file rules (programs.FILES) reaches its `mlflow server` through a flaky proxy and this
entrance (bridge/serve/entrance.py, in this process), so resumable uploads are served as `bridge serve` serves
them and each arrival is stamped with this process's `time.monotonic()` — the clock the executor stamps each
call's return with (executor.Trace.returned). orders.py checks the file lane's orders from these records.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bridge.serve.entrance import Entrance, TokenSource
from bridge.serve.uploads import PREFIX, SHA256_HEADER, parse_metadata

ARTIFACTS_PUT = "/api/2.0/mlflow-artifacts/artifacts/"


@dataclass
class Arrival:
    """One request the entrance answered (or one file it placed in MLflow)."""

    kind: str  # points · update · create · patch · head · delete · put · placed
    started: float  # when its head arrived
    answered: float  # when the entrance answered it (placed: when the file was in MLflow)
    status: int = 0  # the entrance's answer (placed: 200)
    run: str | None = None  # the server's run id (points, update; uploads: from the artifact path)
    path: str | None = None  # artifact path under the run's artifact root (create, put, placed)
    sha256: str | None = None  # create: announced (None: begun without it, a head start); placed: of the bytes placed
    upload: str | None = None  # the tus upload id (create, patch, head, delete, placed)
    announced: str | None = None  # patch: the whole file's sha256 its Bridge-Upload-Sha256 header named (None: none)
    size: int = 0  # patch, put: the body's declared length; create: the file's (Upload-Length)
    received: int = 0  # patch: the bytes the entrance kept of it (a cut part's too)
    offset: int = 0  # patch: the upload's offset it was sent for
    points: list = field(default_factory=list)  # points: (key, step, value, timestamp)
    run_status: str | None = None  # update: the status it sets


def run_and_path(artifact_path: str) -> tuple[str | None, str]:
    """'<experiment>/<run>/artifacts/<path>' -> (run, path)."""
    parts = artifact_path.strip("/").split("/")
    if len(parts) >= 3 and parts[2] == "artifacts":
        return parts[1], "/".join(parts[3:])
    return None, artifact_path


class RecordingEntrance(Entrance):
    """An Entrance that keeps an `Arrival` for every log-batch, runs/update, upload request, artifact PUT and
    placed file; `arrivals()` returns them, `clear()` forgets them (between programs)."""

    def __init__(self, upstream_port: int, token: str, staging: Path, local_artifacts: Path, max_part: int) -> None:
        super().__init__(
            upstream_port,
            port=0,
            tokens=TokenSource(load=lambda: token),
            staging=staging,
            max_part_bytes=max_part,
            local_artifacts=local_artifacts,
        )
        self._lock = threading.Lock()
        self._arrivals: list[Arrival] = []

    def arrivals(self) -> list[Arrival]:
        with self._lock:
            return list(self._arrivals)

    def clear(self) -> None:
        with self._lock:
            self._arrivals.clear()

    def _keep(self, arrival: Arrival) -> None:
        with self._lock:
            self._arrivals.append(arrival)

    async def _handle(self, request):  # type: ignore[no-untyped-def]
        started = time.monotonic()
        arrival = await self._describe(request, started)
        response = await super()._handle(request)
        if arrival is not None:
            arrival.answered = time.monotonic()
            arrival.status = response.status
            if arrival.kind == "create" and response.status == 201:
                arrival.upload = (response.headers.get("Location") or "").rsplit("/", 1)[-1]
            if arrival.kind == "patch" and self.uploads is not None:
                upload = self.uploads._find(arrival.upload or "")
                arrival.received = max(0, upload.offset - arrival.offset) if upload is not None else 0
            self._keep(arrival)
        return response

    async def _describe(self, request, started: float) -> Arrival | None:  # type: ignore[no-untyped-def]
        path, method = request.path, request.method
        if method == "POST" and path.endswith(("/runs/log-batch", "/runs/update")):
            try:
                body = json.loads(await request.read())
            except ValueError:
                return None
            run = body.get("run_id") or body.get("run_uuid")
            if path.endswith("/runs/update"):
                return Arrival("update", started, 0.0, run=run, run_status=body.get("status"))
            points = [
                (m["key"], int(m.get("step") or 0), float(m["value"]), int(m["timestamp"]))
                for m in body.get("metrics") or []
            ]
            return Arrival("points", started, 0.0, run=run, points=points) if points else None
        if path.startswith(PREFIX):
            rest = path[len(PREFIX) :].strip("/")
            if method == "POST" and not rest:
                try:
                    meta = parse_metadata(request.headers.get("Upload-Metadata", ""))
                except ValueError:
                    return None
                run, artifact = run_and_path(meta.get("path", ""))
                try:
                    length = int(request.headers.get("Upload-Length", "0"))
                except ValueError:
                    length = 0
                return Arrival("create", started, 0.0, run=run, path=artifact, sha256=meta.get("sha256"), size=length)
            if method in ("PATCH", "HEAD", "DELETE") and rest:
                try:
                    offset = int(request.headers.get("Upload-Offset", "0"))
                except ValueError:
                    offset = 0
                announced = request.headers.get(SHA256_HEADER) if method == "PATCH" else None
                return Arrival(
                    method.lower(),
                    started,
                    0.0,
                    upload=rest,
                    size=request.content_length or 0,
                    offset=offset,
                    announced=announced.strip().lower() if announced is not None else None,
                )
            return None
        if method == "PUT" and path.startswith(ARTIFACTS_PUT):
            run, artifact = run_and_path(path[len(ARTIFACTS_PUT) :])
            return Arrival("put", started, 0.0, run=run, path=artifact, size=request.content_length or 0)
        return None

    async def _place(self, file: Path, path: str) -> None:
        started = time.monotonic()
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        await super()._place(file, path)
        run, artifact = run_and_path(path)
        self._keep(
            Arrival(
                "placed",
                started,
                time.monotonic(),
                200,
                run=run,
                path=artifact,
                sha256=digest,
                upload=file.parent.name,  # the upload's staging folder (bridge/serve/uploads.py: <id>/data)
            )
        )
