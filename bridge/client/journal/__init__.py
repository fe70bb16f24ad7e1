"""The durable journal: every MLflow write of this process waits here until the sender has delivered it.

kinds.py     what can wait here: the op kinds, entity kinds and the keys writer and sender share
records.py   what a reader gets back: Op, DeadLetter, RunRecord, EntityRecord, Backlog
journal.py   `Journal`: the write interface of the calls, and the parts below put together
database.py  the SQLite file: WAL, one connection per thread, `db()` transactions, schema, integrity and repair
queue.py     the op queue: pending → in-flight → done or dead, claimed all-or-nothing, dead letters, the backlog
ids.py       local ↔ server ids of experiments, runs and entities (logged models, versions, registered models)
bookkeeping.py  the lineage of each opening, delivery marks owed to the server, runs watched for late twins
intake.py    the hot path of a metric point: one write() to an append-only file, moved into SQLite later
spool.py     a private copy of every logged file, with its sha256, until it is uploaded
"""

from bridge.client.journal.journal import Journal, journal_limit, journal_path
from bridge.client.journal.kinds import *  # noqa: F403  (the kinds are the journal's vocabulary)
from bridge.client.journal.kinds import __all__ as _kinds
from bridge.client.journal.queue import DEAD, IN_FLIGHT, PENDING, STATE_NAMES
from bridge.client.journal.records import (
    Backlog,
    DeadLetter,
    EntityRecord,
    ExperimentRecord,
    Op,
    RepairReport,
    RunRecord,
    decode_value,
    encode_value,
)

__all__ = [
    "DEAD",
    "IN_FLIGHT",
    "PENDING",
    "STATE_NAMES",
    "Backlog",
    "DeadLetter",
    "EntityRecord",
    "ExperimentRecord",
    "Journal",
    "Op",
    "RepairReport",
    "RunRecord",
    "decode_value",
    "encode_value",
    "journal_limit",
    "journal_path",
    *_kinds,
]
