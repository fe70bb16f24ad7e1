"""A disk that fills up, without root: the journal's folder given a capacity, enforced where bridge meets the OS.

* intake writes (`os.write` as intake.py sees it) fail with ENOSPC past the capacity;
* SQLite cannot grow past it: every connection's `pragma max_page_count` is set from the room left before each
  transaction, so a write that needs a new page fails with SQLITE_FULL ("database or disk is full"), while
  pages freed by deleted rows are reused as on a real disk;
* `statvfs` (room.free_bytes) reports the room left.

What is "used" is every file in the folder (the journal, its intake files, the reserve, the spool), by size.
The WAL is not limited (SQLite reuses its file after a checkpoint).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class FullDisk:
    """Install with `FullDisk(monkeypatch, folder)`: unlimited until `fill()`; `free_up(n)` adds room."""

    def __init__(self, monkeypatch, folder: Path) -> None:
        from bridge.client.journal import database, intake, room

        self.folder = folder
        self.capacity: int | None = None  # None: no limit yet
        self.refused = 0  # writes refused for want of room
        disk = self

        class _Os:
            def write(self, fd: int, data) -> int:
                if len(data) > disk.free():
                    disk.refused += 1
                    raise OSError(errno.ENOSPC, "No space left on device")
                return os.write(fd, data)

            def __getattr__(self, name):
                return getattr(os, name)

        monkeypatch.setattr(intake, "os", _Os())
        monkeypatch.setattr(room, "free_bytes", lambda folder: disk.free())
        connection = database.Database._connection

        def limited(db):
            conn = connection(db)
            if disk.capacity is not None and Path(db.path).parent == disk.folder:
                page = conn.execute("pragma page_size").fetchone()[0]
                room_for = disk.capacity - (disk.used() - _size(Path(db.path)))
                conn.execute(f"pragma max_page_count={max(1, room_for // page)}")
            return conn

        monkeypatch.setattr(database.Database, "_connection", limited)

    def used(self) -> int:
        total = 0
        for root, _, names in os.walk(self.folder):
            for name in names:
                if not name.endswith(("-wal", "-shm")):
                    total += _size(Path(root) / name)
        return total

    def free(self) -> int:
        return 2**40 if self.capacity is None else max(0, self.capacity - self.used())

    def fill(self) -> None:
        """No room left from now on."""
        self.capacity = self.used()

    def free_up(self, nbytes: int) -> None:
        assert self.capacity is not None
        self.capacity += nbytes


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
