"""The op queue: rows move pending → in-flight → deleted (done) or dead, claimed all-or-nothing by one sender.

In-flight rows go back to pending when a sender starts, because nothing proves the server applied them
(re-sending is safe: see delivery/sender.py). Reads of what still waits (`undelivered`) move the intake in first,
so they see every point logged before them.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator

from bridge.client.journal.database import Database
from bridge.client.journal.kinds import ARTIFACT, UPDATE_RUN
from bridge.client.journal.records import Backlog, DeadLetter, Op, entry_crc
from bridge.client.journal.spool import Spool

PENDING, IN_FLIGHT, DEAD = 0, 1, 3
STATE_NAMES = {PENDING: "pending", IN_FLIGHT: "in-flight", DEAD: "dead"}
#: The states as SQL conditions, so no query spells a state by its number.
IS_PENDING = f"state={PENDING}"
IS_IN_FLIGHT = f"state={IN_FLIGHT}"
IS_DEAD = f"state={DEAD}"
IS_UNDELIVERED = f"state in ({PENDING},{IN_FLIGHT})"


class OpQueue:
    """The `ops` table of one journal's `Database`; `move_intake` brings the intake's points in before a read."""

    def __init__(
        self, db: Database, spool: Spool, move_intake: Callable[[], int], unmoved: Callable[[], int] = lambda: 0
    ) -> None:
        self._db = db
        self._spool = spool
        self._move_intake = move_intake
        self._unmoved = unmoved  # entries accepted but not in SQLite yet (a full disk): the backlog counts them

    def undelivered(self, run: str, kinds: tuple[str, ...]) -> list[Op]:
        """Ops of `run` not yet delivered (pending or in-flight), oldest first."""
        self._move_intake()
        marks = ",".join("?" * len(kinds))
        with self._db.db(write=False) as conn:
            rows = conn.execute(
                f"select id, run, kind, key, value, ts, step, body, attempts, epoch from ops "
                f"where run=? and {IS_UNDELIVERED} and kind in ({marks}) order by id",
                (run, *kinds),
            ).fetchall()
        return [Op(*row) for row in rows]

    def undelivered_naming(self, kind: str, text: str) -> list[Op]:
        """Undelivered ops of `kind`, of any run, whose body holds `text` as a JSON string, oldest first."""
        self._move_intake()
        with self._db.db(write=False) as conn:
            rows = conn.execute(
                f"select id, run, kind, key, value, ts, step, body, attempts, epoch from ops where "
                f"kind=? and {IS_UNDELIVERED} and body like ? order by id",
                (kind, f"%{json.dumps(text)}%"),
            ).fetchall()
        return [Op(*row) for row in rows]

    def update_body(self, op_id: int, body: dict) -> None:
        """Keep how far a long op got (models.py's step copy), so a try after a failure carries on from there."""
        with self._db.db() as conn:
            text = json.dumps(body, separators=(",", ":"))
            row = conn.execute("select run, kind, key from ops where id=?", (op_id,)).fetchone()
            if row is not None:
                crc = entry_crc(row[0], row[1], row[2], None, None, None, text)
                conn.execute("update ops set body=?, crc=? where id=?", (text, crc, op_id))

    def requeue(self, op_id: int) -> None:
        """Move an op to the end of the journal, pending: it waits for something journaled after it."""
        with self._db.db() as conn:
            # Past every id ever used (the table's AUTOINCREMENT sequence), not only the live ones.
            (new_id,) = conn.execute(
                "select max(coalesce(max(id), 0), coalesce((select seq from sqlite_sequence where name='ops'), 0))"
                " + 1 from ops"
            ).fetchone()
            if conn.execute(f"update ops set id=?, {IS_PENDING} where id=?", (new_id, op_id)).rowcount:
                # SQLite moves the counter only on inserts: the new id is used, the old one is gone for good.
                conn.execute("update sqlite_sequence set seq=max(seq, ?) where name='ops'", (new_id,))
                _count_deleted(conn, 1)

    def reset_in_flight(self) -> int:
        """Return in-flight rows to pending: a sender starting now cannot know whether they arrived."""
        with self._db.db() as conn:
            # Counted as an attempt: the server may have applied them, which the next try must check.
            return conn.execute(f"update ops set {IS_PENDING}, attempts=attempts+1 where {IS_IN_FLIGHT}").rowcount

    def last_id(self) -> int:
        with self._db.db(write=False) as conn:
            return conn.execute("select coalesce(max(id), 0) from ops").fetchone()[0]

    def runs_with_undelivered(self, kinds: tuple[str, ...]) -> set[str]:
        """Runs with rows of these kinds not delivered yet."""
        self._move_intake()
        with self._db.db(write=False) as conn:
            rows = conn.execute(
                f"select distinct run from ops where {IS_UNDELIVERED} and kind in ({','.join('?' * len(kinds))})", kinds
            ).fetchall()
        return {row[0] for row in rows}

    def runs_with_pending(self, *, files: bool | None = None) -> list[str]:
        """Runs with pending rows, the oldest first; `files`: only file uploads (True), none of them (False)."""
        with self._db.db(write=False) as conn:
            rows = conn.execute(
                f"select run, min(id) m from ops where {IS_PENDING}{_lane(files)} group by run order by run != '', m"
            ).fetchall()
        return [r[0] for r in rows]

    def pending_ops(self, run: str, limit: int, upto: int | None = None, *, files: bool | None = None) -> list[Op]:
        """Pending ops of `run`, oldest first, with ids up to `upto` (the end of a delivery round); `files` as in
        runs_with_pending."""
        with self._db.db(write=False) as conn:
            rows = conn.execute(
                "select id, run, kind, key, value, ts, step, body, attempts, epoch from ops "
                f"where {IS_PENDING}{_lane(files)} and run=? and id<=? order by id limit ?",
                (run, upto if upto is not None else 2**62, limit),
            ).fetchall()
        return [Op(*row) for row in rows]

    def first_file(self, run: str) -> int | None:
        """The oldest file upload of `run` not delivered yet (its row id), or None."""
        with self._db.db(write=False) as conn:
            (first,) = conn.execute(
                f"select min(id) from ops where run=? and {IS_UNDELIVERED}{_lane(True)}", (run,)
            ).fetchone()
        return first

    def superseded(self, op: Op, before: int | None = None) -> bool:
        """Whether a later, still undelivered upload to the same run and artifact path makes `op`'s pointless.

        MLflow keeps only the last file at a path, so after an outage a file refreshed every 30 s (console.log)
        goes up once, not once per refresh. The later copy must still be on disk to count, and be older than row
        `before` when given (an end status that waits for `op`: delivery/operations.py).
        """
        if op.kind != ARTIFACT:
            return False
        with self._db.db(write=False) as conn:
            rows = conn.execute(
                f"select body from ops where id>? and id<? and run=? and kind=? and key=? and {IS_UNDELIVERED}",
                (op.id, before if before is not None else 2**62, op.run, ARTIFACT, op.key),
            ).fetchall()
        return any(self._spool.path(json.loads(body)["spool"]).is_file() for (body,) in rows)

    def replaced_files(self, run: str, path: str) -> list[tuple[int, str, int]]:
        """Pending uploads to `run`'s artifact `path` that a copy logged now replaces: (row, spool name, size).

        Not those logged before an end status still on its way: the server must see the run end with them.
        """
        with self._db.db(write=False) as conn:
            rows = conn.execute(
                f"select id, body from ops where run=? and kind=? and key=? and {IS_PENDING} order by id",
                (run, ARTIFACT, path),
            ).fetchall()
            ends = conn.execute(
                f"select id, body from ops where run=? and kind=? and {IS_UNDELIVERED}", (run, UPDATE_RUN)
            ).fetchall()
        last_end = max((i for i, body in ends if json.loads(body).get("status") not in (None, "RUNNING")), default=0)
        found = []
        for op_id, body in rows:
            spec = json.loads(body)
            if op_id > last_end and spec.get("spool"):
                found.append((op_id, spec["spool"], int(spec.get("size") or 0)))
        return found

    def drop_replaced(self, ids: list[int]) -> int:
        """Delete the replaced uploads `ids` that are still pending (a sender may have claimed one meanwhile) and
        their spooled copies; the bytes freed."""
        spool = []
        with self._db.db() as conn:
            for op_id in ids:
                row = conn.execute(f"select body from ops where id=? and {IS_PENDING}", (op_id,)).fetchone()
                if row is None:
                    continue
                _count_deleted(conn, conn.execute("delete from ops where id=?", (op_id,)).rowcount)
                conn.execute("delete from uploads where op=?", (op_id,))
                spool.append(json.loads(row[0])["spool"])
            if spool:
                _count_settled(conn)
        before = self._spool.bytes
        for name in spool:
            self._spool.discard(name)
        return before - self._spool.bytes

    def claim(self, ids: list[int]) -> bool:
        """Mark `ids` in-flight, all or nothing: False when another sender took any of them."""
        try:
            with self._db.db() as conn:
                changed = 0
                for chunk in _chunks(ids, 500):
                    marks = ",".join("?" * len(chunk))
                    changed += conn.execute(
                        f"update ops set {IS_IN_FLIGHT} where {IS_PENDING} and id in ({marks})", chunk
                    ).rowcount
                if changed != len(ids):
                    raise _ClaimLost()
        except _ClaimLost:
            return False
        return True

    def complete(self, ids: list[int], *, spool: Iterable[str] = ()) -> None:
        """The server has these: forget them (done), and their spooled files."""
        with self._db.db() as conn:
            spool = list(spool)
            for chunk in _chunks(ids, 500):
                deleted = conn.execute(f"delete from ops where id in ({','.join('?' * len(chunk))})", chunk).rowcount
                _count_deleted(conn, deleted)
                if spool:  # an artifact row: its upload's state goes with it
                    conn.execute(f"delete from uploads where op in ({','.join('?' * len(chunk))})", chunk)
            _count_settled(conn)
        for name in spool:
            self._spool.discard(name)

    def settled(self) -> int:
        """A counter that moves whenever rows leave the undelivered set (see the `settled` table)."""
        with self._db.db(write=False) as conn:
            row = conn.execute("select n from settled").fetchone()
        return row[0] if row else 0

    def release(self, ids: list[int]) -> None:
        """Not delivered this time: back to pending, one more attempt counted."""
        with self._db.db() as conn:
            for chunk in _chunks(ids, 500):
                conn.execute(
                    f"update ops set {IS_PENDING}, attempts=attempts+1 "
                    f"where {IS_IN_FLIGHT} and id in ({','.join('?' * len(chunk))})",
                    chunk,
                )

    def bury(self, ids: list[int], error: str, *, reason: str) -> None:
        """The server refused this entry for good: keep it as a dead letter with the server's message.

        A dead artifact's spooled copy is deleted: nothing will upload it, and it counts against the limit.
        """
        spool: list[str | None] = []  # the copies the artifact rows name (None: a body naming none)
        with self._db.db() as conn:
            for chunk in _chunks(ids, 500):
                rows = conn.execute(
                    f"select body from ops where kind=? and id in ({','.join('?' * len(chunk))})", (ARTIFACT, *chunk)
                ).fetchall()
                spool.extend(json.loads(body).get("spool") for (body,) in rows if body)
            conn.executemany(
                f"update ops set {IS_DEAD}, error=?, reason=? where id=?", [(error[:2000], reason, i) for i in ids]
            )
            conn.executemany("delete from uploads where op=?", [(i,) for i in ids])
            _count_settled(conn)
        for name in spool:
            if name:
                self._spool.discard(name)

    def backlog(self) -> Backlog:
        self._move_intake()
        with self._db.db(write=False) as conn:
            rows = conn.execute("select run, state, count(*) from ops group by run, state").fetchall()
            oldest = conn.execute(f"select min(created) from ops where {IS_UNDELIVERED}").fetchone()[0]
        result = Backlog(oldest_created=oldest, unmoved=self._unmoved())
        for run, state, count in rows:
            bucket = result.dead if state == DEAD else result.pending
            bucket[run] = bucket.get(run, 0) + count
        return result

    def retry_dead(self, ids: list[int] | None = None) -> int:
        """Dead letters (all, or `ids`) back to pending with their tries reset; how many."""
        where, args = _ids_clause(ids)
        with self._db.db() as conn:
            # Its lineage's mark may already be past it (a dead letter counts as done for the marks, marks.py):
            # without one it is sent, never taken for a row a copy delivered.
            return conn.execute(
                f"update ops set {IS_PENDING}, attempts=0, error=null, reason=null, epoch=null where {IS_DEAD}{where}",
                args,
            ).rowcount

    def drop_dead(self, ids: list[int] | None = None) -> int:
        """Delete dead letters (all, or `ids`) for good; how many."""
        where, args = _ids_clause(ids)
        with self._db.db() as conn:
            deleted = conn.execute(f"delete from ops where {IS_DEAD}{where}", args).rowcount
            _count_deleted(conn, deleted)
            return deleted

    def dead_letters(self) -> list[DeadLetter]:
        with self._db.db(write=False) as conn:
            rows = conn.execute(
                "select id, run, kind, key, value, ts, step, body, attempts, error, reason from ops "
                f"where {IS_DEAD} order by id"
            ).fetchall()
        return [DeadLetter(Op(*row[:9]), row[9], row[10]) for row in rows]

    def spool_names(self) -> set[str]:
        """Spool files that undelivered rows refer to."""
        with self._db.db(write=False) as conn:
            rows = conn.execute(f"select body from ops where kind=? and {IS_UNDELIVERED}", (ARTIFACT,)).fetchall()
        return {json.loads(body).get("spool") for (body,) in rows if body}

    def spool_referenced(self, name: str) -> bool:
        with self._db.db(write=False) as conn:
            rows = conn.execute(
                f"select body from ops where kind=? and {IS_UNDELIVERED} and body like ?", (ARTIFACT, f'%"{name}"%')
            ).fetchall()
        return any(json.loads(body).get("spool") == name for (body,) in rows)


def _lane(files: bool | None) -> str:
    """The condition (appended with `and`) of one delivery lane's rows: file uploads, or everything else."""
    if files is None:
        return ""
    return f" and kind {'=' if files else '!='} '{ARTIFACT}'"


def _count_settled(conn: sqlite3.Connection) -> None:
    conn.execute("insert into settled(id, n) values(0, 1) on conflict(id) do update set n = n + 1")


def _count_deleted(conn: sqlite3.Connection, rows: int) -> None:
    """Count rows deleted from ops (database.py's ops_deleted), in the transaction that deletes them."""
    if rows:
        conn.execute(
            "insert into ops_deleted(id, n) values(0, ?) on conflict(id) do update set n = n + excluded.n", (rows,)
        )


def _ids_clause(ids: list[int] | None) -> tuple[str, list[int]]:
    if ids is None:
        return "", []
    return f" and id in ({','.join('?' * len(ids))})", list(ids)


class _ClaimLost(Exception):
    """Another sender claimed rows first (rolled back by db())."""


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
