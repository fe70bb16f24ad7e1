"""Local ↔ server ids, in one place: the experiments, runs and entities (logged models, model versions, registered
models) created here, under the ids MLflow was given here, and the server's ids once the sender created them there.
"""

from __future__ import annotations

import os
import socket
import uuid

from bridge.client.journal.database import Database
from bridge.client.journal.kinds import LOGGED_MODEL
from bridge.client.journal.records import EntityRecord, ExperimentRecord, RunRecord
from bridge.processes import pid_alive

#: This machine: a run's owner process is looked for only on the host that created it.
HOST = socket.gethostname()

#: The UUID version nibble of the run ids issued here. MLflow's servers make run ids with `uuid4().hex` (version
#: 4); ids issued here carry version 8 (RFC 9562's "custom"), so a run id can be told local even when the
#: journal lost the run's row (a torn copy): its entries must never be sent as if it were the server's.
LOCAL_RUN_VERSION = "8"


def new_local_run_id() -> str:
    """A fresh local run id: 32 hex digits like MLflow's own, with version nibble `LOCAL_RUN_VERSION`."""
    digits = uuid.uuid4().hex
    return digits[:12] + LOCAL_RUN_VERSION + digits[13:]


def is_local_run_id(run_id: str) -> bool:
    """Whether `run_id` was issued here (by `new_local_run_id`), whether or not the journal still has its row."""
    if len(run_id) != 32 or run_id[12] != LOCAL_RUN_VERSION:
        return False
    try:
        int(run_id, 16)
    except ValueError:
        return False
    return True


class IdMaps:
    """Lookups and mappings of the ids of one journal's `Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def experiment_by_name(self, name: str) -> ExperimentRecord | None:
        with self._db.db(write=False) as conn:
            row = conn.execute("select local_id, name, remote_id from experiments where name=?", (name,)).fetchone()
        return ExperimentRecord(*row) if row else None

    def experiment(self, local_id: str) -> ExperimentRecord | None:
        with self._db.db(write=False) as conn:
            row = conn.execute(
                "select local_id, name, remote_id from experiments where local_id=?", (local_id,)
            ).fetchone()
        return ExperimentRecord(*row) if row else None

    def experiment_for_remote(self, remote_id: str) -> ExperimentRecord | None:
        with self._db.db(write=False) as conn:
            row = conn.execute(
                "select local_id, name, remote_id from experiments where remote_id=?", (remote_id,)
            ).fetchone()
        return ExperimentRecord(*row) if row else None

    def run(self, local_id: str) -> RunRecord | None:
        with self._db.db(write=False) as conn:
            row = conn.execute(
                "select local_id, remote_id, experiment_id, name, user_id, start_time, end_time, "
                "status, artifact_uri from runs where local_id=?",
                (local_id,),
            ).fetchone()
        return RunRecord(*row) if row else None

    def run_for_remote(self, remote_id: str) -> RunRecord | None:
        with self._db.db(write=False) as conn:
            row = conn.execute(
                "select local_id, remote_id, experiment_id, name, user_id, start_time, end_time, "
                "status, artifact_uri from runs where remote_id=?",
                (remote_id,),
            ).fetchone()
        return RunRecord(*row) if row else None

    def server_experiment_id(self, experiment_id: str) -> str | None:
        """The server's id of `experiment_id`: its mapping when local (None until created there), else itself."""
        record = self.experiment(experiment_id)
        return experiment_id if record is None else record.remote_id

    def server_run(self, run_id: str) -> tuple[str | None, str | None]:
        """(server run id, server artifact root) of `run_id`; a run not created here is the server's own.

        A logged model created here answers too: its artifacts are journaled under its local id (models.py).
        A local run id whose row this journal lost (`row_lost`) has no server id: (None, None).
        """
        record = self.run(run_id)
        if record is None and run_id.startswith("m-"):
            model = self.entity(LOGGED_MODEL, run_id)
            if model is not None:
                return model.remote_id, model.location
        if record is None:
            return (None, None) if is_local_run_id(run_id) else (run_id, None)
        return record.remote_id, record.artifact_uri

    def row_lost(self, run_id: str) -> bool:
        """Whether `run_id` was issued here but the journal no longer has its row (a torn or damaged copy)."""
        return is_local_run_id(run_id) and self.run(run_id) is None

    def local_experiment_id(self, server_id: str) -> str:
        """The id this process knows a server experiment by: the local id it was created under, else the server's."""
        record = self.experiment_for_remote(server_id)
        return server_id if record is None else record.local_id

    def local_run_id(self, server_id: str) -> str:
        record = self.run_for_remote(server_id)
        return server_id if record is None else record.local_id

    def runs_of_live_processes(self) -> set[str]:
        """RUNNING runs created by other processes of this machine that are still alive (DataLoader workers,
        DDP children): whoever delivers this journal keeps them beating."""
        with self._db.db(write=False) as conn:
            rows = conn.execute(
                "select local_id, owner_pid from runs where status='RUNNING' and owner_host=? "
                "and owner_pid is not null and owner_pid != ?",
                (HOST, os.getpid()),
            ).fetchall()
        return {run for run, pid in rows if pid_alive(pid)}

    def run_created_at(self, local_id: str) -> float | None:
        """When the run was journaled (seconds since the epoch)."""
        with self._db.db(write=False) as conn:
            row = conn.execute("select created from runs where local_id=?", (local_id,)).fetchone()
        return row[0] if row else None

    def runs(self) -> list[RunRecord]:
        with self._db.db(write=False) as conn:
            rows = conn.execute(
                "select local_id, remote_id, experiment_id, name, user_id, start_time, end_time, "
                "status, artifact_uri from runs order by created"
            ).fetchall()
        return [RunRecord(*row) for row in rows]

    def entity(self, kind: str, local_id: str) -> EntityRecord | None:
        with self._db.db(write=False) as conn:
            row = conn.execute(
                "select local_id, remote_id, location, body from entities where kind=? and local_id=?", (kind, local_id)
            ).fetchone()
        return EntityRecord(*row) if row else None

    def entity_for_remote(self, kind: str, remote_id: str) -> EntityRecord | None:
        with self._db.db(write=False) as conn:
            row = conn.execute(
                "select local_id, remote_id, location, body from entities where kind=? and remote_id=?",
                (kind, remote_id),
            ).fetchone()
        return EntityRecord(*row) if row else None

    def entities(self, kind: str) -> list[EntityRecord]:
        with self._db.db(write=False) as conn:
            rows = conn.execute(
                "select local_id, remote_id, location, body from entities where kind=? order by created", (kind,)
            ).fetchall()
        return [EntityRecord(*row) for row in rows]

    def map_experiment(self, local_id: str, remote_id: str) -> None:
        with self._db.db() as conn:
            conn.execute("update experiments set remote_id=? where local_id=?", (remote_id, local_id))

    def map_run(
        self, local_id: str, remote_id: str, artifact_uri: str | None, *, watch_twins_until: float | None = None
    ) -> None:
        """`local_id` is `remote_id` on the server; with `watch_twins_until`, in the same transaction, a late
        try of its create may still land (twin_watch)."""
        with self._db.db() as conn:
            conn.execute(
                "update runs set remote_id=?, artifact_uri=? where local_id=?", (remote_id, artifact_uri, local_id)
            )
            if watch_twins_until is not None:
                conn.execute(
                    "insert into twin_watch(run, due) values(?,?) on conflict(run) do update set "
                    "due=max(due, excluded.due)",
                    (local_id, watch_twins_until),
                )

    def map_entity(self, kind: str, local_id: str, remote_id: str, location: str | None = None) -> None:
        with self._db.db() as conn:
            conn.execute(
                "update entities set remote_id=?, location=coalesce(?, location) where kind=? and local_id=?",
                (remote_id, location, kind, local_id),
            )

    def experiments(self) -> list[ExperimentRecord]:
        """Every experiment created here, oldest first."""
        with self._db.db(write=False) as conn:
            rows = conn.execute("select local_id, name, remote_id from experiments order by created").fetchall()
        return [ExperimentRecord(*row) for row in rows]
