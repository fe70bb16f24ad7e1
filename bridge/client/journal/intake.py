"""The journal's intake: metric points appended with one `write()` each, later moved into the SQLite journal.

Why: a SQLite commit per `mlflow.log_metric` costs ≈9 µs on the training thread; one `write()` to an
append-only file costs ≈2 µs and is just as safe against `kill -9` — once `write()` returns, the bytes are
in the kernel's page cache and survive the process (not an OS crash: this file is never fsynced). The
sender's threads move the points into SQLite (a group commit, fsynced within about a second, see journal.py)
and record, in the same transaction, how far they read; a journal opened later replays whatever an ended
process left behind. Only metric points take this path: their order relative to params, tags or run status
does not change what the server ends up holding.

A record is written whole or not at all (a short write is completed, a failed one cut off again). A damaged
stretch all the same (a bad disk, a crash of the machine) is skipped, loudly, and the records after it kept.

Record: crc32 (of the rest) · len(run) · len(key) · value (f64) · timestamp ms (i64) · step (i64) · run · key.
Each process writes its own file `<journal>.intake-<pid>-<nonce>`, flock'ed while the process lives.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import threading
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

_HEADER = struct.Struct("<IHHdqq")
_BODY = struct.Struct("<HHdqq")
#: Start a new file once this much was moved, so the intake never grows without bound.
ROTATE_BYTES = 4 * 1024 * 1024

Point = tuple[str, str, float, int, int]  # run, key, value, timestamp ms, step

#: No real run id or metric key is longer (MLflow caps keys at 250 characters); a header claiming more is noise.
_MAX_FIELD_BYTES = 1024


def encode(run: str, key: str, value: float, ts: int, step: int) -> bytes:
    run_b, key_b = run.encode(), key.encode()
    body = _BODY.pack(len(run_b), len(key_b), value, ts, step) + run_b + key_b
    return struct.pack("<I", zlib.crc32(body)) + body


def decode(data: bytes, start: int = 0, stop: int | None = None) -> tuple[list[Point], int]:
    """The whole records in `data[start:stop]` up to the first damaged one, and where they end."""
    points: list[Point] = []
    pos = start
    size = _HEADER.size
    limit = len(data) if stop is None else min(stop, len(data))
    while pos + size <= limit:
        crc, run_len, key_len, value, ts, step = _HEADER.unpack_from(data, pos)
        end = pos + size + run_len + key_len
        if end > limit or zlib.crc32(data[pos + 4 : end]) != crc:
            break
        try:
            run = data[pos + size : pos + size + run_len].decode()
            key = data[pos + size + run_len : end].decode()
        except UnicodeDecodeError:
            break
        points.append((run, key, value, ts, step))
        pos = end
    return points, pos


def scan(data: bytes) -> tuple[list[Point], int, int]:
    """Every whole record in `data`, stepping over damaged stretches: (points, end of the last one, bytes skipped)."""
    points, pos = decode(data)
    end, skipped = pos, 0
    while pos + _HEADER.size <= len(data):
        found = _next_record(data, pos + 1)
        if found is None:
            break
        skipped += found - pos
        more, pos = decode(data, found)
        points.extend(more)
        end = pos
    return points, end, skipped


def _next_record(data: bytes, start: int) -> int | None:
    """The first offset at or after `start` where a whole record with a valid checksum begins."""
    size = _HEADER.size
    for pos in range(start, len(data) - size + 1):
        crc, run_len, key_len = struct.unpack_from("<IHH", data, pos)
        if run_len > _MAX_FIELD_BYTES or key_len > _MAX_FIELD_BYTES:
            continue
        end = pos + size + run_len + key_len
        if end <= len(data) and zlib.crc32(data[pos + 4 : end]) == crc:
            return pos
    return None


class Intake:
    """This process's intake file next to `journal_path`."""

    def __init__(self, journal_path: Path) -> None:
        self.journal_path = journal_path
        self.pid = os.getpid()
        self.name = f"{journal_path.name}.intake-{self.pid}-{uuid.uuid4().hex[:8]}"
        self.path = journal_path.with_name(self.name)
        self.lock = threading.Lock()
        self.size = 0  # bytes written
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try_lock(self.fd)

    def append(self, record: bytes) -> None:
        """Write `record` whole; on failure the file is cut back to where it was and OSError raised."""
        with self.lock:
            written = 0
            try:
                while written < len(record):
                    n = os.write(self.fd, record[written:] if written else record)
                    if n <= 0:
                        raise OSError(errno.ENOSPC, f"no room to write the journal intake {self.path}")
                    written += n
            except BaseException:
                if written:
                    try:
                        os.ftruncate(self.fd, self.size)
                    except OSError:
                        self.size += written  # keep offsets true; the reader skips the torn record, loudly
                raise
            self.size += len(record)

    def read(self, start: int) -> tuple[bytes, int]:
        """The bytes written since `start`, and where they end."""
        with self.lock:
            end = self.size
        with open(self.path, "rb") as fh:
            fh.seek(start)
            return fh.read(end - start), end

    def rotate_if(self, moved_to: int) -> bool:
        """Empty the file if everything written has been moved and it has grown large; True when emptied."""
        with self.lock:
            if self.size != moved_to or moved_to < ROTATE_BYTES:
                return False
            os.ftruncate(self.fd, 0)
            self.size = 0
            return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def try_lock(fd: int) -> bool:
    """Take an exclusive, non-blocking flock on `fd`; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one process per journal in practice
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def orphans(journal_path: Path, own: str | None) -> Iterator[tuple[Path, int]]:
    """Intake files of processes that have ended (their lock is free), each with an open, locked fd."""
    for path in sorted(journal_path.parent.glob(journal_path.name + ".intake-*")):
        if path.name == own:
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        if not try_lock(fd):
            os.close(fd)  # a live process owns it
            continue
        yield path, fd
