"""The SuperLink's LinkState patches: a message is handed out only once its whole object tree is stored."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.server.superlink.linkstate import sql_linkstate
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.superlink.config_loader import get_federation_manager, get_objectstore_linkstate_factories

from server import superlink_state


@pytest.fixture
def store(tmp_path):
    """A real SQLite object store (the SuperLink's)."""
    _, factory = get_objectstore_linkstate_factories(str(tmp_path / "state.db"), get_federation_manager())
    return factory.state().object_store


def _message() -> RecordDict:
    """A message's content: a tree of objects (records, arrays) as the ServerApp pushes them."""
    return RecordDict(
        {
            "params": ArrayRecord([np.arange(4.0), np.ones((2, 3))]),
            "config": ConfigRecord({"stage": "collect_masked_vectors"}),
        }
    )


def test_the_objects_of_a_message_are_missing_until_all_are_stored(store):
    message = _message()
    objects = get_all_nested_objects(message)
    store.preregister(1, get_object_tree(message))
    assert superlink_state._missing_objects(store, message.object_id) == len(objects) > 4
    for count, (object_id, obj) in enumerate(objects.items(), start=1):
        store.put(object_id, obj.deflate())
        assert superlink_state._missing_objects(store, message.object_id) == len(objects) - count
    assert superlink_state._missing_objects(store, "an-unknown-id") == 0  # nothing to wait for


def test_a_poll_claims_only_a_complete_message(monkeypatch):
    cls = sql_linkstate.SqlLinkState
    claimed: list = []
    monkeypatch.setattr(
        cls, "_claim_message_ins_rows", lambda self, n, limit, run=None: claimed.append(n) or ["m"]
    )
    assert superlink_state.patch_complete_claims()
    state = type("State", (), {"object_store": object()})()
    missing = {"m1": 3}
    monkeypatch.setattr(superlink_state, "_next_message", lambda st, models, node, run: next_id[0])
    monkeypatch.setattr(superlink_state, "_missing_objects", lambda store, mid: missing.get(mid, 0))
    claim = cls._claim_message_ins_rows
    next_id = [None]
    assert claim(state, 5, 1) == [] and claimed == []  # nothing to hand out: no claim (no write)
    now = sql_linkstate.now().timestamp()
    next_id[0] = ("m1", now)
    assert claim(state, 5, 1) == [] and claimed == []  # its objects are still being pushed
    missing["m1"] = 0
    assert claim(state, 5, 1) == ["m"] and claimed == [5]  # complete: Flower's own claim
    assert claim(state, 6, None) == ["m"] and claimed == [5, 6]  # other callers are not gated
    missing["m2"], next_id[0] = 3, ("m2", now - superlink_state.HOLD_S - 1)
    assert claim(state, 7, 1) == ["m"] and claimed == [5, 6, 7]  # stuck (its pusher died): not held forever
