"""The SuperLink's LinkState patches: a message is handed out only once its whole object tree is stored."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.server.superlink.linkstate import sql_linkstate
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.superlink.config_loader import get_federation_manager, get_objectstore_linkstate_factories
from sqlalchemy import event, text

from server import superlink_runs, superlink_state


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
    monkeypatch.setattr(cls, "get_message_ins", cls.get_message_ins)
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


def install_complete_claims(monkeypatch) -> None:
    """Install the complete-only claims and idle polls on SqlLinkState; monkeypatch undoes them afterwards."""
    cls = sql_linkstate.SqlLinkState
    for name in ("get_message_ins", "_claim_message_ins_rows"):
        monkeypatch.setattr(cls, name, getattr(cls, name))
    assert superlink_state.patch_complete_claims()


@pytest.fixture
def linkstate(tmp_path, monkeypatch):
    """A real SQLite LinkState with the complete-only claims and idle polls installed (undone afterwards)."""
    install_complete_claims(monkeypatch)
    _, factory = get_objectstore_linkstate_factories(str(tmp_path / "state.db"), get_federation_manager())
    return factory.state()


def _statements(state) -> list[str]:
    seen: list[str] = []
    event.listen(state._engine, "before_cursor_execute", lambda conn, cur, stmt, *rest: seen.append(stmt))
    return seen


def test_an_idle_node_is_answered_without_the_database_until_a_message_is_written(linkstate, monkeypatch):
    assert linkstate.get_message_ins(node_id=5, limit=1) == []
    seen = _statements(linkstate)
    assert linkstate.get_message_ins(node_id=5, limit=1) == []
    assert seen == []  # remembered: no transaction at all
    assert linkstate.get_message_ins(node_id=6, limit=1) == [] and seen  # another node reads
    with linkstate.session() as session:  # any write to message_ins (here: one that changes nothing)
        session.execute(text("DELETE FROM message_ins WHERE 0"))
    seen.clear()
    assert linkstate.get_message_ins(node_id=5, limit=1) == []
    assert any("message_ins" in stmt for stmt in seen)  # read again
    seen.clear()
    clock = superlink_runs.time.monotonic() + superlink_state.IDLE_TTL_S + 1
    monkeypatch.setattr(superlink_runs.time, "monotonic", lambda: clock)
    assert linkstate.get_message_ins(node_id=5, limit=1) == []
    assert seen  # expired: read again


def test_message_writes_are_recognized():
    class Context:
        isinsert, isupdate, isdelete = True, False, False

        def __init__(self, table: str) -> None:
            self.compiled = type(
                "C", (), {"statement": type("S", (), {"table": type("T", (), {"name": table})})}
            )

    assert superlink_state.writes_messages("INSERT INTO message_ins ...", Context("message_ins"))
    assert not superlink_state.writes_messages("INSERT INTO objects ...", Context("objects"))
    assert superlink_state.writes_messages("DELETE FROM message_ins", None)
    assert not superlink_state.writes_messages("SELECT * FROM message_ins", None)
