"""How journal rows become one MLflow `log_batch` request: MLflow's limits, merging, and proto3 JSON numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bridge.client.journal import METRIC, PARAM, TAG, Op, decode_value

#: MLflow's log_batch limits (mlflow.utils.validation).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_ENTRIES_PER_BATCH = 1000
#: The kinds that travel in log_batch; every other kind is a request of its own.
BATCH_KINDS = (METRIC, PARAM, TAG)


def json_number(value: float) -> float | str:
    """Proto3 JSON spells the non-finite doubles as strings; bare NaN is not JSON."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


@dataclass
class Entry:
    """One log_batch entry; several journal rows when identical params or repeated tags were merged."""

    kind: str
    key: str
    value: str | float | None  # as Op.value
    ts: int | None = None
    step: int | None = None
    ids: list[int] = field(default_factory=list)
    attempts: int = 0  # the most tries any of its rows has had (for moving a poison entry aside)

    def payload(self) -> dict:
        if self.kind == METRIC:
            return {
                "key": self.key,
                "value": json_number(decode_value(self.value)),
                "timestamp": self.ts,
                "step": self.step or 0,
            }
        return {"key": self.key, "value": self.value}


def batch_body(server_run_id: str, entries: list[Entry]) -> dict:
    """The log_batch request body for `entries` of one run."""
    return {
        "run_id": server_run_id,
        "metrics": [e.payload() for e in entries if e.kind == METRIC],
        "params": [e.payload() for e in entries if e.kind == PARAM],
        "tags": [e.payload() for e in entries if e.kind == TAG],
    }


class Batch:
    """Entries of one run that fit one log_batch request and keep their meaning together."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.params: dict[str, Entry] = {}
        self.tags: dict[str, Entry] = {}
        self.metrics = 0

    def __bool__(self) -> bool:
        return bool(self.entries)

    @property
    def ids(self) -> list[int]:
        return [i for entry in self.entries for i in entry.ids]

    def has_room_for_tags(self, keys: list[str]) -> bool:
        """Whether more tags `keys` fit MLflow's limits without touching what the batch already says."""
        return (
            len(self.entries) + len(keys) <= MAX_ENTRIES_PER_BATCH
            and len(self.tags) + len(keys) <= MAX_TAGS_PER_BATCH
            and not any(k in self.tags for k in keys)
        )

    def add(self, op: Op) -> bool:
        """Take `op` if it fits MLflow's limits and keeps the batch's meaning; False means send first."""
        if len(self.entries) >= MAX_ENTRIES_PER_BATCH:
            return False
        key = op.named()  # every kind that travels in log_batch has one
        if op.kind == METRIC:
            if self.metrics >= MAX_METRICS_PER_BATCH:
                return False
            self.metrics += 1
            self.entries.append(Entry(METRIC, key, op.value, op.ts, op.step, [op.id], op.attempts))
        elif op.kind == PARAM:
            seen = self.params.get(key)
            if seen is not None:
                if seen.value != op.value:
                    return False  # a changed value must reach the server on its own (and be refused there)
                seen.ids.append(op.id)
                seen.attempts = max(seen.attempts, op.attempts)
                return True
            if len(self.params) >= MAX_PARAMS_PER_BATCH:
                return False
            self.params[key] = entry = Entry(PARAM, key, op.value, ids=[op.id], attempts=op.attempts)
            self.entries.append(entry)
        else:
            seen = self.tags.get(key)
            if seen is not None:
                seen.value = op.value  # tags overwrite: only the last value matters
                seen.ids.append(op.id)
                seen.attempts = max(seen.attempts, op.attempts)
                return True
            if len(self.tags) >= MAX_TAGS_PER_BATCH:
                return False
            self.tags[key] = entry = Entry(TAG, key, op.value, ids=[op.id], attempts=op.attempts)
            self.entries.append(entry)
        return True
