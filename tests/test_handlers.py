"""The table from journal op kind to handler (bridge/client/delivery/handlers.py): every kind the plugins write has
one, nothing registers itself by being imported, and a kind the table lacks is a named dead letter."""

from __future__ import annotations

import pytest

from bridge.client.delivery import handlers
from bridge.client.delivery.batch import BATCH_KINDS
from bridge.client.delivery.heartbeat import Heartbeats
from bridge.client.delivery.operations import UNKNOWN_OPERATION, Operations
from bridge.client.journal import Journal, Op
from bridge.client.journal import kinds as K
from bridge.client.link import Link
from bridge.errors import HttpError, UndeliverableError
from tests.support.transport import FaultTransport

#: Names in kinds.py that are not op kinds.
_NOT_OP_KINDS = {
    "LOGGED_MODEL",
    "MODEL_VERSION",
    "REGISTERED_MODEL",
    "REGISTRY_KEY",
    "MODEL_KEY_TAG",
    "VERSION_KEY_TAG",
    "ARTIFACT_SCHEME",
    "RUN_ID_TAGS",
    "MARKED_RUN_KINDS",
    "MARKED_EXPERIMENT_KINDS",
    "REGISTRY_KINDS",
}


def _op_kinds() -> set[str]:
    return {getattr(K, name) for name in K.__all__ if name.isupper() and name not in _NOT_OP_KINDS}


def test_every_op_kind_is_batched_or_has_a_handler():
    kinds = _op_kinds()
    assert len(kinds) >= 25, kinds  # the table above is read from kinds.py, not typed twice
    missing = sorted(kinds - set(handlers.HANDLERS) - set(BATCH_KINDS))
    assert missing == [], f"op kinds the sender cannot deliver: {missing}"
    assert set(handlers.HANDLERS) <= kinds, "a handler for a kind kinds.py does not name"
    assert not set(handlers.HANDLERS) & set(BATCH_KINDS)


def test_the_registry_kinds_all_keep_one_order():
    assert set(K.REGISTRY_KINDS) <= set(handlers.HANDLERS)


@pytest.mark.parametrize("kind", sorted(k for k, h in handlers.HANDLERS.items() if h.upsert))
def test_an_upsert_refused_on_its_unique_key_is_tried_again(kind):
    race = HttpError(400, "BAD_REQUEST", "(sqlite3.IntegrityError) UNIQUE constraint failed: experiment_tags.key")
    assert handlers.lost_upsert_race((kind,), race)
    assert not handlers.lost_upsert_race((kind,), HttpError(400, "INVALID_PARAMETER_VALUE", "too long"))


def test_an_insert_refused_on_its_unique_key_stays_refused():
    race = HttpError(400, "BAD_REQUEST", "UNIQUE constraint failed: logged_model_metrics.model_id")
    inserts = [k for k, h in handlers.HANDLERS.items() if not h.upsert]
    assert not handlers.lost_upsert_race(inserts, race)


def test_a_kind_the_table_lacks_is_a_named_dead_letter_not_a_crash(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite")
    link = Link("http://127.0.0.1:9", "t", transport=FaultTransport())
    ops = Operations(link, journal, Heartbeats(link, journal, 60.0))
    op = Op(1, "run", "written_by_a_newer_bridge", None, None, None, None, "{}", 0)
    with pytest.raises(UndeliverableError) as raised:
        handlers.apply(ops, op)
    assert raised.value.reason == UNKNOWN_OPERATION
    assert not handlers.must_wait(ops, op)
    journal.close()
