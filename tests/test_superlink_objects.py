"""Object trees preregistered and read with prebuilt statements: Flower's rows, results and errors."""

from __future__ import annotations

import hashlib

import pytest
from flwr.proto.message_pb2 import ObjectTree
from flwr.supercore.object_store import sql_object_store
from flwr.superlink.config_loader import get_federation_manager, get_objectstore_linkstate_factories
from sqlalchemy import text

from server import superlink_objects

STOCK = (sql_object_store.SqlObjectStore.preregister, sql_object_store.SqlObjectStore.get_object_tree)


def _id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _tree(name: str, *children: ObjectTree) -> ObjectTree:
    return ObjectTree(object_id=_id(name), children=list(children))


SHARED = _tree("shared")
FIRST = _tree("message-1", _tree("record", _tree("array-a"), SHARED), _tree("config"))
SECOND = _tree("message-2", _tree("record-2", SHARED))


def _store(path):
    objects, _ = get_objectstore_linkstate_factories(str(path), get_federation_manager())
    return objects.store()


def _rows(store) -> dict[str, list]:
    with store.session() as session:
        return {
            table: sorted(tuple(row) for row in session.execute(text(f"SELECT {cols} FROM {table}")))
            for table, cols in (
                ("objects", "object_id, is_available, ref_count, length(content)"),
                ("object_children", "parent_id, child_id"),
                ("run_objects", "run_id, object_id"),
            )
        }


def _script(store) -> list:
    """Preregister, put, re-preregister and read trees; every result or error, then the rows."""
    out: list = [store.preregister(7, FIRST)]
    with store.session() as session:  # as if its content had been pushed
        session.execute(
            text("UPDATE objects SET is_available = 1 WHERE object_id = :id"), {"id": _id("array-a")}
        )
    for run_id, tree in ((7, FIRST), (8, SECOND), (7, _tree("message-1", _tree("other")))):
        try:
            out.append(store.preregister(run_id, tree))
        except ValueError as err:
            out.append(str(err))
    for bad in (ObjectTree(object_id="not-a-hash"), _tree("dup", SHARED, SHARED)):
        with pytest.raises(ValueError) as err:
            store.preregister(7, bad)
        out.append(str(err.value))
    out.append(store.get_object_tree(_id("message-1")))
    with pytest.raises(Exception) as missing:
        store.get_object_tree(_id("nope"))
    out.append((type(missing.value).__name__, str(missing.value)))
    return [*out, _rows(store)]


def test_prebuilt_statements_give_flowers_results_and_rows(tmp_path, monkeypatch):
    cls = sql_object_store.SqlObjectStore
    monkeypatch.setattr(cls, "preregister", STOCK[0])
    monkeypatch.setattr(cls, "get_object_tree", STOCK[1])
    want = _script(_store(tmp_path / "stock.db"))
    assert superlink_objects.patch_object_statements()
    assert cls.preregister is not STOCK[0]
    got = _script(_store(tmp_path / "fast.db"))
    assert got == want
    assert "different children" in want[3]  # both paths of Flower's code were taken
    assert _id("array-a") in want[0] and _id("array-a") not in want[1]  # stored objects are not asked again
