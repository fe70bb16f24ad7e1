"""A journal asked to live on a network filesystem (Google Drive in Colab, NFS, SMB) runs on local disk and keeps a
consistent replica there instead (Litestream's idea, with SQLite's backup API).

SQLite's WAL must not live on a network filesystem, and Drive uploads each file of a folder on its own schedule,
so a journal running there can be found torn by the next runtime. The replica is written so that a copy taken at
any moment restores whole: every file is written under a temporary name and renamed into place (a reader sees the
old file or the new one, never half of one), in the order that keeps each one consistent with what is already
there — spool files first (rows never point at a file not yet there), then the database (a backup, no WAL), then
the intake files (offsets in the database never point past their end).

    network_filesystem(path)       the filesystem type when `path` lies on a mount SQLite must not use, else None
    local_journal_for(path)        where the journal runs instead, on local disk
    Replica(local, target)         snapshot() copies the running journal to `target`; restore() the other way
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from bridge.client.journal.intake import try_lock

log = logging.getLogger(__name__)

#: Filesystem types SQLite's WAL must not run on (its documentation: no network filesystems; FUSE mounts of
#: cloud drives upload files on their own schedule).
NETWORK_TYPES = frozenset(
    {
        "fuse",
        "fuse.drive",
        "fuse.drivefs",
        "fuse.rclone",
        "fuse.sshfs",
        "fuse.gcsfuse",
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "afs",
        "ceph",
        "glusterfs",
        "fuse.s3fs",
    }
)
#: How often the replica is brought up to date while the journal changes (and at every flush).
REPLICA_EVERY_ENV = "BRIDGE_REPLICA_EVERY_S"
#: Colab's Google Drive mount point (its type has varied between releases).
COLAB_DRIVE = Path("/content/drive")
#: The mount table; a test points this at a file of its own (or, for a child process, `MOUNTS_FILE_ENV`).
MOUNTS_FILE = Path("/proc/mounts")
#: Names a mount table to read instead of /proc/mounts, read at every call (a test's child process: a folder it
#: stands in for Google Drive is then a network filesystem).
MOUNTS_FILE_ENV = "BRIDGE_MOUNTS_FILE"


def _mounts(text: str) -> list[tuple[Path, str]]:
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            point = fields[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            out.append((Path(point), fields[2]))
    return out


def network_filesystem(path: str | os.PathLike, mounts_file: Path | None = None) -> str | None:
    """The type of the filesystem holding `path` when SQLite must not run there (network, FUSE), else None."""
    target = Path(os.path.abspath(path))
    if mounts_file is None:
        named = os.environ.get(MOUNTS_FILE_ENV, "").strip()
        mounts_file = Path(named) if named else MOUNTS_FILE
    try:
        text = mounts_file.read_text()
    except OSError:
        text = ""
    best: tuple[int, str] | None = None
    for point, kind in _mounts(text):
        if target == point or point in target.parents:
            depth = len(point.parts)
            if best is None or depth >= best[0]:
                best = (depth, kind)
    if best is not None and (best[1] in NETWORK_TYPES or best[1].startswith("fuse.")):
        return best[1]
    if target == COLAB_DRIVE or COLAB_DRIVE in target.parents:
        return best[1] if best is not None and best[1] != "overlay" else "fuse.drive"
    return None


def local_journal_for(path: str | os.PathLike, data_dir: Path) -> Path:
    """The local journal that stands in for `path` (one per path, so two Drive journals never share one)."""
    digest = hashlib.sha256(str(Path(os.path.abspath(path))).encode()).hexdigest()[:16]
    return data_dir / "replicated" / digest / Path(path).name


@dataclass(frozen=True)
class SnapshotStats:
    bytes_written: int
    seconds: float


def _write_atomically(source: Path | None, target: Path, *, data: bytes | None = None) -> int:
    """Copy `source` (or write `data`) to `target` under a temporary name, fsync, rename; the bytes written."""
    temporary = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if data is None:
            assert source is not None
            shutil.copyfile(source, temporary)
        else:
            temporary.write_bytes(data)
        with open(temporary, "rb") as fh:
            os.fsync(fh.fileno())
        size = temporary.stat().st_size
        os.replace(temporary, target)
        return size
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def _copy_spooled(path: Path, target: Path) -> int:
    """Copy a spooled file unless it is still being written (its writer holds its lock until its row commits)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        if not try_lock(fd):
            return 0  # the next snapshot takes it
        return _write_atomically(path, target)
    finally:
        os.close(fd)


class Replica:
    """The replica at `target` (a journal path on the network filesystem) of the journal running at `local`."""

    def __init__(self, local: Path, target: Path) -> None:
        self.local = local
        self.target = target

    def _spool(self, journal: Path) -> Path:
        return journal.with_name(journal.name + ".spool")

    def snapshot(self) -> SnapshotStats:
        """Bring the replica up to the journal now: spool, then database, then intake (see the module docstring)."""
        started = time.monotonic()
        written = 0
        self.target.parent.mkdir(parents=True, exist_ok=True)
        local_spool, target_spool = self._spool(self.local), self._spool(self.target)
        target_spool.mkdir(exist_ok=True)
        have = {p.name for p in target_spool.iterdir() if p.is_file() and not p.name.startswith(".")}
        local_names = set()
        for path in self._files(local_spool):
            local_names.add(path.name)
            if path.name not in have:  # a spooled file never changes once its row is committed
                written += _copy_spooled(path, target_spool / path.name)
        # The database: a consistent copy by SQLite's backup API, in rollback mode (one file, no WAL).
        staging = self.local.with_name(f".{self.local.name}.replica-{uuid.uuid4().hex[:8]}")
        try:
            src = sqlite3.connect(str(self.local))
            dst = sqlite3.connect(str(staging))
            try:
                src.backup(dst)
                dst.execute("pragma journal_mode=delete")
            finally:
                dst.close()
                src.close()
            written += _write_atomically(staging, self.target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                staging.unlink()
        # Intake files after the database: the offsets it holds never point past what the copies hold.
        intake_names = set()
        for path in sorted(self.local.parent.glob(self.local.name + ".intake-*")):
            intake_names.add(path.name)
            with contextlib.suppress(FileNotFoundError):
                written += _write_atomically(None, self.target.with_name(path.name), data=path.read_bytes())
        for stale in self.target.parent.glob(self.target.name + ".intake-*"):
            if stale.name not in intake_names:
                stale.unlink(missing_ok=True)
        for name in have - local_names:  # delivered: no row refers to it any more
            (target_spool / name).unlink(missing_ok=True)
        return SnapshotStats(written, time.monotonic() - started)

    @staticmethod
    def _files(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return [p for p in folder.iterdir() if p.is_file()]

    def restore(self) -> bool:
        """Copy the replica to the local journal when there is none here (a new runtime); True when it did."""
        if self.local.exists() or not self.target.exists():
            return False
        self.local.parent.mkdir(parents=True, exist_ok=True)
        local_spool = self._spool(self.local)
        local_spool.mkdir(exist_ok=True)
        for path in self._files(self._spool(self.target)):
            if not path.name.startswith("."):
                _write_atomically(path, local_spool / path.name)
        for path in self.target.parent.glob(self.target.name + ".intake-*"):
            _write_atomically(path, self.local.with_name(path.name))
        wal = Path(str(self.target) + "-wal")  # a journal an older bridge ran there: checked at opening
        if wal.exists():
            _write_atomically(wal, Path(str(self.local) + "-wal"))
        _write_atomically(self.target, self.local)  # last: a journal here means the restore finished
        log.info("bridge: journal restored from its replica %s", self.target)
        return True


class ReplicaKeeper:
    """Keeps a `Replica` up to date: every `every_s` seconds while the journal changes, and on demand (a flush,
    the end). `sync` makes the journal durable first (the intake moved into SQLite)."""

    def __init__(self, replica: Replica, sync, every_s: float = 5.0) -> None:
        self.replica = replica
        self._sync = sync
        self.every_s = every_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.snapshots = 0
        self.bytes_written = 0
        self.seconds = 0.0
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="bridge-replica", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.snapshot_now()

    def snapshot_now(self) -> bool:
        """Bring the replica up to date now; False (and logged) when it could not be written."""
        with self._lock:
            try:
                self._sync()
                stats = self.replica.snapshot()
            except Exception as exc:  # the network filesystem went away: the journal here keeps everything
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("bridge: could not update the journal's replica %s: %s", self.replica.target, exc)
                return False
            self.snapshots += 1
            self.bytes_written += stats.bytes_written
            self.seconds += stats.seconds
            self.last_error = None
            return True

    def stop(self) -> bool:
        """Stop the timer and take a last snapshot."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        return self.snapshot_now()
