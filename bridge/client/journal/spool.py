"""The artifact spool: a private copy of every logged file, taken at call time, kept until it is uploaded.

A later change or deletion of the user's file does not matter, and the copy's sha256 (taken while copying)
is what the server checks an upload against (and the sender before a single PUT). Files are named by random ids;
the journal's rows name them. A file is flock'ed from creation until its row is committed, so a sweep in another
process leaves it alone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from bridge.client.journal.intake import try_lock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpooledFile:
    name: str
    size: int
    sha256: str


class SpoolProgress:
    """How far one copy into the spool has got, for a reader that sends its first bytes while it is still copying
    (the file lane's head start, delivery/files.py). Every byte below `written` is in the copy (in the page cache,
    as any reader sees it); `end` says the copy is over: its journal row, or None when the call failed and there
    is no row (the copy is gone)."""

    def __init__(self, artifact_path: str, size: int) -> None:
        self.artifact_path = artifact_path
        self.size = size  # the source's size when the call began (the copy may end with another)
        self.name: str | None = None
        self.written = 0
        self.op: int | None = None
        self.ended = False
        self._changed = threading.Condition()

    def __repr__(self) -> str:
        return f"SpoolProgress({self.artifact_path!r}, {self.written}/{self.size}, ended={self.ended}, op={self.op})"

    def wrote(self, total: int) -> None:
        with self._changed:
            self.written = total
            self._changed.notify_all()

    def end(self, op: int | None) -> None:
        with self._changed:
            self.op, self.ended = op, True
            self._changed.notify_all()

    def wait_for(self, nbytes: int, timeout: float) -> bool:
        """Wait until the copy holds `nbytes` bytes or is over (at most `timeout` s); whether it holds them."""
        with self._changed:
            self._changed.wait_for(lambda: self.written >= nbytes or self.ended, timeout)
            return self.written >= nbytes

    def wait_end(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.ended, timeout)


class Spool:
    """The folder of spooled copies, and how many bytes they hold."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)
        self._bytes = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return self._bytes

    def path(self, name: str) -> Path:
        return self.folder / name

    @contextlib.contextmanager
    def copy_in(self, source: Path, progress: SpoolProgress | None = None) -> Iterator[SpooledFile]:
        """Copy `source` in (fsynced) and yield it still locked; if the block raises, the copy is removed.
        `progress` learns the copy's name and each byte written as it goes."""
        digest = hashlib.sha256()
        with open(source, "rb") as src, _new_file(self.folder) as (name, dst):
            counted = False
            written = 0
            if progress is not None:
                progress.name = name
            try:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
                    if progress is not None:
                        dst.flush()
                        written += len(chunk)
                        progress.wrote(written)
                dst.flush()
                os.fsync(dst.fileno())  # a journal row must never point at a file that is not on disk
                size = os.fstat(dst.fileno()).st_size
                with self._lock:
                    self._bytes += size
                counted = True
                yield SpooledFile(name, size, digest.hexdigest())
            except BaseException:
                # No row points at the copy: it would only count against the limit, for ever.
                if counted:
                    self.discard(name)
                else:
                    self.path(name).unlink(missing_ok=True)
                raise

    def discard(self, name: str) -> None:
        target = self.path(name)
        with contextlib.suppress(FileNotFoundError):
            size = target.stat().st_size
            target.unlink()
            with self._lock:
                self._bytes -= size

    def sweep(self, referenced: set[str], still_referenced: Callable[[str], bool]) -> int:
        """Delete files no undelivered row refers to (left by a kill mid-call, or by dead letters)."""
        removed = 0
        for path in self.folder.iterdir():
            if not path.is_file() or path.name in referenced:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if not try_lock(fd):
                    continue  # another process is spooling it right now
                # Asked under the lock: a writer commits its row before it lets go of the file.
                if not still_referenced(path.name):
                    size = os.fstat(fd).st_size
                    path.unlink(missing_ok=True)
                    with self._lock:
                        self._bytes -= size
                    removed += 1
            finally:
                os.close(fd)
        if removed:
            log.info("spool %s: removed %d file(s) nothing refers to any more", self.folder, removed)
        return removed


@contextlib.contextmanager
def _new_file(folder: Path) -> Iterator[tuple[str, BinaryIO]]:
    """(name, file) of a new spool file, flock'ed until the block ends: `Spool.sweep` leaves it alone."""
    for _ in range(5):
        name = uuid.uuid4().hex
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        # A sweep in another process may have locked or removed it between create and lock: take another name.
        if try_lock(fd) and os.fstat(fd).st_nlink > 0:
            break
        os.close(fd)
    else:
        raise OSError(errno.EAGAIN, f"cannot create a spool file in {folder}")
    with os.fdopen(fd, "wb") as fh:
        yield name, fh
