"""Journal folders torn the way Google Drive uploads them, and what a copy holds (issue 18).

    log_offline(folder, name, seconds, rng)   a client logging steadily offline (metrics, params, tags, a few
                                              artifacts) while a copier takes each file of the folder at its own
                                              random moment; the client dies at the end (no close). Returns the
                                              torn copy's files and the kinds of tear in it.
    write_copy(files, folder)                 lays a torn copy out on disk
    DriveCopier(folder, rng)                  the same copier for a folder another process writes (a replica
                                              on a stand-in Drive): start(), then stop() once the writer died
    holdings(path)                            what the whole parts of a copy hold (database alone, database with
                                              WAL, whole intake records of runs it knows, whole spool files)
    server_holdings(client, name)             the same, read back from the MLflow server

Points are recognizable: run <r>'s metric `loss` at step s has value s + r/10, so anything foreign shows.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bridge.client.journal import Journal
from bridge.client.journal import intake as _intake

JOURNAL = "j.sqlite"


@dataclass
class TornCopy:
    files: dict[str, bytes]  # relative path -> bytes
    kinds: set[str] = field(default_factory=set)
    taken_at: dict[str, int] = field(default_factory=dict)  # relative path -> tick the copy was taken


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.name.endswith("-shm"))


def log_offline(folder: Path, name: str, seconds: float, rng: random.Random, *, tick_s: float = 0.02) -> TornCopy:
    """Log into a journal in `folder` for `seconds` while a copier takes each file at random moments."""
    journal = Journal(folder / JOURNAL)
    experiment = journal.add_experiment(name, {})
    stop = threading.Event()
    errors: list[BaseException] = []

    def client() -> None:
        try:
            runs = [
                journal.add_run(experiment_id=experiment, user_id="u", start_time=1, name=f"run{r}", tags={})
                for r in range(2)
            ]
            source = folder.parent / f"{name}-artifact.bin"
            step = 0
            while not stop.is_set():
                for r, run in enumerate(runs):
                    journal.append_batch(run, [("loss", step + r / 10, 1_700_000_000_000 + step, step)])
                    if step % 20 == 0:
                        journal.append_batch(run, params=[(f"p{step}", str(step))], tags=[(f"t{step}", str(step))])
                    if step % 150 == 0:
                        source.write_bytes(rng.randbytes(20_000 + step))
                        journal.spool_artifact(run, source, f"a/{step}.bin")
                step += 1
                time.sleep(0.0005)
        except BaseException as exc:  # surfaced by the caller
            errors.append(exc)

    def durable() -> None:  # the sender's journal-sync thread: intake into SQLite, checkpoint, fsync
        while not stop.wait(0.05):
            try:
                journal.sync()
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=client, daemon=True), threading.Thread(target=durable, daemon=True)]
    for t in threads:
        t.start()
    taken: dict[str, tuple[int, bytes | None]] = {}
    # Drive uploads a changed file again later; each file has its own chance per tick to be (re)uploaded.
    upload_chance = {JOURNAL: rng.uniform(0.02, 0.3), JOURNAL + "-wal": rng.uniform(0.02, 0.3)}
    ticks = int(seconds / tick_s)
    # Drive holds back a file that keeps changing: now and then one's uploads stop at a random moment.
    stalls: dict[str, int] = {}
    for tick in range(ticks):
        time.sleep(tick_s)
        for rel in _files(folder):
            chance = upload_chance.setdefault(rel, rng.uniform(0.02, 0.3))
            if rel not in stalls:
                stalls[rel] = rng.randrange(tick, ticks) if rng.random() < 0.3 else ticks
            if tick < stalls[rel] and rng.random() < chance:
                try:
                    taken[rel] = (tick, (folder / rel).read_bytes())
                except FileNotFoundError:
                    taken[rel] = (tick, None)  # deleted meanwhile: Drive deletes it too
    stop.set()  # the runtime dies here: nothing is closed
    for t in threads:
        t.join(5)
    if errors:
        raise errors[0]
    copy = TornCopy({})
    for rel in _files(folder):
        if rel not in taken and stalls.get(rel, ticks) >= ticks and rng.random() < 0.5:
            taken[rel] = (ticks, (folder / rel).read_bytes())  # uploaded at the very end
    for rel, (tick, data) in taken.items():
        if data is None:
            continue
        if rng.random() < 0.08 and data:
            cut = rng.randrange(len(data))
            data = data[:cut]
            copy.kinds.add(f"{_role(rel)} cut")
        copy.files[rel] = data
        copy.taken_at[rel] = tick
    for rel in _files(folder):
        if rel not in copy.files:
            copy.kinds.add(f"{_role(rel)} missing")
    db, wal = copy.taken_at.get(JOURNAL), copy.taken_at.get(JOURNAL + "-wal")
    if db is not None and wal is not None:
        copy.kinds.add("wal older than db" if wal < db else "wal newer than db" if wal > db else "wal with db")
    if not copy.kinds:
        copy.kinds.add("no tear")
    return copy


class DriveCopier:
    """Copies a folder another process writes the way Drive uploads it, each file at its own random moments.

    `start()` takes every file as it is then (Drive has caught up with the folder by that moment); from then on a
    thread takes each file again, now and then, at its own pace (some stop being taken at a random moment, as
    Drive holds back a file that keeps changing); a file deleted meanwhile is deleted from the copy. `stop()`
    (the writer is dead: nothing uploads any more) gives the copy: each file as it was at the last moment it was
    taken, a file never taken missing."""

    def __init__(self, folder: Path, rng: random.Random, *, tick_s: float = 0.02, window_s: float = 2.0) -> None:
        self.folder = folder
        self.rng = rng
        self.tick_s = tick_s
        self.window_s = window_s  # about how long the writer goes on: stalls fall within it
        self._taken: dict[str, tuple[float, bytes | None]] = {}
        self._seen: dict[str, tuple[int, int, int]] = {}  # rel -> (inode, mtime, size) of what was taken
        self._chance: dict[str, float] = {}
        self._stall: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self.ticks = 0

    def _take(self, rel: str, now: float) -> None:
        path = self.folder / rel
        try:
            st = path.stat()
            signature = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._seen.get(rel) == signature and self._taken.get(rel, (0, None))[1] is not None:
                self._taken[rel] = (now, self._taken[rel][1])  # unchanged: uploaded again, the same bytes
                return
            self._taken[rel] = (now, path.read_bytes())
            self._seen[rel] = signature
        except FileNotFoundError:
            self._taken[rel] = (now, None)  # deleted meanwhile: Drive deletes it too
        except IsADirectoryError:
            pass

    def start(self) -> None:
        self._started = time.monotonic()
        for rel in _files(self.folder):
            self._take(rel, 0.0)
        self._thread = threading.Thread(target=self._loop, name="drive-copier", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            now = time.monotonic() - self._started
            self.ticks += 1
            for rel in _files(self.folder) + [rel for rel in self._taken if not (self.folder / rel).exists()]:
                chance = self._chance.setdefault(rel, self.rng.uniform(0.02, 0.3))
                stall = self._stall.setdefault(
                    rel, self.rng.uniform(0, self.window_s) if self.rng.random() < 0.3 else float("inf")
                )
                if now < stall and self.rng.random() < chance:
                    self._take(rel, now)

    def stop(self) -> TornCopy:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        copy = TornCopy({})
        moments: dict[str, float] = {}
        for rel, (moment, data) in sorted(self._taken.items()):
            if data is not None:
                copy.files[rel] = data
                moments[rel] = moment
                copy.taken_at[rel] = int(moment / self.tick_s)
        for rel in _files(self.folder):
            if rel not in copy.files:
                copy.kinds.add(f"{_role(rel)} missing")
            elif (self.folder / rel).read_bytes() != copy.files[rel]:
                copy.kinds.add(f"{_role(rel)} older")
        db = moments.get(JOURNAL)
        for rel, moment in moments.items():
            if db is not None and _role(rel) == "intake" and moment != db:
                copy.kinds.add(f"{_role(rel)} {'older' if moment < db else 'newer'} than db")
        if not copy.kinds:
            copy.kinds.add("no tear")
        return copy


def _role(rel: str) -> str:
    if rel == JOURNAL:
        return "db"
    if rel == JOURNAL + "-wal":
        return "wal"
    if ".intake-" in rel:
        return "intake"
    if ".spool" in rel:
        return "spool"
    return "other"


def write_copy(copy: TornCopy, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for rel, data in copy.files.items():
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (folder / (JOURNAL + ".spool")).mkdir(exist_ok=True)
    return folder / JOURNAL


@dataclass
class Holdings:
    """What a journal copy (or the server) holds, by run name."""

    points: set[tuple[str, int, float]] = field(default_factory=set)  # run name, step, value
    params: set[tuple[str, str]] = field(default_factory=set)
    tags: set[tuple[str, str]] = field(default_factory=set)
    artifacts: set[tuple[str, str, str]] = field(default_factory=set)  # run name, path, sha256

    def __or__(self, other: Holdings) -> Holdings:
        return Holdings(
            self.points | other.points,
            self.params | other.params,
            self.tags | other.tags,
            self.artifacts | other.artifacts,
        )

    def size(self) -> int:
        return len(self.points) + len(self.params) + len(self.tags) + len(self.artifacts)

    def missing_from(self, other: Holdings) -> Holdings:
        """What this holds that `other` lacks."""
        return Holdings(
            self.points - other.points,
            self.params - other.params,
            self.tags - other.tags,
            self.artifacts - other.artifacts,
        )


def _view(uri: str, spool: Path) -> tuple[Holdings, dict[str, str], dict[str, int]] | None:
    """(holdings, local run id -> name, intake offsets) of one view of a copy, or None when it is not whole."""
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        try:
            if conn.execute("pragma quick_check").fetchall() != [("ok",)]:
                return None
            names = dict(conn.execute("select local_id, name from runs").fetchall())
            offsets = dict(conn.execute("select name, moved from intake").fetchall())
            held = Holdings()
            rows = conn.execute("select run, kind, key, value, step, body from ops").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return None
    import json

    for run, kind, key, value, step, body in rows:
        name = names.get(run)
        if name is None:
            continue
        if kind == "metric":
            held.points.add((name, step, float(value)))
        elif kind == "param":
            held.params.add((name, key))
        elif kind == "tag":
            held.tags.add((name, key))
        elif kind == "artifact":
            spec = json.loads(body)
            path = spool / spec["spool"]
            if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == spec["sha256"]:
                held.artifacts.add((name, spec["path"], spec["sha256"]))
    return held, names, offsets


def holdings(path: Path) -> Holdings:
    """What the whole parts of the copy at `path` hold: the union of its whole views (database alone, database
    with its WAL, read on private copies) and the whole intake records, past the view's offsets, of runs a
    whole view knows."""
    spool = path.with_name(path.name + ".spool")
    views = []
    views.append(_view(f"file:{path}?immutable=1", spool) if path.exists() else None)
    scratch = Path(tempfile.mkdtemp(prefix="torn-view-"))
    try:
        if path.exists():
            shutil.copyfile(path, scratch / JOURNAL)
            wal = Path(str(path) + "-wal")
            if wal.exists():
                shutil.copyfile(wal, scratch / (JOURNAL + "-wal"))
            views.append(_view(f"file:{scratch / JOURNAL}", spool))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    held = Holdings()
    names: dict[str, str] = {}
    for view in views:
        if view is None:
            continue
        held = held | view[0]
        names.update(view[1])
    for intake in path.parent.glob(path.name + ".intake-*"):
        points, _end, _skipped = _intake.scan(intake.read_bytes())
        for run, _key, value, _ts, step in points:
            if run in names:
                held.points.add((names[run], step, value))
    return held


def server_holdings(client, experiment_name: str) -> tuple[Holdings, list[str], int]:
    """(what the server holds for the experiment by run name, every run name there — twins show as repeats, and
    how many metric rows repeat another)."""
    experiment = client.get_experiment_by_name(experiment_name)
    held = Holdings()
    if experiment is None:
        return held, [], 0
    repeats = 0
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    names = []
    for run in runs:
        name = run.info.run_name
        names.append(name)
        history = client.get_metric_history(run.info.run_id, "loss")
        points = {(name, point.step, point.value) for point in history}
        repeats += len(history) - len(points)
        held.points |= points
        held.params |= {(name, k) for k in run.data.params}
        held.tags |= {(name, k) for k in run.data.tags if k.startswith("t")}
        for listed in client.list_artifacts(run.info.run_id, "a"):
            local = client.download_artifacts(run.info.run_id, listed.path, tempfile.mkdtemp(prefix="torn-art-"))
            held.artifacts.add((name, listed.path, hashlib.sha256(Path(local).read_bytes()).hexdigest()))
    return held, names, repeats


def sha_map(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }
