"""Where each file's upload stands, and why each lane waits: kept in the journal, so a new process (or a new
runtime delivering a copy of the journal) goes on from the last byte the server confirmed, and `bridge queue` —
another process — can say why an entry waits."""

from __future__ import annotations

import time
from dataclasses import dataclass

from bridge.client.journal.database import Database
from bridge.client.journal.kinds import ARTIFACT
from bridge.client.journal.queue import IS_UNDELIVERED


@dataclass
class UploadState:
    """One artifact row's upload: `location` on the server (None before it began), bytes it confirmed."""

    op: int
    size: int
    part: int  # bytes per request now (halved when the tunnel's edge refuses or times out)
    location: str | None = None
    confirmed: int = 0
    error: str | None = None  # why the last try failed
    tries: int = 0
    next_try: float | None = None  # time.time() of the next try, while backing off
    timeouts: int = 0  # parts in a row that timed out at the smallest part size
    damaged: int = 0  # times the whole file arrived with another sha256


@dataclass(frozen=True)
class LaneWait:
    """Why a delivery lane ("records" or "files") is not delivering right now."""

    lane: str
    error: str
    attempts: int
    next_try: float | None
    since: float


@dataclass(frozen=True)
class FileWaiting:
    """A file not delivered yet: its row, run, path, bytes the server confirmed of it, and why its last try failed."""

    op: int
    run: str
    path: str
    size: int
    confirmed: int
    error: str | None
    tries: int
    next_try: float | None


_FIELDS = ("op", "size", "part", "location", "confirmed", "error", "tries", "next_try", "timeouts", "damaged")
_COLUMNS = ", ".join(_FIELDS)


class UploadBook:
    """The `uploads` and `lane_waits` tables."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def get(self, op: int) -> UploadState | None:
        with self._db.db(write=False) as conn:
            row = conn.execute(f"select {_COLUMNS} from uploads where op=?", (op,)).fetchone()
        return UploadState(*row) if row else None

    def all(self) -> dict[int, UploadState]:
        with self._db.db(write=False) as conn:
            rows = conn.execute(f"select {_COLUMNS} from uploads").fetchall()
        return {row[0]: UploadState(*row) for row in rows}

    def save(self, state: UploadState) -> None:
        with self._db.db() as conn:
            conn.execute(
                f"insert or replace into uploads({_COLUMNS}, updated) values({','.join('?' * len(_FIELDS))},?)",
                (*(getattr(state, name) for name in _FIELDS), time.time()),
            )

    def drop(self, op: int) -> None:
        """Forget an upload (the server no longer takes uploads in parts: the file goes whole)."""
        with self._db.db() as conn:
            conn.execute("delete from uploads where op=?", (op,))

    def files_waiting(self) -> list[FileWaiting]:
        """Every file not delivered yet (dead letters aside), oldest first, with its upload's progress."""
        with self._db.db(write=False) as conn:
            rows = conn.execute(
                "select o.id, o.run, o.key, coalesce(u.size, json_extract(o.body, '$.size'), 0), "
                "coalesce(u.confirmed, 0), u.error, coalesce(u.tries, o.attempts), u.next_try "
                f"from ops o left join uploads u on u.op = o.id where o.kind = '{ARTIFACT}' and {IS_UNDELIVERED} "
                "order by o.id"
            ).fetchall()
        return [FileWaiting(*row) for row in rows]

    def note_wait(self, lane: str, error: str | None, attempts: int = 0, next_try: float | None = None) -> None:
        """Lane `lane` waits because of `error` (None: it delivers again)."""
        with self._db.db() as conn:
            if error is None:
                conn.execute("delete from lane_waits where lane=?", (lane,))
                return
            conn.execute(
                "insert into lane_waits(lane, error, attempts, next_try, since) values(?,?,?,?,?) "
                "on conflict(lane) do update set error=excluded.error, attempts=excluded.attempts, "
                "next_try=excluded.next_try",
                (lane, error[:500], attempts, next_try, time.time()),
            )

    def waits(self) -> dict[str, LaneWait]:
        with self._db.db(write=False) as conn:
            rows = conn.execute("select lane, error, attempts, next_try, since from lane_waits").fetchall()
        return {row[0]: LaneWait(*row) for row in rows}
