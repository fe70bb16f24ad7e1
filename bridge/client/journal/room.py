"""The journal's room on its disk: a reserve file given up when the disk fills, and the "disk full" state.

Why: on a full disk SQLite still needs a few pages to mark rows delivered and delete them, a run's end status
needs a row, and moving metric points out of the intake needs pages too. So `<journal>.reserve` (RESERVE_BYTES)
is kept while there is room and deleted the moment a write meets a full disk: delivery and run ends then have
room, while new entries are refused (JournalFullError) so the freed room is not eaten by the next points. Once the
disk has the reserve's size and HEADROOM_BYTES free again, the reserve is written back and logging goes on
(`tend()`, called by the sender's journal-sync thread every second). The person is told once per episode.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

#: What a full disk leaves for delivery and run ends: a few delivery rounds' worth of SQLite pages.
RESERVE_BYTES = 8 * 1024 * 1024
#: Free beyond the reserve before logging goes on, so a disk that is still nearly full does not fill at once.
HEADROOM_BYTES = 16 * 1024 * 1024


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged process can still write on the filesystem holding `folder`."""
    st = os.statvfs(folder)
    if st.f_files and not st.f_favail:
        return 0  # out of inodes: as full as out of blocks (ENOSPC all the same)
    return st.f_bavail * st.f_frsize


class Room:
    """The reserve beside the journal at `journal_path`, and whether the disk was met full."""

    def __init__(self, journal_path: Path) -> None:
        self.journal_path = journal_path
        self.reserve = journal_path.with_name(journal_path.name + ".reserve")
        #: A write met the disk full and there has not been room since (an attribute: every log call reads it).
        self.full = False
        self._lock = threading.Lock()

    def needed(self) -> int:
        """Free bytes the disk needs before logging goes on."""
        return RESERVE_BYTES + HEADROOM_BYTES

    def met_full(self, detail: str = "") -> None:
        """A write found the disk full: give the reserve up to delivery and say so, once until there is room."""
        with self._lock:
            if self.full:
                return
            self.full = True
        released = self._release()
        log.warning("%s", self.message(detail, released=released))

    def message(self, detail: str = "", *, released: bool = False) -> str:
        """What the person reads: which journal, how much room it needs, what to do."""
        free = self.free()
        return (
            f"bridge: the disk holding journal {self.journal_path} is full"
            f"{f' ({detail})' if detail else ''}; {free:,} bytes free. New entries are refused (JournalFullError) "
            f"until it has {self.needed():,} bytes free; what was accepted is kept and still delivered"
            f"{', and a run can still end' if released else ''}. Free space on that disk (or set BRIDGE_JOURNAL "
            f"to a journal on another disk); logging and delivery go on by themselves."
        )

    def free(self) -> int:
        try:
            return free_bytes(self.reserve.parent)
        except OSError:
            return 0

    def tend(self) -> bool:
        """Keep the reserve while there is room; leave the full state once there is room again. True when the
        disk is not (or no longer) full."""
        if self.full:
            if self.free() < self.needed():
                return False
            with self._lock:
                self.full = False
            log.warning("bridge: the disk holding journal %s has room again; logging goes on", self.journal_path)
        if not self.reserve.exists() and self.free() >= self.needed():
            self._write_reserve()
        return True

    def _release(self) -> bool:
        try:
            self.reserve.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("bridge: could not release the journal's reserve %s: %s", self.reserve, exc)
            return False
        return True

    def _write_reserve(self) -> None:
        part = self.reserve.with_name(self.reserve.name + ".part")
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, RESERVE_BYTES)  # blocks taken, nothing written
                except (AttributeError, OSError):
                    block = b"\0" * (1 << 20)
                    for _ in range(RESERVE_BYTES // len(block)):
                        os.write(fd, block)
            finally:
                os.close(fd)
            os.replace(part, self.reserve)  # a torn reserve never passes for a whole one
        except OSError as exc:
            with contextlib.suppress(OSError):
                part.unlink()
            log.info("bridge: no reserve for journal %s: %s", self.journal_path, exc)
