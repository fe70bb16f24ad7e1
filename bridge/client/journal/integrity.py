"""The check a journal gets at opening, done on a private copy: the person's files are never written by it.

Why a copy: a journal found on a synced folder (Google Drive) may be torn — its database and its `-wal` file
uploaded at different moments. Opening such a file read-write and closing it checkpoints whatever WAL lies
beside it into the database and deletes the WAL, before anyone could tell the WAL was older than the database.
So the database and its WAL are copied into a temporary folder (retried until no process changed them during
the copy), and two views of the copy are checked:

  * the database alone (opened immutable: its WAL ignored, nothing written);
  * the database with its WAL applied (as a normal open would see it).

A WAL whose view is damaged while the database alone is whole, or whose view moves the journal backwards
(an `autoincrement` counter — entries, lineages — lower than in the database alone: only an older WAL can do
that, as SQLite never lowers them), is set aside, never applied. Both views damaged: the journal is repaired
from the copy (database.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Tries at a copy no process wrote to meanwhile; a journal busy for all of them is in use by a live process,
#: whose own connections keep it whole, and is not checked.
_COPY_TRIES = 5

WHOLE = "whole"
STALE_WAL = "stale-wal"  # the WAL would move the journal backwards: set aside
DAMAGED_WAL = "damaged-wal"  # the database alone is whole, with its WAL it is not: set aside
DAMAGED = "damaged"  # neither view is whole: repair from the copy
BUSY = "busy"  # changed during every copy: a live process has it open


@dataclass
class Verdict:
    """What the check found; `copy` (a private copy, database and WAL) lives until `cleanup()`."""

    state: str
    problem: str | None = None
    copy: Path | None = None
    wal_bytes: int = 0

    def cleanup(self) -> None:
        if self.copy is not None:
            shutil.rmtree(self.copy.parent, ignore_errors=True)
            self.copy = None


def wal_path(path: Path) -> Path:
    return Path(str(path) + "-wal")


def _stats(path: Path) -> tuple:
    out: list[tuple[int, int, int] | None] = []
    for p in (path, wal_path(path)):
        try:
            st = p.stat()
            out.append((st.st_size, st.st_mtime_ns, st.st_ino))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def private_copy(path: Path) -> Path | None:
    """A copy of the database and its WAL in a new temporary folder, or None when every try was written to."""
    for attempt in range(_COPY_TRIES):
        folder = Path(tempfile.mkdtemp(prefix="bridge-check-"))
        target = folder / "journal.sqlite"
        before = _stats(path)
        try:
            shutil.copyfile(path, target)
            with contextlib.suppress(FileNotFoundError):
                shutil.copyfile(wal_path(path), wal_path(target))
        except FileNotFoundError:
            pass
        if before == _stats(path) and target.exists():
            return target
        shutil.rmtree(folder, ignore_errors=True)
        time.sleep(0.02 * (attempt + 1))  # a live writer: let its transaction end
    return None


def _unaccounted(conn: sqlite3.Connection, counters: dict[str, int]) -> int | None:
    """Entries up to ops' counter that are neither in the view nor counted as deleted (database.py's ops_deleted);
    None for a journal from before that count."""
    try:
        row = conn.execute("select n from ops_deleted where id=0").fetchone()
    except sqlite3.OperationalError:
        return None
    if row is None:
        return None
    (present,) = conn.execute("select count(*) from ops").fetchone()
    return counters.get("ops", 0) - present - row[0]


def _view(uri: str, *, is_uri: bool) -> tuple[str | None, dict[str, int]]:
    """(problem or None, the autoincrement counters) of one view of the copy; counters["unaccounted"] as
    `_unaccounted` says, when known."""
    try:
        conn = sqlite3.connect(uri, uri=is_uri, isolation_level=None)
        try:
            rows = conn.execute("pragma quick_check").fetchall()
            messages = [r[0] for r in rows]
            if messages != ["ok"]:
                return "; ".join(messages[:3]), {}
            try:
                counters = dict(conn.execute("select name, seq from sqlite_sequence").fetchall())
            except sqlite3.OperationalError:  # no autoincrement table yet
                counters = {}
            unaccounted = _unaccounted(conn, counters)
            if unaccounted is not None:
                counters["unaccounted"] = unaccounted
            return None, counters
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return str(exc), {}


def check(path: Path) -> Verdict:
    """Check the journal at `path` on a private copy; the caller acts on the verdict, then calls `cleanup()`."""
    if not path.exists() or path.stat().st_size == 0:
        return Verdict(WHOLE)
    copy = private_copy(path)
    if copy is None:
        log.info("journal %s is being written by another process: its check is left to that process", path)
        return Verdict(BUSY)
    wal = wal_path(copy)
    wal_bytes = wal.stat().st_size if wal.exists() else 0
    alone_problem, alone = _view(f"file:{copy}?immutable=1", is_uri=True)
    if wal_bytes == 0:
        state = WHOLE if alone_problem is None else DAMAGED
        return Verdict(state, alone_problem, copy, 0)
    with_problem, with_wal = _view(str(copy), is_uri=False)  # applies (and checkpoints) the WAL in the copy
    if with_problem is None:
        alone_lacks, with_lacks = alone.pop("unaccounted", None), with_wal.pop("unaccounted", None)
        behind = {name: (seq, with_wal.get(name, 0)) for name, seq in alone.items() if with_wal.get(name, 0) < seq}
        if alone_problem is None and behind:
            detail = ", ".join(f"{name} {now} < {before}" for name, (before, now) in sorted(behind.items()))
            return Verdict(STALE_WAL, f"its WAL is older than its database ({detail})", copy, wal_bytes)
        if alone_problem is None and alone_lacks == 0 and with_lacks is not None and with_lacks > 0:
            # The WAL started after a checkpoint the database file was copied before: with it the journal would
            # say entries were written (counters, intake offsets) that neither file holds.
            return Verdict(
                DAMAGED_WAL,
                f"its WAL does not fit its database ({with_lacks} entries it counts are in neither; the database "
                "was copied before the WAL began)",
                copy,
                wal_bytes,
            )
        return Verdict(WHOLE, None, copy, wal_bytes)
    if alone_problem is None:
        return Verdict(DAMAGED_WAL, f"its WAL is damaged ({with_problem})", copy, wal_bytes)
    return Verdict(DAMAGED, with_problem, copy, wal_bytes)


def set_aside(path: Path, label: str, stamp: int | None = None) -> Path:
    """Rename `path` (and its -wal/-shm) to `<name>.<label>-<stamp>`, next to it; returns the new name."""
    stamp = int(time.time()) if stamp is None else stamp
    target = path.with_name(f"{path.name}.{label}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{label}-{stamp}.{n}")
    os.replace(path, target)
    return target
