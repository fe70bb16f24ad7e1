"""Delivering one spooled file: a single PUT when small or when the server takes nothing else, otherwise a
resumable upload in parts (link/uploads.py) that goes on from the last byte the server confirmed.

What is kept in the journal (journal/uploads.py) — the upload's address, bytes confirmed, the part size — makes a
drop, a new process or a new runtime with a copy of the journal cost only the part in flight. The edge's refusals
are information: 413 (Cloudflare refuses bodies over 100 MB) halves the part at once; 524 (no answer within
100 s) and timeouts halve it for the next try; a part the edge refuses even at UPLOAD_PART_FLOOR_BYTES makes the
file a dead letter with reason `file-refused-by-link`, never a loop.

A big file can get a head start (`head_start`): while `log_artifact` is still copying it into the spool, the file
lane sends its first parts from the growing copy, to an upload begun without the sha256 (not known yet). The
part that completes the file is never among them: it goes from the journal row, with the sha256, as any upload's
last part does, so the server places nothing unchecked and the row's order in the lane stays what places it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from bridge.client.journal import Journal, Op
from bridge.client.journal.spool import SpoolProgress
from bridge.client.journal.uploads import UploadState
from bridge.client.link import Link, upload_read_timeout
from bridge.client.link import uploads as tus
from bridge.client.options import DEFAULT_UPLOAD_PART_BYTES, UPLOAD_PART_FLOOR_BYTES
from bridge.errors import HttpError, TransportError, UndeliverableError

log = logging.getLogger(__name__)

#: Files up to this size go as one PUT even when the server takes resumable uploads: one request instead of three,
#: and a drop costs at most this much again.
SINGLE_PUT_BYTES = 8 * 1024 * 1024
#: A file that a tunnel refuses even in the smallest parts (reason shown by `bridge queue`).
FILE_REFUSED_BY_LINK = "file-refused-by-link"
#: A file whose bytes kept arriving changed (the sha256 the server computed differs) this often: given up.
CHECKSUM_FAILURES_ALLOWED = 3
#: An upload whose parts time out at UPLOAD_PART_FLOOR_BYTES this many times in a row is given up.
SLOW_TRIES_AT_FLOOR = 8
#: Statuses by which a tunnel's edge says a request was too big or too slow for it.
TOO_BIG = 413
TOO_SLOW = (408, 504, 522, 524)


class WaitForServer(TransportError):
    """The server has every byte and is still checking and placing the file: ask again in a while."""


def put_whole(link: Link, url: str, spool_file: Path, size: int) -> None:
    """The file in one PUT to MLflow's artifact proxy (a plain `mlflow server`, or a small file)."""
    with open(spool_file, "rb") as fh:
        read_s = upload_read_timeout(size, link.timeout[1])
        link.request("PUT", url, data=fh, timeout=(link.timeout[0], read_s))
    link.upload_bytes_sent += size


def deliver_file(
    link: Link,
    journal: Journal,
    op: Op,
    body: dict,
    spool_file: Path,
    *,
    artifact_path: str,
    url: str,
    part_bytes: int = DEFAULT_UPLOAD_PART_BYTES,
    should_stop: Callable[[], bool] = lambda: False,
    check_spool: Callable[[], None] = lambda: None,
) -> None:
    """Deliver the spooled copy of `body['path']` (artifact row `op`) to `artifact_path` on the server.

    Raises LinkError (try again later: the lane backs off), UndeliverableError (a dead letter), or WaitForServer.
    `should_stop` is asked between parts: a stopping sender ends the upload there (it goes on next time).
    `check_spool` reads the spooled copy whole and raises UndeliverableError when it no longer matches its sha256:
    asked before a single PUT (a plain server checks nothing), and for an upload in parts only when the server
    found another sha256 (it checks every upload whole; reading a multi-GB copy once more before each upload
    took as long as a fifth of sending it on loopback).
    """
    size = int(body.get("size") or spool_file.stat().st_size)
    artifact_path = _proxy_path(artifact_path)
    state = journal.uploads.get(op.id)
    if state is not None and tus.max_part(link) is None:
        journal.uploads.drop(op.id)  # begun behind an entrance, now delivered to a plain server: whole
        state = None
    if state is None:
        max_part = tus.max_part(link) if size > SINGLE_PUT_BYTES or part_bytes < size else None
        if max_part is None:
            try:
                check_spool()
                put_whole(link, url, spool_file, size)
                return
            except HttpError as exc:
                if exc.status != TOO_BIG:
                    raise
                if tus.max_part(link, fresh=True) is None:  # fresh: "none" may have been a tunnel's own 404
                    raise UndeliverableError(
                        FILE_REFUSED_BY_LINK,
                        f"the link refuses a request of {_mib(size)} (HTTP 413) and the server takes no uploads in "
                        "parts (it is not behind `bridge serve`'s entrance)",
                    ) from None
                max_part = tus.max_part(link) or part_bytes
                part_bytes = min(part_bytes, size // 2)
        state = UploadState(op.id, size, max(UPLOAD_PART_FLOOR_BYTES, min(part_bytes, max_part)))
        journal.uploads.save(state)
    try:
        _resume(link, journal, state, body, spool_file, artifact_path, should_stop, check_spool)
    except Exception as exc:
        state.tries += 1
        state.error = _short(exc)
        journal.uploads.save(state)
        raise


def _resume(
    link: Link,
    journal: Journal,
    state: UploadState,
    body: dict,
    spool_file: Path,
    artifact_path: str,
    should_stop: Callable[[], bool],
    check_spool: Callable[[], None],
) -> None:
    """Send what the server does not have yet, part after part, keeping its confirmed offset in the journal."""
    if state.location is not None:
        try:
            held = tus.offset(link, state.location)
        except HttpError as exc:
            if exc.status not in (404, 410) or not tus.from_endpoint(exc):
                raise  # a tunnel's "endpoint offline" 404 says nothing about the upload
            log.info("bridge: the server no longer has the upload of %s; starting it again", body["path"])
            state.location, state.confirmed = None, 0
        else:
            if held.state == tus.PLACED:
                return
            if held.state == tus.PLACING:
                raise WaitForServer(f"the server is checking and placing {body['path']}")
            state.confirmed = held.offset
    if state.location is None:
        state.location = tus.create(link, artifact_path, state.size, body["sha256"])
        state.confirmed = 0
        journal.uploads.save(state)

    def sent(n: int) -> None:
        link.upload_bytes_sent += n

    while True:
        if should_stop():
            raise TransportError(f"delivery is stopping; the upload of {body['path']} goes on next time")
        length = min(state.part, state.size - state.confirmed)
        started = time.monotonic()
        try:
            answer = tus.send_part(
                link, state.location, spool_file, state.confirmed, length, on_bytes=sent, sha256=body["sha256"]
            )
        except HttpError as exc:
            if exc.status == TOO_BIG:
                _smaller(state, length, exc, body["path"])
                journal.uploads.save(state)
                # The next files start at what this link takes (the edge's limit does not change per file).
                link.upload_parts[link.url] = min(link.upload_parts.get(link.url) or state.part, state.part)
                continue  # at once
            if exc.status in TOO_SLOW:
                _smaller(state, length, exc, body["path"])
                journal.uploads.save(state)
                raise
            if not tus.from_endpoint(exc):
                raise  # a tunnel's or a proxy's answer: the link's trouble, not the upload's
            if exc.status == 409:  # the server holds another offset (a part cut after it arrived): ask it
                now_at = tus.offset(link, state.location).offset
                if now_at == state.confirmed:
                    raise  # it says both "not there" and "there": do not loop on it
                state.confirmed = now_at
                journal.uploads.save(state)
                continue
            if exc.status in (404, 410):
                state.location, state.confirmed = None, 0
                journal.uploads.save(state)
                raise
            if exc.status == 460:  # the server's sha256 of the whole differs: the upload is gone, send it again
                state.location, state.confirmed = None, 0
                check_spool()  # unless the copy here changed: then sending it again cannot help
                state.damaged += 1
                if state.damaged >= CHECKSUM_FAILURES_ALLOWED:
                    raise UndeliverableError(
                        "file-damaged-in-transit",
                        f"{body['path']} arrived with another sha256 {state.damaged} times: {exc.message}",
                    ) from None
                raise
            raise
        except TransportError:
            if time.monotonic() - started > upload_read_timeout(length, link.timeout[1]) * 0.9:
                _smaller(state, length, None, body["path"])  # a part that times out is too big for this link now
            raise
        if length > 0 and answer.offset <= state.confirmed:
            raise TransportError(f"the server confirmed none of a {_mib(length)} part of {body['path']}")
        state.confirmed = answer.offset
        state.error = None
        state.timeouts = 0
        journal.uploads.save(state)
        if answer.state == tus.PLACED:
            return
        if answer.state == tus.PLACING:
            raise WaitForServer(f"the server is checking and placing {body['path']}")
        if state.confirmed >= state.size and length == 0:
            raise WaitForServer(f"the server has every byte of {body['path']} but has not placed it yet")


def head_start(
    link: Link,
    journal: Journal,
    progress: SpoolProgress,
    artifact_path: str,
    *,
    part_bytes: int,
    should_stop: Callable[[], bool] = lambda: False,
    poll_s: float = 0.5,
) -> int:
    """Send the first parts of a file while `log_artifact` copies it into the spool; the bytes the server confirmed.

    Parts go only once the copy holds all their bytes, never the last one, and only while the copy goes on. When
    the copy ends with its journal row, the upload is handed to the row (its UploadState: address, bytes
    confirmed), so `deliver_file` goes on from there with the sha256. Any failure (the link, an edge refusal, a
    copy that failed or came out another size) ends the head start quietly: the row's own upload does all that
    is left, and an upload no row took is dropped on the server. Raises nothing but what the journal raises."""
    artifact_path = _proxy_path(artifact_path)
    size = progress.size
    part = max(UPLOAD_PART_FLOOR_BYTES, min(part_bytes, link.upload_parts.get(link.url) or part_bytes))
    location: str | None = None
    confirmed = 0

    def sent(n: int) -> None:
        link.upload_bytes_sent += n

    try:
        location = tus.create(link, artifact_path, size, None)
        # Only while the copy goes on: once it is over its row exists, and the row's upload (journalled part by
        # part, so a kill loses at most one) does the rest.
        while confirmed + part < size and not should_stop() and not progress.ended:
            if not progress.wait_for(confirmed + part, poll_s):
                if progress.ended:
                    break  # the copy is over short of this part (a failure, or the source shrank)
                continue
            assert progress.name is not None
            answer = tus.send_part(
                link, location, journal.spool.path(progress.name), confirmed, part, on_bytes=sent, last=False
            )
            if answer.offset <= confirmed:
                break
            confirmed = answer.offset
    except (HttpError, TransportError, OSError) as exc:  # OSError: a failed copy removed the file
        log.debug("bridge: the head start of %s ended at byte %d: %s", progress.artifact_path, confirmed, exc)
    while not progress.wait_end(poll_s):
        if should_stop():
            return confirmed
    if location is None:
        return 0
    if progress.op is not None and progress.written == size and journal.uploads.get(progress.op) is None:
        journal.uploads.save(UploadState(progress.op, size, part, location, confirmed))
        return confirmed
    try:
        tus.terminate(link, location)  # no row takes it: the server would keep its bytes until they expire
    except (HttpError, TransportError):
        pass
    return 0


def _proxy_path(artifact_path: str) -> str:
    """The path as the upload endpoint takes it: "./weights//best.pt" as MLflow stores it becomes
    "weights/best.pt"; ".." stays, for the server to refuse."""
    return "/".join(part for part in artifact_path.split("/") if part not in ("", "."))


def _smaller(state: UploadState, refused: int, exc: HttpError | None, path: str) -> None:
    """Halve the part after the edge refused `refused` bytes (413) or they took too long; a dead letter below the
    floor."""
    if min(state.part, refused) <= UPLOAD_PART_FLOOR_BYTES:
        if exc is not None and exc.status == TOO_BIG:
            raise UndeliverableError(
                FILE_REFUSED_BY_LINK,
                f"the link refuses even {_mib(state.part)} requests (HTTP 413) while uploading {path}",
            ) from None
        state.timeouts += 1
        if exc is not None and state.timeouts >= SLOW_TRIES_AT_FLOOR:
            raise UndeliverableError(
                FILE_REFUSED_BY_LINK,
                f"the link timed out (HTTP {exc.status}) {state.timeouts} times in a row, even on "
                f"{_mib(state.part)} requests, while uploading {path}",
            ) from None
        return
    state.part = max(UPLOAD_PART_FLOOR_BYTES, min(state.part, refused) // 2)
    why = f"HTTP {exc.status}" if exc is not None else "a timeout"
    log.info("bridge: %s for a part of %s: parts of %s from now on", why, path, _mib(state.part))


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


def _short(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc)
    status = getattr(exc, "status", None)
    return (f"HTTP {status}: " if status else "") + text[:300]
