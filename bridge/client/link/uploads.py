"""The client half of resumable uploads (tus 1.0.0, served by the entrance: bridge/serve/uploads.py).

Each function is one request over the `Link`, so uploads share its token, timeouts, abort-on-stop and failure
accounting with every other request. What to send when, and what to keep in the journal, is the file lane's
(delivery/files.py).

Why not tuspy (tus/tus-py-client): its PATCH is `requests.patch` with no timeout, so a black-holed link hangs the
lane for ever; it retries by sleeping in the calling thread; and it keeps upload addresses in its own store
(TinyDB) rather than in the journal that travels with the data. The protocol is small; speaking it over the Link
keeps one place for timeouts, the token and aborts. The test suite checks the server against tuspy's own client.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bridge.client.link import Link, upload_read_timeout
from bridge.errors import HttpError

PREFIX = "/bridge/uploads"
TUS = {"Tus-Resumable": "1.0.0"}
#: Bridge-Upload-State values (the server's docstring says what each means).
RECEIVING, PLACING, PLACED, FAILED = "receiving", "placing", "placed", "failed"
#: How long "this server takes no resumable uploads" holds before it is asked again.
NO_UPLOADS_RECHECK_S = 300.0
#: A part's header naming the whole file's sha256 (for an upload begun before it was known: a head start).
SHA256_HEADER = "Bridge-Upload-Sha256"
#: The last part's answer waits for the server to check and place the whole file (its PLACE_WAIT_S, 60 s).
LAST_PART_ANSWER_S = 75.0


@dataclass(frozen=True)
class Offset:
    """What the server holds of an upload: bytes confirmed, and its state."""

    offset: int
    length: int
    state: str


def _header(headers: dict, name: str) -> str | None:
    """A response header by name, whatever case a proxy gave it."""
    lowered = name.lower()
    return next((v for k, v in headers.items() if k.lower() == lowered), None)


def _offset_of(headers: dict) -> Offset:
    try:
        return Offset(
            int(_header(headers, "Upload-Offset") or ""),
            int(_header(headers, "Upload-Length") or -1),
            _header(headers, "Bridge-Upload-State") or RECEIVING,
        )
    except ValueError:
        raise HttpError(502, None, "the server's upload answer has no readable Upload-Offset") from None


def max_part(link: Link, *, fresh: bool = False) -> int | None:
    """The largest part the server takes, or None when it takes no resumable uploads (a plain `mlflow server`).
    Asked once per server URL (a "None" again after NO_UPLOADS_RECHECK_S, or when `fresh`); a link failure raises
    (not known yet)."""
    cache = link.upload_parts
    if link.url in cache and (
        cache[link.url] is not None or (not fresh and time.monotonic() < link.upload_parts_until[link.url])
    ):
        return cache[link.url]
    try:
        answer = link.request("OPTIONS", PREFIX, headers=TUS)
    except HttpError as exc:
        if exc.status >= 500 or exc.status in (401, 403, 408, 429):
            raise
        answer = None
    part = None
    if answer is not None and "1.0.0" in (_header(answer.headers, "Tus-Version") or ""):
        try:
            part = int(_header(answer.headers, "Bridge-Max-Part") or 0) or None
        except ValueError:
            part = None
    cache[link.url] = part
    later = answer is not None and _header(answer.headers, "Bridge-Sha256-Later") == "1"
    link.upload_sha256_later[link.url] = part is not None and later
    link.upload_parts_until[link.url] = time.monotonic() + NO_UPLOADS_RECHECK_S
    return part


def from_endpoint(exc: HttpError) -> bool:
    """Whether an error answer came from the upload endpoint itself (not a tunnel's edge or a proxy page)."""
    return _header(exc.headers, "Tus-Resumable") is not None


def takes_sha256_later(link: Link) -> bool:
    """Whether the server (as last asked, by `max_part`) takes an upload's sha256 on a later part."""
    return link.upload_sha256_later.get(link.url, False)


def create(link: Link, artifact_path: str, size: int, sha256: str | None) -> str:
    """Begin an upload of `size` bytes to `artifact_path` (as the artifact proxy names it); its address. Without
    `sha256`, a later part must name it (`send_part`; only where `takes_sha256_later`)."""
    pairs = [("path", artifact_path)] + ([("sha256", sha256)] if sha256 else [])
    meta = ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in pairs)
    answer = link.request("POST", PREFIX, headers={**TUS, "Upload-Length": str(size), "Upload-Metadata": meta})
    location = _header(answer.headers, "Location") or ""
    path = urlsplit(location).path  # kept as a path: the server's public URL may change, the upload stays
    if not path.startswith(PREFIX + "/"):
        raise HttpError(502, None, f"the server began an upload but named no address for it ({location[:100]!r})")
    return path


def offset(link: Link, location: str) -> Offset:
    """How much of the upload the server has (HEAD); HttpError 404 when it has none of it (expired, other server)."""
    return _offset_of(link.request("HEAD", location, headers=TUS).headers)


def send_part(
    link: Link,
    location: str,
    file: Path,
    start: int,
    length: int,
    on_bytes: Callable[[int], None] | None = None,
    *,
    sha256: str | None = None,
    last: bool | None = None,
) -> Offset:
    """PATCH `length` bytes of `file` from `start`; the server's offset after it (and its state). `sha256` (the whole
    file's) goes along where known; `last`: whether this part completes the file (by default: it reaches the end
    of `file`), so its answer waits for the check and placing."""
    part = FilePart(file, start, length, on_bytes)
    read_s = upload_read_timeout(length, link.timeout[1])
    if last or (last is None and start + length >= file.stat().st_size):
        read_s = max(read_s, LAST_PART_ANSWER_S)
    headers = {**TUS, "Upload-Offset": str(start), "Content-Type": "application/offset+octet-stream"}
    if sha256:
        headers[SHA256_HEADER] = sha256
    try:
        answer = link.request(
            "PATCH",
            location,
            data=part,  # type: ignore[arg-type]  # a sized iterable: requests streams it with a Content-Length
            headers=headers,
            timeout=(link.timeout[0], read_s),
        )
    finally:
        part.close()
    return _offset_of(answer.headers)


def terminate(link: Link, location: str) -> None:
    """Tell the server to drop an upload nobody will finish (a newer version of the file replaced it)."""
    try:
        link.request("DELETE", location, headers=TUS)
    except HttpError as exc:
        if exc.status not in (404, 410):
            raise


class FilePart:
    """`length` bytes of a file from `start`, streamed as a request body: `len()` gives the Content-Length, and
    iterating yields 1 MiB pieces (a readable body would be read 8 to 16 KiB at a time: many more system calls)."""

    PIECE = 1024 * 1024

    def __init__(self, file: Path, start: int, length: int, on_bytes: Callable[[int], None] | None = None) -> None:
        self._fh = open(file, "rb")  # noqa: SIM115  # closed by close(), after the request
        self._fh.seek(start)
        self._length = self._left = length
        self._on_bytes = on_bytes

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        while self._left > 0:
            piece = self._fh.read(min(self.PIECE, self._left))
            if not piece:
                return
            self._left -= len(piece)
            if self._on_bytes is not None:
                self._on_bytes(len(piece))
            yield piece

    def close(self) -> None:
        self._fh.close()
