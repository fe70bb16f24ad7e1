"""The journal's records as its readers see them: an op, a dead letter, a run, an entity, the backlog."""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple


@dataclass(frozen=True)
class Op:
    """One journaled write, as the sender sees it."""

    id: int
    run: str
    kind: str
    key: str | None
    #: A metric's number (REAL, or INTEGER as logged; 'NaN' for NaN), a param's or tag's text; None for the rest.
    value: str | float | None
    ts: int | None
    step: int | None
    body: str | None
    attempts: int
    #: The `lineage` row of the Journal that wrote it; None for metric points and rows of older journals.
    epoch: int | None = None

    def json(self) -> dict:
        return json.loads(self.body) if self.body else {}

    def named(self) -> str:
        """`key`, of an op of a kind that is always journaled with one (a metric, param or tag, a tag deletion, an
        experiment's creation, ...)."""
        assert self.key is not None, f"{self.kind} entry {self.id} has no key"
        return self.key

    def text(self) -> str:
        """`value`, of a param or tag op: always journaled as text (Journal.append_batch)."""
        assert isinstance(self.value, str), f"{self.kind} entry {self.id} has no text value"
        return self.value


class DeadLetter(NamedTuple):
    """An entry that will not be delivered as it is: why (`reason`) and the message that said so."""

    op: Op
    error: str | None
    reason: str | None


@dataclass(frozen=True)
class RunRecord:
    local_id: str
    remote_id: str | None
    experiment_id: str
    name: str | None
    user_id: str | None
    start_time: int  # always written (Journal.add_run)
    end_time: int | None
    status: str
    artifact_uri: str | None


@dataclass(frozen=True)
class EntityRecord:
    """A logged model or model version created here; `body` is what is known of it locally (JSON)."""

    local_id: str
    remote_id: str | None
    location: str | None
    body: str

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass(frozen=True)
class ExperimentRecord:
    local_id: str
    name: str
    remote_id: str | None


@dataclass(frozen=True)
class RepairReport:
    """What opening a damaged journal did: where the damaged file went and how much was saved.

    `wal_only`: the database was whole and only its WAL was set aside (older than the database, or damaged),
    never applied: the journal holds what its database file held.
    """

    damaged_file: Path
    problem: str
    rows_recovered: int
    rows_lost: int | None  # None when the damage hides how many rows there were
    wal_only: bool = False

    def __str__(self) -> str:
        if self.wal_only:
            return (
                f"journal was damaged: {self.problem}; the WAL was set aside, not applied, and kept as "
                f"{self.damaged_file} (what only it held is not delivered); the journal goes on from its "
                f"database file"
            )
        lost = "an unknown number" if self.rows_lost is None else str(self.rows_lost)
        return (
            f"journal was damaged ({self.problem}); recovered {self.rows_recovered} entries, "
            f"lost {lost}; the damaged file was kept as {self.damaged_file}"
        )


@dataclass
class Backlog:
    """What is waiting in the journal, per run (local id, '' for experiment operations)."""

    pending: dict[str, int] = field(default_factory=dict)
    dead: dict[str, int] = field(default_factory=dict)
    oldest_created: float | None = None
    #: Accepted but not in SQLite yet (metric points and run ends a full disk kept out): waiting all the same.
    unmoved: int = 0

    @property
    def total(self) -> int:
        return sum(self.pending.values()) + self.unmoved


def entry_crc(run: str, kind: str, key: str | None, value, ts: int | None, step: int | None, body: str | None) -> int:
    """The checksum an entry (`ops` row) carries of what it says, so a repair keeps only rows read back whole.

    A torn copy of the database (Drive uploaded it while SQLite wrote it) can hold pages whose cells decode into
    rows that look valid — a known run, `metric`, a value and a step — but were never written (seen: a point
    with ts 0, step 0, value 2.0 in a cut copy). The row id, state and bookkeeping columns are not covered: they
    change as the row is delivered."""
    return zlib.crc32(repr((run, kind, key, value, ts, step, body)).encode())


def encode_value(value: float) -> str | float:
    # SQLite stores a float NaN as NULL; keep it recognisable instead.
    return "NaN" if value != value else value


def decode_value(value: str | float | None) -> float:
    return math.nan if value == "NaN" or value is None else float(value)
