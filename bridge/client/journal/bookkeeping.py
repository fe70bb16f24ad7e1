"""What delivery keeps beside the queue: the lineage of each opening of the file, the delivery marks owed to the
server (delivery/marks.py), and the runs watched for a late create's twin (delivery/operations.py `remove_twins`).
"""

from __future__ import annotations

import time
import uuid

from bridge.client.journal.database import Database
from bridge.client.journal.kinds import ARTIFACT, MARKED_EXPERIMENT_KINDS, MARKED_RUN_KINDS
from bridge.client.journal.queue import IS_UNDELIVERED


class Bookkeeping:
    """Lineage, owed marks and twin watches of one journal's `Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._epoch_uids: dict[int, str | None] = {}

    def open_lineage(self) -> int:
        """A lineage for this opening: a copy of the file opened elsewhere never shares it with what is written
        here from now on (delivery/marks.py). Its number is the `epoch` of every row this opening writes."""
        with self._db.db() as conn:
            epoch = conn.execute(
                "insert into lineage(uid, created) values(?,?)", (uuid.uuid4().hex, time.time())
            ).lastrowid
            assert epoch is not None  # the row the insert made
            return epoch

    def epoch_uid(self, epoch: int | None) -> str | None:
        """The lineage uid of rows written with `epoch` (Op.epoch); None when unknown (a repaired journal)."""
        if epoch is None:
            return None
        if epoch not in self._epoch_uids:
            with self._db.db(write=False) as conn:
                row = conn.execute("select uid from lineage where n=?", (epoch,)).fetchone()
            self._epoch_uids[epoch] = row[0] if row else None
        return self._epoch_uids[epoch]

    def owe_marks(self, done: dict[tuple[str, str], int]) -> None:
        """Rows up to these ids, per (scope, lineage uid), were delivered or set aside: their marks are owed."""
        with self._db.db() as conn:
            conn.executemany(
                "insert into owed_marks(scope, uid, done) values(?,?,?) on conflict(scope, uid) "
                "do update set done=max(done, excluded.done)",
                [(scope, uid, n) for (scope, uid), n in done.items()],
            )

    def owed_marks(self, scope: str | None = None) -> dict[str, dict[str, int]]:
        """{scope: {uid: mark}}: what may be sent now — each owed mark kept below the first row of its scope and
        lineage that is not done yet (a batch split by a pause can deliver rows past one still waiting)."""
        with self._db.db(write=False) as conn:
            rows = conn.execute(
                "select scope, uid, done from owed_marks" + (" where scope=?" if scope else ""),
                (scope,) if scope else (),
            ).fetchall()
            result: dict[str, dict[str, int]] = {}
            for owner, uid, done in rows:
                kind, _, local_id = owner.partition(":")
                if kind in ("run", "files"):  # a run's records, or its files: each lane's rows go in order
                    lane = sorted(MARKED_RUN_KINDS - {ARTIFACT}) if kind == "run" else [ARTIFACT]
                    where, args = ("run=? and kind in ({})".format(",".join("?" * len(lane))), (local_id, *lane))
                else:
                    where, args = (
                        "run='' and kind in ({}) and json_extract(body, '$.experiment_id')=?".format(
                            ",".join("?" * len(MARKED_EXPERIMENT_KINDS))
                        ),
                        (*sorted(MARKED_EXPERIMENT_KINDS), local_id),
                    )
                (first,) = conn.execute(
                    f"select min(id) from ops where {IS_UNDELIVERED} and {where} and "
                    "epoch in (select n from lineage where uid=?)",
                    (*args, uid),
                ).fetchone()
                mark = done if first is None else min(done, first - 1)
                if mark > 0:
                    result.setdefault(owner, {})[uid] = mark
        return result

    def marks_sent(self, scope: str, marks: dict[str, int]) -> None:
        """The server holds these marks of `scope`: what they cover is owed no more."""
        with self._db.db() as conn:
            conn.executemany(
                "delete from owed_marks where scope=? and uid=? and done<=?",
                [(scope, uid, n) for uid, n in marks.items()],
            )

    def drop_owed_marks(self, scope: str) -> None:
        with self._db.db() as conn:
            conn.execute("delete from owed_marks where scope=?", (scope,))

    def twin_watches(self) -> dict[str, float]:
        """{local run id: when its watch may end (time.time())}."""
        with self._db.db(write=False) as conn:
            return dict(conn.execute("select run, due from twin_watch").fetchall())

    def unwatch_twins(self, run: str) -> None:
        with self._db.db() as conn:
            conn.execute("delete from twin_watch where run=?", (run,))
