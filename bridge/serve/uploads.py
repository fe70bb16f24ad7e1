"""Resumable uploads through the entrance: files of any size, in parts, placed in MLflow whole or not at all.

Why: a tunnel's edge bounds every request — a Cloudflare quick tunnel refuses bodies over 100 MB (413) and gives up
on an origin that takes 100 s to answer (524) — and a link that drops sends a single PUT back to byte 0. Here a
file travels as parts of at most `max_part_bytes`. Every byte received is kept in a staging folder outside
MLflow's artifact store, a cut part's bytes included, so a client that lost the link asks for the offset (HEAD)
and sends only the rest (PATCH) — from a new process or a new runtime too, since the client keeps the upload's
address in its journal. Once the last byte is in, the whole file's sha256 is checked against the one announced at
creation, and the file is PUT to MLflow's own artifact proxy on loopback: MLflow's artifact repository stores it
(a local folder, or S3 / MinIO for a team), so it appears there once, whole, or not at all. Uploads nobody
touched for `expire_s` are deleted.

The wire protocol is tus 1.0.0 (https://tus.io/protocols/resumable-upload), core plus the creation, expiration
and termination extensions, so any tus client can use it:

    OPTIONS /bridge/uploads       204  Tus-Version, Tus-Extension, Tus-Max-Size, Bridge-Max-Part, Bridge-Sha256-Later
    POST    /bridge/uploads       Upload-Length, Upload-Metadata "path <b64>,sha256 <b64>"   → 201 Location
    HEAD    /bridge/uploads/<id>  200  Upload-Offset, Upload-Length, Bridge-Upload-State
    PATCH   /bridge/uploads/<id>  Upload-Offset + application/offset+octet-stream            → 204 Upload-Offset
    DELETE  /bridge/uploads/<id>  204

The whole file's sha256 may also come later (bridge's own addition, advertised by `Bridge-Sha256-Later: 1`): an
upload created without it takes it from a part's `Bridge-Upload-Sha256` header, and a part that could complete the
file while no sha256 is known is refused (400) before its bytes are read. So a client can send the first parts of
a file while it is still copying and hashing it, and no file is ever placed unchecked.

`Bridge-Upload-State` is bridge's own: `receiving`, `placing` (the last byte is in; checking and placing),
`placed` (in MLflow), or `failed` (the sha256 did not match: the upload is gone; `Bridge-Upload-Error` says why).
A PATCH that completes the file answers after placing it, or after PLACE_WAIT_S with `placing` (a HEAD tells
later), so no answer waits as long as the edge's 100 s. The path is the one MLflow's artifact proxy names
(`<experiment>/<run>/artifacts/<path>`); the entrance has already checked the access token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

log = logging.getLogger(__name__)

PREFIX = "/bridge/uploads"
TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,expiration,termination"
#: The largest part the server takes in one PATCH. The client sends 32 MiB by default (ClientOptions); this leaves
#: room for a client configured larger on a link without an edge limit (ngrok has none for bodies).
DEFAULT_MAX_PART_BYTES = 64 * 1024 * 1024
#: The largest file: far above any checkpoint, below what would fill a workstation's disk by mistake.
MAX_UPLOAD_BYTES = 64 * 1024**3
#: Uploads nobody touched for this long are deleted (a runtime that died and never came back).
DEFAULT_EXPIRE_S = 24 * 3600.0
#: How often the staging folder is swept for expired uploads (at most; sweeps ride on requests).
SWEEP_EVERY_S = 600.0
#: How long the PATCH that completes a file waits for the check and the placing before answering `placing`:
#: well below the 100 s after which Cloudflare's edge answers 524 instead of the origin.
PLACE_WAIT_S = 60.0
#: A part whose bytes stop arriving for this long is ended (its bytes so far are kept), so a connection the
#: client has long given up on does not hold the upload's lock.
IDLE_READ_S = 60.0
#: How long a PATCH waits for an earlier PATCH of the same upload still being read (a try the client gave up on).
LOCK_WAIT_S = 5.0
#: Free space kept on the staging disk beyond the upload itself.
DISK_MARGIN_BYTES = 256 * 1024 * 1024
READ_CHUNK = 1024 * 1024
#: A PATCH header carrying the whole file's sha256 (hex), for an upload created without one.
SHA256_HEADER = "Bridge-Upload-Sha256"

RECEIVING, PLACING, PLACED, FAILED = "receiving", "placing", "placed", "failed"
_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

#: Places a complete, checked file at an artifact path in MLflow; raises (with a message for the client) when not.
Placer = Callable[[Path, str], Awaitable[None]]


class PlaceError(Exception):
    """Placing a complete file in MLflow failed for now (MLflow down, refused): the client tries again later."""


@dataclass
class _Upload:
    id: str
    folder: Path
    length: int
    path: str
    sha256: str | None  # None until a part's SHA256_HEADER names it (an upload created without it)
    state: str = RECEIVING
    error: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    placing: asyncio.Task | None = None
    #: The sha256 of the bytes received so far, kept as they arrive (this process only): the finished file is
    #: then not read once more to check it. None after a restart: it is read whole then.
    hasher: hashlib._Hash | None = field(default_factory=hashlib.sha256)
    hashed: int = 0

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def offset(self) -> int:
        if self.state in (PLACING, PLACED):
            return self.length
        try:
            return self.data.stat().st_size
        except FileNotFoundError:
            return 0

    def save(self) -> None:
        info = {"length": self.length, "path": self.path, "sha256": self.sha256, "state": self.state}
        if self.error:
            info["error"] = self.error
        tmp = self.folder / "info.json.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.folder / "info.json")


def _tus_headers(**extra: str) -> dict[str, str]:
    return {"Tus-Resumable": TUS_VERSION, "Cache-Control": "no-store", **extra}


#: Refusals that no later try changes carry MLflow's error code, so a client takes them as final (a dead letter
#: with this message) rather than as a link that failed; every other answer is one to try again after.
_FINAL = {400: "INVALID_PARAMETER_VALUE", 405: "INVALID_PARAMETER_VALUE", 415: "INVALID_PARAMETER_VALUE"}


def _error(status: int, message: str, **extra: str) -> web.Response:
    body: dict[str, str] = {"message": message}
    if status in _FINAL:
        body["error_code"] = _FINAL[status]
    return web.json_response(body, status=status, headers=_tus_headers(**extra))


def parse_metadata(header: str) -> dict[str, str]:
    """tus's Upload-Metadata: comma-separated `key base64(value)` pairs; raises ValueError on a malformed one."""
    result = {}
    for pair in filter(None, (p.strip() for p in header.split(","))):
        key, _, value = pair.partition(" ")
        try:
            result[key] = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise ValueError(f"Upload-Metadata value of {key!r} is not base64 of UTF-8 text") from None
    return result


def check_artifact_path(path: str) -> str:
    """The artifact path as the proxy names it, refused when it could leave the artifact root."""
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"artifact path {path!r} is not a plain relative path")
    return path


class Uploads:
    """The tus endpoint under PREFIX, staging in `folder`; `place` puts a finished file into MLflow."""

    def __init__(
        self,
        folder: Path,
        place: Placer,
        *,
        max_part_bytes: int = DEFAULT_MAX_PART_BYTES,
        expire_s: float = DEFAULT_EXPIRE_S,
        place_wait_s: float = PLACE_WAIT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.folder = folder
        self.place = place
        self.max_part_bytes = max_part_bytes
        self.expire_s = expire_s
        self.place_wait_s = place_wait_s
        self._clock = clock
        self._open: dict[str, _Upload] = {}
        self._last_sweep = 0.0
        self.placed = 0  # files placed since start (for status and tests)

    def __repr__(self) -> str:
        return f"Uploads(folder={str(self.folder)!r}, max_part_bytes={self.max_part_bytes})"

    # ------------------------------------------------------------------------------------ routing

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer a request under PREFIX (already authenticated by the entrance)."""
        rest = request.path[len(PREFIX) :].strip("/")
        if rest == "":
            if request.method == "OPTIONS":
                return web.Response(
                    status=204,
                    headers=_tus_headers(
                        **{
                            "Tus-Version": TUS_VERSION,
                            "Tus-Extension": TUS_EXTENSIONS,
                            "Tus-Max-Size": str(MAX_UPLOAD_BYTES),
                            "Bridge-Max-Part": str(self.max_part_bytes),
                            "Bridge-Sha256-Later": "1",
                        }
                    ),
                )
            if request.method == "POST":
                return await self._create(request)
            return _error(405, f"{request.method} is not allowed on {PREFIX}", Allow="OPTIONS, POST")
        if request.method == "OPTIONS":
            return web.Response(status=204, headers=_tus_headers(Allow="HEAD, PATCH, DELETE"))
        upload = self._find(rest)
        if upload is None:
            return _error(404, f"no upload {rest!r} here (finished long ago, expired, or another server)")
        if request.method == "HEAD":
            return web.Response(status=200, headers=self._state_headers(upload))
        if request.method == "PATCH":
            return await self._patch(request, upload)
        if request.method == "DELETE":
            async with upload.lock:
                self._open.pop(upload.id, None)
                shutil.rmtree(upload.folder, ignore_errors=True)
            return web.Response(status=204, headers=_tus_headers())
        return _error(405, f"{request.method} is not allowed on an upload", Allow="HEAD, PATCH, DELETE")

    def _state_headers(self, upload: _Upload) -> dict[str, str]:
        headers = _tus_headers(
            **{
                "Upload-Offset": str(upload.offset),
                "Upload-Length": str(upload.length),
                "Bridge-Upload-State": upload.state,
                "Upload-Expires": _http_date(self._touched(upload) + self.expire_s),
            }
        )
        if upload.error:
            headers["Bridge-Upload-Error"] = upload.error[:500].encode("ascii", "replace").decode()
        return headers

    # ----------------------------------------------------------------------------------- creation

    async def _create(self, request: web.Request) -> web.StreamResponse:
        self._sweep()
        try:
            length = int(request.headers.get("Upload-Length", ""))
            if not 0 <= length <= MAX_UPLOAD_BYTES:
                raise ValueError
        except ValueError:
            return _error(400, f"Upload-Length must be a whole number of bytes from 0 to {MAX_UPLOAD_BYTES}")
        try:
            meta = parse_metadata(request.headers.get("Upload-Metadata", ""))
            path = check_artifact_path(meta.get("path", ""))
            sha = meta.get("sha256", "").lower() or None
            if sha is not None and not _SHA256.match(sha):
                raise ValueError("Upload-Metadata's sha256 must be the file's sha256 (64 hex digits)")
            if sha is None and length == 0:
                raise ValueError("Upload-Metadata must carry the sha256 of an empty file (it completes at once)")
        except ValueError as exc:
            return _error(400, str(exc))
        self.folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.folder).free
        if free < length + DISK_MARGIN_BYTES:
            return _error(507, f"the workstation has {free // 2**20} MiB free for a {length // 2**20} MiB upload")
        upload_id = secrets.token_urlsafe(24)
        upload = _Upload(upload_id, self.folder / upload_id, length, path, sha)
        upload.folder.mkdir(mode=0o700)
        upload.data.touch()
        upload.save()
        self._open[upload_id] = upload
        if length == 0:  # nothing to send: complete at once
            await self._complete(upload)
        headers = self._state_headers(upload)
        headers["Location"] = f"{PREFIX}/{upload_id}"
        return web.Response(status=201, headers=headers)

    def _find(self, upload_id: str) -> _Upload | None:
        if not _ID.match(upload_id):
            return None
        upload = self._open.get(upload_id)
        if upload is not None:
            return upload
        folder = self.folder / upload_id
        try:  # an upload begun before this entrance started (a restart): its files tell
            info = json.loads((folder / "info.json").read_text())
            upload = _Upload(upload_id, folder, int(info["length"]), info["path"], info.get("sha256"), info["state"])
            upload.error = info.get("error")
        except (OSError, ValueError, KeyError):
            return None
        if upload.state == PLACING:  # the placing was cut by the restart: do it again when asked
            upload.state = RECEIVING
        self._open[upload_id] = upload
        return upload

    # -------------------------------------------------------------------------------------- parts

    async def _patch(self, request: web.Request, upload: _Upload) -> web.StreamResponse:
        if request.content_type != "application/offset+octet-stream":
            return _error(415, "a part's Content-Type must be application/offset+octet-stream")
        try:
            offset = int(request.headers["Upload-Offset"])
        except (KeyError, ValueError):
            return _error(400, "Upload-Offset must be a whole number")
        declared = request.content_length
        if declared is not None and declared > self.max_part_bytes:
            return _error(413, f"a part may carry at most {self.max_part_bytes} bytes, not {declared}")
        try:
            await asyncio.wait_for(upload.lock.acquire(), LOCK_WAIT_S)
        except asyncio.TimeoutError:
            return _error(423, "an earlier part of this upload is still arriving; ask for the offset again soon")
        try:
            if upload.state == FAILED:
                return _error(410, upload.error or "this upload failed", **self._state_headers(upload))
            if upload.state in (PLACING, PLACED):
                return await self._answer_complete(upload)
            current = upload.offset
            if offset != current:
                return _error(409, f"this upload is at byte {current}, not {offset}", **self._state_headers(upload))
            refused = self._take_sha256(upload, request.headers.get(SHA256_HEADER), offset, declared)
            if refused is not None:
                return refused
            outcome = await self._receive(request, upload, current)
            if outcome is not None:
                return outcome
            if upload.offset < upload.length:
                return web.Response(status=204, headers=self._state_headers(upload))
            upload.state = PLACING
            upload.save()
            upload.placing = asyncio.ensure_future(self._complete(upload))
            return await self._answer_complete(upload)
        finally:
            upload.lock.release()

    def _take_sha256(
        self, upload: _Upload, announced: str | None, offset: int, declared: int | None
    ) -> web.StreamResponse | None:
        """Take a part's announced sha256; a refusal when it is malformed, differs from the one known (the upload is
        then gone, as after a failed check: 460), or is still unknown for a part that could complete the file."""
        if announced is not None:
            announced = announced.strip().lower()
            if not _SHA256.match(announced):
                return _error(400, f"{SHA256_HEADER} must be the file's sha256 (64 hex digits)")
            if upload.sha256 is None:
                upload.sha256 = announced
                upload.save()
            elif announced != upload.sha256:
                error = f"a part announced the sha256 {announced}, the upload was begun for {upload.sha256}"
                self._fail(upload, error)
                return _error(460, error, **self._state_headers(upload))
        if upload.sha256 is None and (declared is None or offset + declared >= upload.length):
            return _error(400, f"the part that completes a file must carry {SHA256_HEADER} (none was announced)")
        return None

    async def _receive(self, request: web.Request, upload: _Upload, start: int) -> web.StreamResponse | None:
        """Append the part's bytes as they arrive; every byte received stays, even when the part is cut."""
        room = min(self.max_part_bytes, upload.length - start)
        received = 0
        upload.data.touch(exist_ok=True)  # its bytes may have gone with a restart mid-placing: start them again
        with open(upload.data, "r+b", buffering=0) as fh:  # unbuffered: a HEAD sees every byte read so far
            fh.seek(start)
            fh.truncate()
            try:
                while True:
                    chunk = await asyncio.wait_for(request.content.read(READ_CHUNK), IDLE_READ_S)
                    if not chunk:
                        break
                    try:
                        if received + len(chunk) > room:
                            fh.write(chunk[: room - received])
                            self._hashed(upload, start + received, chunk[: room - received])
                            received = room
                            what = "the file's announced length" if room < self.max_part_bytes else "a part's limit"
                            return _error(413, f"the part goes past {what} ({room} bytes from {start})")
                        fh.write(chunk)
                        self._hashed(upload, start + received, chunk)
                    except OSError as exc:  # the workstation's disk: full, or failing
                        log.warning("Upload %s: cannot write the part: %s", upload.id[:8], exc)
                        return _error(507, f"the workstation cannot store the upload now ({exc.strerror or exc})")
                    received += len(chunk)
            except Exception as exc:
                # Cut or stalled: keep what arrived (the client asks for the offset and goes on from there).
                log.info("Upload %s: part cut after %d bytes (%s)", upload.id[:8], received, type(exc).__name__)
                return _error(400, "the part was cut")
            finally:
                # Not fsynced per part: a HEAD answers the bytes the file holds (after a crash too), and the whole
                # file is fsynced once before its check and placing. An fsync per 32 MiB part held every answer
                # for it (~12 ms each on an idle disk, seconds while other processes wrote).
                fh.flush()
        return None

    @staticmethod
    def _hashed(upload: _Upload, at: int, chunk: bytes) -> None:
        """Add `chunk`, written at byte `at`, to the running sha256 (dropped when bytes are not in order)."""
        if upload.hasher is not None and upload.hashed == at:
            upload.hasher.update(chunk)
            upload.hashed += len(chunk)
        else:
            upload.hasher = None

    # -------------------------------------------------------------------------------- completion

    async def _answer_complete(self, upload: _Upload) -> web.StreamResponse:
        """Wait (bounded) for the placing; answer what it came to."""
        if upload.state == PLACING and upload.placing is None:  # found after a restart, or a placing that failed
            upload.placing = asyncio.ensure_future(self._complete(upload))
        if upload.placing is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(upload.placing), self.place_wait_s)
        if upload.state == FAILED:
            return _error(460, upload.error or "checksum mismatch", **self._state_headers(upload))
        if upload.state == RECEIVING:  # placing failed for now (MLflow down): the next complete PATCH tries again
            return _error(503, upload.error or "could not place the file yet", **self._state_headers(upload))
        return web.Response(status=204, headers=self._state_headers(upload))

    @staticmethod
    def _fail(upload: _Upload, error: str) -> None:
        """The upload is gone for good (its bytes are not the file announced): FAILED with `error`, bytes deleted."""
        upload.state, upload.error = FAILED, error
        log.warning("Upload %s of %s failed: %s", upload.id[:8], upload.path, error)
        with contextlib.suppress(OSError):
            upload.data.unlink()
        upload.save()

    async def _complete(self, upload: _Upload) -> None:
        """Check the whole file's sha256, then place it through MLflow; the state says how it went."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, _fsync, upload.data)  # on disk before MLflow takes it
            if upload.hasher is not None and upload.hashed == upload.length:
                digest = upload.hasher.hexdigest()
            else:
                digest = await loop.run_in_executor(None, _sha256_of, upload.data)
            if digest != upload.sha256:
                self._fail(upload, f"the file's sha256 is {digest}, not the {upload.sha256} announced")
                return
            await self.place(upload.data, upload.path)
        except Exception as exc:
            upload.state, upload.error = RECEIVING, f"could not place the file in MLflow yet: {exc}"
            log.warning("Upload %s of %s: %s", upload.id[:8], upload.path, upload.error)
            upload.save()
            return
        finally:
            upload.placing = None
        upload.state, upload.error = PLACED, None
        self.placed += 1
        upload.save()  # before the bytes go: a restart in between must not find "placing" with no data
        with contextlib.suppress(OSError):
            upload.data.unlink()
        log.info("Upload %s: placed %s (%d bytes)", upload.id[:8], upload.path, upload.length)

    # ---------------------------------------------------------------------------------- clean-up

    def _touched(self, upload: _Upload) -> float:
        try:
            return max(p.stat().st_mtime for p in upload.folder.iterdir())
        except (OSError, ValueError):
            return self._clock()

    def _sweep(self) -> int:
        """Delete uploads untouched for `expire_s` (at most every SWEEP_EVERY_S); how many."""
        now = self._clock()
        if now - self._last_sweep < min(SWEEP_EVERY_S, self.expire_s):
            return 0
        self._last_sweep = now
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for folder in self.folder.iterdir():
                upload = self._open.get(folder.name)
                if upload is not None and upload.lock.locked():
                    continue
                try:
                    touched = max((p.stat().st_mtime for p in folder.iterdir()), default=folder.stat().st_mtime)
                except OSError:
                    continue
                if now - touched > self.expire_s:
                    shutil.rmtree(folder, ignore_errors=True)
                    self._open.pop(folder.name, None)
                    removed += 1
        if removed:
            log.info("Deleted %d upload(s) untouched for %.0f h", removed, self.expire_s / 3600)
        return removed


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _http_date(when: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(when))
